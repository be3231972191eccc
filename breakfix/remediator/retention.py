"""What the remediator service remembers of incidents, and when it forgets them.

``track`` takes each incident version the service's consumer (``RemediatorService.on_change``) or the take-up
after a restart (``remediator.takeup``) hands it, into the service's LRU map of latest versions
(``RemediatorService.latest``) and its map of group members to the group that covers them (``covered``).
``forget_old`` runs after every change: the map is capped at ``max_incidents``, and finished incidents leave after
the policy's ``retention_s`` (a sweep at most once a minute); ``forget`` drops an incident from every per-incident
map of the service, its decision memory (``remediator.decisions``) and the guard state (waits, cooldown, a
resolved incident's hold), saved through the keeper. Nothing is published.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from breakfix.schemas.incident import Incident, IncidentStatus

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService


def track(svc: RemediatorService, inc: Incident) -> None:
    """Remember an incident's latest version and the members it covers."""
    svc.latest[inc.id] = inc
    svc.latest.move_to_end(inc.id)
    for member in inc.members:
        if inc.status.terminal:
            svc.covered.pop(member, None)
        else:
            svc.covered[member] = inc.id


def forget_old(svc: RemediatorService) -> None:
    """Finished incidents leave memory after ``retention_s``; the map is LRU-capped at ``max_incidents``."""
    horizon = svc.policy.guards.retention_s
    now = svc.clock.now()
    while len(svc.latest) > svc.max_incidents:
        forget(svc, next(iter(svc.latest)))
    if svc.clock.monotonic() - svc._swept < min(60.0, horizon / 10):
        return  # a sweep is O(incidents): at most once a minute
    svc._swept = svc.clock.monotonic()
    for iid in [i for i, inc in svc.latest.items() if inc.status.terminal and i not in svc.tasks
                and (now - inc.last_seen).total_seconds() > horizon
                and (inc.resolved_at is None or (now - inc.resolved_at).total_seconds() > horizon)]:
        forget(svc, iid)


def forget(svc: RemediatorService, iid: str) -> None:
    inc = svc.latest.pop(iid, None)
    svc.covered = {m: c for m, c in svc.covered.items() if c != iid and m != iid}
    svc.acted.discard(iid)
    if svc.guards.cooled.pop(iid, None) is not None:
        svc.keeper.save()
    svc.deferred.discard(iid)
    svc.redo.pop(iid, None)
    svc.stopped.discard(iid)
    svc.awaiting.pop(iid, None)
    svc.decisions.forget(iid)
    if svc.guards.end_waits(iid):
        svc.keeper.save()
    svc.taken_up.pop(iid, None)
    if inc is not None and inc.status is IncidentStatus.RESOLVED:
        svc.guards.forget(iid)  # an escalated incident keeps its hold until a human releases it
