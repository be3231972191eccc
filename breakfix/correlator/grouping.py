"""The pure grouping core: (state, signal, now) -> state + incident changes. No I/O, no clock reads.

``Correlator.ingest`` folds one ``Signal`` into the open incidents; ``apply_action`` folds one
remediator ``ActionRecord`` into an incident's lifecycle; ``expire`` forgets what is long
settled. Each returns ``Change``s (``correlator.model``) for the service to publish. The
service (``correlator.service``, NATS) and ``breakfix replay`` (a file) drive it and pass time
in. What the rules mean is data: ``correlator/rules/default.yaml`` via ``correlator.rules``.

Grouping, in the order a fault signal meets it (its facts bundled once into an ``Observation``):
1. duplicates (same id) are counted on their incident and dropped; a code with an NVIDIA equivalent
   (a DCGM code's XID, a pending row remap) is counted as that equivalent from here on;
2. collateral XID 45 within the window of another fault on the same GPU folds into it (the GPU's own
   incident, or the node or tenant incident holding its codes);
3. XID 154 (or its DCGM equivalent) and a GPU off the bus join the incident already holding that
   GPU's codes, raising its required action (NVIDIA Xid catalog, XID_154); a tenant XID after the GPU's
   XID 154 joins it (XID_154_EVAL), and the same fault from another source joins the GPU's incident of it;
   a DBE or row remap and its containment XID (94/95), in either order, are one incident;
4. XID 74 / NVLink errors on the peers of a GPU that just went down (or behind a fatal NVSwitch
   SXid) fold into its incident; peers' incidents opened just before fold in when it arrives;
5. an endpoint SLO breach served by a node with an open hardware incident becomes its impact;
6. application XIDs on one GPU from different workloads (controllers) open a suspect-GPU incident;
7. otherwise the key: tenant (namespace, workload; never for XID 94/95), GPU (node, GPU) or node; a resolved
   incident under the key reopens (a flap) only for the same fault needing action within ``flap_s``,
   else a new one opens;
8. count-in-window thresholds (per code, or per category and entity) hold back an incident;
9. new and reopened incidents feed lemon detection, multi-GPU and topology grouping, and so does a workload's
   one-GPU incident a hardware fault joined, re-keyed as the GPU's from then on (``IncidentBook._to_gpu_scope``);
   an incident opened with or raised to a node reboot makes one reboot incident of its node (``Patterns.one_reboot``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from breakfix.correlator.book import IncidentBook
from breakfix.correlator.lifecycle import ENDPOINT_FAULT, Lifecycle
from breakfix.correlator.model import (
    DOMAIN_TENANT,
    NODE_CATEGORIES,
    SCOPE_GPU,
    SCOPE_NODE,
    SCOPE_TENANT,
    STATUS_RESOLVED,
    STATUS_VALIDATING,
    TERMINAL,
    Change,
    Observation,
    TrackedIncident,
    node_key_for,
    tenant_incident_key,
)
from breakfix.correlator.patterns import Patterns
from breakfix.correlator.rules import CategoryThreshold, Rules, Threshold
from breakfix.correlator.state import LEMON_LABEL, CoreState
from breakfix.correlator.topology import TopologyGrouper
from breakfix.schemas.catalog import Catalog, FaultClass
from breakfix.schemas.common import GpuRef, TenantRef
from breakfix.schemas.incident import ActionRecord, IncidentChange
from breakfix.schemas.signal import Signal

NO_ACTION = frozenset({"informational", "sympathetic"})  # NVIDIA IGNORE and collateral XIDs: no repair of their own
_ROUTES = 4096  # (check, code) pairs are open-ended input: the route cache is bounded
_XID154 = "xid:154"
__all__ = ["LEMON_LABEL", "NODE_CATEGORIES", "CoreState", "Correlator", "Observation", "code_key"]


@dataclass(frozen=True, slots=True)
class Route:
    """What a fault signal's check and code decide before any incident is looked at (the rules are fixed for a
    core): its class and code keys, and which of the grouping steps below can apply to it."""

    fc: FaultClass
    ck: str
    eck: str
    down: bool  # a GPU down or a fatal NVSwitch fault: NVLink peers' incidents may fold in (step 4)
    symp: bool  # a collateral XID that folds into the GPU's fault (step 2)
    raises: bool  # XID 154 or a node category: joins the GPU's host incident (step 3)
    peer: bool  # an NVLink peer code (step 4)
    impact: bool  # an endpoint SLO breach (step 5)
    suspect: bool  # an application XID that may make the GPU suspect (step 6)
    threshold: Threshold | None  # count-in-window per code (step 8)
    category_threshold: CategoryThreshold | None  # count-in-window per category (step 8)
    same_fault: bool  # a DCGM equivalent or a tenant-domain code: may join the GPU's incident of that fault (step 3)
    memory: bool  # a DBE or row-remap fact from any source: joins the GPU's incident of a containment XID (step 3)
    contained: bool  # a containment XID (94, 95): joins the GPU's DBE incident (step 3)
    no_action: bool  # informational or sympathetic: never reopens a resolved incident (step 7)


def code_key(signal: Signal) -> str:
    """``xid:48``, ``dcgm:DCGM_FR_...``, ``<check>:<code>``, or the check name when there is no code."""
    if signal.code:
        return f"{signal.check}:{signal.code}"
    return signal.check


def signal_keys(d: dict[str, Any]) -> tuple[str, str | None]:
    """A signal's fault key (``Signal.fault_key``) and its GPU's key (``GpuRef.key``) from its field values
    (``Signal.__dict__``). Written out here rather than calling those methods: this is the per-signal work of the
    compiled core, and a call into Python code costs it more than the rest of a heartbeat. Every value read is given
    its type, and each key is one f-string, so the compiled core builds it natively in one allocation.
    ``tests/test_correlator_fastpaths.py`` pins both keys to the models' own over generated signals."""
    check: str = d["check"]
    node: str = d["node"]
    g: GpuRef | None = d["gpu"]
    gkey: str | None = None
    if g is not None:
        gd: dict[str, Any] = g.__dict__
        uuid: str | None = gd["uuid"]
        if uuid:
            gkey = uuid
        else:
            index: int | None = gd["index"]
            pci: str | None = gd["pci_bus_id"]
            gkey = f"gpu{index}" if index is not None else pci or "gpu?"
        key = f"{check}@{node}/{gkey}"
    else:
        key = f"{check}@{node}"
    component: str | None = d["component"]
    if component:
        key = f"{key}/{component}"
    t: TenantRef | None = d["tenant"]
    if t is not None:
        td: dict[str, Any] = t.__dict__
        endpoint: str | None = td["endpoint"]
        if endpoint:
            namespace: str = td["namespace"]
            key = f"{key}/{namespace}/{endpoint}"  # TenantRef.key with an endpoint
    return key, gkey


