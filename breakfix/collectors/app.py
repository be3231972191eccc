"""Composition roots of the collector stage: the node collector, the fleet collector, the sim source.

The CLI (``breakfix collector``, ``breakfix fleet-collector``), the demo, the benchmarks and the
tests build the collectors here and nowhere else. Each root takes the config, the one injected
``Clock`` and the bus: either a connected bus, or a ``connect`` callable that the daemon keeps
retrying in the background while its signals wait in the spool (NATS connection options,
URL, credentials and TLS, are the CLI's business; it passes the callable). The node agent is
built here from the config's ``agent`` section with its busy-check (processes on the GPU) and
the node's GPU count. ``build_sim_collector`` is the demo's collector: a scenario's timeline
published at its own pace on the injected clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from breakfix.bus.clock import Clock
from breakfix.bus.protocol import Bus
from breakfix.collectors.agent import BusyCheck, NodeAgent, PodLister
from breakfix.collectors.config import CollectorConfig
from breakfix.collectors.context import NodeContext
from breakfix.collectors.daemon import CollectorDaemon, ServiceBus
from breakfix.collectors.fleet import Fleet
from breakfix.collectors.fleetd import FleetBus, FleetCollector
from breakfix.collectors.metrics import FleetCollectorMetrics
from breakfix.collectors.nvml_api import Nvml
from breakfix.collectors.promfleet import FleetRules, Prometheus
from breakfix.collectors.publisher import SignalPublisher
from breakfix.collectors.sim import Scenario, run_scenario, timeline
from breakfix.collectors.spool import Spool
from breakfix.schemas.agent import AgentAction
from breakfix.schemas.catalog import Catalog, default_catalog
from breakfix.schemas.signal import Signal


def _connector(bus: ServiceBus | None,
               connect: Callable[[], Awaitable[ServiceBus]] | None) -> Callable[[], Awaitable[ServiceBus]] | None:
    if bus is not None and connect is not None:
        raise ValueError("give build_collector a connected bus or a connect callable, not both")
    if bus is None:
        return connect
    connected = bus

    async def ready() -> ServiceBus:
        return connected

    return ready


def build_agent(config: CollectorConfig, ctx: NodeContext, *, clock: Clock, busy: BusyCheck | None = None,
                registry: CollectorRegistry | None = None) -> NodeAgent | None:
    """The node agent the config enables, or None. Its GPU count: the config's, else NVML's enumeration."""
    a = config.agent
    if not a.enabled:
        return None

    def gpu_count() -> int | None:
        if a.gpu_count is not None:
            return a.gpu_count
        indices = [g.index for g in ctx.gpus_by_uuid.values() if g.index is not None]
        return max(indices) + 1 if indices else None

    pods: PodLister | None = None
    if a.podresources_socket is not None:  # gpu_pods: a fresh kubelet List, matched against the GPU's device ids
        from breakfix.collectors.podresources import PodResourcesClient, gpu_holders

        lister = PodResourcesClient(a.podresources_socket)
        resource = config.sources.podresources.resource

        async def holding(devices: frozenset[str]) -> tuple[str, ...]:
            return gpu_holders(await lister.list(), devices, resource)

        pods = holding

    return NodeAgent(config.node_name, config.state_dir, nvidia_smi=a.nvidia_smi, dcgmi=a.dcgmi,
                     reboot_cmd=a.reboot_command, allow=frozenset(AgentAction(x) for x in a.allow), clock=clock,
                     busy=busy, gpu_count=gpu_count, reboot_window_s=a.reboot_window_s,
                     reset_window_s=a.reset_window_s, registry=registry, pods=pods, ready_wait_s=a.engine_wait_s)


def build_collector(config: CollectorConfig, *, clock: Clock, bus: ServiceBus | None = None,
                    connect: Callable[[], Awaitable[ServiceBus]] | None = None, catalog: Catalog | None = None,
                    nvml: Nvml | None = None, agent_busy: BusyCheck | None = None) -> CollectorDaemon:
    """The node collector daemon: sources from the registry, edge filter, spool, forwarder, node agent.

    ``bus``: an already-connected bus; ``connect``: how to connect (retried with backoff while
    the spool holds the signals). Neither: a spool-only collector (nothing leaves the node)."""
    daemon = CollectorDaemon(config, catalog or default_catalog(), clock=clock, connect=_connector(bus, connect),
                             nvml=nvml)
    daemon.agent = build_agent(config, daemon.ctx, clock=clock, busy=agent_busy, registry=daemon.metrics.registry)
    return daemon


def build_fleet_collector(rules: FleetRules, *, prom: Prometheus, clock: Clock, spool_dir: Path,
                          interval_s: float, bus: FleetBus | None = None,
                          connect: Callable[[], Awaitable[FleetBus]] | None = None, resync_s: float = 300.0,
                          retry_s: float = 2.0, connect_timeout_s: float = 10.0,
                          metrics: FleetCollectorMetrics | None = None) -> FleetCollector:
    """The fleet collector: PromQL rules -> edge filter -> forwarder, spooling while NATS is away."""
    if bus is not None and connect is not None:
        raise ValueError("give build_fleet_collector a connected bus or a connect callable, not both")
    if bus is not None:
        connected = bus

        async def ready() -> FleetBus:
            return connected

        connect = ready
    return FleetCollector(rules, prom=prom, clock=clock, spool=Spool(spool_dir), interval_s=interval_s,
                          connect=connect, resync_s=resync_s, retry_s=retry_s, connect_timeout_s=connect_timeout_s,
                          metrics=metrics)


@dataclass
class SimCollector:
    """The demo's collector: one scenario's timed signals, published with their spacing on ``clock``."""

    publisher: SignalPublisher
    timed: list[tuple[float, Signal]]
    clock: Clock
    speed: float = 1.0

    async def run(self) -> int:
        """Publish the whole timeline; the number of signals sent."""
        return await run_scenario(self.publisher, self.timed, speed=self.speed, sleep=self.clock.sleep)


def build_sim_collector(scenario: Scenario, fleet: Fleet, *, bus: Bus, clock: Clock, catalog: Catalog | None = None,
                        speed: float = 1.0) -> SimCollector:
    """A scenario over a simulated fleet, starting at ``clock.now()``, published on ``bus``."""
    timed = timeline(scenario, fleet, clock.now(), catalog or default_catalog())
    return SimCollector(SignalPublisher(bus), timed, clock, speed)
