"""An incident's plan task for the remediator service, and the service's answers to the executor's step questions.

``RemediatorService.spawn`` starts ``guarded`` as the incident's one task: it waits for the lease and (a new plan)
the policy's ``settle_s``, then tries (``remediate``) until no guard says "not now" (``retry_refused_s`` between
tries), and runs the re-decided plan when the one before stopped at a step (``redo``). One try reads the incident's
latest version from the service, returns a node left cordoned (``planrun.return_cordoned``) or hands it back after
a stop (``planrun.after_stop``), lets a deferred repair wait for its GPU outside the node lock
(``remediator.deferral``), then decides and runs the plan under the node lock (``planrun.decide_and_run``).

``StepHooks`` is what the ``Executor`` asks the service while it carries a plan out: the ``gate`` before every step
(kill switches, retry caps, from the guard state; a capped step let run is saved through the keeper), the other
holders of a node before it returns to service, and the ``soak`` before capacity returns (``follow.recurrence``
against the incident's latest version). Every effect goes through ``remediator.planrun``, the executor or the keeper.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from breakfix.remediator import deferral as deferral_wait
from breakfix.remediator import planrun
from breakfix.remediator.actuator import StepResult
from breakfix.remediator.follow import deferral, recurrence
from breakfix.remediator.guards import step_check
from breakfix.remediator.reconcile import ATTEMPT_STRIDE
from breakfix.remediator.records import PlanRecord
from breakfix.schemas.incident import Incident, IncidentStatus, Plan, Step

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")


async def guarded(svc: RemediatorService, incident_id: str, attempt: int, resume: PlanRecord | None,
                  settle: bool) -> None:
    try:
        await svc.leading_event.wait()
        if resume is None and settle:
            await svc.clock.sleep(svc.policy.settle_s)
        while True:
            while await remediate(svc, incident_id, attempt, resume):
                await svc.clock.sleep(svc.retry_refused_s)
            again = svc.redo.pop(incident_id, None)  # its plan stopped at a step: the re-decided one runs now
            if again is None:
                break
            attempt, resume = again, None
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("remediation_crashed", incident=incident_id, error=repr(exc))
    finally:
        if svc.tasks.get(incident_id) is asyncio.current_task():
            del svc.tasks[incident_id]
            svc.redo.pop(incident_id, None)


async def remediate(svc: RemediatorService, incident_id: str, attempt: int, resume: PlanRecord | None) -> bool:
    """One try; True when a guard said 'not now' and the same incident should be tried again later."""
    if resume is None:
        inc = svc.latest.get(incident_id)
        if inc is not None and inc.status is IncidentStatus.RESOLVED and inc.id in svc.guards.cooled:
            return await planrun.return_cordoned(svc, inc, attempt)
        if inc is not None and inc.id in svc.stopped and \
                (inc.status.terminal or inc.parent or svc.covered.get(inc.id)):
            return await planrun.after_stop(svc, inc, attempt)
        if inc is None or inc.status.terminal or inc.flaps * ATTEMPT_STRIDE > attempt:
            return False
        if planrun.covered(svc, inc):
            return False
        first = svc.decisions.plan(inc, await svc.view(), svc.policy, busy=svc.guards.active)
        while inc.id not in svc.deferred and (early := deferral(first)) is not None:  # outside the node lock
            if not await deferral_wait.wait_idle(svc, inc, first, attempt, early):
                svc.deferred.add(inc.id)
                break
            inc = svc.latest.get(inc.id, inc)  # the incident changed while it waited: decide again
            if inc.status.terminal:
                return False
            first = svc.decisions.plan(inc, await svc.view(), svc.policy, busy=svc.guards.active)
    else:
        inc = resume.incident
    async with svc.node_locks.hold(inc.node or f"fabric:{inc.id}"):
        return await planrun.decide_and_run(svc, inc, attempt, resume)


class StepHooks:
    """The service's side of the executor's ``gate``, ``holders`` and ``soak`` callbacks."""

    def __init__(self, svc: RemediatorService) -> None:
        self.svc = svc

    def gate(self, inc: Incident, plan: Plan, step: Step, key: str) -> str | None:
        """The executor asks before every step: kill switches switched on since the plan started (on the rule, or on
        a code of the incident as it stands now), retry caps. A capped step let run is remembered
        (``GuardState.cleared``), so a plan resumed at it is not refused for it."""
        svc = self.svc
        now = svc.clock.now()
        refusal = step_check(svc.latest.get(inc.id, inc), step, svc.guards, svc.policy.guards, now, rule=plan.rule,
                             key=key)
        if refusal is None and inc.node is not None and step.action in svc.policy.guards.retry_caps:
            svc.guards.cleared[inc.id] = (key, now)
            svc.keeper.save()
        return refusal.reason if refusal else None

    def holders(self, inc: Incident, node: str) -> str | None:
        others = self.svc.guards.holders(node, inc.id)
        return ", ".join(f"{i} ({why})" for i, why in sorted(others.items())) or None

    async def soak(self, inc: Incident) -> StepResult:
        """Capacity returns only after a quiet period in which the fault did not recur (``follow.recurrence``)."""
        svc = self.svc
        before = svc.latest.get(inc.id, inc)
        await svc.clock.sleep(svc.policy.guards.soak_s)
        what = recurrence(before, svc.latest.get(inc.id, inc), svc.companion)
        if what is not None:
            return StepResult(False, f"the fault recurred during the {svc.policy.guards.soak_s:g}s soak: {what}",
                              {"recurred": what})
        return StepResult(True, f"quiet for {svc.policy.guards.soak_s:g}s")
