"""``breakfix collector``: the per-node daemon. Sources -> edge filter -> forwarder -> NATS.

Builds the sources the config enables (``collectors.config``) around one ``NodeContext``,
runs each in its own named task under a guard that logs, counts and restarts a failing
loop (the daemon itself never dies of a source error), passes every cycle through the
``EdgeFilter`` and hands what survives to the ``Forwarder`` (NATS, or the on-disk spool while
NATS is away). Blocking reads (NVML, sysfs, files) run in worker threads. It serves
``/metrics`` (prometheus-client) and ``/healthz`` (every enabled source ran recently) on
``http_listen``. Detection never imports reporting: sources only return signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from breakfix.bus.protocol import Bus, Requester
from breakfix.collectors.agent import NodeAgent
from breakfix.collectors.config import CollectorConfig
from breakfix.collectors.context import NodeContext
from breakfix.collectors.dcgm import DcgmRules, DcgmThresholds
from breakfix.collectors.edge import Cycle, EdgeFilter
from breakfix.collectors.endpoint import EndpointRules, EndpointSpec, Slo, probe
from breakfix.collectors.fabric import FabricRules, FabricThresholds, read_ports
from breakfix.collectors.forwarder import Forwarder
from breakfix.collectors.kmsg_follow import KmsgFollower, PositionStore
from breakfix.collectors.kmsg_source import KmsgSource
from breakfix.collectors.nvml import NvmlSource, Thresholds
from breakfix.collectors.nvml_api import FakeNvml, Nvml, real_nvml
from breakfix.collectors.parse_metrics import ParseSkipped
from breakfix.collectors.spool import Spool
from breakfix.schemas import subjects
from breakfix.schemas.agent import AgentAction
from breakfix.schemas.catalog import Catalog

log = structlog.get_logger("breakfix.collector")


class ServiceBus(Bus, Requester, Protocol):
    """The collector publishes signals and serves node-agent requests on one connection."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.signals = Counter("breakfix_collector_signals", "Signals sent on, by source", ["source"], registry=r)
        self.cycles = Counter("breakfix_collector_cycles", "Completed source cycles", ["source"], registry=r)
        self.errors = Counter("breakfix_collector_source_errors", "Source loop failures", ["source"], registry=r)
        self.last_ok = Gauge("breakfix_collector_source_last_success_timestamp_seconds",
                             "Unix time of the last good cycle", ["source"], registry=r)
        self.spool_depth = Gauge("breakfix_collector_spool_depth", "Signals waiting in the spool", registry=r)
        self.spool_dropped = Gauge("breakfix_collector_spool_dropped", "Signals dropped by a full spool, by severity",
                                   ["severity"], registry=r)
        self.parse_skipped = ParseSkipped(r)
        self.nats_up = Gauge("breakfix_collector_nats_up", "1 while NATS answers", registry=r)
        self.published = Gauge("breakfix_collector_published", "Signals acked by JetStream", registry=r)
        self.suppressed = Gauge("breakfix_collector_suppressed", "Repeats counted instead of sent", ["kind"],
                                registry=r)


