"""The executor: the one place a ``Plan`` turns into effects, one audited step at a time.

Input: an incident and the plan ``decide`` chose. Each step calls the ``Actuator`` and
publishes ``ActionRecord``s (started, then succeeded/failed) through the injected
``publish`` callback; the clock is injected too. A failed step stops the plan and
escalates; a step that needs approval stops and records a refusal until approved.
Dry-run records what would have happened and touches nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime

from remediator.actuator import Actuator, StepResult
from schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    Incident,
    Plan,
    Step,
    StepAction,
)

Publish = Callable[[ActionRecord], Awaitable[None]]
Clock = Callable[[], datetime]


def record_id(incident: str, attempt: int, kind: str, index: int | None, action: str, outcome: str) -> str:
    raw = f"{incident}\x1f{attempt}\x1f{kind}\x1f{index}\x1f{action}\x1f{outcome}"
    return "act-" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def rma_summary(incident: Incident) -> str:
    """One line for the RMA ticket / page."""
    gpus = ",".join(g.label() for g in incident.gpus) or "-"
    codes = ",".join(incident.codes) or "-"
    return (f"{incident.cluster}/{incident.node or '-'} gpus={gpus} category={incident.category} "
            f"codes={codes} signals={incident.signal_count} first_seen={incident.first_seen.isoformat()}")


class Executor:
    def __init__(self, actuator: Actuator, publish: Publish, clock: Clock, *, actor: str) -> None:
        self.actuator = actuator
        self.publish = publish
        self.clock = clock
        self.actor = actor

    async def _record(self, incident: Incident, plan: Plan, attempt: int, kind: ActionKind,
                      outcome: ActionOutcome, *, step: Step | None = None, index: int | None = None,
                      reason: str = "", details: dict[str, str] | None = None,
                      with_plan: bool = False) -> None:
        action = step.action if step else None
        gpu = incident.gpus[0] if incident.gpus else None
        rec = ActionRecord(
            id=record_id(incident.id, attempt, kind.value, index, action.value if action else "", outcome.value),
            cluster=incident.cluster, incident_id=incident.id, kind=kind, action=action, step_index=index,
            outcome=outcome, actor=self.actor, rule=plan.rule, reason=reason or plan.reason,
            node=incident.node, gpu=gpu, domain=plan.domain, dry_run=plan.dry_run,
            plan=plan if with_plan else None, details=details or {}, at=self.clock(),
        )
        await self.publish(rec)

    async def run(self, incident: Incident, plan: Plan, *, attempt: int = 0) -> ActionOutcome:
        """Carry the plan out; return the plan's final outcome."""
        await self._record(incident, plan, attempt, ActionKind.PLAN, ActionOutcome.PLANNED, with_plan=True)
        escalated = False
        for i, step in enumerate(plan.steps):
            if plan.dry_run:
                await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.DRY_RUN, step=step,
                                   index=i, reason="dry-run: would have run this step")
                continue
            if step.requires_approval:
                await self._record(incident, plan, attempt, ActionKind.REFUSAL, ActionOutcome.REFUSED, step=step,
                                   index=i, reason=f"awaiting approval: breakfix approve {incident.id} "
                                   f"{step.action.value}")
                return ActionOutcome.REFUSED
            await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.STARTED, step=step, index=i)
            try:
                result = await self._call(incident, step)
            except Exception as exc:  # an adapter bug must not kill the remediator
                result = StepResult(False, f"{type(exc).__name__}: {exc}")
            outcome = ActionOutcome.SUCCEEDED if result.ok else ActionOutcome.FAILED
            await self._record(incident, plan, attempt, ActionKind.STEP, outcome, step=step, index=i,
                               reason=result.detail, details=result.evidence)
            if not result.ok:
                esc = Step(action=StepAction.ESCALATE, params=step.params)
                summary = f"{step.action.value} failed: {result.detail}; {rma_summary(incident)}"
                await self.actuator.escalate(incident.node, summary, incident=incident.id)
                await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.SUCCEEDED, step=esc,
                                   index=len(plan.steps), reason=summary)
                await self._record(incident, plan, attempt, ActionKind.PLAN, ActionOutcome.ESCALATED, reason=summary)
                return ActionOutcome.ESCALATED
            escalated |= step.action is StepAction.ESCALATE
        if plan.dry_run:
            return ActionOutcome.DRY_RUN
        final = ActionOutcome.ESCALATED if escalated else ActionOutcome.COMPLETED
        await self._record(incident, plan, attempt, ActionKind.PLAN, final)
        return final

    async def _call(self, incident: Incident, step: Step) -> StepResult:
        a, p, iid = self.actuator, step.params, incident.id
        node = str(p.get("node", incident.node or ""))
        gpu = p.get("gpu")
        gpu_i = int(gpu) if isinstance(gpu, int | str) and str(gpu).isdigit() else None
        match step.action:
            case StepAction.CORDON:
                return await a.cordon(node, incident=iid, reason=f"breakfix {iid}: {incident.category}")
            case StepAction.DRAIN:
                return await a.drain(node, incident=iid)
            case StepAction.DRAIN_GPU | StepAction.RESET_GPU if gpu_i is None:
                return StepResult(False, f"{step.action.value} needs a GPU index and the incident has none")
            case StepAction.DRAIN_GPU:
                assert gpu_i is not None
                return await a.drain_gpu(node, gpu_i, incident=iid)
            case StepAction.RESET_GPU:
                assert gpu_i is not None
                return await a.reset_gpu(node, gpu_i, incident=iid)
            case StepAction.REBOOT:
                return await a.reboot(node, incident=iid)
            case StepAction.REPROVISION:
                return await a.reprovision(node, incident=iid)
            case StepAction.VALIDATE:
                return await a.validate(node, gpu_i, int(p.get("level", 2)), incident=iid)
            case StepAction.RETURN_TO_SERVICE:
                return await a.return_to_service(node, incident=iid)
            case StepAction.NOTIFY_TENANT:
                pod = p.get("pod")
                msg = f"breakfix {iid}: {incident.title}"
                return await a.notify_tenant(str(p.get("namespace", "")), str(pod) if pod else None, msg,
                                             incident=iid)
            case StepAction.RESTART_POD:
                return await a.restart_pod(str(p.get("namespace", "")), str(p.get("pod", "")), incident=iid)
            case StepAction.ESCALATE:
                return await a.escalate(incident.node, rma_summary(incident), incident=iid)
        return StepResult(False, f"no actuator for {step.action.value}")  # pragma: no cover
