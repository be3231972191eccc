"""Running one incident's plan for the remediator service: decide, guard, carry out, and what follows a stop.

``plantask.remediate`` calls ``decide_and_run`` under the node lock for an opened, reopened, retried
or resumed incident: the pure ``decide`` (through the service's decision memory) and ``guards.check``, then the
``Executor``. A refusal (``refused``) waits, queues behind the breaker, fences and pages, or cordons a broken node
while its cooldown damps the repair. A plan resumed from its stored record whose incident moved on meanwhile is
re-decided first (``behind``). A plan stopped for a re-decision that has nothing left to run hands its node back
(``after_stop``); a node left cordoned by a damped repair or a stopped plan is validated and returned when its
incident resolves (``return_cordoned``). An incident folded into another on its node lets the node go (``folded``).
State lives on the service (guards, plan book, current plans) and is written through its keeper; every effect goes
through the executor, the actuator or an audit record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from breakfix.remediator.breaker import fence, return_plan
from breakfix.remediator.executor import step_key
from breakfix.remediator.follow import held_nodes, ran_until, redecision, step_at, turns_cautious, undefer
from breakfix.remediator.guards import Refusal, check, wait_key
from breakfix.remediator.records import WAIT_ENDS, PlanRecord, Progress, ProgressState
from breakfix.remediator.store import Conflict
from breakfix.remediator.view import ClusterView
from breakfix.schemas.common import Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    Incident,
    IncidentScope,
    IncidentStatus,
    Plan,
    StepAction,
    WaitingOn,
)

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")


async def decide_and_run(svc: RemediatorService, inc: Incident, attempt: int, resume: PlanRecord | None) -> bool:
    view = await svc.view()
    if resume is None:
        inc = svc.latest.get(inc.id, inc)
        if inc.status.terminal:
            return False
        if covered(svc, inc):  # folded while it waited for the node lock: the parent's plan has the node
            return False
        plan = svc.decisions.plan(inc, view, svc.policy, busy=svc.guards.active)
        svc.decisions.forget(inc.id)  # what runs is decided: the next ask is a new version or a retry
        plan = undefer(plan) if inc.id in svc.deferred else plan
        progress = None
    else:
        plan, progress = resume.plan, resume.progress
        remember_acted(svc, resume)
        here = step_at(plan, progress.rung, progress.step)
        if here is not None and not here.requires_approval and here.action in svc.policy.guards.retry_caps:
            # progress stands at a step only once its gate let it run (an approved step: once a human approved
            # it): resumed there, the step's own start is not a second run against its retry cap
            svc.guards.cleared[inc.id] = (step_key(inc.id, progress.attempt, progress.rung, progress.step),
                                           svc.clock.now())
    live = not (plan.dry_run or plan.shadow)
    held = held_nodes(plan, inc)
    for node in held:
        svc.guards.hold(node, inc.id, f"{plan.rule}: {inc.category}")
    if held:
        svc.keeper.save()
    if resume is None:
        refusal = check(inc, plan, svc.guards, view, svc.policy.guards, svc.clock.now())
        if refusal is not None and live:
            return await refused(svc, inc, plan, refusal, attempt)
    if svc.guards.budget_since.pop(wait_key(inc), None) is not None:
        svc.keeper.save()
    svc.guards.queued.pop(inc.id, None)
    return await run_plan(svc, inc, plan, attempt, progress, held, view)

async def refused(svc: RemediatorService, inc: Incident, plan: Plan, refusal: Refusal, attempt: int) -> bool:
    now = svc.clock.now()
    reason = refusal.reason
    if refusal.guard in ("budget", "topology_budget"):
        since = svc.guards.budget_since.setdefault(wait_key(inc), now)  # kept across restarts (guard state)
        if since == now:
            svc.keeper.save()
        waited = (now - since).total_seconds()
        if waited > svc.policy.guards.budget_wait_s:
            reason = f"waited {waited:.0f}s for remediation budget (limit {svc.policy.guards.budget_wait_s:g}s)"
            refusal = Refusal(refusal.guard, f"{reason}: {refusal.reason}", False, WaitingOn.HUMAN, fence=True)
    rec = svc.record(inc, ActionKind.REFUSAL, ActionOutcome.REFUSED, refusal.reason,
                      tag=f"refusal-{refusal.guard}", waiting=refusal.waiting, rule=plan.rule,
                      details={"guard": refusal.guard})
    await svc.publish(rec)
    log.warning("refused", incident=inc.id, guard=refusal.guard, reason=refusal.reason)
    if refusal.guard == "breaker":
        svc.guards.queued[inc.id] = inc.first_seen
        svc.keeper.save()
        return False
    if refusal.fence and inc.node is not None:
        await fence(svc, inc, refusal, attempt)
        return False
    if refusal.guard == "cooldown" and inc.node is not None and inc.severity.rank >= Severity.CRITICAL.rank \
            and inc.id not in svc.guards.cooled:
        svc.guards.cooled[inc.id] = inc.node  # a broken node does not take work while its repair is damped
        svc.keeper.save()  # kept, so a restart or the next leader returns it when the incident resolves
        done = await svc.actuator.cordon(inc.node, incident=inc.id, reason=f"breakfix {inc.id}: {inc.category}")
        await svc.publish(svc.record(inc, ActionKind.STEP, ActionOutcome.SUCCEEDED if done.ok else
                                       ActionOutcome.FAILED, f"{done.detail} while the cooldown damps the repair",
                                       tag="cooldown-cordon", action=StepAction.CORDON,
                                       waiting=WaitingOn.COOLDOWN, rule=plan.rule))
    return refusal.retry

async def run_plan(svc: RemediatorService, inc: Incident, plan: Plan, attempt: int, progress: Progress | None,
               held: tuple[str, ...], view: ClusterView | None = None) -> bool:
    # the revision as the run starts (the raw entry's: nothing validated): a writer that moves it before the run's
    # first save (a stale ex-leader) stops this run with a conflict rather than being overwritten
    save = svc.book.saver(inc, plan, await svc.book.revision(inc.id))
    for node in held:  # a group's member already in another incident's plan stays counted once, under that one
        if inc.node is not None or node not in svc.guards.active:
            svc.guards.start(node, inc.id)
    if held:
        svc.keeper.save()
    svc.current[inc.id] = (plan, inc.category, attempt)
    if progress is not None and view is not None and (why := behind(svc, inc, plan, attempt, view)) is not None:
        # resumed with an incident that changed meanwhile so that a more severe plan fits: it replaces this one
        svc.current.pop(inc.id, None)
        svc.guards.stop(inc.id)  # the re-decided plan takes the node on (held) and counts again when it starts
        svc.stopped.add(inc.id)
        svc.keeper.save()
        await svc.cancel_record(inc.id)
        await svc.publish(svc.record(inc, ActionKind.PLAN, ActionOutcome.CANCELLED, why,
                                       tag=ActionOutcome.CANCELLED.value, rule=plan.rule))
        svc.redo[inc.id] = attempt + 1
        return False
    svc.stopped.discard(inc.id)  # the re-decided plan (or a resumed one) has the node now
    log.info("plan", incident=inc.id, node=inc.node, rule=plan.rule, rungs=[r.name for r in plan.rungs()],
             resume=progress is not None)
    try:
        outcome = await svc.executor.run(inc, plan, attempt=attempt, progress=progress, save=save)
    except Conflict:
        log.warning("plan_taken_over", incident=inc.id)  # another remediator owns it now
        return False
    finally:
        if svc.current.get(inc.id, (None, "", -1))[2] == attempt:
            svc.current.pop(inc.id, None)
    if svc.guards.cleared.pop(inc.id, None) is not None:
        svc.keeper.save()
    if outcome is ActionOutcome.REFUSED:  # a step waits for approval: incident updates may re-decide it meanwhile
        svc.awaiting[inc.id] = (plan, inc.category, attempt)
        latest = svc.latest.get(inc.id)
        if latest is not None and latest.status in WAIT_ENDS:  # resolved while the plan ran to its wait: the update
            await svc.end_approval_wait(latest)  # found the plan still running and left the wait to be ended here
            if latest.status is IncidentStatus.RESOLVED and inc.id not in svc.guards.cooled:
                svc.release_resolved(latest)
    if outcome is ActionOutcome.CANCELLED:  # stopped at a step for a re-decision: the new plan takes the node on
        log.info("plan_stopped", incident=inc.id, node=inc.node, rule=plan.rule)
        if held:  # its budget slot is free (the re-decided plan counts when it starts); the node stays held
            svc.guards.stop(inc.id)
            svc.stopped.add(inc.id)
            svc.keeper.save()
        return False
    if held and outcome is not ActionOutcome.REFUSED:
        if inc.node is not None:  # the cooldown compares with the fault as it is now, companions included
            svc.guards.finish(inc.node, inc.id, svc.clock.now(), svc.latest.get(inc.id, inc))
        else:
            svc.guards.stop(inc.id)  # a group's plan repaired nothing: no cooldown on its members
        if outcome is ActionOutcome.COMPLETED:
            svc.guards.unhold(inc.id)
        svc.keeper.save()
    log.info("plan_done", incident=inc.id, outcome=outcome.value)
    return False

def behind(svc: RemediatorService, inc: Incident, plan: Plan, attempt: int, view: ClusterView) -> str | None:
    """A plan resumed (a restart, a new leader) from a stored record whose incident is older than the latest
    version known (the index, a change that came meanwhile): re-decided as a live update would be
    (``RemediatorService.maybe_redecide``). Turned cautious: it stops at its next step and the cautious plan runs
    (None); more severe, or a late category change before anything disruptive ran: why it is replaced now."""
    latest = svc.latest.get(inc.id)
    if latest is not None and fold_parent(svc, latest) is not None:  # folded while no replica ran it: it ends here
        svc.stop_at_step(inc.id, attempt, f"folded into {latest.parent}, whose plan has {inc.node}")
        return None
    if latest is None or latest.version <= inc.version:
        return None
    now = svc.decisions.plan(latest, view, svc.policy, busy=svc.guards.active)
    why = redecision(plan, inc.category, now, latest, inc.id in svc.acted)
    if why is None:
        return None
    log.warning("redecide_resumed", incident=inc.id, node=inc.node, old=plan.rule, why=why,
                stored=inc.version, latest=latest.version)
    if turns_cautious(plan, inc.category, now, latest):
        svc.stop_at_step(inc.id, attempt, why)
        return None
    return why

def fold_parent(svc: RemediatorService, inc: Incident) -> Incident | None:
    """The incident ``inc`` folded into, where that one stands on its node (a multi-GPU node incident, the GPU that went
    down taking its NVLink peers) and its plan has the node; None for no parent, one not seen yet, or a fabric parent,
    whose plan fences and escalates its members' nodes: a fabric member keeps its node hold and its plan in flight
    (one not started yet does not start, as for any folded incident: ``covered``)."""
    parent = svc.latest.get(inc.parent) if inc.parent else None
    return parent if parent is not None and parent.scope is not IncidentScope.FABRIC else None


def covered(svc: RemediatorService, inc: Incident) -> bool:
    """Whether a parent incident (a fold, or a fabric incident fencing the node) has the node, so this incident's plan
    does not start; a folded one lets go of the node (``let_go``)."""
    cover = inc.parent or svc.covered.get(inc.id)
    if cover is None:
        return False
    log.info("covered", incident=inc.id, by=cover)
    let_go(svc, inc)
    return True


def let_go(svc: RemediatorService, inc: Incident) -> None:
    """A folded incident (``fold_parent``) holds its node no longer, so the parent's return is not held back by it."""
    if inc.node is not None and inc.id in svc.guards.holders(inc.node, "") and fold_parent(svc, inc) is not None:
        log.info("folded_node_released", incident=inc.id, node=inc.node, into=inc.parent)
        svc.guards.unhold(inc.id)
        svc.keeper.save()


