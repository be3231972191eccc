"""Mutable per-incident state inside the correlator, its wire snapshot, and its checkpoint form.

``TrackedIncident`` is what the grouping core (``correlator.grouping``) updates in place for
speed. The core returns ``Change``s that point at it; the service turns each into the frozen
``schemas.IncidentChange`` only when it publishes (``Change.to_wire``), so a storm that
touches one incident a thousand times in one batch costs one snapshot; ``change_json`` writes
the same JSON straight from the tracked state for the service's hot path. ``from_state`` reads
back the form ``correlator.checkpoint`` stores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson

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

# Most cautious first. Merging two faults into one incident keeps the earlier entry here.
CATEGORY_PRIORITY: tuple[str, ...] = (
    "unknown_fault",
    "node_reboot_required",
    "multi_gpu_failure",
    "hardware_support",
    "mechanical_inspection",
    "software_update",
    "gpu_drain_reset_required",
    "gpu_reset_required",
    "nvlink_fault",
    "gpu_suspect",
    "fabric_link",
    "thermal_power",
    "endpoint_slo",
    "application_fault",
    "sympathetic",
    "informational",
)
_RANK = {c: i for i, c in enumerate(CATEGORY_PRIORITY)}

# When one batch holds several changes to one incident, the published kind is the strongest.
KIND_STRENGTH = {ChangeKind.UPDATED: 0, ChangeKind.STATUS: 1, ChangeKind.FOLDED: 2, ChangeKind.RESOLVED: 3,
                 ChangeKind.REOPENED: 4, ChangeKind.OPENED: 5}


def category_rank(category: str) -> int:
    """Lower is more cautious; an unlisted category ranks with ``unknown_fault``."""
    return _RANK.get(category, 0)


def incident_id(key: str, first_signal_id: str) -> str:
    return "inc-" + hashlib.sha256(f"{key}\x1f{first_signal_id}".encode()).hexdigest()[:16]


@dataclass
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
    last_at: dict[str, datetime] = field(default_factory=dict)  # fault key#code -> last occurrence (dedupe)

    def note(self, at: datetime, event: str, text: str = "", limit: int = 64) -> None:
        """Append to the timeline; past ``limit`` keep the first half and the latest entries."""
        self.timeline.append((at, event, text))
        if len(self.timeline) > limit:
            del self.timeline[limit // 2]

    def snapshot(self) -> Incident:
        """The wire model. Built without re-validation: every value here came from validated
        signals, records and rules, and is already the right type (``tests`` compare it with a
        validated round trip)."""
        return Incident.model_construct(
            id=self.id, cluster=self.cluster, scope=self.scope, node=self.node, nodes=tuple(self.nodes),
            gpus=tuple(self.gpus.values()), tenants=tuple(self.tenants.values()), category=self.category,
            severity=self.severity, domain=self.domain, status=self.status, title=self.title,
            codes=tuple(self.counts), checks=tuple(self.checks), labels=dict(self.labels),
            first_seen=self.first_seen, last_seen=self.last_seen, signal_ids=tuple(self.signal_ids),
            signal_count=self.signal_count, duplicate_count=self.duplicate_count,
            counts=tuple(CodeCount.model_construct(key=k, count=v) for k, v in self.counts.items()),
            flaps=self.flaps, open_faults=tuple(self.open_faults), evidence=tuple(self.evidence), plan=self.plan,
            resolved_at=self.resolved_at, version=self.version,
            timeline=tuple(TimelineEntry.model_construct(at=a, event=e, note=n) for a, e, n in self.timeline),
            parent=self.parent, members=tuple(self.members), topology=dict(self.topology),
            impact=tuple(self.impact.values()), time_to_repair_s=self.time_to_repair_s, waiting=self.waiting,
        )

    # -- checkpoint form ------------------------------------------------------------------------
    # ``correlator.checkpoint`` writes a TrackedIncident with orjson's native dataclass support
    # (pydantic values through ``model_dump``); ``from_state`` reads that dict back.
    @classmethod
    def from_state(cls, d: dict[str, Any]) -> TrackedIncident:
        def dt(v: str) -> datetime:
            return datetime.fromisoformat(v)

        return cls(
            id=d["id"], key=d["key"], cluster=d["cluster"], scope=IncidentScope(d["scope"]), node=d["node"],
            category=d["category"], severity=Severity(d["severity"]), domain=Domain(d["domain"]), title=d["title"],
            first_seen=dt(d["first_seen"]), last_seen=dt(d["last_seen"]), status=IncidentStatus(d["status"]),
            nodes=dict.fromkeys(d["nodes"]), gpus={k: GpuRef.model_validate(v) for k, v in d["gpus"].items()},
            tenants={k: TenantRef.model_validate(v) for k, v in d["tenants"].items()}, counts=dict(d["counts"]),
            checks=dict.fromkeys(d["checks"]), labels=dict(d["labels"]), signal_ids=list(d["signal_ids"]),
            signal_count=d["signal_count"], duplicate_count=d["duplicate_count"], flaps=d["flaps"],
            open_faults={k: dt(v) for k, v in d["open_faults"].items()}, evidence=list(d["evidence"]),
            plan=Plan.model_validate(d["plan"]) if d["plan"] else None,
            resolved_at=dt(d["resolved_at"]) if d["resolved_at"] else None, version=d["version"],
            timeline=[(dt(a), e, n) for a, e, n in d["timeline"]], parent=d["parent"],
            members=dict.fromkeys(d["members"]), topology=dict(d["topology"]),
            impact={k: TenantRef.model_validate(v) for k, v in d["impact"].items()},
            time_to_repair_s=d["time_to_repair_s"],
            waiting=WaitingOn(d["waiting"]) if d.get("waiting") else None,
            last_at={k: dt(v) for k, v in d["last_at"].items()},
        )


@dataclass(slots=True)
class Change:
    """What the core tells the service: this incident changed, this way. Snapshot taken on publish."""

    kind: ChangeKind
    incident: TrackedIncident

    def to_wire(self, at: datetime) -> IncidentChange:
        return IncidentChange.model_construct(kind=self.kind, incident=self.incident.snapshot(), at=at)

    def to_json_bytes(self, at: datetime) -> bytes:
        return change_json(self.kind, self.incident, at)


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


_OPTS = orjson.OPT_UTC_Z


@lru_cache(maxsize=65536)
def _ref(obj: GpuRef | TenantRef) -> dict[str, Any]:
    """Frozen refs repeat across changes; dump each once (callers never mutate the dict)."""
    return obj.model_dump(mode="json")


def change_json(kind: ChangeKind, inc: TrackedIncident, at: datetime) -> bytes:
    """The ``IncidentChange`` JSON for ``inc``, written directly (orjson) for the hot path.

    Byte-for-byte it decodes to the same ``IncidentChange`` as ``Change.to_wire`` (pinned by
    ``tests/test_correlator_wire.py``); timestamps come out as RFC 3339 with ``Z``.
    """
    doc = {
        "kind": kind.value, "at": at,
        "incident": {
            "schema": "breakfix.incident/v1", "id": inc.id, "cluster": inc.cluster, "scope": inc.scope.value,
            "node": inc.node, "nodes": list(inc.nodes), "gpus": [_ref(g) for g in inc.gpus.values()],
            "tenants": [_ref(t) for t in inc.tenants.values()], "category": inc.category,
            "severity": inc.severity.value, "domain": inc.domain.value, "status": inc.status.value,
            "title": inc.title, "codes": list(inc.counts), "checks": list(inc.checks), "labels": inc.labels,
            "first_seen": inc.first_seen, "last_seen": inc.last_seen, "signal_ids": inc.signal_ids,
            "signal_count": inc.signal_count, "duplicate_count": inc.duplicate_count,
            "counts": [{"key": k, "count": v} for k, v in inc.counts.items()], "flaps": inc.flaps,
            "open_faults": list(inc.open_faults), "evidence": inc.evidence,
            "plan": inc.plan.model_dump(mode="json") if inc.plan else None, "resolved_at": inc.resolved_at,
            "version": inc.version, "timeline": [{"at": a, "event": e, "note": n} for a, e, n in inc.timeline],
            "parent": inc.parent, "members": list(inc.members), "topology": inc.topology,
            "impact": [_ref(t) for t in inc.impact.values()], "time_to_repair_s": inc.time_to_repair_s,
            "waiting": inc.waiting.value if inc.waiting else None,
        },
    }
    return orjson.dumps(doc, option=_OPTS)
