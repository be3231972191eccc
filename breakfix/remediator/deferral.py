"""A deferred repair's wait for its GPU to go idle, and what ends it early.

Where NVIDIA lets work continue until the next reset (a pending row remap, retired pages pending, XID 94
contained ECC), the policy's deferring rule (``defer_s``) waits for the GPU's pods to end, or a deadline
kept in the guard state so a restart keeps it (``guards.defer_until``). The service
(``remediator.service``) runs the wait outside the node lock through ``wait_idle``; the executor polls the
actuator (``Executor.wait_idle``). While it waits, every update of the incident goes to ``end_if_changed``:
when ``decide`` now picks a plan that must not wait (XID 154, XID 48 or a failed row remap joined, not an
informational or sympathetic companion such as XID 63: ``follow.wait_ends``), the wait ends at once, a
``cancelled`` plan record says why, and the service decides again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from breakfix.remediator.decide import decide
from breakfix.remediator.follow import wait_ends, without_companions
from breakfix.remediator.guards import wait_key
from breakfix.schemas.incident import ActionKind, ActionOutcome, Incident, Plan, Step

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")


@dataclass(slots=True)
class IdleWait:
    """A deferred repair waiting for its GPU to go idle: the plan it waits with, and what ends the wait early."""

    plan: Plan
    category: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set when the incident changed so another plan fits
    why: str = ""


async def end_if_changed(svc: RemediatorService, inc: Incident) -> None:
    """The incident's deferred repair waits for its GPU to go idle: a change after which ``decide`` picks another
    plan ends the wait now (``follow.wait_ends``), and the waiting task decides again."""
    wait = svc.waits.get(inc.id)
    if wait is None or wait.ended.is_set():
        return
    view = await svc.view()
    now = svc.decisions.plan(inc, view, svc.policy, busy=svc.guards.active)
    stripped = without_companions(inc, svc.companion) if now.rule != wait.plan.rule else None
    bare = decide(stripped, view, svc.policy, busy=svc.guards.active) if stripped is not None else None
    why = wait_ends(wait.plan, wait.category, now, inc, bare)
    if why is not None:
        wait.why = why
        wait.ended.set()


async def wait_idle(svc: RemediatorService, inc: Incident, plan: Plan, attempt: int, early: tuple[Step, float]) -> bool:
    """The deferred repair waits (outside the node lock) for its GPU to go idle, at most until the deadline kept
    in the guard state (a restart keeps it); True when the incident changed meanwhile so that another plan fits
    (``end_if_changed``): the wait ended early, audited with the reason, and the caller decides again."""
    until = svc.guards.defer_until.get(wait_key(inc))  # set before a restart: the same deadline
    if until is None:
        until = svc.guards.defer_until[wait_key(inc)] = svc.clock.now() + timedelta(seconds=early[1])
        svc.keeper.save()
    wait = svc.waits[inc.id] = IdleWait(plan, inc.category)
    try:
        if (latest := svc.latest.get(inc.id, inc)) is not inc:  # a change that came while this was decided
            await end_if_changed(svc, latest)
        ended = await svc.executor.wait_idle(inc, plan, attempt, early[0], until, changed=wait.ended)
    finally:
        if svc.waits.get(inc.id) is wait:
            del svc.waits[inc.id]
    if not ended:
        return False
    why = f"the wait for the GPU to go idle ended because the incident changed: {wait.why}"
    log.warning("deferred_wait_ended", incident=inc.id, node=inc.node, rule=plan.rule, why=wait.why)
    await svc.publish(svc.record(inc, ActionKind.PLAN, ActionOutcome.CANCELLED, why, tag="wait-ended",
                                 rule=plan.rule, details={"wait_ended": "incident_changed"}))
    return True
