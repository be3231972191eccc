"""Incidents, plans and the audit record (``breakfix.incident/v1``, ``breakfix.action/v1``).

The correlator builds ``Incident``s from signals and publishes an ``IncidentChange`` on
``breakfix.incidents.<cluster>`` on every change. The remediator reads them, decides a
``Plan`` (an ordered list of typed ``Step``s), carries it out, and publishes one
``ActionRecord`` per plan, step, refusal or approval on ``breakfix.actions.<cluster>``;
the correlator folds those records back into the incident's lifecycle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from breakfix.schemas.common import GpuRef, Severity, TenantRef, UtcDatetime

INCIDENT_SCHEMA: Literal["breakfix.incident/v1"] = "breakfix.incident/v1"
ACTION_SCHEMA: Literal["breakfix.action/v1"] = "breakfix.action/v1"

_FROZEN = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)  # finite numbers only


class IncidentScope(StrEnum):
    GPU = "gpu"
    NODE = "node"
    TENANT = "tenant"
    FABRIC = "fabric"


# An incident label the correlator sets when one of its signals named a MIG GPU instance (kmsg ``GPU-I``, dcgm-exporter
# ``GPU_I_ID``); incident-wide, so the remediator reads it only to refuse taking the GPUs for whole.
MIG_SEEN_LABEL = "breakfix.io/mig-instance-seen"


class IncidentStatus(StrEnum):
    OPEN = "open"
    MITIGATING = "mitigating"
    VALIDATING = "validating"
    RESOLVED = "resolved"
    ESCALATED = "escalated"
    STALE = "stale"  # closed by the correlator after ``max_open_age_s`` without a signal; on-call is told

    @property
    def terminal(self) -> bool:
        return self in (IncidentStatus.RESOLVED, IncidentStatus.ESCALATED, IncidentStatus.STALE)


class Domain(StrEnum):
    """Who owns the fix: the tenant's workload, the operator's hardware, or nobody."""

    TENANT = "tenant"
    OPERATOR = "operator"
    NONE = "none"


class WaitingOn(StrEnum):
    """What an open incident's plan is waiting on, shown instead of a bare ``open``."""

    APPROVAL = "approval"
    BUDGET = "budget"
    BREAKER = "breaker"
    COOLDOWN = "cooldown"
    SOAK = "soak"
    HUMAN = "human"
    IDLE = "idle"  # deferred repair: waits for the GPU to go idle or its job to end (with a deadline)


class StepAction(StrEnum):
    NOTIFY_TENANT = "notify_tenant"
    RESTART_POD = "restart_pod"
    CORDON = "cordon"
    DRAIN = "drain"
    DRAIN_GPU = "drain_gpu"
    RESET_GPU = "reset_gpu"
    REBOOT = "reboot"
    REPROVISION = "reprovision"
    VALIDATE = "validate"
    RETURN_TO_SERVICE = "return_to_service"
    ESCALATE = "escalate"

    @property
    def disruptive(self) -> bool:
        """Steps that take capacity or state away from a node."""
        return self in _DISRUPTIVE


_DISRUPTIVE = frozenset(
    {StepAction.DRAIN, StepAction.DRAIN_GPU, StepAction.RESET_GPU, StepAction.REBOOT, StepAction.REPROVISION}
)


class Step(BaseModel):
    """One typed effect. ``params`` carry action-specific knobs such as the diag ``level``."""

    model_config = _FROZEN

    action: StepAction
    params: dict[str, str | int | bool] = Field(default_factory=dict)
    timeout_s: float = Field(default=600.0, gt=0)
    requires_approval: bool = False


class Rung(BaseModel):
    """One rung of an escalation ladder: its steps all succeed, or the next rung is taken."""

    model_config = _FROZEN

    name: str
    steps: tuple[Step, ...]
    timeout_s: float = Field(default=3600.0, gt=0, description="The whole rung must finish within this.")


class Plan(BaseModel):
    """What the remediator decided for one incident, and why.

    ``steps`` is the first rung; ``ladder`` holds every rung in order (a one-rung plan when the
    rule has no ladder). ``shadow`` plans are recorded, never carried out.
    """

    model_config = _FROZEN

    domain: Domain
    rule: str = Field(description="Name of the policy rule that chose this plan.")
    reason: str = Field(description="One human sentence.")
    steps: tuple[Step, ...] = ()
    ladder: tuple[Rung, ...] = ()
    dry_run: bool = False
    shadow: bool = False

    def actions(self) -> list[str]:
        return [s.action.value for s in self.steps]

    def rungs(self) -> tuple[Rung, ...]:
        return self.ladder or (Rung(name="main", steps=self.steps),)


class CodeCount(BaseModel):
    model_config = _FROZEN

    key: str
    count: int


class TimelineEntry(BaseModel):
    """One state change in an incident's life, for the SRE reading why it exists."""

    model_config = _FROZEN

    at: UtcDatetime
    event: str = Field(description="opened, escalated, folded, status:<s>, lemon, ...")
    note: str = ""


