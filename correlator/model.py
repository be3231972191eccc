"""Mutable per-incident state inside the correlator, its wire snapshot, and its checkpoint form.

``TrackedIncident`` is what the grouping core (``correlator.grouping``) updates in place for
speed. The core returns ``Change``s that point at it; the service turns each into the frozen
``schemas.IncidentChange`` only when it publishes (``Change.to_wire``), so a storm that
touches one incident a thousand times in one batch costs one snapshot. ``to_state`` /
``from_state`` give the plain-JSON form that ``correlator.checkpoint`` stores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.common import GpuRef, Severity, TenantRef
from schemas.incident import (
    ChangeKind,
    CodeCount,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    Plan,
    TimelineEntry,
)

# Most cautious first. Merging two faults into one incident keeps the earlier entry here.
CATEGORY_PRIORITY: tuple[str, ...] = (
    "unknown_fault",
    "node_reboot_required",
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
    last_at: dict[str, datetime] = field(default_factory=dict)  # fault key#code -> last occurrence (dedupe)

    def note(self, at: datetime, event: str, text: str = "", limit: int = 64) -> None:
        """Append to the timeline; past ``limit`` keep the first half and the latest entries."""
        self.timeline.append((at, event, text))
        if len(self.timeline) > limit:
            del self.timeline[limit // 2]

    def snapshot(self) -> Incident:
        return Incident(
            id=self.id, cluster=self.cluster, scope=self.scope, node=self.node, nodes=tuple(self.nodes),
            gpus=tuple(self.gpus.values()), tenants=tuple(self.tenants.values()), category=self.category,
            severity=self.severity, domain=self.domain, status=self.status, title=self.title,
            codes=tuple(self.counts), checks=tuple(self.checks), labels=dict(self.labels),
            first_seen=self.first_seen, last_seen=self.last_seen, signal_ids=tuple(self.signal_ids),
            signal_count=self.signal_count, duplicate_count=self.duplicate_count,
            counts=tuple(CodeCount(key=k, count=v) for k, v in self.counts.items()), flaps=self.flaps,
            open_faults=tuple(self.open_faults), evidence=tuple(self.evidence), plan=self.plan,
            resolved_at=self.resolved_at, version=self.version,
            timeline=tuple(TimelineEntry(at=a, event=e, note=n) for a, e, n in self.timeline),
            parent=self.parent, members=tuple(self.members), topology=dict(self.topology),
            impact=tuple(self.impact.values()), time_to_repair_s=self.time_to_repair_s,
        )

    # -- checkpoint form ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _PLAIN}
        d.update(
            scope=self.scope.value, severity=self.severity.value, domain=self.domain.value, status=self.status.value,
            first_seen=self.first_seen.isoformat(), last_seen=self.last_seen.isoformat(),
            resolved_at=self.resolved_at.isoformat() if self.resolved_at else None,
            nodes=list(self.nodes), checks=list(self.checks), members=list(self.members),
            gpus=[g.model_dump(exclude_none=True) for g in self.gpus.values()],
            tenants=[t.model_dump(exclude_none=True) for t in self.tenants.values()],
            impact=[t.model_dump(exclude_none=True) for t in self.impact.values()],
            open_faults={k: v.isoformat() for k, v in self.open_faults.items()},
            plan=self.plan.model_dump(mode="json") if self.plan else None,
            timeline=[[a.isoformat(), e, n] for a, e, n in self.timeline],
            last_at={k: v.isoformat() for k, v in self.last_at.items()},
        )
        return d

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> TrackedIncident:
        gpus = [GpuRef.model_validate(g) for g in d["gpus"]]
        tenants = [TenantRef.model_validate(t) for t in d["tenants"]]
        impact = [TenantRef.model_validate(t) for t in d["impact"]]
        return cls(
            **{k: d[k] for k in _PLAIN},
            scope=IncidentScope(d["scope"]), severity=Severity(d["severity"]), domain=Domain(d["domain"]),
            status=IncidentStatus(d["status"]), first_seen=datetime.fromisoformat(d["first_seen"]),
            last_seen=datetime.fromisoformat(d["last_seen"]),
            resolved_at=datetime.fromisoformat(d["resolved_at"]) if d["resolved_at"] else None,
            nodes=dict.fromkeys(d["nodes"]), checks=dict.fromkeys(d["checks"]), members=dict.fromkeys(d["members"]),
            gpus={g.key(): g for g in gpus}, tenants={t.key(): t for t in tenants}, impact={t.key(): t for t in impact},
            open_faults={k: datetime.fromisoformat(v) for k, v in d["open_faults"].items()},
            plan=Plan.model_validate(d["plan"]) if d["plan"] else None,
            timeline=[(datetime.fromisoformat(a), e, n) for a, e, n in d["timeline"]],
            last_at={k: datetime.fromisoformat(v) for k, v in d["last_at"].items()},
        )


_PLAIN = ("id", "key", "cluster", "node", "category", "title", "counts", "labels", "signal_ids", "signal_count",
          "duplicate_count", "flaps", "evidence", "version", "parent", "topology", "time_to_repair_s")


@dataclass(slots=True)
class Change:
    """What the core tells the service: this incident changed, this way. Snapshot taken on publish."""

    kind: ChangeKind
    incident: TrackedIncident

    def to_wire(self, at: datetime) -> IncidentChange:
        return IncidentChange(kind=self.kind, incident=self.incident.snapshot(), at=at)


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
