"""``breakfix fleet-collector``: the fleet-mode collector loop around ``collectors.promfleet``.

Built by ``collectors.app.build_fleet_collector``. Every ``interval`` it evaluates the fleet
rules against Prometheus in a worker thread, passes the result through the edge filter
(transitions only) and hands it to the same store-and-forward ``Forwarder`` a node daemon uses.
The bus link is kept by ``collectors.link.keep_connected`` in its own task, so the rules are
evaluated from the first cycle whether or not NATS answers: while it is away the signals wait
in the spool and are replayed in order when it returns. All time comes from the injected clock.
Its cycles, failures and signals go to ``collectors.metrics.FleetCollectorMetrics``; the odd series the rules
skipped (``FleetRules.skipped``) to ``breakfix_collector_parse_skipped_total{source="prometheus"}`` on the same
registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from breakfix.bus.clock import Clock
from breakfix.bus.protocol import Bus
from breakfix.collectors.edge import EdgeFilter
from breakfix.collectors.forwarder import Forwarder
from breakfix.collectors.link import keep_connected, pause
from breakfix.collectors.metrics import FleetCollectorMetrics
from breakfix.collectors.parse_metrics import ParseSkipped
from breakfix.collectors.promfleet import FleetRules, Prometheus
from breakfix.collectors.spool import Spool
from breakfix.schemas import subjects

log = structlog.get_logger("breakfix.collector.fleet")

FleetBus = Bus


class FleetCollector:
    def __init__(self, rules: FleetRules, *, prom: Prometheus, clock: Clock, spool: Spool, interval_s: float,
                 connect: Callable[[], Awaitable[FleetBus]] | None, resync_s: float = 300.0, retry_s: float = 2.0,
                 connect_timeout_s: float = 10.0, metrics: FleetCollectorMetrics | None = None) -> None:
        self.rules = rules
        self.metrics = metrics or FleetCollectorMetrics()
        try:
            ParseSkipped(self.metrics.registry).watch("prometheus", lambda: self.rules.skipped)
        except ValueError:  # a registry shared with another collector that exports it already
            log.warning("fleet_parse_skipped_not_exported", reason="registry already has the family")
        self.prom = prom
        self.clock = clock
        self.interval_s = interval_s
        self.connect = connect
        self.retry_s = retry_s
        self.connect_timeout_s = connect_timeout_s
        self.edge = EdgeFilter(resync_s=resync_s, catalog=rules.catalog)
        self.spool = spool
        self.forwarder = Forwarder(spool, retry_s=min(retry_s, 1.0), clock=clock)
        self.bus: FleetBus | None = None
        self.cycles = 0
        self.failures = 0

    async def _setup(self, bus: FleetBus) -> None:
        await bus.ensure_streams(subjects.STREAMS)
        self.bus = bus
        self.forwarder.attach(bus)

    async def _link(self, stop: asyncio.Event) -> None:
        if self.connect is None:
            log.warning("fleet_collector_without_bus")
            return
        await keep_connected(self.connect, self._setup, stop, self.clock, retry_s=self.retry_s,
                             timeout_s=self.connect_timeout_s, what="fleet-collector")

    async def cycle(self) -> None:
        """Evaluate every rule once and hand the transitions to the forwarder (published or spooled)."""
        try:
            cycle = await asyncio.to_thread(self.rules.evaluate, self.prom, self.clock.now())
        except Exception as exc:  # Prometheus down or a bad answer: report, keep going
            self.failures += 1
            self.metrics.cycle_failed()
            log.error("fleet_rules_failed", error=repr(exc)[:300])
            return
        out = self.edge.apply(cycle, self.clock.now())
        await self.forwarder.send(out)
        self.cycles += 1
        self.metrics.cycle_ok(self.clock.now(), len(out))

    async def run(self, stop: asyncio.Event) -> None:
        link = asyncio.create_task(self._link(stop), name="fleet-link")
        drain = asyncio.create_task(self.forwarder.drain(stop), name="fleet-drain")
        try:
            while not stop.is_set():
                await self.cycle()
                await pause(self.clock, stop, self.interval_s)
        finally:
            stop.set()
            await asyncio.gather(link, drain, return_exceptions=True)
            if self.bus is not None:
                await self.bus.close()
