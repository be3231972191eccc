"""The pure grouping core: (state, signal, now) -> incident changes. No I/O, no clock reads.

``Correlator.ingest`` folds one ``Signal`` into the open incidents; ``Correlator.apply_action``
folds one remediator ``ActionRecord`` into an incident's lifecycle. Both return the
``IncidentChange``s to publish. ``correlator.service`` (NATS) and ``breakfix replay`` (a file)
drive it; both pass time in.

Grouping keys:
- tenant-domain faults with a known tenant -> one incident per (namespace, workload);
- GPU faults -> one per (node, GPU); node faults -> one per node;
- collateral XIDs (45) fold into the open incident of the same GPU they follow.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from correlator.model import TrackedIncident, category_rank, incident_id
from schemas.catalog import Catalog, FaultClass
from schemas.common import max_severity
from schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    StepAction,
)
from schemas.signal import Signal

NODE_CATEGORIES = frozenset({"node_reboot_required"})


@dataclass(frozen=True, slots=True)
class CorrelatorConfig:
    dedupe_window_s: float = 60.0
    flap_window_s: float = 600.0
    sympathetic_window_s: float = 120.0
    evidence_limit: int = 20
    signal_id_limit: int = 50
    seen_id_limit: int = 200_000


def code_key(signal: Signal) -> str:
    """``xid:48``, ``dcgm:DCGM_FR_...``, or the check name when there is no code."""
    if signal.check == "xid" and signal.code:
        return f"xid:{signal.code}"
    if signal.code:
        return f"{signal.check}:{signal.code}"
    return signal.check


class Correlator:
    """Open incidents and the indexes to find them. Mutated only by ``ingest``/``apply_action``."""

    def __init__(self, catalog: Catalog, config: CorrelatorConfig | None = None) -> None:
        self.catalog = catalog
        self.config = config or CorrelatorConfig()
        self.incidents: dict[str, TrackedIncident] = {}
        self.by_key: dict[str, str] = {}
        self.by_fault: dict[str, str] = {}
        self.seen: OrderedDict[str, str] = OrderedDict()
        self.last_fault_at: dict[tuple[str, str], datetime] = {}
        self.stats = {"signals": 0, "duplicates": 0, "suppressed": 0, "healthy": 0}

    # -- keys ---------------------------------------------------------------------------------
    def _key(self, s: Signal, fc: FaultClass) -> tuple[str, IncidentScope, str | None]:
        if fc.domain is Domain.TENANT and s.tenant is not None:
            workload = s.tenant.endpoint or s.tenant.pod or "*"
            return f"tenant|{s.cluster}|{s.tenant.namespace}|{workload}", IncidentScope.TENANT, s.node
        if s.gpu is not None and fc.category not in NODE_CATEGORIES:
            return f"gpu|{s.cluster}|{s.node}|{s.gpu.key()}", IncidentScope.GPU, s.node
        return f"node|{s.cluster}|{s.node}", IncidentScope.NODE, s.node

    def _gpu_incident(self, s: Signal) -> TrackedIncident | None:
        if s.gpu is None:
            return None
        iid = self.by_key.get(f"gpu|{s.cluster}|{s.node}|{s.gpu.key()}")
        inc = self.incidents.get(iid) if iid else None
        if inc is None or inc.status is IncidentStatus.RESOLVED:
            return None
        return inc

    # -- signals ------------------------------------------------------------------------------
    def ingest(self, s: Signal, now: datetime) -> list[IncidentChange]:
        """Fold one signal in; return the changes to publish (often none)."""
        self.stats["signals"] += 1
        if s.id in self.seen:
            self.stats["duplicates"] += 1
            inc = self.incidents.get(self.seen[s.id])
            if inc is not None:
                inc.duplicate_count += 1
            return []
        if s.healthy:
            self._remember(s.id, "")
            return self._clear(s, now)
        fc = self.catalog.classify(check=s.check, code=s.code, message=s.message)
        if s.check == "xid" and s.code in self.catalog.correlation.sympathetic_xids:
            host = self._gpu_incident(s)
            window = timedelta(seconds=self.config.sympathetic_window_s)
            if host is not None and s.observed_at - host.last_seen <= window:
                return self._add(host, s, fc, now, fold=True)
        key, scope, node = self._key(s, fc)
        iid = self.by_key.get(key)
        inc = self.incidents.get(iid) if iid else None
        if inc is not None and inc.status is IncidentStatus.RESOLVED:
            assert inc.resolved_at is not None
            if s.observed_at - inc.resolved_at <= timedelta(seconds=self.config.flap_window_s):
                return self._reopen(inc, s, fc, now)
            inc = None
        if inc is None:
            return self._open(key, scope, node, s, fc, now)
        return self._add(inc, s, fc, now)

    def _remember(self, signal_id: str, incident: str) -> None:
        self.seen[signal_id] = incident
        if len(self.seen) > self.config.seen_id_limit:
            self.seen.popitem(last=False)

    def _open(self, key: str, scope: IncidentScope, node: str | None, s: Signal, fc: FaultClass,
              now: datetime) -> list[IncidentChange]:
        inc = TrackedIncident(
            id=incident_id(key, s.id), key=key, cluster=s.cluster, scope=scope, node=node,
            category=fc.category, severity=max_severity(fc.severity, s.severity) if not fc.known else fc.severity,
            domain=fc.domain, title=fc.title, first_seen=s.observed_at, last_seen=s.observed_at,
        )
        self.incidents[inc.id] = inc
        self.by_key[key] = inc.id
        self._absorb(inc, s, fc)
        return [IncidentChange(kind=ChangeKind.OPENED, incident=inc.snapshot(), at=now)]

    def _reopen(self, inc: TrackedIncident, s: Signal, fc: FaultClass, now: datetime) -> list[IncidentChange]:
        inc.status = IncidentStatus.OPEN
        inc.flaps += 1
        inc.plan = None
        inc.resolved_at = None
        inc.version += 1
        self._absorb(inc, s, fc)
        return [IncidentChange(kind=ChangeKind.REOPENED, incident=inc.snapshot(), at=now)]

    def _add(self, inc: TrackedIncident, s: Signal, fc: FaultClass, now: datetime,
             fold: bool = False) -> list[IncidentChange]:
        dedupe_key = (inc.id, f"{s.fault_key()}#{s.code or ''}")
        last = self.last_fault_at.get(dedupe_key)
        window = timedelta(seconds=self.config.dedupe_window_s)
        material = self._absorb(inc, s, fc, fold=fold)
        if not material and last is not None and s.observed_at - last <= window:
            self.stats["suppressed"] += 1
            return []
        if not material:
            return []
        inc.version += 1
        return [IncidentChange(kind=ChangeKind.UPDATED, incident=inc.snapshot(), at=now)]

    def _absorb(self, inc: TrackedIncident, s: Signal, fc: FaultClass, fold: bool = False) -> bool:
        """Add a fault signal's facts to an incident; True when something an SRE would notice changed."""
        self._remember(s.id, inc.id)
        self.last_fault_at[(inc.id, f"{s.fault_key()}#{s.code or ''}")] = s.observed_at
        material = False
        inc.signal_count += 1
        if len(inc.signal_ids) < self.config.signal_id_limit:
            inc.signal_ids.append(s.id)
        if len(inc.evidence) < self.config.evidence_limit and s.message:
            inc.evidence.append(s.message)
        inc.last_seen = max(inc.last_seen, s.observed_at)
        ck = code_key(s)
        if ck not in inc.counts:
            material = True
        inc.counts[ck] = inc.counts.get(ck, 0) + 1
        if s.check not in inc.checks:
            inc.checks.append(s.check)
        if s.node not in inc.nodes:
            inc.nodes.append(s.node)
            material = True
        if s.gpu is not None and s.gpu.key() not in inc.gpus:
            inc.gpus[s.gpu.key()] = s.gpu
            material = True
        if s.tenant is not None and s.tenant.key() not in inc.tenants:
            inc.tenants[s.tenant.key()] = s.tenant
            material = True
        for k, v in s.labels.items():
            inc.labels.setdefault(k, v)
        fk = s.fault_key()
        if fk not in inc.open_faults or inc.open_faults[fk] < s.observed_at:
            inc.open_faults[fk] = s.observed_at
            self.by_fault[fk] = inc.id
        if not fold:
            material |= self._merge_class(inc, fc)
        material |= self._companions(inc)
        return material

    def _merge_class(self, inc: TrackedIncident, fc: FaultClass) -> bool:
        changed = False
        if category_rank(fc.category) < category_rank(inc.category):
            inc.category, inc.title = fc.category, fc.title
            if fc.domain is Domain.OPERATOR or inc.domain is not Domain.OPERATOR:
                inc.domain = fc.domain
            changed = True
        sev = max_severity(inc.severity, fc.severity)
        if sev is not inc.severity:
            inc.severity, changed = sev, True
        return changed

    def _companions(self, inc: TrackedIncident) -> bool:
        """XID 48 with 63/64 on the same GPU means drain-and-reset (NVIDIA WORKFLOW_XID_48)."""
        if "xid:48" not in inc.counts or inc.category != "gpu_reset_required":
            return False
        if any(f"xid:{c}" in inc.counts for c in self.catalog.correlation.dbe_companions):
            spec = self.catalog.category("gpu_drain_reset_required")
            inc.category, inc.title = "gpu_drain_reset_required", "XID 48 DBE with row-remap event: drain and reset"
            inc.severity = max_severity(inc.severity, spec.severity)
            return True
        return False

    def _clear(self, s: Signal, now: datetime) -> list[IncidentChange]:
        self.stats["healthy"] += 1
        fk = s.fault_key()
        iid = self.by_fault.get(fk)
        inc = self.incidents.get(iid) if iid else None
        if inc is None or fk not in inc.open_faults:
            return []
        if s.observed_at < inc.open_faults[fk]:
            return []  # a healthy reading older than the fault never clears it
        del inc.open_faults[fk]
        self.by_fault.pop(fk, None)
        inc.version += 1
        if not inc.open_faults and inc.status is IncidentStatus.OPEN and inc.plan is None:
            inc.status = IncidentStatus.RESOLVED
            inc.resolved_at = s.observed_at
            return [IncidentChange(kind=ChangeKind.RESOLVED, incident=inc.snapshot(), at=now)]
        return [IncidentChange(kind=ChangeKind.UPDATED, incident=inc.snapshot(), at=now)]

    # -- remediator feedback ---------------------------------------------------------------------
    def apply_action(self, rec: ActionRecord, now: datetime) -> list[IncidentChange]:
        """Fold one audit record into the incident lifecycle."""
        inc = self.incidents.get(rec.incident_id)
        if inc is None or rec.dry_run:
            if inc is not None and rec.kind is ActionKind.PLAN and rec.plan is not None and inc.plan is None:
                inc.plan = rec.plan
                inc.version += 1
                return [IncidentChange(kind=ChangeKind.STATUS, incident=inc.snapshot(), at=now)]
            return []
        before = (inc.status, inc.plan)
        if rec.kind is ActionKind.PLAN:
            if rec.outcome is ActionOutcome.PLANNED and rec.plan is not None:
                inc.plan = rec.plan
            elif rec.outcome is ActionOutcome.COMPLETED:
                self._set_status(inc, IncidentStatus.RESOLVED, rec.at)
            elif rec.outcome in (ActionOutcome.ESCALATED, ActionOutcome.FAILED):
                self._set_status(inc, IncidentStatus.ESCALATED, rec.at)
        elif rec.kind is ActionKind.STEP and rec.outcome in (ActionOutcome.STARTED, ActionOutcome.SUCCEEDED):
            if rec.action is StepAction.VALIDATE:
                self._set_status(inc, IncidentStatus.VALIDATING, rec.at)
            elif rec.action is StepAction.RETURN_TO_SERVICE and rec.outcome is ActionOutcome.SUCCEEDED:
                self._set_status(inc, IncidentStatus.RESOLVED, rec.at)
            elif rec.action is StepAction.ESCALATE:
                self._set_status(inc, IncidentStatus.ESCALATED, rec.at)
            elif rec.action not in (StepAction.RETURN_TO_SERVICE, StepAction.NOTIFY_TENANT):
                self._set_status(inc, IncidentStatus.MITIGATING, rec.at)
        if (inc.status, inc.plan) == before:
            return []
        inc.version += 1
        kind = ChangeKind.RESOLVED if inc.status is IncidentStatus.RESOLVED else ChangeKind.STATUS
        return [IncidentChange(kind=kind, incident=inc.snapshot(), at=now)]

    def _set_status(self, inc: TrackedIncident, status: IncidentStatus, at: datetime) -> None:
        if inc.status.terminal:
            return
        inc.status = status
        if status is IncidentStatus.RESOLVED:
            inc.resolved_at = at
            for fk in list(inc.open_faults):
                self.by_fault.pop(fk, None)
            inc.open_faults.clear()