class Incident(BaseModel):
    """A correlated problem: one per real fault, however many signals it took to see it."""

    model_config = _FROZEN

    schema_: Literal["breakfix.incident/v1"] = Field(default=INCIDENT_SCHEMA, alias="schema")
    id: str
    cluster: str
    scope: IncidentScope
    node: str | None = Field(description="Null for fabric incidents.")
    nodes: tuple[str, ...] = ()
    gpus: tuple[GpuRef, ...] = ()
    tenants: tuple[TenantRef, ...] = ()
    category: str
    severity: Severity
    domain: Domain = Domain.OPERATOR
    status: IncidentStatus = IncidentStatus.OPEN
    title: str = ""
    codes: tuple[str, ...] = Field(default=(), description="Fault codes seen, e.g. xid:48, dcgm:DCGM_FR_...")
    checks: tuple[str, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)
    first_seen: UtcDatetime
    last_seen: UtcDatetime
    signal_ids: tuple[str, ...] = ()
    signal_count: int = 0
    duplicate_count: int = 0
    counts: tuple[CodeCount, ...] = ()
    flaps: int = 0
    open_faults: tuple[str, ...] = Field(default=(), description="Fault keys not yet cleared.")
    evidence: tuple[str, ...] = Field(default=(), description="First raw messages, oldest first.")
    plan: Plan | None = None
    resolved_at: UtcDatetime | None = None
    version: int = 1
    timeline: tuple[TimelineEntry, ...] = Field(default=(), description="State changes, oldest first (bounded).")
    parent: str | None = Field(
        default=None,
        description="The incident this one is folded into: a fabric incident, or the hardware incident "
        "that causes this endpoint breach. The remediator acts on the parent only.",
    )
    members: tuple[str, ...] = Field(default=(), description="Fabric incidents: the folded node/GPU incidents.")
    topology: dict[str, str] = Field(
        default_factory=dict, description="Fabric incidents: the shared component, e.g. {switch: leaf-03}."
    )
    impact: tuple[TenantRef, ...] = Field(
        default=(), description="Tenant endpoints whose SLO breach this hardware incident causes."
    )
    time_to_repair_s: float | None = None
    waiting: WaitingOn | None = Field(
        default=None, description="What the plan waits on (from the remediator's latest record); null when nothing."
    )
    source: str = Field(
        default="", description="The NVIDIA document (or breakfix rule) behind the incident's category."
    )
    overflow: dict[str, int] = Field(
        default_factory=dict,
        description="Items past a per-incident cap, by kind (codes, components, open_faults, evidence, timeline): "
                    "'+N more' that were counted but not listed.",
    )


class ChangeKind(StrEnum):
    OPENED = "opened"
    UPDATED = "updated"
    REOPENED = "reopened"
    STATUS = "status"
    RESOLVED = "resolved"
    FOLDED = "folded"


class IncidentChange(BaseModel):
    """What the correlator publishes: the incident as it now is, and what changed."""

    model_config = _FROZEN

    kind: ChangeKind
    incident: Incident
    at: UtcDatetime


class ActionKind(StrEnum):
    PLAN = "plan"
    STEP = "step"
    REFUSAL = "refusal"
    APPROVAL = "approval"
    # human verbs (published on the on-call / admin subjects, see ``subjects.oncall_subject``)
    DENIAL = "denial"
    ACK = "ack"
    SILENCE = "silence"
    NOTE = "note"
    ASSIGN = "assign"
    RELEASE = "release"
    CANCEL = "cancel"
    BREAKER = "breaker"
    KILL_SWITCH = "kill_switch"
    # the remediator's record of a notification it sent (or failed to send)
    NOTIFICATION = "notification"


class ActionOutcome(StrEnum):
    PLANNED = "planned"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    DRY_RUN = "dry_run"
    REFUSED = "refused"
    APPROVED = "approved"
    COMPLETED = "completed"
    ESCALATED = "escalated"
    DENIED = "denied"
    REQUESTED = "requested"
    CANCELLED = "cancelled"
    WAITING = "waiting"


class ActionRecord(BaseModel):
    """One line of the audit trail: who or what did which step, when, why, with what outcome."""

    model_config = _FROZEN

    schema_: Literal["breakfix.action/v1"] = Field(default=ACTION_SCHEMA, alias="schema")
    id: str = Field(description="Deterministic: incident, step index, action and outcome.")
    cluster: str
    incident_id: str
    kind: ActionKind
    action: StepAction | None = None
    step_index: int | None = None
    outcome: ActionOutcome
    actor: str = Field(description="Who or what acted, e.g. remediator/<host> or a user.")
    rule: str = ""
    reason: str = ""
    node: str | None = None
    gpu: GpuRef | None = None
    domain: Domain | None = None
    dry_run: bool = False
    plan: Plan | None = None
    details: dict[str, str] = Field(default_factory=dict)
    waiting: WaitingOn | None = Field(default=None, description="Set when the plan now waits on something.")
    at: UtcDatetime
