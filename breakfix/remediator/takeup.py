"""On becoming the leader (at start without a lease): resume the running plans, take up the unplanned incidents.

Both are read fresh from the stores each time this replica becomes the leader, never at process start
on a standby (a record read then may be long finished by the other replica), and again after a lease
flap (losing the lease cancels every plan task; ``remediator.leading``).

The remediator acks an incident's ``opened`` change once that incident's task has started; a plan record
is written only when the plan's first step runs. An incident that was settling, waiting out a deferral,
or refused for a budget or a cooldown when the process stopped (or lost the lease) has no record, and
nothing would deliver its change again. Each time this replica becomes the leader,
``remediator.terms.serve`` calls ``take_up_until_done`` before it starts consuming: ``take_up`` reads
the incident index (JetStream KV ``breakfix-incidents``, the correlator's latest version of every
incident; this cluster's keys only, one entry at a time) and hands what ``remediator.reconcile`` picks
to the service, as if the change had just arrived. Openings found there count towards the circuit
breaker first, so a mass event during the outage still trips it. A node the cooldown cordoned for an incident
that resolved meanwhile (``GuardState.cooled``) is validated and returned. The waits it was in carry on where they
were: the first budget refusal and the deferral deadline are kept in the guard state (``guards.GuardState``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from breakfix.bus.clock import first_of
from breakfix.remediator import planrun
from breakfix.remediator.follow import held_nodes
from breakfix.remediator.reconcile import ATTEMPT_STRIDE, OpenIncidents, unplanned
from breakfix.remediator.records import PlanRecord, ProgressState
from breakfix.schemas import subjects
from breakfix.schemas.incident import IncidentStatus

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")
SCAN_TIMEOUT_S = 30.0  # the index read may stall this long without progress before start-up goes on without it


async def until_set(event: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait for ``event`` (this replica leads); False when ``stop`` came first."""
    await first_of(event.wait(), stop.wait(), name="remediator-wait-lead")
    return not stop.is_set()


async def end_of_term(leading: asyncio.Event, stop: asyncio.Event, term: asyncio.Event, *, poll_s: float) -> None:
    """Set ``term`` once this replica stops leading or ``stop`` is set (checked every ``poll_s``, at most 0.1 s:
    after a lost lease the consumers hand messages back for at most that long)."""
    while leading.is_set() and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(poll_s, 0.1))
    term.set()


async def take_up_until_done(svc: RemediatorService, stop: asyncio.Event, leading: asyncio.Event, *,
                             retry_s: float) -> None:
    """``take_up``, tried again every ``retry_s`` while the plan store cannot be read (and this replica leads)."""
    while not stop.is_set() and leading.is_set():
        try:
            await take_up(svc)
            return
        except Exception as exc:  # the plan store is unreachable: plans are resumed once it answers
            log.error("take_up_failed", error=repr(exc), retry_s=retry_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry_s)


