"""The circuit breaker's page: when ``guards.GuardState.observe_open`` trips it, on-call gets one page listing
every incident the breaker now holds. It is a ``NOTIFICATION`` record on ``breakfix.actions.<cluster>`` (plus the
actuator's escalation), so no incident is marked escalated by the breaker's own record; ``breakfix breaker
reset`` (``remediator.human``) re-drives the held incidents."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from breakfix.schemas.incident import ActionKind, ActionOutcome, Domain, Incident, WaitingOn

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")


async def page_breaker(svc: RemediatorService, inc: Incident) -> None:
    reason = svc.guards.breaker_reason
    log.error("breaker_tripped", reason=reason)
    svc.keeper.save()
    held = sorted(i.id for i in svc.latest.values() if not i.status.terminal and i.domain is Domain.OPERATOR)
    why = (f"circuit breaker tripped, automated operator actions stopped: {reason}; held incidents: "
           f"{', '.join(held)}; reset with 'breakfix breaker reset' to re-drive them")
    await svc.actuator.escalate(None, why, incident=inc.id)
    await svc.publish(svc.record(inc, ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, why, tag="breaker",
                                 waiting=WaitingOn.BREAKER, details={"guard": "breaker", "held": ",".join(held)}))
