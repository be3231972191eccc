"""Stopping, cancelling and resuming an incident's plan for the remediator service as its incident changes.

Called through the service's methods of the same names (``RemediatorService.maybe_redecide``, ``cancel_record``,
``end_approval_wait``, ``resume_after``), from its incident consumer (``on_change``), the plan runner
(``remediator.planrun``), the take-up after a restart (``remediator.takeup``) and the human verbs
(``remediator.human``). Reads the incident's latest version and the plan in flight or waiting for approval from the
service, and the stored plan record from its ``PlanBook``. ``maybe_redecide`` re-decides a plan its incident's
update no longer fits (``follow.redecision``): stopped at its next step when it turns cautious
(``follow.turns_cautious``), else stopped now and decided again; ``end_approval_wait`` cancels a plan whose step
waits for approval when its incident resolves, goes stale or folds; ``cancel_record`` marks the stored plan
cancelled so no restart or new leader resumes it; ``resume_after`` resumes a stored plan approved while its task
was still returning. Out go cancelled plan records (``ActionRecord`` through ``RemediatorService.publish``),
guard state saved through the keeper, and new or stopped tasks.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from breakfix.remediator import planrun
from breakfix.remediator.follow import redecision, turns_cautious
from breakfix.remediator.records import ProgressState
from breakfix.remediator.store import Conflict
from breakfix.schemas.incident import ActionKind, ActionOutcome, Incident

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")


async def end_approval_wait(svc: RemediatorService, inc: Incident, *, why: str = "") -> None:
    """The incident resolved (or went stale, or folded into another whose plan has the node: ``why``) while a step
    of its plan waited for approval: the plan is cancelled, so neither a late approval nor a restart runs the step
    on a node with no open fault of its own."""
    svc.awaiting.pop(inc.id, None)
    if await svc.cancel_record(inc.id, only=ProgressState.AWAITING_APPROVAL):
        svc.guards.stop(inc.id)  # its budget slot is free; a resolved incident's node hold went with it
        svc.keeper.save()
        why = f"{why or f'{inc.id} is {inc.status.value}'}: the step waiting for approval will not run"
        log.warning("approval_wait_ended", incident=inc.id, status=inc.status.value, why=why)
        await svc.publish(svc.record(inc, ActionKind.PLAN, ActionOutcome.CANCELLED, why, tag="cancelled"))


async def cancel_record(svc: RemediatorService, incident_id: str, *, only: ProgressState | None = None) -> bool:
    """Mark the incident's stored plan cancelled if it is live (and in state ``only``, when given), so no restart
    or new leader resumes it; True when it was."""
    for _ in range(2):
        try:
            got = await svc.book.get(incident_id)
            if got is None or not got[0].progress.state.live or \
                    (only is not None and got[0].progress.state is not only):
                return False
            got[0].progress.state = ProgressState.CANCELLED
            await svc.book.put(got[0], got[1])
            return True
        except Conflict:
            continue  # another save landed in between: read it again
        except Exception as exc:  # the store did not answer: logged; the stop itself stands
            log.error("cancel_record_failed", incident=incident_id, error=repr(exc))
            return False
    log.warning("cancel_record_moved", incident=incident_id)  # another writer keeps moving it
    return False


def resume_after(svc: RemediatorService, old: asyncio.Task[None], incident_id: str) -> None:
    """Resume the incident's stored plan once ``old`` (its task, finishing) is done: an approval that came
    while the task was still returning from its approval wait. A guarded task; the consumer does not wait."""
    async def later() -> None:
        try:
            await asyncio.wait({old})
            got = await svc.book.get(incident_id)
            if got is not None and got[0].progress.state is ProgressState.RUNNING:
                svc.spawn(incident_id, got[0].progress.attempt, got[0])
        except Exception as exc:
            log.error("approval_resume_failed", incident=incident_id, error=repr(exc))
        finally:
            svc.helpers.discard(task)

    task = asyncio.create_task(later(), name=f"resume-after-approval-{incident_id}")
    svc.helpers.add(task)


async def maybe_redecide(svc: RemediatorService, inc: Incident) -> None:
    """A newer version of an incident whose plan is in flight or waits for an approval (a live update, or one the
    index had when a plan was resumed: ``remediator.takeup``): re-decide it (``follow.redecision``)."""
    held = svc.current.get(inc.id)
    if held is None:
        if inc.id in svc.awaiting:
            await planrun.redecide_awaiting(svc, inc)
        return
    plan, category, attempt = held
    now = svc.decisions.plan(inc, await svc.view(), svc.policy, busy=svc.guards.active)
    why = redecision(plan, category, now, inc, inc.id in svc.acted)
    if why is None:
        return
    log.warning("redecide", incident=inc.id, node=inc.node, old=plan.rule, why=why)
    if svc.current.get(inc.id) is not held:
        # the plan ended (or another took over) while the view was read: nothing is left to stop, but the incident
        # as it is now is decided again (a plan that completed meanwhile left an unknown fault unhandled)
        if inc.id not in svc.current:
            svc.decide_again(inc.id, attempt + 1)
        return
    if turns_cautious(plan, category, now, inc):
        svc.stop_at_step(inc.id, attempt, why)
        return
    await svc.stop_plan(inc, why, outcome=ActionOutcome.CANCELLED, rule=plan.rule)
    svc.spawn(inc.id, attempt + 1, None, settle=False)