class CollectorDaemon:
    def __init__(self, config: CollectorConfig, catalog: Catalog, *, nvml: Nvml | None = None,
                 clock: Callable[[], datetime] = utcnow,
                 connect: Callable[[str], Awaitable[ServiceBus]] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.ctx = NodeContext(cluster=config.cluster, node=config.node_name, catalog=catalog,
                               labels=dict(config.labels))
        self.edge = EdgeFilter(resync_s=config.edge.resync_s, repeat_window_s=config.edge.repeat_window_s)
        self.spool = Spool(config.spool.dir, max_records=config.spool.max_records)
        self.forwarder = Forwarder(self.spool, publish_timeout_s=config.nats.publish_timeout_s)
        self.metrics = Metrics()
        self.nvml = nvml
        self._connect = connect
        self.bus: ServiceBus | None = None
        self.last_ok: dict[str, float] = {}
        self.intervals: dict[str, float] = {}
        self.port: int | None = None
        self.ready = asyncio.Event()
        a = config.agent
        self.agent = NodeAgent(self.ctx.node, config.state_dir, nvidia_smi=a.nvidia_smi, dcgmi=a.dcgmi,
                               reboot_cmd=a.reboot_command,
                               allow=frozenset(AgentAction(x) for x in a.allow)) if a.enabled else None

    # -- plumbing ----------------------------------------------------------------------------------
    async def emit(self, source: str, cycle: Cycle) -> None:
        out = self.edge.apply(cycle, self.clock())
        if out:
            await self.forwarder.send(out)
            self.metrics.signals.labels(source).inc(len(out))
        self.metrics.cycles.labels(source).inc()
        self.metrics.last_ok.labels(source).set(time.time())
        self.last_ok[source] = time.monotonic()

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
                log.error("source_failed", source=name, node=self.ctx.node, error=repr(exc), retry_s=backoff)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except TimeoutError:
                    backoff = min(backoff * 2, 60.0)

    async def every(self, name: str, interval: float, stop: asyncio.Event, step: Callable[[], Awaitable[None]]) -> None:
        self.intervals[name] = interval

        async def loop() -> None:
            while not stop.is_set():
                started = time.monotonic()
                await step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(0.0, interval - (time.monotonic() - started)))

        await self.guard(name, loop, stop)

    # -- NATS --------------------------------------------------------------------------------------
    async def _nats(self, stop: asyncio.Event) -> None:
        from breakfix.bus.jetstream import JetStreamBus

        connect = self._connect or (lambda url: JetStreamBus.connect(url, name=f"breakfix-collector-{self.ctx.node}"))
        while not stop.is_set() and self.bus is None:
            attempt = asyncio.create_task(asyncio.wait_for(connect(self.config.nats.url), timeout=10),
                                          name="collector-nats-connect")
            stopping = asyncio.create_task(stop.wait(), name="collector-nats-stop")
            await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not attempt.done():
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await attempt
                return
            try:
                bus = attempt.result()
                await bus.ensure_streams(subjects.STREAMS)
                if self.agent is not None:
                    await bus.serve(subjects.agent_subject(self.ctx.cluster, self.ctx.node), self.agent.handle_bytes)
                self.bus = bus
                self.forwarder.attach(bus)
                log.info("nats_connected", node=self.ctx.node, url=self.config.nats.url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("nats_connect_failed", node=self.ctx.node, error=repr(exc), spooled=len(self.spool))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.nats.connect_retry_s)

    # -- sources -----------------------------------------------------------------------------------
    def _nvml_source(self) -> NvmlSource:
        c = self.config.sources.nvml
        api = self.nvml or (FakeNvml.hgx(c.fake_gpus, self.ctx.node) if c.fake_gpus else real_nvml())
        self.nvml = api
        return NvmlSource(api, self.ctx, expected_gpus=c.expected_gpus,
                          thresholds=Thresholds(sbe_burst=c.sbe_burst, pcie_replay_per_min=c.pcie_replay_per_min,
                                                nvlink_errors_per_min=c.nvlink_errors_per_min))

    def tasks(self, stop: asyncio.Event, http: aiohttp.ClientSession) -> list[tuple[str, Awaitable[None]]]:
        cfg = self.config.sources
        out: list[tuple[str, Awaitable[None]]] = []
        if cfg.nvml.enabled:
            src = self._nvml_source()

            async def nvml_step() -> None:
                await self.emit("nvml", await asyncio.to_thread(src.collect, self.clock(), time.monotonic()))

            out.append(("nvml", self.every("nvml", cfg.nvml.interval_s, stop, nvml_step)))
            if cfg.nvml.xid_events:
                async def xids() -> None:
                    async for s in src.watch_xids(stop, self.clock):
                        await self.emit("nvml-events", Cycle(events=[s]))

                out.append(("nvml-events", self.guard("nvml-events", xids, stop)))
        if cfg.kmsg.enabled:
            follower = KmsgFollower(cfg.kmsg.path, PositionStore(self.config.state_dir / "kmsg-position.json"),
                                    from_start=cfg.kmsg.from_start)
            kmsg = KmsgSource(follower, self.ctx)
            self.metrics.parse_skipped.watch("kmsg", lambda: kmsg.skipped)

            async def kmsg_step() -> None:
                signals, pos = await asyncio.to_thread(kmsg.poll, self.clock())
                await self.emit("kmsg", Cycle(events=signals))
                if pos is not None:
                    follower.commit(pos)  # only after the signals were published or spooled

            out.append(("kmsg", self.every("kmsg", cfg.kmsg.poll_s, stop, kmsg_step)))
        if cfg.dcgm.enabled:
            dcgm = DcgmRules(self.ctx, DcgmThresholds(nvlink_errors_per_min=cfg.dcgm.nvlink_errors_per_min,
                                                      pcie_replay_per_min=cfg.dcgm.pcie_replay_per_min))
            self.metrics.parse_skipped.watch("dcgm", lambda: dcgm.skipped)

            async def dcgm_step() -> None:
                async with http.get(cfg.dcgm.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    r.raise_for_status()
                    text = await r.text()
                await self.emit("dcgm", dcgm.apply(text, self.clock(), time.monotonic()))

            out.append(("dcgm", self.every("dcgm", cfg.dcgm.interval_s, stop, dcgm_step)))
        if cfg.fabric.enabled:
            f = cfg.fabric
            fabric = FabricRules(self.ctx, FabricThresholds(errors_per_min=f.errors_per_min, flap_count=f.flap_count,
                                                            flap_window_s=f.flap_window_s,
                                                            expected_rate_gbps=f.expected_rate_gbps,
                                                            expected_ethernet_rate_gbps=f.expected_ethernet_rate_gbps,
                                                            skip_ethernet=f.skip_ethernet))

            async def fabric_step() -> None:
                ports = await asyncio.to_thread(read_ports, f.sysfs, fabric.skipped_files)
                await self.emit("fabric", fabric.apply(ports, self.clock(), time.monotonic()))

            self.metrics.parse_skipped.watch("fabric", lambda: fabric.skipped_files.n)
            out.append(("fabric", self.every("fabric", f.interval_s, stop, fabric_step)))
        if cfg.endpoint.enabled:
            rules = [EndpointRules(self.ctx, EndpointSpec(
                name=e.name, namespace=e.namespace, url=e.url, health_path=e.health_path, models_path=e.models_path,
                metrics_path=e.metrics_path, slo=Slo(**e.slo.model_dump()), serving_pods=e.serving_pods,
                serving_nodes=e.serving_nodes or (self.ctx.node,))) for e in cfg.endpoint.endpoints]

            async def endpoint_step() -> None:
                probes = await asyncio.gather(*(probe(http, r.spec) for r in rules))
                at = self.clock()
                await self.emit("endpoint", Cycle(states=[s for r, p in zip(rules, probes, strict=True)
                                                          for s in r.apply(p, at).states]))

            out.append(("endpoint", self.every("endpoint", cfg.endpoint.interval_s, stop, endpoint_step)))
        if cfg.podresources.enabled:
            from breakfix.collectors.podresources import PodResourcesClient, gpu_tenants

            client = PodResourcesClient(cfg.podresources.socket)

            async def pods_step() -> None:
                self.ctx.set_tenants(gpu_tenants(await client.list(), cfg.podresources.resource))
                self.last_ok["podresources"] = time.monotonic()

            out.append(("podresources", self.every("podresources", cfg.podresources.interval_s, stop, pods_step)))
        return out

    # -- HTTP --------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, object]]:
        now = time.monotonic()
        stale = {n: round(now - self.last_ok.get(n, 0.0), 1) for n, iv in self.intervals.items()
                 if now - self.last_ok.get(n, 0.0) > 3 * iv + 5}
        body: dict[str, object] = {"node": self.ctx.node, "nats": self.forwarder.up, "spool": len(self.spool),
                                   "stale_sources": stale}
        return not stale, body

    async def _http(self, stop: asyncio.Event) -> None:
        async def metrics(_req: web.Request) -> web.Response:
            m = self.metrics
            m.spool_depth.set(len(self.spool))
            for sev, n in self.spool.dropped.items():
                m.spool_dropped.labels(sev).set(n)
            m.nats_up.set(1 if self.forwarder.up else 0)
            m.published.set(self.forwarder.stats.published + self.forwarder.stats.replayed)
            m.suppressed.labels("state").set(self.edge.stats.suppressed_states)
            m.suppressed.labels("event").set(self.edge.stats.suppressed_events)
            return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_req: web.Request) -> web.Response:
            ok, body = self.health()
            return web.json_response(body, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.config.http_listen.rpartition(":")
        site = web.TCPSite(runner, host, int(port))
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        self.ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

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
        self.ctx.labels.update(found)  # signals made from now on carry them
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

