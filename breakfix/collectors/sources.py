"""The built-in collector sources as plugins, each registered under its config section.

Each factory takes its section of ``collectors.config.Sources`` (thresholds embedded as the
rules' own ``Thresholds`` model) and the ``SourceEnv`` and returns ``source.Source`` /
``source.Watcher`` plugins around the pure rules: ``nvml`` (``collectors.nvml``; polled
health plus the XID event watcher), ``kmsg`` (``collectors.kmsg_source``; commits its read
position after the cycle was spooled or published), ``dcgm`` (``collectors.dcgm``), ``fabric``
(``collectors.fabric``), ``endpoint`` (``collectors.endpoint``) and ``podresources``
(tenant attribution into the ``NodeContext``; publishes nothing). The daemon imports this
module once, so the registry (``collectors.source.REGISTRY``) holds them all; a new source is a
new module with its own ``@register``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import structlog

from breakfix.collectors.config import (
    DcgmConfig,
    EndpointsConfig,
    FabricConfig,
    KmsgConfig,
    NvmlConfig,
    PodResourcesConfig,
)
from breakfix.collectors.dcgm import DcgmRules
from breakfix.collectors.edge import Cycle
from breakfix.collectors.endpoint import EndpointRules, EndpointSpec, Probe, Slo, probe
from breakfix.collectors.fabric import FabricRules, PortSample, read_ports
from breakfix.collectors.keyfile import load_keys, save_keys
from breakfix.collectors.kmsg_follow import KmsgFollower, Line, PositionStore, log_zone
from breakfix.collectors.kmsg_source import KmsgSource
from breakfix.collectors.nvml import NvmlSource, in_daemon_thread
from breakfix.collectors.nvml_api import FakeNvml, real_nvml
from breakfix.collectors.nvml_eval import GpuSample
from breakfix.collectors.source import Plugin, SourceEnv, register
from breakfix.schemas.signal import Signal

log = structlog.get_logger("breakfix.collector.sources")


# -- nvml ----------------------------------------------------------------------------------------
class NvmlPoll:
    name = "nvml"

    def __init__(self, src: NvmlSource, interval: float) -> None:
        self.src = src
        self.interval = interval

    @property
    def skipped(self) -> int:
        return self.src.skipped

    async def read(self) -> list[GpuSample]:
        return await asyncio.wrap_future(in_daemon_thread(self.src.read, name="nvml-poll"))  # a hung init: no exit

    def apply(self, raw: list[GpuSample], at: datetime, mono: float) -> Cycle:
        return self.src.evaluate_readings(raw, at, mono)


class NvmlXids:
    name = "nvml-events"

    def __init__(self, src: NvmlSource, env: SourceEnv) -> None:
        self.src = src
        self.env = env

    async def watch(self, stop: asyncio.Event) -> AsyncIterator[Cycle]:
        async for s in self.src.watch_xids(stop, self.env.clock.now, self.env.clock.sleep):
            yield Cycle(events=[s])


@register("nvml")
def nvml_plugins(c: NvmlConfig, env: SourceEnv) -> Sequence[Plugin]:
    api = env.nvml or (FakeNvml.hgx(c.fake_gpus, env.ctx.node) if c.fake_gpus else real_nvml())
    src = NvmlSource(api, env.ctx, expected_gpus=c.expected_gpus, thresholds=c.thresholds,
                     sample_timeout_s=max(5.0, 2 * c.interval_s))
    out: list[Plugin] = [NvmlPoll(src, c.interval_s)]
    if c.xid_events:
        out.append(NvmlXids(src, env))
    return out


# -- kmsg ----------------------------------------------------------------------------------------
class KmsgPlugin:
    name = "kmsg"

    def __init__(self, follower: KmsgFollower, src: KmsgSource, interval: float) -> None:
        self.follower = follower
        self.src = src
        self.interval = interval

    @property
    def skipped(self) -> int:
        return self.src.skipped

    async def read(self) -> list[Line]:
        return await asyncio.to_thread(self.follower.read)

    def apply(self, raw: list[Line], at: datetime, mono: float) -> Cycle:
        return Cycle(events=self.src.signals(raw, at))

    def commit(self, raw: list[Line]) -> None:
        """Called only after the batch's signals were published or spooled."""
        if raw:
            self.follower.commit(raw[-1].position)


@register("kmsg")
def kmsg_plugins(c: KmsgConfig, env: SourceEnv) -> Sequence[Plugin]:
    follower = KmsgFollower(c.path, PositionStore(env.state_dir / "kmsg-position.json"), from_start=c.from_start)
    return [KmsgPlugin(follower, KmsgSource(follower, env.ctx, tz=log_zone(c.timezone)), c.poll_s)]


