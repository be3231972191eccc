"""``breakfix fleet-collector``: the fleet-mode collector loop around ``collectors.promfleet``.

Every ``interval`` it evaluates the fleet rules against Prometheus in a worker thread, passes
the result through the edge filter (transitions only) and hands it to the same store-and-
forward ``Forwarder`` a node daemon uses, so a NATS outage spools instead of losing signals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import structlog

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.options import NatsOptions
from breakfix.collectors.edge import EdgeFilter
from breakfix.collectors.forwarder import Forwarder
from breakfix.collectors.promfleet import FleetRules, Prometheus
from breakfix.collectors.spool import Spool
from breakfix.schemas import subjects

log = structlog.get_logger("breakfix.collector.fleet")


async def run_fleet(*, rules: FleetRules, prom: Prometheus, nats_url: str | NatsOptions, spool_dir: Path,
                    interval_s: float, clock: Callable[[], datetime], stop: asyncio.Event,
                    resync_s: float = 300.0) -> None:
    edge = EdgeFilter(resync_s=resync_s)
    fwd = Forwarder(Spool(spool_dir))
    bus = None
    drain = asyncio.create_task(fwd.drain(stop), name="fleet-drain")
    try:
        while not stop.is_set():
            if bus is None:
                try:
                    bus = await JetStreamBus.connect(nats_url, name="breakfix-fleet-collector")
                    await bus.ensure_streams(subjects.STREAMS)
                    fwd.attach(bus)
                except Exception as exc:
                    log.warning("nats_connect_failed", error=repr(exc))
                    bus = None
            try:
                cycle = await asyncio.to_thread(rules.evaluate, prom, clock())
                await fwd.send(edge.apply(cycle, clock()))
            except Exception as exc:  # Prometheus down or a bad answer: report, keep going
                log.error("fleet_rules_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
    finally:
        await drain
        if bus is not None:
            await bus.close()
