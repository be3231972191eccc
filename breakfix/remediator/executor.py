"""The executor: the one place a ``Plan`` turns into effects, one audited step at a time.

Input: an incident and the plan ``decide`` chose (a ladder of rungs). Each step calls the
``Actuator`` and publishes ``ActionRecord``s (started, then succeeded/failed) through the
injected ``publish`` callback; the clock is injected too. A failed step (a failed validation
included) ends its rung and the next rung runs; when the ladder is exhausted the node stays
cordoned and the plan escalates with a one-line RMA summary. A step that needs approval stops
the plan with a refusal record until ``breakfix approve`` names it. Dry-run and shadow plans
record what would have happened and touch nothing.

Crash safety: before and after every step the executor hands a ``Progress`` to ``save``
(the plan store, with optimistic concurrency), and every node-side step carries an
idempotency key, so a remediator killed mid-step resumes at that step and the node agent
answers a repeated key without acting again (no double reboot). Before capacity returns,
``soak`` must confirm the node stayed quiet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from breakfix.remediator.actuator import Actuator, StepResult
from breakfix.schemas.incident import (
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
Soak = Callable[[Incident], Awaitable[StepResult]]


@dataclass
class Progress:
    """Where a plan stands: the store's record of it (``remediator.store``)."""

    incident: str
    attempt: int
    rung: int = 0
    step: int = 0
    state: str = "running"  # running | awaiting_approval | done | escalated
    approved: list[str] = field(default_factory=list)  # "rung:step" approvals received

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        return cls(**d)


Save = Callable[[Progress], Awaitable[None]]


def record_id(incident: str, attempt: int, kind: str, index: int | None, action: str, outcome: str,
              rung: int = 0) -> str:
    raw = f"{incident}\x1f{attempt}\x1f{rung}\x1f{kind}\x1f{index}\x1f{action}\x1f{outcome}"
    return "act-" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def step_key(incident: str, attempt: int, rung: int, index: int) -> str:
    """The idempotency key of one step: the same step of the same plan always has the same key."""
    return f"{incident}:{attempt}:{rung}:{index}"


def rma_summary(incident: Incident) -> str:
    """One line for the RMA ticket / page."""
    gpus = ",".join(g.label() for g in incident.gpus) or "-"
    codes = ",".join(incident.codes) or "-"
    return (f"{incident.cluster}/{incident.node or '-'} gpus={gpus} category={incident.category} "
            f"codes={codes} signals={incident.signal_count} first_seen={incident.first_seen.isoformat()}")


async def _no_save(_p: Progress) -> None:
    return None