async def take_up(svc: RemediatorService) -> int:
    """Resume the store's running plans, then one reconciliation against the index; returns how many incidents
    were taken up again."""
    records = await svc.book.all()
    resume(svc, records)
    found = await read_open(svc.bus, svc.cluster, watch=frozenset(svc.guards.cooled))
    if found is None:
        return 0
    for inc in found.ended:  # resolved while no replica led: the node the cooldown cordoned for it goes back
        if inc.status is IncidentStatus.RESOLVED and inc.id not in svc.tasks:
            log.warning("returning_cooldown_cordon", incident=inc.id, node=svc.guards.cooled[inc.id])
            svc.track(inc)
            svc.spawn(inc.id, inc.flaps * ATTEMPT_STRIDE, None, settle=False)
        elif inc.status is not IncidentStatus.RESOLVED:  # stale or escalated: a human owns the node now (paged)
            log.warning("cooldown_cordon_left_to_a_human", incident=inc.id, node=svc.guards.cooled.pop(inc.id, ""),
                        status=inc.status.value)
            svc.keeper.save()
    behind = []  # plans resumed (and started) with an older version of their incident than the index holds
    for inc in found.incidents:
        prev = svc.latest.get(inc.id)
        if prev is None or inc.version >= prev.version:
            svc.track(inc)
            if prev is not None and inc.version > prev.version and (inc.id in svc.current or inc.id in svc.awaiting):
                behind.append(inc)
    for inc in behind:  # re-decided as a live update would be (one not started yet is, when it starts: planrun.behind)
        await svc.maybe_redecide(inc)
    for inc in found.incidents:  # folded while no replica led: the parent's plan has the node
        if inc.parent is not None:
            await planrun.folded(svc, inc)
    for inc in sorted(found.incidents, key=lambda i: (i.first_seen, i.id)):
        await svc.observe_open(inc)  # counts nodes once: an opening already seen before the stop is harmless
    planned = {rec.incident.id: rec.progress.attempt for rec in records  # a cancelled plan covers nothing: a
               if rec.progress.state is not ProgressState.CANCELLED}  # human's cancel leaves the incident waiting
    again = unplanned(found.incidents, planned=planned, running=svc.tasks, queued=svc.guards.queued,
                      covered=svc.covered)
    for inc in again:
        log.warning("taken_up_again", incident=inc.id, node=inc.node, category=inc.category,
                    waiting=inc.waiting.value if inc.waiting else None)
        svc.taken_up[inc.id] = inc.version
        await svc.admit(inc)
    log.info("index_reconciled", open=len(found.incidents), taken_up=len(again), undecodable=found.undecodable,
             over_limit=found.over_limit)
    return len(again)


def resume(svc: RemediatorService, records: list[PlanRecord]) -> None:
    """Resume every running plan in the store at its step (on becoming the leader, ``remediator.takeup``); the
    approvals gauges count the plans the store says wait for one."""
    waiting = [rec for rec in records if rec.progress.state is ProgressState.AWAITING_APPROVAL]
    svc.observe.metrics.awaiting(rec.incident.id for rec in waiting)
    for rec in waiting:  # incident updates may re-decide a plan that waits for an approval (planrun.redecide_awaiting)
        svc.awaiting[rec.incident.id] = (rec.plan, rec.incident.category, rec.progress.attempt)
        planrun.remember_acted(svc, rec)
    for rec in records:
        if not rec.progress.state.live:
            continue
        inc = rec.incident
        for node in held_nodes(rec.plan, inc):  # the budget counts plans in flight (a group's fenced members)
            if inc.node or node not in svc.guards.active:  # a member in another incident's plan stays counted there
                svc.guards.start(node, inc.id)
        svc.latest.setdefault(inc.id, inc)
        if rec.progress.state is ProgressState.RUNNING and inc.id not in svc.tasks:
            log.warning("resuming", incident=inc.id, rung=rec.progress.rung, step=rec.progress.step)
            svc.spawn(inc.id, rec.progress.attempt, rec)


async def read_open(bus: object, cluster: str, *, watch: frozenset[str] = frozenset()) -> OpenIncidents | None:
    """The open incidents of ``cluster`` in the index, and those of ``watch`` found terminal; None when there is no
    index to read (logged)."""
    scan = getattr(bus, "kv_scan", None)
    exists = getattr(bus, "kv_exists", None)
    if scan is None or exists is None:
        return None
    found = OpenIncidents(watch=watch)
    try:  # the correlator creates the bucket (with its retention): never created here
        if not await exists(subjects.INCIDENT_INDEX_BUCKET):
            return None
        async for entry in scan(subjects.INCIDENT_INDEX_BUCKET, f"{subjects.token(cluster)}.",
                                timeout_s=SCAN_TIMEOUT_S):
            found.add(entry)
    except Exception as exc:  # no permission, a stalled read: start without it
        log.warning("index_unreadable", error=repr(exc))
        return None
    return found


__all__ = ["end_of_term", "read_open", "resume", "take_up", "take_up_until_done", "until_set"]