class Correlator:
    """The grouping core, by composition: ``CoreState`` (state, indexes, checkpoint form) shared by reference
    with the ``IncidentBook`` (incident mutations), ``Patterns`` (multi-signal patterns) and ``Lifecycle``
    (healthy signals, remediator records, stale closing, expiry). This class routes each signal."""

    def __init__(self, catalog: Catalog, rules: Rules | None = None, *, topology: bool = True) -> None:
        self.state = CoreState(catalog, rules, topology=topology)
        self.book = IncidentBook(self.state)
        self.patterns = Patterns(self.state, self.book)
        self.book.patterns = self.patterns
        self.lifecycle = Lifecycle(self.state)
        self._routes: dict[tuple[str, str | None], Route] = {}

    # -- the state, for callers (the service, replay, tests) ----------------------------------------
    @property
    def catalog(self) -> Catalog:
        return self.state.catalog

    @property
    def rules(self) -> Rules:
        return self.state.rules

    @property
    def incidents(self) -> dict[str, TrackedIncident]:
        return self.state.incidents

    @property
    def seen(self) -> dict[str, str]:
        return self.state.seen

    @property
    def stats(self) -> dict[str, int]:
        return self.state.stats

    @property
    def topology(self) -> TopologyGrouper | None:
        return self.state.topology

    def to_state(self) -> dict[str, Any]:
        return self.state.to_state()

    def load_state(self, d: dict[str, Any]) -> None:
        self.state.load_state(d)

    # -- records and housekeeping -------------------------------------------------------------------
    def apply_action(self, rec: ActionRecord, now: datetime) -> list[Change]:
        return self.lifecycle.apply_action(rec, now)

    def adopt(self, change: IncidentChange, now: datetime) -> list[Change]:
        return self.lifecycle.adopt(change, now)

    def close_stale(self, now: datetime) -> list[Change]:
        return self.lifecycle.close_stale(now)

    def expire(self, now: datetime) -> list[str]:
        return self.lifecycle.expire(now)

    # -- signals ----------------------------------------------------------------------------------
    def ingest(self, s: Signal, now: datetime) -> list[Change]:
        """Fold one signal in; return the changes to publish (often none)."""
        st, book = self.state, self.book
        st.counters.signals += 1
        # the signal's field values, read once: each attribute read of a pydantic model goes through its
        # ``__getattr__`` hook (slower in both builds, and the compiled one cannot read its fields natively)
        d: dict[str, Any] = s.__dict__
        check: str = d["check"]
        if d["healthy"]:
            # never remembered (a repeated healthy reading clears nothing twice), so never looked up as a duplicate:
            # only a fault signal's id is in ``seen``, and a signal's id covers its health (``make_signal_id``)
            st.counters.healthy += 1
            # the common case, a heartbeat for something that is fine, answered here without a call: first from a
            # node with no fault open (before its fault key is built), then by that key. An endpoint's breach may be
            # open where no index names it (``Lifecycle.clear``).
            endpoint = check.startswith(ENDPOINT_FAULT)
            if not endpoint and not st.by_fault.may_hold(d["node"]):
                return []
            fk, gkey = signal_keys(d)
            iid = st.by_fault.get(fk)
            if iid is None and not endpoint:
                return []
            return self.lifecycle.clear(fk, s, iid)
        sid: str = d["id"]
        hit = st.seen.get(sid)
        if hit is not None:
            st.counters.duplicates += 1
            inc = st.incidents.get(hit)
            if inc is not None:
                inc.duplicate_count += 1
            return []
        fk, gkey = signal_keys(d)
        r = self._route(s, check, d["code"])
        fc, ck, eck = r.fc, r.ck, r.eck
        at: datetime = d["observed_at"]
        node: str = d["node"]
        cluster: str = d["cluster"]
        gpu_key = None if gkey is None else f"gpu|{cluster}|{node}|{gkey}"
        o = Observation(s, d, fk, ck, eck, fc, gpu_key, gkey, f"{fk}#{ck}", at, sid, node, check, d["tenant"])
        down = r.down  # may fold peers opened before
        if r.symp and gpu_key is not None:  # the GPU's own incident, or the node or tenant one holding its codes
            host = st.live(st.by_key.get(gpu_key)) or st.live(st.by_gpu.get(gpu_key))
            if host is not None and at - host.last_seen <= st.symp_td:
                return book.add(host, o, fold=True)
        if r.raises and gpu_key is not None:
            # NVIDIA Xid catalog, XID_154: the recovery action applies to the GPU's fault; it raises the
            # incident already holding that GPU's codes (and a GPU off the bus joins that incident too)
            host = book.gpu_host(gpu_key, node)
            if host is not None:  # not folded: an unreadable recovery action (unknown_fault) makes the host cautious
                changes = book.add(host, o)
                return changes + book.after_down(host, o) if down else changes
        if (r.same_fault or r.memory or r.contained) and gpu_key is not None:
            host = book.gpu_host(gpu_key, node)
            if host is not None and self._joins(host, r):
                changes = book.add(host, o)
                return changes + book.after_down(host, o) if down else changes
        if r.peer:
            dn = st.down.get(node)
            if dn is not None and at - dn[2] <= st.peer_td:  # peers, and the downed GPU's own NVLink codes
                host = st.live(dn[0])
                if host is not None:
                    return book.add(host, o, fold=True)
        tenant = o.tenant
        if r.impact and tenant is not None:
            found = self.patterns.endpoint(o)
            if found is not None:
                return found
        if r.suspect and gpu_key is not None and tenant is not None:
            found = self.patterns.suspect(gpu_key, o)
            if found is not None:
                return found
        t = tenant  # the key (Correlator._key, inlined: most fault signals get here)
        if fc.domain is DOMAIN_TENANT and t is not None and not r.contained:
            # (a containment XID is keyed by its GPU even with a pod: its repair is the GPU's reset, and the DBE or
            # row remap it reports, or another workload's XID 94 on that GPU, meets it there in any order)
            key, scope = tenant_incident_key(cluster, t), SCOPE_TENANT
        elif gpu_key is not None and fc.category not in NODE_CATEGORIES:
            key, scope = gpu_key, SCOPE_GPU
        else:
            key, scope = node_key_for(cluster, node, fc.category), SCOPE_NODE
            held = st.live(st.by_fault.get(fk))
            if held is not None and held.status is STATUS_VALIDATING and st.by_key.get(key) != held.id:
                # its own fault back on a node incident validating after its reboot, whose key a node incident opened
                # since for other reboots took (Patterns.one_reboot): the recurrence is the validating one's to see
                return book.add(held, o) + (book.after_down(held, o) if down else [])
        inc = st.incidents.get(st.by_key.get(key, ""))
        if inc is not None and inc.status in TERMINAL:
            # a flap is the same fault back within flap_s; an IGNORE or collateral code after a repair (a tenant's
            # Ctrl-C XID 45, XID 92) is not, nor is another fault, which opens its own incident (and is seen by
            # multi-GPU and lemon detection)
            if inc.status is STATUS_RESOLVED and inc.resolved_at is not None and not r.no_action \
                    and ck in inc.counts and (at - inc.resolved_at).total_seconds() <= st.rules.flap_s:
                changes = book.reopen(inc, o)
                if inc.parent is not None:
                    changes.extend(book.echo(inc, o))
                return changes + book.after_down(inc, o) if down else changes
            inc = None
        if inc is None:
            thr = r.threshold
            if thr is not None and not book.threshold_met(f"{fk}#{eck}", at, thr.count, thr.window_s):
                st.counters.below_threshold += 1
                st.remember(sid, "")
                return []
            cthr = r.category_threshold
            if cthr is not None and not book.threshold_met(f"{fk}#cat:{fc.category}", at, cthr.count,
                                                            cthr.window_s):
                st.counters.below_threshold += 1
                st.remember(sid, "")
                return []
            changes = book.open(key, scope, o)
            return changes + book.after_down(st.incidents[st.by_key[key]], o) if down else changes
        changes = book.add(inc, o)
        if inc.parent is not None:  # folded: the incident standing on its own hears of it while it validates
            changes.extend(book.echo(inc, o))
        return changes + book.after_down(inc, o) if down else changes

    def _joins(self, host: TrackedIncident, r: Route) -> bool:
        """Step 3: whether a fault joins the live incident holding its GPU's codes (``IncidentBook.gpu_host``)."""
        counts, st = host.counts, self.state
        if r.same_fault:
            # NVIDIA XID_154_EVAL: "If an XID 154 is seen along with this error, take that action"; XID 154
            # "summarizes the recovery action required for other Xids": a tenant XID after the GPU's 154 joins it.
            if r.fc.domain is DOMAIN_TENANT and _XID154 in counts:
                return True
            # The same fault from another source (a DCGM code counted as its XID; an XID read first without its pod)
            # joins the GPU's incident of that fault rather than opening a second plan. (An application XID that may
            # make the GPU suspect does not join by code: two workloads hitting one GPU is step 6's evidence.)
            if r.eck in counts and (bool(r.fc.equivalent) or (host.scope is SCOPE_GPU and not r.suspect)):
                return True
        # A DBE or its row remap and the XID saying how it was contained (94, 95: investigatory "IGNORE (sympathetic)"
        # in the Xid catalog) are one memory fault, whichever is read first: the worst repair decides.
        if r.contained and any(st.is_memory_fault(k) for k in counts):
            return True
        return r.memory and not st.contained_facts.isdisjoint(counts)

    def _route(self, s: Signal, check: str, code: str | None) -> Route:
        """The signal's ``Route``: cached by (check, code) (the signal's) unless its class depends on the message
        (``CoreState.classify`` caches the same way), bounded."""
        k = (check, code)
        r = self._routes.get(k)
        if r is None:
            st, rules = self.state, self.state.rules
            fc = st.classify(s)
            # a DCGM code with an NVIDIA equivalent (XID 94, a pending row remap, ...) is counted and matched as that
            # equivalent: one fault, one incident, one plan, whichever source reported it (dcgm_fr_semantics.csv)
            eck = fc.equivalent or code_key(s)
            ck = eck
            r = Route(fc, ck, eck, down=eck in rules.down_codes or fc.category in rules.down_categories,
                      symp=s.check == "xid" and s.code in st.symp,
                      raises=eck == _XID154 or fc.category in NODE_CATEGORIES, peer=eck in rules.peer_codes,
                      impact=fc.category in rules.impact_categories, suspect=eck in rules.suspect_codes,
                      threshold=rules.thresholds.get(eck),
                      category_threshold=rules.category_thresholds.get(fc.category),
                      same_fault=bool(fc.equivalent) or fc.domain is DOMAIN_TENANT,
                      memory=st.is_memory_fault(eck), contained=eck in st.contained_facts,
                      no_action=fc.category in NO_ACTION)
            if st.class_cacheable(s):
                if len(self._routes) >= _ROUTES:
                    self._routes.clear()
                self._routes[k] = r
        return r
