"""The executor: the one place a ``Plan`` turns into effects, one audited step at a time.

Input: an incident and the plan ``decide`` chose (a ladder of rungs). Each step calls the
``Actuator`` and publishes ``ActionRecord``s (started, then succeeded/failed) through the
injected ``publish`` callback; the clock is injected too. A failed step (a failed validation, a
timed-out step included) ends its rung and the next rung runs; when the ladder is exhausted the
node stays cordoned and the plan escalates with a one-line RMA summary. A step that needs approval
stops the plan until ``breakfix approve`` names it. Dry-run and shadow plans record what would
have happened and touch nothing.

Enforced here, per step: its ``timeout_s`` and what is left of its rung's ``timeout_s``; the
``gate`` before every step (kill switches switched on since the plan started, retry caps; a
human's release runs ungated); the ``hold`` check before a return to service (the
node is uncordoned only when no other incident holds it); the ``soak`` before capacity returns; a
deferred step (``defer_s``) waits for the GPU to go idle or the deadline (``wait_idle``; the service's own wait
also ends when the incident changes). A reset the node agent refuses as ``busy:`` drains the node's pods and is
tried once more, instead of climbing to a reboot. ``stop_at_next_step``: a plan re-decided to a cautious one
starts no further step; the step in flight finishes (node-side steps are idempotent by key, below) and is
recorded, and the plan ends ``CANCELLED``.

Crash safety: before and after every step the executor hands a ``Progress`` to ``save``
(the plan store, with optimistic concurrency), and every node-side step carries an
idempotency key, so a remediator killed mid-step resumes at that step and the node agent
answers a repeated key without acting again (no double reboot).

What each step does on the actuator (the busy reset, MIG drains, the return's hold check) is in
``remediator.stepcalls``; record ids and step keys are made by ``remediator.ids``; their public names are
importable from here as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog

from breakfix.bus.clock import Clock, first_of
from breakfix.remediator.actuator import Actuator, StepResult
from breakfix.remediator.ids import keyed_digest as keyed_digest
from breakfix.remediator.ids import record_id, record_key, step_key
from breakfix.remediator.records import Progress, ProgressState
from breakfix.remediator.stepcalls import BUSY, _gpu, _pod_list, call_step, rma_summary
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    Incident,
    Plan,
    Step,
    StepAction,
    WaitingOn,
)

Publish = Callable[[ActionRecord], Awaitable[None]]
Soak = Callable[[Incident], Awaitable[StepResult]]
Gate = Callable[[Incident, Plan, Step, str], str | None]  # a reason the step (its idempotency key) may not run
Holders = Callable[[Incident, str], str | None]            # who else still holds the node, or None
Save = Callable[[Progress], Awaitable[None]]
log = structlog.get_logger("breakfix.remediator")
ESCALATE_MARKS_S = 120.0  # marking the escalated node (condition, event) may not hold up the page

__all__ = ["BUSY", "Executor", "Progress", "ProgressState", "record_id", "record_key", "rma_summary", "step_key"]


async def _no_save(_p: Progress) -> None:
    return None


class Executor:
    def __init__(self, actuator: Actuator, publish: Publish, clock: Clock, *, actor: str,
                 soak: Soak | None = None, gate: Gate | None = None, holders: Holders | None = None,
                 idle_poll_s: float = 30.0, id_key: bytes = b"") -> None:
        self.actuator = actuator
        self.id_key = id_key  # record ids are keyed with it (record_id)
        self.publish = publish
        self.clock = clock
        self.actor = actor
        self.soak = soak
        self.gate = gate
        self.holders = holders
        self.idle_poll_s = idle_poll_s
        self._stops: dict[tuple[str, int], str] = {}  # (incident, attempt) -> why its plan starts no further step

    def stop_at_next_step(self, incident: str, attempt: int, why: str) -> None:
        """The plan ``run`` carries out for ``incident``'s ``attempt`` starts no further step: the one in flight ends
        as it would (a node agent call is not cut off mid-way), then the plan ends ``CANCELLED`` with ``why``, its
        progress saved as cancelled so no restart resumes it. A plan that ends first forgets the request."""
        self._stops[(incident, attempt)] = why

    async def _record(self, incident: Incident, plan: Plan, attempt: int, kind: ActionKind,
                      outcome: ActionOutcome, *, step: Step | None = None, index: int | None = None,
                      rung: int = 0, reason: str = "", details: dict[str, str] | None = None,
                      with_plan: bool = False, waiting: WaitingOn | None = None) -> None:
        action = step.action if step else None
        gpu = incident.gpus[0] if incident.gpus else None
        rungs = plan.rungs()
        extra = {"rung": rungs[rung].name} if kind is not ActionKind.PLAN and rung < len(rungs) else {}
        if step is not None and step.params.get("mig") is True:
            extra["mig"] = "instances on this GPU must be recreated after the reset"
        rec = ActionRecord(
            id=record_id(incident.id, attempt, kind.value, index, action.value if action else "", outcome.value,
                         rung, key=self.id_key),
            cluster=incident.cluster, incident_id=incident.id, kind=kind, action=action, step_index=index,
            outcome=outcome, actor=self.actor, rule=plan.rule, reason=reason or plan.reason,
            node=incident.node, gpu=gpu, domain=plan.domain, dry_run=plan.dry_run or plan.shadow,
            plan=plan if with_plan else None, details={**extra, **(details or {})}, waiting=waiting,
            at=self.clock.now(),
        )
        await self.publish(rec)

    async def run(self, incident: Incident, plan: Plan, *, attempt: int = 0, progress: Progress | None = None,
                  save: Save = _no_save, guarded: bool = True) -> ActionOutcome:
        """Carry the plan out from ``progress`` (the start when None); return the plan's final outcome.
        ``guarded=False``: a plan a human ordered (a release), which the ``gate`` does not stop."""
        try:
            return await self._carry(incident, plan, attempt, progress, save, guarded)
        finally:  # a stop asked for as the plan ended never lingers for a later run under the same attempt
            self._stops.pop((incident.id, attempt), None)

    async def _carry(self, incident: Incident, plan: Plan, attempt: int, progress: Progress | None, save: Save,
                     guarded: bool) -> ActionOutcome:
        fresh = progress is None
        prog = progress or Progress(incident=incident.id, attempt=attempt)
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
        climbed = ""  # why the ladder left its last rung: an escalation on a later rung pages with it
        while prog.rung < len(rungs):
            rung = rungs[prog.rung]
            used = 0.0  # seconds this rung's steps have taken (waits for a human, soak and idle excluded)
            failed: tuple[Step, StepResult] | None = None
            while prog.step < len(rung.steps):
                if (stop := self._stops.pop((incident.id, attempt), None)) is not None:
                    return await self._stopped(incident, plan, attempt, prog, save, stop)
                step = rung.steps[prog.step]
                if step.requires_approval and prog.tag not in prog.approved:
                    prog.state = ProgressState.AWAITING_APPROVAL
                    await save(prog)
                    await self._record(incident, plan, attempt, ActionKind.REFUSAL, ActionOutcome.REFUSED, step=step,
                                       index=prog.step, rung=prog.rung, waiting=WaitingOn.APPROVAL,
                                       reason=f"awaiting approval: breakfix approve {incident.id} {step.action.value}")
                    return ActionOutcome.REFUSED
                key = step_key(incident.id, attempt, prog.rung, prog.step)
                refused = self.gate(incident, plan, step, key) if self.gate is not None and guarded else None
                if refused is not None:
                    return await self._exhausted(incident, plan, attempt, prog, save, f"refused: {refused}")
                prog.state = ProgressState.RUNNING
                await save(prog)  # a crash from here on resumes at this very step, with the same key
                if "defer_s" in step.params:
                    if prog.deadline is None:
                        prog.deadline = self.clock.now() + timedelta(seconds=float(step.params["defer_s"]))
                        await save(prog)  # a restart keeps the deadline it promised
                    await self.wait_idle(incident, plan, attempt, step, prog.deadline, rung=prog.rung,
                                         index=prog.step)
                await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.STARTED, step=step,
                                   index=prog.step, rung=prog.rung)
                result, took = await self._timed(incident, plan, attempt, prog, step, rung.timeout_s - used, climbed)
                used += took
                outcome = ActionOutcome.SUCCEEDED if result.ok else ActionOutcome.FAILED
                await self._record(incident, plan, attempt, ActionKind.STEP, outcome, step=step, index=prog.step,
                                   rung=prog.rung, reason=result.detail, details=result.evidence)
                if not result.ok:
                    failed = (step, result)
                    break
                escalated |= step.action is StepAction.ESCALATE
                prog.step += 1
            if failed is None:
                prog.state = ProgressState.ESCALATED if escalated else ProgressState.DONE
                await save(prog)
                final = ActionOutcome.ESCALATED if escalated else ActionOutcome.COMPLETED
                await self._record(incident, plan, attempt, ActionKind.PLAN, final,
                                   waiting=WaitingOn.HUMAN if escalated else None,
                                   reason=f"rung {rung.name} completed" if not escalated else "")
                return final
            step, result = failed
            climbed = f"{step.action.value} failed: {result.detail}"
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

    async def _timed(self, incident: Incident, plan: Plan, attempt: int, prog: Progress, step: Step,
                     rung_left: float, climbed: str = "") -> tuple[StepResult, float]:
        """Run one step under its timeout and what is left of the rung's; (result, seconds it took)."""
        key = step_key(incident.id, attempt, prog.rung, prog.step)
        soak = step.params.get("soak") is not False
        if step.action is StepAction.RETURN_TO_SERVICE and self.soak is not None and soak:
            await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.WAITING, step=step,
                               index=prog.step, rung=prog.rung, waiting=WaitingOn.SOAK,
                               reason="soak: capacity returns only after a quiet period")
            quiet = await self.soak(incident)
            if not quiet.ok:
                return quiet, 0.0
        limit = min(step.timeout_s, rung_left)
        which = "step" if step.timeout_s <= rung_left else "rung"
        start = self.clock.monotonic()
        try:
            if limit <= 0:
                raise TimeoutError
            async with asyncio.timeout(limit):
                result = await call_step(self.actuator, incident, step, key, climbed, holders=self.holders)
        except TimeoutError:
            result = StepResult(False, f"{step.action.value} timed out after {max(limit, 0):g}s "
                                       f"({which} timeout_s)", {"timeout": which})
        except Exception as exc:  # an adapter bug must not kill the remediator
            result = StepResult(False, f"{type(exc).__name__}: {exc}")
        return result, max(0.0, self.clock.monotonic() - start)

    async def wait_idle(self, incident: Incident, plan: Plan, attempt: int, step: Step, deadline: datetime, *,
                        rung: int = 0, index: int = 0, changed: asyncio.Event | None = None) -> bool:
        """Deferred repair: wait until the GPU's job has ended, or ``deadline``, whichever comes first, or until
        ``changed`` is set (the incident changed so that another plan fits: the caller decides again). True when
        ``changed`` ended the wait."""
        if changed is not None and changed.is_set():
            return True
        node, gpu = str(step.params.get("node", incident.node or "")), _gpu(step)
        pods = _pod_list(step.params.get("pods"))
        failed: list[str] = []  # the errors already logged in this wait (once each kind)
        if gpu is None or self.clock.now() >= deadline or await self._idle(incident.id, node, gpu, pods, failed):
            return False
        await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.WAITING, step=step,
                           index=index, rung=rung, waiting=WaitingOn.IDLE,
                           reason=f"deferred repair: waits for gpu{gpu} to go idle or until "
                                  f"{deadline.isoformat()}; the running job is not evicted now")
        if changed is None:
            await self._until_idle(incident.id, node, gpu, pods, deadline, failed)
            return False
        await first_of(self._until_idle(incident.id, node, gpu, pods, deadline, failed), changed.wait(),
                       name=f"wait-idle-{incident.id}")
        return changed.is_set()

    async def _idle(self, incident: str, node: str, gpu: int, pods: tuple[str, ...], failed: list[str]) -> bool:
        """Whether the GPU is idle; False when the actuator could not say (an API server blip): the wait goes on
        until the deadline, never ends early on an error. Each kind of error is logged once per wait."""
        try:
            return await self.actuator.gpu_idle(node, gpu, pods=pods)
        except Exception as exc:
            kind = type(exc).__name__
            if kind not in failed:
                failed.append(kind)
                log.warning("gpu_idle_unknown", incident=incident, node=node, gpu=gpu, error=repr(exc)[:300],
                            note="the deferred repair keeps waiting until the GPU is idle or the deadline")
            return False

    async def _until_idle(self, incident: str, node: str, gpu: int, pods: tuple[str, ...], deadline: datetime,
                          failed: list[str]) -> None:
        """Poll every ``idle_poll_s`` until the GPU is idle or ``deadline``; the loop's own timer bounds it too, so a
        node agent that stops answering does not stretch the wait past the deadline. An error polling is not an end
        (``_idle``)."""
        left = (deadline - self.clock.now()).total_seconds()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, left) + self.idle_poll_s):
                while self.clock.now() < deadline:
                    await self.clock.sleep(min(self.idle_poll_s, (deadline - self.clock.now()).total_seconds()))
                    if await self._idle(incident, node, gpu, pods, failed):
                        return

    async def _stopped(self, incident: Incident, plan: Plan, attempt: int, prog: Progress, save: Save,
                       why: str) -> ActionOutcome:
        """``stop_at_next_step``: saved as cancelled (no restart resumes it), recorded with the reason."""
        prog.state = ProgressState.CANCELLED
        await save(prog)
        await self._record(incident, plan, attempt, ActionKind.PLAN, ActionOutcome.CANCELLED, reason=why)
        return ActionOutcome.CANCELLED

    async def _exhausted(self, incident: Incident, plan: Plan, attempt: int, prog: Progress, save: Save,
                         why: str) -> ActionOutcome:
        """The node stays as it is (cordoned when a rung cordoned it) and a human gets the RMA line."""
        summary = f"{why}; {rma_summary(incident)}"
        esc = Step(action=StepAction.ESCALATE, params={"node": incident.node or ""})
        marks = ""
        try:  # the node's marks (condition, event) are best effort: the records and the page below must go out
            async with asyncio.timeout(ESCALATE_MARKS_S):
                await self.actuator.escalate(incident.node, summary, incident=incident.id)
        except Exception as exc:  # TimeoutError included
            marks = f" (the node's GPUHealthy condition and event were not written: {exc!r}"[:300] + ")"
        prog.state = ProgressState.ESCALATED
        await save(prog)
        # index None: the escalation that closes the ladder, not one of a rung's steps
        await self._record(incident, plan, attempt, ActionKind.STEP, ActionOutcome.SUCCEEDED, step=esc,
                           index=None, rung=max(0, prog.rung - 1), reason=summary + marks, waiting=WaitingOn.HUMAN)
        await self._record(incident, plan, attempt, ActionKind.PLAN, ActionOutcome.ESCALATED, reason=summary,
                           waiting=WaitingOn.HUMAN)
        return ActionOutcome.ESCALATED
