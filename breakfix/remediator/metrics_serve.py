"""Serving the remediator's metrics and running its notifier beside the service (``--metrics-port``, 9473).

``run_observed`` runs the ``RemediatorService``, its ``bus.observe.ObserveServer`` (``/metrics``; ``/healthz``:
the service task is alive; ``/readyz``: it is consuming) and, when the config has a ``notify`` section with a
channel, the ``notify.service.NotifierService`` (only the lease holder sends). Just before each scrape the
gauges read the live guard state (breaker, budgets, held nodes), the cluster view the service last read, and
leadership; a standby exports 0 for what only the leader knows (breaker, approvals, held nodes, budget use).
Called by ``breakfix remediator``; the metric families are ``remediator.metrics``.
"""

from __future__ import annotations

import asyncio

from breakfix.bus.clock import Clock
from breakfix.bus.observe import REMEDIATOR_PORT, ObserveServer
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.service import NotifierService
from breakfix.remediator.service import RemediatorService


def is_leader(service: RemediatorService) -> bool:
    return service._leading.is_set()


def remediator_server(service: RemediatorService, port: int = REMEDIATOR_PORT, host: str = "0.0.0.0",
                      running: asyncio.Event | None = None) -> ObserveServer:
    m = service.observe.metrics
    server = ObserveServer(m.registry, port=port, host=host, name="remediator")

    def refresh() -> None:
        cached = service._view_cache
        leading = is_leader(service)
        m.guards(service.guards, service.policy.guards, cached[1] if cached else None, leading=leading)
        m.leader(leading)

    server.on_scrape(refresh)
    if running is not None:
        server.readiness.add("consuming", lambda: (running.is_set(), "starting: loading plans and guard state"))
    return server


async def run_observed(service: RemediatorService, stop: asyncio.Event, *, clock: Clock,
                       notify: NotifyConfig | None = None, port: int = REMEDIATOR_PORT,
                       host: str = "0.0.0.0") -> NotifierService | None:
    """The remediator with its metrics endpoint and, when configured, its notifier, until ``stop``."""
    running = asyncio.Event()
    server = remediator_server(service, port, host, running)
    notifier = None
    if notify is not None and notify.enabled:
        m = service.observe.metrics
        notifier = NotifierService(service.bus, notify, clock, actor=service.actor,
                                   is_leader=lambda: is_leader(service), on_delivery=m.notification)
        service.observe.listeners.append(notifier)
        for c in notify.channels:  # every channel's series exist from the start (rate() needs them)
            m.deliveries.labels(c.name)
            m.failures.labels(c.name)

    async def serve_service() -> None:
        running.set()
        try:
            await service.run(stop)
        finally:
            running.clear()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve(stop), name="remediator-observe")
        tg.create_task(serve_service(), name="remediator")
        if notifier is not None:
            tg.create_task(notifier.run(stop), name="remediator-notify")
    return notifier


__all__ = ["is_leader", "remediator_server", "run_observed"]