# -- dcgm-exporter -------------------------------------------------------------------------------
class DcgmPlugin:
    name = "dcgm"

    def __init__(self, c: DcgmConfig, env: SourceEnv) -> None:
        self.url = c.url
        self.interval = c.interval_s
        self.http = env.http
        self.rules = DcgmRules(env.ctx, c.thresholds)

    async def read(self) -> str:
        async with self.http.get(self.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            r.raise_for_status()
            return await r.text()

    @property
    def skipped(self) -> int:
        return self.rules.skipped

    def apply(self, raw: str, at: datetime, mono: float) -> Cycle:
        return self.rules.apply(raw, at, mono)


@register("dcgm")
def dcgm_plugins(c: DcgmConfig, env: SourceEnv) -> Sequence[Plugin]:
    return [DcgmPlugin(c, env)]


# -- InfiniBand sysfs ----------------------------------------------------------------------------
class FabricPlugin:
    name = "fabric"

    def __init__(self, c: FabricConfig, env: SourceEnv) -> None:
        self.sysfs = c.sysfs
        self.interval = c.interval_s
        self.seen_path = env.state_dir / "fabric-seen-up.json"  # a restart must not forget which ports worked
        self.rules = FabricRules(env.ctx, c.thresholds, seen_up=set(load_keys(self.seen_path)))
        self.uptime = env.uptime
        self._saved = len(self.rules.seen_up)

    @property
    def skipped(self) -> int:
        return self.rules.skipped_files.n

    async def read(self) -> list[PortSample]:
        return await asyncio.to_thread(read_ports, self.sysfs, self.rules.skipped_files)

    def carried_faults(self, keys: list[str]) -> None:
        """The faults open when the collector last stopped: a port whose ib.link_down was open had been up, even
        if the seen-up file was lost, so it is judged (and its fault cleared only by a real recovery)."""
        for key in keys:
            check, _, entity = key.partition("@")
            if check == "ib.link_down" and "/" in entity:
                self.rules.seen_up.add(entity.split("/", 1)[1])

    def apply(self, raw: list[PortSample], at: datetime, mono: float) -> Cycle:
        cycle = self.rules.apply(raw, at, mono, uptime_s=self.uptime() if self.uptime is not None else None)
        if len(self.rules.seen_up) != self._saved and save_keys(self.seen_path, sorted(self.rules.seen_up)):
            self._saved = len(self.rules.seen_up)
        return cycle


@register("fabric")
def fabric_plugins(c: FabricConfig, env: SourceEnv) -> Sequence[Plugin]:
    return [FabricPlugin(c, env)]


# -- inference endpoints -------------------------------------------------------------------------
async def _guarded_probe(http: aiohttp.ClientSession, spec: EndpointSpec) -> Probe | None:
    """``probe`` turns network trouble into a failed probe; anything else it lets escape (a bug, an odd reply) is
    counted and logged and leaves that endpoint unjudged this round (None), never a false ``endpoint.down``, and
    never costs the other endpoints their round."""
    try:
        return await probe(http, spec)
    except Exception as exc:
        log.warning("endpoint_probe_failed", endpoint=spec.name, url=spec.url, error=repr(exc)[:200])
        return None


class EndpointPlugin:
    name = "endpoint"

    def __init__(self, c: EndpointsConfig, env: SourceEnv) -> None:
        self.interval = c.interval_s
        self.http = env.http
        self.skipped = 0
        self.rules = [EndpointRules(env.ctx, EndpointSpec(
            name=e.name, namespace=e.namespace, url=e.url, health_path=e.health_path, models_path=e.models_path,
            metrics_path=e.metrics_path, slo=Slo(**e.slo.model_dump()), serving_pods=e.serving_pods,
            serving_nodes=e.serving_nodes or (env.ctx.node,))) for e in c.endpoints]

    async def read(self) -> list[Probe | None]:
        return list(await asyncio.gather(*(_guarded_probe(self.http, r.spec) for r in self.rules)))

    def apply(self, raw: list[Probe | None], at: datetime, mono: float) -> Cycle:
        states: list[Signal] = []
        for rules, p in zip(self.rules, raw, strict=True):
            if p is None:  # the probe itself failed (logged): nothing known about this endpoint this round
                self.skipped += 1
                continue
            try:
                states.extend(rules.apply(p, at).states)
            except Exception as exc:  # one endpoint's odd metrics never hide another's breach
                self.skipped += 1
                log.warning("endpoint_sample_skipped", endpoint=rules.spec.name, error=repr(exc)[:200])
        return Cycle(states=states)


@register("endpoint")
def endpoint_plugins(c: EndpointsConfig, env: SourceEnv) -> Sequence[Plugin]:
    return [EndpointPlugin(c, env)]


# -- kubelet PodResources ------------------------------------------------------------------------
class PodResourcesPlugin:
    name = "podresources"

    def __init__(self, c: PodResourcesConfig, env: SourceEnv) -> None:
        from breakfix.collectors.podresources import PodResourcesClient

        self.client = PodResourcesClient(c.socket)
        self.resource = c.resource
        self.interval = c.interval_s
        self.proc_gpus = c.proc_gpus
        self.ctx = env.ctx

    async def read(self) -> Any:
        """The kubelet's List, and the GPUs' device minors (DRA names GPUs ``gpu-<minor>``)."""
        from breakfix.collectors.gpuinfo import read_minors

        return await self.client.list(), await asyncio.to_thread(read_minors, self.proc_gpus)

    def apply(self, raw: Any, at: datetime, mono: float) -> Cycle:
        from breakfix.collectors.podresources import gpu_tenants

        resp, minors = raw
        self.ctx.set_tenants(gpu_tenants(resp, self.resource, minors=minors))
        return Cycle()


@register("podresources")
def podresources_plugins(c: PodResourcesConfig, env: SourceEnv) -> Sequence[Plugin]:
    return [PodResourcesPlugin(c, env)]