class Executor:
    def __init__(self, actuator: Actuator, publish: Publish, clock: Clock, *, actor: str,
                 soak: Soak | None = None) -> None:
        self.actuator = actuator
        self.publish = publish
        self.clock = clock
        self.actor = actor
        self.soak = soak

    async def _record(self, incident: Incident, plan: Plan, attempt: int, kind: ActionKind,
                      outcome: ActionOutcome, *, step: Step | None = None, index: int | None = None,
                      rung: int = 0, reason: str = "", details: dict[str, str] | None = None,
                      with_plan: bool = False) -> None:
        action = step.action if step else None
        gpu = incident.gpus[0] if incident.gpus else None
        rungs = plan.rungs()
        extra = {"rung": rungs[rung].name} if kind is not ActionKind.PLAN and rung < len(rungs) else {}
        rec = ActionRecord(
            id=record_id(incident.id, attempt, kind.value, index, action.value if action else "", outcome.value,
                         rung),
            cluster=incident.cluster, incident_id=incident.id, kind=kind, action=action, step_index=index,
            outcome=outcome, actor=self.actor, rule=plan.rule, reason=reason or plan.reason,
            node=incident.node, gpu=gpu, domain=plan.domain, dry_run=plan.dry_run or plan.shadow,
            plan=plan if with_plan else None, details={**extra, **(details or {})}, at=self.clock(),
        )
        await self.publish(rec)

    async def run(self, incident: Incident, plan: Plan, *, attempt: int = 0, progress: Progress | None = None,
                  save: Save = _no_save) -> ActionOutcome:
        """Carry the plan out from ``progress`` (the start when None); return the plan's final outcome."""
        fresh = progress is None
        prog = progress or Progress(incident.id, attempt)
        if fresh:
            await self._record(incident, plan, attempt, ActionKind.PLAN, ActionOutcome.PLANNED, with_plan=True)
        rungs = plan.rungs()
        if plan.dry_run or plan.shadow:
            why = "dry-run" if plan.dry_run else f"shadow mode (rule {plan.rule})"
            for r, rung in enumerate(rungs):
                for i, step in enumerate(rung.steps):
                    await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.DRY_RUN, step=step,
                                       index=i, rung=r, reason=f"{why}: would have run this step")
            return ActionOutcome.DRY_RUN
        escalated = False
        while prog.rung < len(rungs):
            rung = rungs[prog.rung]
            failed: tuple[Step, StepResult] | None = None
            while prog.step < len(rung.steps):
                step = rung.steps[prog.step]
                tag = f"{prog.rung}:{prog.step}"
                if step.requires_approval and tag not in prog.approved:
                    prog.state = "awaiting_approval"
                    await save(prog)
                    await self._record(incident, plan, attempt, ActionKind.REFUSAL, ActionOutcome.REFUSED, step=step,
                                       index=prog.step, rung=prog.rung,
                                       reason=f"awaiting approval: breakfix approve {incident.id} {step.action.value}")
                    return ActionOutcome.REFUSED
                prog.state = "running"
                await save(prog)  # a crash from here on resumes at this very step, with the same key
                await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.STARTED, step=step,
                                   index=prog.step, rung=prog.rung)
                try:
                    result = await self._call(incident, step, step_key(incident.id, attempt, prog.rung, prog.step))
                except Exception as exc:  # an adapter bug must not kill the remediator
                    result = StepResult(False, f"{type(exc).__name__}: {exc}")
                outcome = ActionOutcome.SUCCEEDED if result.ok else ActionOutcome.FAILED
                await self._record(incident, plan, attempt, ActionKind.STEP, outcome, step=step, index=prog.step,
                                   rung=prog.rung, reason=result.detail, details=result.evidence)
                if not result.ok:
                    failed = (step, result)
                    break
                escalated |= step.action is StepAction.ESCALATE
                prog.step += 1
            if failed is None:
                prog.state = "done"
                await save(prog)
                final = ActionOutcome.ESCALATED if escalated else ActionOutcome.COMPLETED
                await self._record(incident, plan, attempt, ActionKind.PLAN, final,
                                   reason=f"rung {rung.name} completed" if not escalated else "")
                return final
            step, result = failed
            prog.rung += 1
            prog.step = 0
            if prog.rung < len(rungs):
                await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.SKIPPED, step=step,
                                   index=len(rung.steps), rung=prog.rung - 1,
                                   reason=f"{step.action.value} failed ({result.detail}); taking rung "
                                          f"{rungs[prog.rung].name}")
                continue
            return await self._exhausted(incident, plan, attempt, prog, save,
                                         f"{step.action.value} failed: {result.detail}")
        return await self._exhausted(incident, plan, attempt, prog, save, "ladder exhausted")

    async def _exhausted(self, incident: Incident, plan: Plan, attempt: int, prog: Progress, save: Save,
                         why: str) -> ActionOutcome:
        """The node stays as it is (cordoned when a rung cordoned it) and a human gets the RMA line."""
        summary = f"{why}; {rma_summary(incident)}"
        esc = Step(action=StepAction.ESCALATE, params={"node": incident.node or ""})
        await self.actuator.escalate(incident.node, summary, incident=incident.id)
        prog.state = "escalated"
        await save(prog)
        await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.SUCCEEDED, step=esc,
                           index=99, rung=max(0, prog.rung - 1), reason=summary)
        await self._record(incident, plan, attempt, ActionKind.PLAN, ActionOutcome.ESCALATED, reason=summary)
        return ActionOutcome.ESCALATED

    async def _call(self, incident: Incident, step: Step, key: str) -> StepResult:
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
                pods = tuple(x for x in str(p.get("pods", "")).split(",") if x)
                return await a.drain_gpu(node, gpu_i, incident=iid, pods=pods)
            case StepAction.RESET_GPU:
                assert gpu_i is not None
                return await a.reset_gpu(node, gpu_i, incident=iid, key=key)
            case StepAction.REBOOT:
                return await a.reboot(node, incident=iid, key=key)
            case StepAction.REPROVISION:
                return await a.reprovision(node, incident=iid, key=key)
            case StepAction.VALIDATE:
                return await a.validate(node, gpu_i, int(p.get("level", 2)), incident=iid, key=key)
            case StepAction.RETURN_TO_SERVICE:
                if self.soak is not None:
                    quiet = await self.soak(incident)
                    if not quiet.ok:
                        return quiet
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