async def folded(svc: RemediatorService, inc: Incident) -> None:
    """The incident folded into another whose plan has its node (``fold_parent``): its plan in flight stops at its next
    step (``after_stop`` then lets the node go), a step of it waiting for approval is cancelled, and one not running
    lets go of the node at once (``let_go``)."""
    parent = fold_parent(svc, inc)
    if parent is None or inc.status.terminal:
        return
    why = f"folded into {parent.id}, whose plan has {inc.node}"
    held = svc.current.get(inc.id)
    if held is not None:
        log.info("folded_plan_stops", incident=inc.id, node=inc.node, into=parent.id, rule=held[0].rule)
        svc.stop_at_step(inc.id, held[2], why)
        return
    if inc.id in svc.awaiting:
        await svc.end_approval_wait(inc, why=why)
    let_go(svc, inc)


async def fold_members(svc: RemediatorService, inc: Incident) -> None:
    """``folded`` for the members of ``inc`` already seen folded into it (their change came before its own)."""
    for mid in inc.members:
        member = svc.latest.get(mid)
        if member is not None and member.parent == inc.id:
            await folded(svc, member)


async def after_stop(svc: RemediatorService, inc: Incident, attempt: int) -> bool:
    """The incident's plan stopped at a step for a re-decision (``turns_cautious``, ``behind``), and the
    re-decided plan has nothing to run: the incident resolved (its node, left cordoned and held by the stopped
    plan, is validated and returned as a cooldown-cordoned one is: ``return_cordoned``), or a parent incident
    covers it (the parent's plan has the node; this incident holds it no longer). Escalated or stale, the node
    stays held for the human already paged."""
    svc.stopped.discard(inc.id)
    if inc.status is IncidentStatus.RESOLVED and inc.node is not None:
        why = f"{inc.id} resolved after its plan stopped for a re-decision, {inc.node} still cordoned; " \
              "validate, then return it"
        return await return_cordoned(svc, inc, attempt, why=why, rule="stopped-return")
    if not inc.status.terminal:  # covered: the parent's plan has the node, this incident holds it no longer
        log.info("stopped_plan_covered", incident=inc.id, by=inc.parent or svc.covered.get(inc.id))
        svc.guards.unhold(inc.id)
        svc.keeper.save()
    return False

