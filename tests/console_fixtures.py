"""Shared set-up for the console tests: incidents and records on a real nats-server, and a running console."""

from __future__ import annotations

from datetime import timedelta

from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.console.auth import AuthConfig, hash_token
from breakfix.correlator.index import IncidentIndex
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    Plan,
    Rung,
    Step,
    StepAction,
    TimelineEntry,
    WaitingOn,
)
from tests.conftest import T0

TOKENS = {"olga": "operator-token-1", "vera": "viewer-token-1", "adam": "admin-token-1"}


def auth_config(ttl_s: float = 3600.0) -> AuthConfig:
    roles = {"olga": "operator", "vera": "viewer", "adam": "admin"}
    return AuthConfig.model_validate({"mode": "users", "session_ttl_s": ttl_s, "users": [
        {"name": n, "role": roles[n], "token_hash": hash_token(t)} for n, t in TOKENS.items()]})


LADDER = Plan(domain=Domain.OPERATOR, rule="gpu-reset-ladder", reason="XID 48 double-bit ECC error",
              ladder=(Rung(name="reset", steps=(Step(action=StepAction.DRAIN_GPU), Step(action=StepAction.RESET_GPU),
                                                 Step(action=StepAction.VALIDATE))),
                      Rung(name="reprovision", steps=(Step(action=StepAction.CORDON),
                                                      Step(action=StepAction.REPROVISION, requires_approval=True)))))


def incident(iid: str, *, node: str = "gpu-node-001", cluster: str = "c1", status: IncidentStatus = IncidentStatus.OPEN,
             category: str = "gpu_reset_required", waiting: WaitingOn | None = None, version: int = 1,
             minutes: float = 0, plan: Plan | None = LADDER, rack: str = "rack-1") -> Incident:
    at = T0 + timedelta(minutes=minutes)
    return Incident(id=iid, cluster=cluster, scope=IncidentScope.GPU, node=node, nodes=(node,),
                    gpus=(GpuRef(index=2),), tenants=(TenantRef(namespace="team-a", pod="train-0"),),
                    category=category, severity=Severity.CRITICAL, status=status, title=f"XID 48 on {node} GPU 2",
                    codes=("xid:48",), first_seen=at, last_seen=at, version=version, plan=plan, waiting=waiting,
                    labels={"rack": rack}, evidence=(f"NVRM: Xid (PCI:0000:1a:00): 48, pid=1234 on {node}",),
                    timeline=(TimelineEntry(at=at, event="opened", note=f"xid:48 on {node}/gpu2"),),
                    time_to_repair_s=300.0 if status is IncidentStatus.RESOLVED else None,
                    resolved_at=at + timedelta(minutes=5) if status is IncidentStatus.RESOLVED else None)


def awaiting(inc: Incident, index: int = 1) -> ActionRecord:
    """The remediator's record of a step that waits for approval."""
    return ActionRecord(id=f"wait-{inc.id}", cluster=inc.cluster, incident_id=inc.id, kind=ActionKind.REFUSAL,
                        action=StepAction.REPROVISION, step_index=index, outcome=ActionOutcome.REFUSED,
                        actor="remediator/test", rule="gpu-reset-ladder", waiting=WaitingOn.APPROVAL,
                        reason=f"awaiting approval: breakfix approve {inc.id} reprovision",
                        details={"rung": "reprovision"}, node=inc.node, at=inc.first_seen + timedelta(seconds=30))


async def seed(bus: JetStreamBus, incidents: list[Incident], records: list[ActionRecord]) -> None:
    """Publish as the correlator and remediator would: changes on the stream, latest in the index."""
    await bus.ensure_streams(subjects.STREAMS)
    for inc in incidents:
        await bus.publish(subjects.incident_subject(inc.cluster),
                          encode(IncidentChange(kind=ChangeKind.OPENED, incident=inc, at=inc.first_seen)))
    await IncidentIndex(bus).write(incidents)
    for rec in records:
        await bus.publish(subjects.action_subject(rec.cluster), encode(rec), msg_id=rec.id)
