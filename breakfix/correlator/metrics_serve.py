"""Serving a correlator's or fleet stage's metrics beside the service (``--metrics-port``).

``run_observed`` runs the service, its ``bus.observe.ObserveServer`` (``/metrics``, ``/healthz``: the service
makes progress, ``/readyz``: restored and consuming) and a poller that reads each durable consumer's lag from
JetStream (``StreamAdmin.consumer_state``) into ``breakfix_correlator_consumer_lag``. The CLI commands
``breakfix correlator`` and ``breakfix correlator-fleet`` call it; the metric families are ``correlator.metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib

from breakfix.bus.observe import CORRELATOR_PORT, FLEET_STAGE_PORT, ObserveServer, consumer_pending
from breakfix.correlator.fleet import FleetService
from breakfix.correlator.metrics import CorrelatorMetrics
from breakfix.correlator.service import CorrelatorService
from breakfix.schemas import subjects

LAG_EVERY_S = 15.0


async def poll_lag(bus: object, metrics: CorrelatorMetrics, consumers: list[tuple[str, str]], stop: asyncio.Event,
                   every_s: float = LAG_EVERY_S) -> None:
    """Every ``every_s``: each consumer's ``num_pending`` (one consumer-info request each; never raises)."""
    while not stop.is_set():
        for stream, durable in consumers:
            metrics.lag(durable, await consumer_pending(bus, stream, durable))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


def correlator_server(service: CorrelatorService, port: int = CORRELATOR_PORT, host: str = "0.0.0.0") -> ObserveServer:
    server = ObserveServer(service.metrics.registry, port=port, host=host, name=service.config.name)
    server.on_scrape(service.metrics.refresh)
    server.health.add("progress", lambda: (not service.stuck, "no pull, batch or checkpoint completed recently"))
    server.readiness.add("consuming", lambda: (service.is_ready(), "restoring the checkpoint, or stuck"))
    return server


async def run_observed(service: CorrelatorService, stop: asyncio.Event, *, port: int = CORRELATOR_PORT,
                       host: str = "0.0.0.0", lag_every_s: float = LAG_EVERY_S) -> None:
    """The correlator with its metrics endpoint and lag poller, until ``stop``."""
    server = correlator_server(service, port, host)
    consumers = [(stream, durable) for stream, durable, _ in service._consumers()]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve(stop), name=f"{service.config.name}-observe")
        tg.create_task(poll_lag(service.bus, service.metrics, consumers, stop, lag_every_s),
                       name=f"{service.config.name}-lag")
        tg.create_task(service.run(stop), name=service.config.name)


async def run_fleet_observed(service: FleetService, stop: asyncio.Event, *, port: int = FLEET_STAGE_PORT,
                             host: str = "0.0.0.0", lag_every_s: float = LAG_EVERY_S) -> None:
    """The fleet stage with its metrics endpoint (prefix ``breakfix_fleet_stage``) and lag poller."""
    server = ObserveServer(service.metrics.registry, port=port, host=host, name="correlator-fleet")
    counted = [0]

    def refresh() -> None:  # the shared consume loop dead-letters on its own; carry its count over
        new = service.stats.dead_lettered - counted[0]
        if new > 0:
            service.metrics.dead_letters.labels("schema").inc(new)
            counted[0] += new
        service.metrics.refresh()

    server.on_scrape(refresh)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve(stop), name="correlator-fleet-observe")
        tg.create_task(poll_lag(service.bus, service.metrics, [(subjects.INCIDENTS.name, service.durable)], stop,
                                lag_every_s), name="correlator-fleet-lag")
        tg.create_task(service.run(stop), name="correlator-fleet")


__all__ = ["correlator_server", "poll_lag", "run_fleet_observed", "run_observed"]
