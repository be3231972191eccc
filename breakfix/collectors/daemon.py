"""``breakfix collector``: the per-node daemon. Sources -> edge filter -> forwarder -> NATS.

Built by ``collectors.app.build_collector``. It asks the source registry
(``collectors.source``, the built-ins in ``collectors.sources``) for the plugins of every
section the config enables and runs each the same way: a polled ``Source`` every
``interval`` (read, apply, emit, then ``commit`` once the signals are published or spooled),
a ``Watcher`` as its events arrive, each in its own named task under a guard that logs, counts
and restarts a failing loop (the daemon itself never dies of a source error). Every cycle
goes through the ``EdgeFilter`` and what survives to the ``Forwarder`` (NATS, or the on-disk
spool while NATS is away; ``collectors.link`` keeps connecting in the background). All time
comes from the injected ``Clock``. It serves ``/metrics`` (prometheus-client) and
``/healthz`` (no source cycle wedged; failing sources are listed, not fatal) on ``http_listen``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

import breakfix.collectors.sources  # noqa: F401  (registers the built-in sources)
from breakfix.bus.clock import Clock
from breakfix.bus.observe import ObserveServer
from breakfix.bus.protocol import Bus, Requester
from breakfix.collectors.agent import NodeAgent
from breakfix.collectors.config import CollectorConfig
from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle, EdgeFilter
from breakfix.collectors.forwarder import Forwarder
from breakfix.collectors.keyfile import load_keys, save_keys
from breakfix.collectors.link import keep_connected, pause
from breakfix.collectors.metrics import AgentMetrics, counted
from breakfix.collectors.nvml_api import Nvml
from breakfix.collectors.parse_metrics import ParseSkipped
from breakfix.collectors.source import (
    CarriesFaults,
    Commits,
    Plugin,
    Skips,
    Source,
    SourceEnv,
    Watcher,
    build_sources,
    node_uptime,
)
from breakfix.collectors.spool import Spool
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog

log = structlog.get_logger("breakfix.collector")
WEDGED_S = 600.0  # a polled cycle running this long (or ten intervals) is wedged: /healthz fails


class ServiceBus(Bus, Requester, Protocol):
    """The collector publishes signals and serves node-agent requests on one connection."""


Connect = Callable[[], Awaitable[ServiceBus]]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.signals = Counter("breakfix_collector_signals", "Signals sent on, by source", ["source"], registry=r)
        self.cycles = Counter("breakfix_collector_cycles", "Completed source cycles", ["source"], registry=r)
        self.errors = Counter("breakfix_collector_source_errors", "Source loop failures", ["source"], registry=r)
        self.last_ok = Gauge("breakfix_collector_source_last_success_timestamp_seconds",
                             "Unix time of the last good cycle", ["source"], registry=r)
        self.spool_depth = Gauge("breakfix_collector_spool_depth", "Signals waiting in the spool", registry=r)
        self.spool_dropped = Gauge("breakfix_collector_spool_dropped",
                                   "Signals the spool dropped (full, or the disk refused), by severity",
                                   ["severity"], registry=r)
        self.spool_quarantined = Gauge("breakfix_collector_spool_quarantined",
                                       "Unreadable spool files moved to quarantine/", registry=r)
        self.parse_skipped = ParseSkipped(r)  # read from every source that Skips, at scrape time
        self.nats_up = Gauge("breakfix_collector_nats_up", "1 while NATS answers", registry=r)
        self.published = Gauge("breakfix_collector_published", "Signals acked by JetStream", registry=r)
        self.suppressed = Gauge("breakfix_collector_suppressed", "Repeats counted instead of sent", ["kind"],
                                registry=r)
        self.unbuildable = Counter("breakfix_collector_states_unbuildable",
                                   "Readings whose signal could not be built (state kept, read again next cycle); "
                                   "a resync's are counted under the source whose cycle ran it", ["source"],
                                   registry=r)


class CollectorDaemon:
    def __init__(self, config: CollectorConfig, catalog: Catalog, *, clock: Clock, connect: Connect | None = None,
                 nvml: Nvml | None = None, agent: NodeAgent | None = None) -> None:
        self.config = config
        self.clock = clock
        self.ctx = NodeContext(cluster=config.cluster, node=config.node_name, catalog=catalog,
                               labels=dict(config.labels))
        self.faults_path = config.state_dir / "edge-faults.json"  # the faults open now, for the next start
        self.edge = EdgeFilter(resync_s=config.edge.resync_s, repeat_window_s=config.edge.repeat_window_s,
                               faulted=load_keys(self.faults_path), catalog=catalog)
        self._faults_saved = self.edge.faulted_keys()
        self._faults_retry = 0.0  # monotonic: when a refused save may be tried again
        self._faults_marker = (0, len(self.edge.carried))  # what the saved file reflects
        self.spool = Spool(config.spool.dir, max_records=config.spool.max_records)
        self.forwarder = Forwarder(self.spool, publish_timeout_s=config.nats.publish_timeout_s, clock=clock)
        self.metrics = Metrics()
        self.nvml = nvml
        self._connect = connect
        self.bus: ServiceBus | None = None
        self.plugins: list[Plugin] = []
        self.last_ok: dict[str, float] = {}
        self.intervals: dict[str, float] = {}
        self.running: dict[str, float] = {}  # source -> when its current cycle started (monotonic)
        self.port: int | None = None
        self.ready = asyncio.Event()
        self.agent = agent
        self.agent_metrics: AgentMetrics | None = None

    # -- plumbing ----------------------------------------------------------------------------------
    async def emit(self, source: str, cycle: Cycle) -> None:
        unbuildable = self.edge.stats.unbuildable
        out = self.edge.apply(cycle, self.clock.now())
        if dropped := self.edge.stats.unbuildable - unbuildable:
            log.warning("states_unbuildable", node=self.ctx.node, source=source, states=dropped)
            self.metrics.unbuildable.labels(source).inc(dropped)
        if out:
            await self.forwarder.send(out)
            self.metrics.signals.labels(source).inc(len(out))
        marker = (self.edge.stats.transitions, len(self.edge.carried))  # the open faults change only with these
        if marker != self._faults_marker and self.clock.monotonic() >= self._faults_retry:
            faults = self.edge.faulted_keys()
            if faults == self._faults_saved or save_keys(self.faults_path, faults):
                self._faults_marker = marker
                self._faults_saved = faults
            else:  # a disk that refuses: tried again in a minute, not at every cycle of every source
                self._faults_retry = self.clock.monotonic() + 60.0
        self.metrics.cycles.labels(source).inc()
        self.metrics.last_ok.labels(source).set(self.clock.now().timestamp())
        self.last_ok[source] = self.clock.monotonic()

    async def guard(self, name: str, loop: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        """Run ``loop`` until ``stop``; a crash is logged, counted and retried with backoff."""
        backoff = 1.0
        while not stop.is_set():
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.errors.labels(name).inc()
                log.error("source_failed", source=name, node=self.ctx.node, error=repr(exc)[:300], retry_s=backoff)
                await pause(self.clock, stop, backoff)
                backoff = min(backoff * 2, 60.0)

    async def every(self, name: str, interval: float, stop: asyncio.Event, step: Callable[[], Awaitable[None]]) -> None:
        self.intervals[name] = interval

        async def loop() -> None:
            while not stop.is_set():
                started = self.running[name] = self.clock.monotonic()
                try:
                    await step()
                finally:
                    self.running.pop(name, None)  # done, well or not: only a cycle that never ends is wedged
                await pause(self.clock, stop, interval - (self.clock.monotonic() - started))

        await self.guard(name, loop, stop)

    async def poll_once(self, src: Source) -> None:
        """One cycle of a polled source: read, apply, emit; commit only once the signals are safe."""
        raw = await src.read()
        cycle = src.apply(raw, self.clock.now(), self.clock.monotonic())
        await self.emit(src.name, cycle)  # published, or appended to the spool
        if isinstance(src, Commits):
            src.commit(raw)

    async def _watch(self, w: Watcher, stop: asyncio.Event) -> None:
        events: AsyncIterator[Cycle] = w.watch(stop)
        async for cycle in events:
            await self.emit(w.name, cycle)

    # -- NATS --------------------------------------------------------------------------------------
    async def _setup(self, bus: ServiceBus) -> None:
        await bus.ensure_streams(subjects.STREAMS)
        if self.agent is not None:
            if self.agent_metrics is None:
                self.agent_metrics = AgentMetrics(self.metrics.registry)
            await bus.serve(subjects.agent_subject(self.ctx.cluster, self.ctx.node),
                            counted(self.agent.handle_bytes, self.agent_metrics, self.clock.monotonic))
        self.bus = bus
        self.forwarder.attach(bus)

    async def _nats(self, stop: asyncio.Event) -> None:
        if self._connect is None:
            log.warning("collector_without_bus", node=self.ctx.node)  # spool-only (tests, offline nodes)
            return
        await keep_connected(self._connect, self._setup, stop, self.clock, retry_s=self.config.nats.connect_retry_s,
                             timeout_s=self.config.nats.connect_timeout_s, what="collector", node=self.ctx.node,
                             url=self.config.nats.url)

    # -- sources -----------------------------------------------------------------------------------
    def tasks(self, stop: asyncio.Event, http: aiohttp.ClientSession) -> list[tuple[str, Awaitable[None]]]:
        env = SourceEnv(ctx=self.ctx, clock=self.clock, http=http, state_dir=self.config.state_dir, nvml=self.nvml,
                        uptime=node_uptime)
        self.plugins = build_sources(self.config.sources, env)
        carried = self.edge.faulted_keys()
        for p in self.plugins:  # a source that judges by what it saw before learns what was open at the last stop
            if isinstance(p, CarriesFaults):
                p.carried_faults(carried)
        out: list[tuple[str, Awaitable[None]]] = []
        for p in self.plugins:
            if isinstance(p, Skips):
                self.metrics.parse_skipped.watch(p.name, functools.partial(getattr, p, "skipped"))
            if isinstance(p, Watcher) and not isinstance(p, Source):
                out.append((p.name, self.guard(p.name, functools.partial(self._watch, p, stop), stop)))
            else:
                out.append((p.name, self.every(p.name, p.interval, stop, functools.partial(self.poll_once, p))))
        return out

    # -- HTTP --------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, object]]:
        """Live unless a source's cycle is wedged: running for ``max(10 intervals, 600 s)`` without ending (a
        restart may clear a hung library call). A source that fails or cannot reach what it reads (an
        exporter away, no driver) is stale, not dead: it is listed here and in
        ``breakfix_collector_source_last_success_timestamp_seconds``, and a restart would only lose the
        other sources' state, so it does not fail the probe."""
        now = self.clock.monotonic()
        stale = {n: round(now - self.last_ok.get(n, 0.0), 1) for n, iv in self.intervals.items()
                 if now - self.last_ok.get(n, 0.0) > 3 * iv + 5}
        wedged = {n: round(now - t, 1) for n, t in self.running.items()
                  if now - t > max(10 * self.intervals.get(n, 60.0), WEDGED_S)}
        body: dict[str, object] = {"node": self.ctx.node, "nats": self.forwarder.up, "spool": len(self.spool),
                                   "stale_sources": stale, "wedged_sources": wedged}
        return not wedged, body

    def refresh_metrics(self) -> None:
        """Copy the spool's, the forwarder's, the edge filter's and the sources' counts into /metrics."""
        m = self.metrics
        m.spool_depth.set(len(self.spool))
        for sev, n in self.spool.dropped.items():
            m.spool_dropped.labels(sev).set(n)
        m.spool_quarantined.set(self.spool.quarantined)
        m.nats_up.set(1 if self.forwarder.up else 0)
        m.published.set(self.forwarder.stats.published + self.forwarder.stats.replayed)
        m.suppressed.labels("state").set(self.edge.stats.suppressed_states)
        m.suppressed.labels("event").set(self.edge.stats.suppressed_events)

    async def _http(self, stop: asyncio.Event) -> None:
        """``/metrics``, ``/healthz`` (no source cycle wedged), ``/readyz`` (bus.observe)."""
        host, _, port = self.config.http_listen.rpartition(":")
        listen = int(port) if self.config.metrics_port is None else self.config.metrics_port
        server = ObserveServer(self.metrics.registry, port=listen, host=host, name=f"collector-{self.ctx.node}")
        server.on_scrape(self.refresh_metrics)
        server.health.add("sources", lambda: (self.health()[0], "a source's cycle has not ended for minutes"))
        server.describe = lambda: self.health()[1]
        self.port = await server.start()
        self.ready.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    async def _topology(self) -> None:
        t = self.config.topology_from_node
        if not t.enabled:
            return
        from breakfix.collectors.nodelabels import node_topology

        try:
            found = await asyncio.to_thread(node_topology, self.ctx.node, t.labels, host=t.host)
        except Exception as exc:
            log.warning("node_labels_unavailable", node=self.ctx.node, error=repr(exc))
            return
        self.ctx.labels = {**self.ctx.labels, **found}  # signals read from now on carry them (replaced, never
        # changed in place: a reading builds its signal later with the labels of the moment it was read)
        log.info("node_topology", node=self.ctx.node, labels=found)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("collector_start", node=self.ctx.node, cluster=self.ctx.cluster, spooled=len(self.spool))
        await self._topology()
        async with aiohttp.ClientSession() as http, asyncio.TaskGroup() as tg:
            tg.create_task(self._http(stop), name="collector-http")
            tg.create_task(self._nats(stop), name="collector-nats")
            tg.create_task(self.forwarder.drain(stop), name="collector-drain")
            for name, coro in self.tasks(stop, http):
                tg.create_task(coro, name=f"collector-{name}")  # type: ignore[arg-type]
        if self.bus is not None:
            await self.bus.close()