async def return_cordoned(svc: RemediatorService, inc: Incident, attempt: int, *, why: str = "",
                           rule: str = "cooldown-return") -> bool:
    """The incident resolved while its node stayed cordoned for a repair the cooldown damped (``refused``):
    nothing else would return the node, so it is validated and returned unless another incident holds it; a
    failed validation keeps it cordoned and held, and pages (the executor escalates)."""
    assert inc.node is not None
    why = why or f"{inc.id} resolved while {inc.node} stayed cordoned for its damped repair; validate, then " \
                 "return it"
    plan = return_plan(inc, (inc.node,), why, rule=rule)
    async with svc.node_locks.hold(inc.node):
        outcome = await svc.executor.run(inc, plan, attempt=attempt + 60)
    svc.guards.cooled.pop(inc.id, None)  # kept until the return ran: one cut short is taken up by the next leader
    if outcome is ActionOutcome.COMPLETED:
        svc.guards.unhold(inc.id)
    else:
        svc.guards.hold(inc.node, inc.id, "cordoned while the cooldown damped its repair; validation failed")
    svc.keeper.save()
    return False


def remember_acted(svc: RemediatorService, rec: PlanRecord) -> None:
    """A stored plan that already ran a step: a late companion never re-decides it into a second reset."""
    if ran_until(rec.plan, rec.progress.rung, rec.progress.step):
        svc.acted.add(rec.incident.id)


