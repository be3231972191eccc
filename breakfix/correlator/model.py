"""Mutable per-incident state inside the correlator, its wire snapshot, and its checkpoint form.

``TrackedIncident`` is what the grouping core (``correlator.grouping``) updates in place for
speed. The core returns ``Change``s that point at it; the service turns each into the frozen
``schemas.IncidentChange`` only when it publishes (``Change.to_wire``), so a storm that
touches one incident a thousand times in one batch costs one snapshot; ``correlator.wire.change_json``
writes the same JSON straight from the tracked state for the service's hot path. ``from_state`` reads
back the form ``correlator.checkpoint`` stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from operator import attrgetter
from typing import Any, Final

from breakfix.schemas.catalog import FaultClass
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.incident import (
    ChangeKind,
    CodeCount,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    Plan,
    TimelineEntry,
    WaitingOn,
)
from breakfix.schemas.signal import Signal

# Most cautious first. Merging two faults into one incident keeps the earlier entry here: the worst repair decides.
# The classes that hand the node to a human come before every automatic ladder, because each ladder ends by
# returning the node to service after a passing diagnostic, which none of their faults allows:
# - CONTACT_SUPPORT ("contact your support organization") and CHECK_MECHANICALS (seating and connections) are not
#   repaired by RESTART_BM or RESET_GPU (NVIDIA Xid catalog, Resolution Buckets): a GPU off the bus (XID 79) or a
#   fatal SXid on a node whose GPU awaits RMA is handled by the human who takes the node for the RMA;
# - a GPU its system's setup leaves out of the NVLink fabric (nvmlGpuFabricInfo_v2 INCORRECT_CONFIGURATION) is not
#   fixed by a reset, reboot or reprovision;
# - UPDATE_SWFW's reprovision reboots the node on the way, so it covers a RESTART_BM.
CATEGORY_PRIORITY: tuple[str, ...] = (
    "unknown_fault",
    "hardware_support",
    "mechanical_inspection",
    "fabric_config",
    "software_update",
    "node_reboot_required",
    "nvswitch_fatal",
    "multi_gpu_failure",
    "gpu_drain_reset_required",
    "gpu_reset_required",
    "nvlink_fault",
    "gpu_suspect",
    "fabric_link",
    "thermal_power",
    "nvswitch_nonfatal",
    "gpu_monitor",
    "endpoint_slo",
    "application_fault",
    "sympathetic",
    "informational",
)
_RANK = {c: i for i, c in enumerate(CATEGORY_PRIORITY)}
# Categories whose repair is the whole node (NVIDIA RESTART_BM): keyed by the node, one incident per node. A fatal
# NVSwitch SXid is one too: the Fabric Manager User Guide has the GPUs and switches reset together after it, which on
# an HGX baseboard is one node reboot (the default policy's nvswitch-fatal rule), so it takes the node's other
# incidents needing a reboot and they take no second one.
NODE_CATEGORIES = frozenset({"node_reboot_required", "nvswitch_fatal"})
# A node's network links (InfiniBand or RoCE ports: ib.link_down, ib.flapping, ib.errors, ib.rate_degraded) are a
# fault domain of their own: their repair is the cable, transceiver or leaf switch, and the same switch failing under
# several nodes is one fabric incident (rules ``topology``). They get their own node incident, ``link|cluster|node``,
# beside the host's (``node|cluster|node``: a GPU off the bus, a node reboot, several GPUs failing), so neither
# takes the other's faults: a reboot does not carry a switch's link, and a link does not hold the reboot's key.
LINK_CATEGORIES = frozenset({"fabric_link"})

TERMINAL = frozenset(st for st in IncidentStatus if st.terminal)  # ``status.terminal`` as one set lookup

# The enum members the core compares with and hands out, as module constants (the same objects: ``inc.scope is
# SCOPE_GPU`` is ``inc.scope is IncidentScope.GPU``). In the compiled core a member read off its class goes through
# ``EnumType.__getattr__`` at every use, as costly as a short call; a ``Final`` name is read as a C static.
SCOPE_GPU: Final = IncidentScope.GPU
SCOPE_NODE: Final = IncidentScope.NODE
SCOPE_TENANT: Final = IncidentScope.TENANT
SCOPE_FABRIC: Final = IncidentScope.FABRIC
DOMAIN_OPERATOR: Final = Domain.OPERATOR
DOMAIN_TENANT: Final = Domain.TENANT
STATUS_OPEN: Final = IncidentStatus.OPEN
STATUS_MITIGATING: Final = IncidentStatus.MITIGATING
STATUS_VALIDATING: Final = IncidentStatus.VALIDATING
STATUS_RESOLVED: Final = IncidentStatus.RESOLVED
STATUS_ESCALATED: Final = IncidentStatus.ESCALATED
STATUS_STALE: Final = IncidentStatus.STALE
KIND_OPENED: Final = ChangeKind.OPENED
KIND_REOPENED: Final = ChangeKind.REOPENED
KIND_UPDATED: Final = ChangeKind.UPDATED
KIND_STATUS: Final = ChangeKind.STATUS
KIND_FOLDED: Final = ChangeKind.FOLDED
KIND_RESOLVED: Final = ChangeKind.RESOLVED

# When one batch holds several changes to one incident, the published kind is the strongest.
KIND_STRENGTH = {ChangeKind.UPDATED: 0, ChangeKind.STATUS: 1, ChangeKind.FOLDED: 2, ChangeKind.RESOLVED: 3,
                 ChangeKind.REOPENED: 4, ChangeKind.OPENED: 5}


def category_rank(category: str) -> int:
    """Lower is more cautious; an unlisted category ranks with ``unknown_fault``."""
    return _RANK.get(category, 0)


def node_key_for(cluster: str, node: str, category: str = "") -> str:
    """The key of a node's own incident for a fault of ``category`` (``LINK_CATEGORIES``: its links' incident)."""
    return link_key_for(cluster, node) if category in LINK_CATEGORIES else f"node|{cluster}|{node}"


def link_key_for(cluster: str, node: str) -> str:
    """The key of the incident of a node's network links (``LINK_CATEGORIES``)."""
    return f"link|{cluster}|{node}"


