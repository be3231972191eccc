"""Leadership terms: the remediator consumes and acts only while it holds the lease (always without one).

``serve`` runs the service's terms: each starts from the stores (the guard state after time as a standby,
the running plans and the unplanned incidents, ``remediator.takeup``), then runs the incident
and human-verb consumers until the lease is lost or the service stops; a standby consumes nothing, so it
neither acts on nor saves a stale picture, and what the old leader had not acked is delivered to the new
one. ``end_plans`` ends every plan task of a term (``cancel_until_done``: cancelled until it has ended).
Called by ``RemediatorService.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from breakfix.bus.codec import decoder
from breakfix.bus.consumer import ConsumerSpec, run_consumer
from breakfix.remediator.takeup import end_of_term, take_up_until_done, until_set
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionRecord, IncidentChange

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")


async def serve(svc: RemediatorService, stop: asyncio.Event) -> None:
    """Consume incident changes and human verbs only while ``svc`` leads; one term per lease held."""
    incidents = ConsumerSpec(subjects.INCIDENTS.name, svc.durable, subjects.INCIDENTS_ALL,
                             decoder(IncidentChange), svc.on_change, batch=1024)  # a burst: decided in one pass
    control = ConsumerSpec(subjects.ACTIONS.name, f"{svc.durable}-control", subjects.HUMAN_ACTIONS_ALL,
                           decoder(ActionRecord), svc.human.on_record)  # its own records: ``Observers.stored``
    leading = svc.leading_event
    # the guard state is loaded at start; with a lease it is read again when a term begins after time as a
    # standby (the other leader may have moved it), never under plans of this replica's own running term
    lost = svc.elector is not None
    while await until_set(leading, stop):
        term = asyncio.Event()
        try:
            if lost:
                await svc.keeper.load()
            lost = False
            await take_up_until_done(svc, stop, leading, retry_s=svc.lease_renew_s)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_consumer(svc.bus, incidents, stop=term, stats=svc.stats),
                               name="remediator-incidents")
                tg.create_task(run_consumer(svc.bus, control, stop=term, stats=svc.control_stats),
                               name="remediator-control")
                tg.create_task(end_of_term(leading, stop, term, poll_s=svc.lease_renew_s), name="remediator-term")
        except Exception as exc:  # a store or bus error starting the term: a new term after a pause
            log.error("term_failed", error=repr(exc))
            term.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=svc.lease_renew_s)
        finally:
            if svc.elector is not None and not leading.is_set():
                lost = True
                await end_plans(svc)  # nothing started in the term outlives it


async def end_plans(svc: RemediatorService) -> None:
    """End every plan task (and first the helpers that would start one once the plan they wait on ends)."""
    helpers = list(svc.helpers)
    for h in helpers:
        h.cancel()
    await asyncio.gather(*helpers, return_exceptions=True)
    await asyncio.gather(*(cancel_until_done(t) for t in list(svc.tasks.values())))


async def cancel_until_done(task: asyncio.Task[None], *, every_s: float = 0.5) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again every ``every_s``: on Python 3.11 an
    ``asyncio.wait_for`` whose inner future completes in the same loop turn swallows a cancellation, and a
    stopped plan that carried on would run its old steps to the end (a re-decision lost)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)


__all__ = ["cancel_until_done", "end_plans", "serve"]
