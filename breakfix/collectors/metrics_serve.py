"""Serving the fleet collector's metrics beside it (``breakfix fleet-collector --metrics-port``, default 9474).

``run_fleet_observed`` runs the ``FleetCollector`` and a ``bus.observe.ObserveServer`` over its
``collectors.metrics.FleetCollectorMetrics``: ``/healthz`` fails when no evaluation succeeded for three intervals
(Prometheus unreachable or every rule failing), ``/readyz`` when it is not linked to NATS (signals then spool).
The node collector serves its own registry on ``http_listen`` (``collectors.daemon``).
"""

from __future__ import annotations

import asyncio

from breakfix.bus.observe import FLEET_COLLECTOR_PORT, ObserveServer
from breakfix.collectors.fleetd import FleetCollector


def fleet_server(collector: FleetCollector, port: int = FLEET_COLLECTOR_PORT, host: str = "0.0.0.0") -> ObserveServer:
    server = ObserveServer(collector.metrics.registry, port=port, host=host, name="fleet-collector")
    started = collector.clock.monotonic()
    state = {"cycles": collector.cycles, "at": started}

    def evaluating() -> tuple[bool, str]:
        now = collector.clock.monotonic()
        if collector.cycles != state["cycles"]:
            state["cycles"], state["at"] = collector.cycles, now
        return now - state["at"] <= 3 * collector.interval_s + 5, "no successful evaluation for three intervals"

    server.health.add("evaluating", evaluating)
    server.readiness.add("nats", lambda: (collector.bus is not None, "not linked to NATS yet (signals spool)"))
    return server


async def run_fleet_observed(collector: FleetCollector, stop: asyncio.Event, *, port: int = FLEET_COLLECTOR_PORT,
                             host: str = "0.0.0.0") -> None:
    server = fleet_server(collector, port, host)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve(stop), name="fleet-collector-observe")
        tg.create_task(collector.run(stop), name="fleet-collector")


__all__ = ["fleet_server", "run_fleet_observed"]