def incident_id(key: str, first_signal_id: str) -> str:
    return "inc-" + hashlib.sha256(f"{key}\x1f{first_signal_id}".encode()).hexdigest()[:16]


@dataclass(init=False)
class TrackedIncident:
    id: str
    key: str
    cluster: str
    scope: IncidentScope
    node: str | None
    category: str
    severity: Severity
    domain: Domain
    title: str
    first_seen: datetime
    last_seen: datetime
    status: IncidentStatus = IncidentStatus.OPEN
    nodes: dict[str, None] = field(default_factory=dict)  # an ordered set
    gpus: dict[str, GpuRef] = field(default_factory=dict)
    tenants: dict[str, TenantRef] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    checks: dict[str, None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    signal_ids: list[str] = field(default_factory=list)
    signal_count: int = 0
    duplicate_count: int = 0
    flaps: int = 0
    open_faults: dict[str, datetime] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
    plan: Plan | None = None
    resolved_at: datetime | None = None
    version: int = 1
    timeline: list[tuple[datetime, str, str]] = field(default_factory=list)
    parent: str | None = None
    members: dict[str, None] = field(default_factory=dict)
    topology: dict[str, str] = field(default_factory=dict)
    impact: dict[str, TenantRef] = field(default_factory=dict)
    time_to_repair_s: float | None = None
    waiting: WaitingOn | None = None
    source: str = ""  # the NVIDIA document (or breakfix rule) behind the category
    overflow: dict[str, int] = field(default_factory=dict)  # items past a cap, by kind ("+N more")
    last_at: dict[str, datetime] = field(default_factory=dict)  # fault key#code -> last occurrence (dedupe)

    def __init__(
        self, *,
        id: str, key: str, cluster: str, scope: IncidentScope, node: str | None, category: str, severity: Severity,
        domain: Domain, title: str, first_seen: datetime, last_seen: datetime,
        status: IncidentStatus = IncidentStatus.OPEN, nodes: dict[str, None] | None = None,
        gpus: dict[str, GpuRef] | None = None, tenants: dict[str, TenantRef] | None = None,
        counts: dict[str, int] | None = None, checks: dict[str, None] | None = None,
        labels: dict[str, str] | None = None, signal_ids: list[str] | None = None, signal_count: int = 0,
        duplicate_count: int = 0, flaps: int = 0, open_faults: dict[str, datetime] | None = None,
        evidence: list[str] | None = None, plan: Plan | None = None, resolved_at: datetime | None = None,
        version: int = 1, timeline: list[tuple[datetime, str, str]] | None = None, parent: str | None = None,
        members: dict[str, None] | None = None, topology: dict[str, str] | None = None,
        impact: dict[str, TenantRef] | None = None, time_to_repair_s: float | None = None,
        waiting: WaitingOn | None = None, source: str = "", overflow: dict[str, int] | None = None,
        last_at: dict[str, datetime] | None = None,
    ) -> None:
        """Written out rather than generated by ``dataclass``: a generated ``__init__`` runs as Python even in
        the compiled core, and an incident is built per opened incident."""
        self.id = id
        self.key = key
        self.cluster = cluster
        self.scope = scope
        self.node = node
        self.category = category
        self.severity = severity
        self.domain = domain
        self.title = title
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.status = status
        self.nodes = {} if nodes is None else nodes
        self.gpus = {} if gpus is None else gpus
        self.tenants = {} if tenants is None else tenants
        self.counts = {} if counts is None else counts
        self.checks = {} if checks is None else checks
        self.labels = {} if labels is None else labels
        self.signal_ids = [] if signal_ids is None else signal_ids
        self.signal_count = signal_count
        self.duplicate_count = duplicate_count
        self.flaps = flaps
        self.open_faults = {} if open_faults is None else open_faults
        self.evidence = [] if evidence is None else evidence
        self.plan = plan
        self.resolved_at = resolved_at
        self.version = version
        self.timeline = [] if timeline is None else timeline
        self.parent = parent
        self.members = {} if members is None else members
        self.topology = {} if topology is None else topology
        self.impact = {} if impact is None else impact
        self.time_to_repair_s = time_to_repair_s
        self.waiting = waiting
        self.source = source
        self.overflow = {} if overflow is None else overflow
        self.last_at = {} if last_at is None else last_at

    def note(self, at: datetime, event: str, text: str = "", limit: int = 64) -> None:
        """Append to the timeline; past ``limit`` keep the first half and the latest entries (counted)."""
        self.timeline.append((at, event, text[:512]))
        if len(self.timeline) > limit:
            del self.timeline[limit // 2]
            self.overflow["timeline"] = self.overflow.get("timeline", 0) + 1

    def over(self, kind: str, at: datetime, cap: int, limit: int) -> None:
        """One more item of ``kind`` past its cap: count it, and say so on the timeline the first time."""
        n = self.overflow.get(kind)
        self.overflow[kind] = 1 if n is None else n + 1
        if n is None:
            self.note(at, "capped", f"more than {cap} {kind}; further ones are counted in overflow", limit)

    def snapshot(self) -> Incident:
        """The wire model, from ``FIELDS``. Built without re-validation: every value here came from
        validated signals, records and rules, and is already the right type (``tests`` compare it with a
        validated round trip)."""
        return Incident.model_construct(**{f.wire_name: f.wire(getattr(self, f.attr)) for f in _WIRE})

    # -- checkpoint form ------------------------------------------------------------------------
    # ``correlator.checkpoint`` writes ``state_dict`` with orjson (pydantic values through ``model_dump``), every field
    # in declaration order; ``from_state`` reads that dict back through ``FIELDS``.
    def state_dict(self) -> dict[str, Any]:
        return dict(zip(_STATE_NAMES, _state_values(self), strict=True))

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> TrackedIncident:
        return cls(**{name: dec(d[name]) for name, dec in _STATE.items() if name in d})


@dataclass(slots=True, init=False)
class Observation:
    """The facts of one fault signal that the core's collaborators need, worked out once per signal.
    Not frozen only because a frozen dataclass is slower to build on this per-signal path; never mutated
    (``with_class`` makes a copy). Its ``__init__`` is written out: a generated one runs as Python in the compiled
    core. The signal's fields the core reads on every signal are carried here too, read once from its field values
    (``Correlator.ingest``): each attribute read of a pydantic model goes through its ``__getattr__`` hook, and
    the compiled core reads these as native fields."""

    signal: Signal
    d: dict[str, Any]  # the signal's field values (``Signal.__dict__``), for the fields read less often
    at: datetime  # ``observed_at``
    sid: str  # ``id``
    node: str
    check: str
    tenant: TenantRef | None
    fk: str  # fault key: check@entity, what a healthy signal must match to clear it
    ck: str  # code key as counted on the incident: ``xid:48``, ``dcgm:DCGM_FR_...``, or the check
    eck: str  # the key the rules match: a DCGM code's XID equivalent, otherwise ``ck``
    fc: FaultClass
    gpu_key: str | None  # ``gpu|cluster|node|gpu`` when the signal names a GPU
    gkey: str | None  # the GPU's own key (``GpuRef.key()``) when the signal names one
    lk: str  # ``fk#ck``: the key of the incident's last occurrence of this fault and code (dedupe)

    def __init__(self, signal: Signal, d: dict[str, Any], fk: str, ck: str, eck: str, fc: FaultClass,
                 gpu_key: str | None, gkey: str | None, lk: str, at: datetime, sid: str, node: str, check: str,
                 tenant: TenantRef | None) -> None:
        self.signal, self.d, self.fk, self.ck, self.eck, self.fc = signal, d, fk, ck, eck, fc
        self.gpu_key, self.gkey, self.lk = gpu_key, gkey, lk
        self.at, self.sid, self.node, self.check, self.tenant = at, sid, node, check, tenant

    def with_class(self, fc: FaultClass) -> Observation:
        """The same facts under another class (a pattern's verdict, such as a suspect GPU)."""
        return Observation(self.signal, self.d, self.fk, self.ck, self.eck, fc, self.gpu_key, self.gkey, self.lk,
                           self.at, self.sid, self.node, self.check, self.tenant)


def tenant_key(t: TenantRef) -> str:
    """``TenantRef.key`` from the ref's field values, without a call into Python code on the per-signal path
    (``tests/test_correlator_fastpaths.py`` pins the two together)."""
    td: dict[str, Any] = t.__dict__
    namespace: str = td["namespace"]
    name: str | None = td["endpoint"] or td["pod"]
    return namespace + "/" + (name or "*")


_WORKLOADS: Final[dict[str, str]] = {}  # pod name -> ``TenantRef.workload`` of a ref without an endpoint
_WORKLOADS_CAP = 65536  # pod names are open-ended input: the cache is bounded


def workload(t: TenantRef) -> str:
    """``TenantRef.workload``, remembered by pod name (it depends on nothing else when the ref has no endpoint):
    the method is a call into Python code and a regular expression match, on every application fault
    (``tests/test_correlator_fastpaths.py`` pins the two together)."""
    td: dict[str, Any] = t.__dict__
    endpoint: str | None = td["endpoint"]
    if endpoint:
        return endpoint
    pod: str | None = td["pod"]
    if not pod:
        return "*"
    w = _WORKLOADS.get(pod)
    if w is None:
        if len(_WORKLOADS) >= _WORKLOADS_CAP:
            _WORKLOADS.clear()
        w = _WORKLOADS[pod] = t.workload()
    return w


def tenant_incident_key(cluster: str, t: TenantRef) -> str:
    """The key of a workload's own incident: ``tenant|cluster|namespace|workload``."""
    namespace: str = t.__dict__["namespace"]
    return f"tenant|{cluster}|{namespace}|{workload(t)}"


# Severity ranks from ``Severity.rank``, read as one dict lookup: the property is a call into Python code.
SEVERITY_RANK: Final[dict[Severity, int]] = {sev: sev.rank for sev in Severity}


def worse(a: Severity, b: Severity) -> Severity:
    """``schemas.common.max_severity`` (the worse of two severities; ``a`` on a tie), by ``SEVERITY_RANK``."""
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b


@dataclass(slots=True, init=False)
class Change:
    """What the core tells the service: this incident changed, this way. Snapshot taken on publish."""

    kind: ChangeKind
    incident: TrackedIncident

    def __init__(self, kind: ChangeKind, incident: TrackedIncident) -> None:
        self.kind, self.incident = kind, incident

    def to_wire(self, at: datetime) -> IncidentChange:
        return IncidentChange.model_construct(kind=self.kind, incident=self.incident.snapshot(), at=at)


def coalesce(changes: list[Change]) -> list[Change]:
    """One change per incident, in first-touched order, with the strongest kind seen."""
    out: dict[str, Change] = {}
    for ch in changes:
        prev = out.get(ch.incident.id)
        if prev is None:
            out[ch.incident.id] = Change(ch.kind, ch.incident)
        elif KIND_STRENGTH[ch.kind] > KIND_STRENGTH[prev.kind]:
            prev.kind = ch.kind
    return list(out.values())


# -- the one field map -------------------------------------------------------------------------------
# Every field of the Incident's wire form and of the checkpoint form, once: the TrackedIncident
# attribute, the wire field it becomes, how it becomes the pydantic value (``snapshot``) and how the
# checkpoint's JSON reads back (``from_state``). ``correlator.wire.change_json`` writes the same fields out by
# hand (``_json_body``, its names and order checked against this map by a test).

def _same(v: Any) -> Any:
    return v


def _dt(v: str) -> datetime:
    return datetime.fromisoformat(v)


def _opt_dt(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v) if v else None


@dataclass(frozen=True, slots=True)
class Field:
    attr: str
    wire_name: str
    wire: Callable[[Any], Any] = _same
    state: Callable[[Any], Any] | None = _same  # None: derived, not read back from this entry


def _refs(model: type[GpuRef] | type[TenantRef]) -> Callable[[Any], Any]:
    return lambda d: {k: model.model_validate(v) for k, v in d.items()}


_NO_WIRE = ""
FIELDS: tuple[Field, ...] = (
    Field("id", "id"), Field("cluster", "cluster"),
    Field("scope", "scope", state=IncidentScope),
    Field("node", "node"),
    Field("nodes", "nodes", tuple, dict.fromkeys),
    Field("gpus", "gpus", lambda d: tuple(d.values()), _refs(GpuRef)),
    Field("tenants", "tenants", lambda d: tuple(d.values()), _refs(TenantRef)),
    Field("category", "category"),
    Field("severity", "severity", state=Severity),
    Field("domain", "domain", state=Domain),
    Field("status", "status", state=IncidentStatus),
    Field("title", "title"),
    Field("counts", "codes", tuple, None),
    Field("checks", "checks", tuple, dict.fromkeys),
    Field("labels", "labels", dict, dict),
    Field("first_seen", "first_seen", state=_dt), Field("last_seen", "last_seen", state=_dt),
    Field("signal_ids", "signal_ids", tuple, list),
    Field("signal_count", "signal_count"), Field("duplicate_count", "duplicate_count"),
    Field("counts", "counts", lambda d: tuple(CodeCount.model_construct(key=k, count=v) for k, v in d.items()),
          dict),
    Field("flaps", "flaps"),
    Field("open_faults", "open_faults", tuple, lambda d: {k: _dt(v) for k, v in d.items()}),
    Field("evidence", "evidence", tuple, list),
    Field("plan", "plan", state=lambda v: Plan.model_validate(v) if v else None),
    Field("resolved_at", "resolved_at", state=_opt_dt),
    Field("version", "version"),
    Field("timeline", "timeline",
          lambda t: tuple(TimelineEntry.model_construct(at=a, event=e, note=n) for a, e, n in t),
          lambda t: [(_dt(a), e, n) for a, e, n in t]),
    Field("parent", "parent"),
    Field("members", "members", tuple, dict.fromkeys),
    Field("topology", "topology", dict, dict),
    Field("impact", "impact", lambda d: tuple(d.values()), _refs(TenantRef)),
    Field("time_to_repair_s", "time_to_repair_s"),
    Field("waiting", "waiting", state=lambda v: WaitingOn(v) if v else None),
    Field("source", "source"),
    Field("overflow", "overflow", dict, dict),
    # checkpoint only
    Field("key", _NO_WIRE),
    Field("last_at", _NO_WIRE, state=lambda d: {k: _dt(v) for k, v in d.items()}),
)
_WIRE = tuple(f for f in FIELDS if f.wire_name)
_STATE: dict[str, Callable[[Any], Any]] = {f.attr: f.state for f in FIELDS if f.state is not None}
_STATE_NAMES = tuple(f.name for f in fields(TrackedIncident))
_state_values = attrgetter(*_STATE_NAMES)
