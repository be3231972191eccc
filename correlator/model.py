"""Mutable per-incident state inside the correlator, and its frozen wire snapshot.

``TrackedIncident`` is what the grouping core updates in place for speed; ``snapshot()``
turns it into the frozen ``schemas.Incident`` that goes on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from schemas.common import GpuRef, Severity, TenantRef
from schemas.incident import CodeCount, Domain, Incident, IncidentScope, IncidentStatus, Plan

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
    "fabric_link",
    "thermal_power",
    "endpoint_slo",
    "application_fault",
    "sympathetic",
    "informational",
)
_RANK = {c: i for i, c in enumerate(CATEGORY_PRIORITY)}


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
    nodes: list[str] = field(default_factory=list)
    gpus: dict[str, GpuRef] = field(default_factory=dict)
    tenants: dict[str, TenantRef] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
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

    def snapshot(self) -> Incident:
        return Incident(
            id=self.id,
            cluster=self.cluster,
            scope=self.scope,
            node=self.node,
            nodes=tuple(self.nodes),
            gpus=tuple(self.gpus.values()),
            tenants=tuple(self.tenants.values()),
            category=self.category,
            severity=self.severity,
            domain=self.domain,
            status=self.status,
            title=self.title,
            codes=tuple(self.counts),
            checks=tuple(self.checks),
            labels=dict(self.labels),
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            signal_ids=tuple(self.signal_ids),
            signal_count=self.signal_count,
            duplicate_count=self.duplicate_count,
            counts=tuple(CodeCount(key=k, count=v) for k, v in self.counts.items()),
            flaps=self.flaps,
            open_faults=tuple(self.open_faults),
            evidence=tuple(self.evidence),
            plan=self.plan,
            resolved_at=self.resolved_at,
            version=self.version,
        )