async def redecide_awaiting(svc: RemediatorService, inc: Incident) -> None:
    """A newer version of an incident whose plan waits for an approval (a reprovision, say): re-decided as a plan
    in flight is (``follow.redecision``: turned cautious, more severe, or a late category change before anything
    disruptive ran). When another plan fits now, the wait ends: the stored plan is cancelled, so a late approval
    finds nothing to approve and no restart resumes it, a ``cancelled`` record says why, and the new plan starts.
    Before, the change waited until someone approved (the resumed plan was re-decided then) or denied it."""
    held = svc.awaiting[inc.id]
    plan, category, attempt = held
    now = svc.decisions.plan(inc, await svc.view(), svc.policy, busy=svc.guards.active)
    why = redecision(plan, category, now, inc, inc.id in svc.acted)
    if why is None or svc.awaiting.get(inc.id) is not held:
        return
    del svc.awaiting[inc.id]
    if not await svc.cancel_record(inc.id, only=ProgressState.AWAITING_APPROVAL):
        return  # approved, denied or cancelled meanwhile: that path goes on
    log.warning("redecide_awaiting_approval", incident=inc.id, node=inc.node, old=plan.rule, new=now.rule, why=why)
    svc.guards.stop(inc.id)  # the node stays held; the new plan counts against the budget when it starts
    svc.keeper.save()
    await svc.publish(svc.record(inc, ActionKind.PLAN, ActionOutcome.CANCELLED,
                                 f"{why}; the step waiting for approval will not run",
                                 tag=ActionOutcome.CANCELLED.value, rule=plan.rule))
    svc.decide_again(inc.id, attempt + 1)  # its task may still be returning from the approval wait
