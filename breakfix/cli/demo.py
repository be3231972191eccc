"""``breakfix demo``: the whole pipeline on embedded defaults, start to finish.

Starts a loopback nats-server (JetStream, store under the data dir), then the sim
collector, the correlator and the remediator as separate NATS clients that talk only
through the bus, plus a console consumer that records what an SRE would see. It replays
a scenario, waits until every plan has finished, and returns the result for printing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import decoder
from breakfix.bus.consumer import ConsumerSpec, run_consumer
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.protocol import Delivery
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.app import build_sim_collector
from breakfix.collectors.fleet import Fleet, build_fleet
from breakfix.collectors.sim import Scenario
from breakfix.correlator.app import CorrelatorConfig, build_correlator
from breakfix.remediator.policy import Policy
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ActionRecord, Incident, IncidentChange


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Console:
    """What the on-call console shows: latest incident versions, the audit trail, dead letters."""

    incidents: dict[str, Incident] = field(default_factory=dict)
    actions: list[ActionRecord] = field(default_factory=list)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)
    last_message: float = field(default_factory=time.monotonic)

    async def on_change(self, ch: IncidentChange, _m: Delivery) -> None:
        prev = self.incidents.get(ch.incident.id)
        if prev is None or ch.incident.version >= prev.version:
            self.incidents[ch.incident.id] = ch.incident
        self.last_message = time.monotonic()

    async def on_action(self, rec: ActionRecord, _m: Delivery) -> None:
        self.actions.append(rec)
        self.last_message = time.monotonic()

    async def on_dead_letter(self, _data: bytes, msg: Delivery) -> None:
        self.dead_letters.append((msg.headers.get(subjects.HDR_DLQ_SUBJECT, "?"),
                                  msg.headers.get(subjects.HDR_DLQ_REASON, "?")))


@dataclass
class DemoResult:
    scenario: Scenario
    fleet: Fleet
    cluster: SimCluster
    console: Console
    signals_sent: int
    duplicates_dropped: int
    elapsed_s: float
    nats_url: str


def demo_policy(policy: Policy) -> Policy:
    """The demo compresses time: a 1 s soak instead of minutes, and a breaker sized for a fleet
    where a quarter of the nodes fail on purpose. Everything else is the policy as loaded."""
    guards = policy.guards.model_copy(update={
        "soak_s": min(policy.guards.soak_s, 1.0),
        "breaker": policy.guards.breaker.model_copy(update={"max_percent": 60.0}),
        "budget": policy.guards.budget.model_copy(update={"max_nodes": max(policy.guards.budget.max_nodes, 4)}),
    })
    return policy.model_copy(update={"guards": guards})


def sim_cluster_for(fleet: Fleet) -> SimCluster:
    nodes = {}
    for spec in fleet.nodes:
        pods = {f"{g.tenant.namespace}/{g.tenant.pod}": g.ref.index or 0 for g in spec.gpus if g.tenant}
        nodes[spec.name] = SimNode(spec.name, gpus=len(spec.gpus), labels=dict(spec.labels), pods=pods)
    return SimCluster(nodes, controller_owned=set(fleet.controller_owned))


async def run_demo(*, scenario: Scenario, nodes: int, data_dir: Path, catalog: Catalog, policy: Policy,
                   duration_s: float, speed: float = 1.0, malformed: bool = True,
                   progress: Callable[[str], None] = lambda _s: None) -> DemoResult:
    started = time.monotonic()
    policy = demo_policy(policy)
    progress(f"demo timing: soak {policy.guards.soak_s:g}s, breaker at {policy.guards.breaker.max_percent:g}% of nodes "
             "(remediator/policies/default.yaml has the production values)")
    fleet = build_fleet(max(nodes, scenario.nodes))
    cluster = sim_cluster_for(fleet)
    server = EmbeddedNats(data_dir / "nats")
    progress(f"starting nats-server (JetStream) in {server.store_dir}")
    server.start()
    buses: list[JetStreamBus] = []
    stop = asyncio.Event()
    try:
        async def bus(name: str) -> JetStreamBus:
            b = await JetStreamBus.connect(server.url, name=name)
            buses.append(b)
            return b

        collector_bus = await bus("breakfix-collector-sim")
        await collector_bus.ensure_streams(subjects.STREAMS)
        correlator = build_correlator(CorrelatorConfig(catalog=catalog), bus=await bus("breakfix-correlator"),
                                      clock=utcnow)
        remediator = RemediatorService(await bus("breakfix-remediator"), cluster, policy, utcnow,
                                       actor="remediator/demo", retry_refused_s=1.0)
        console = Console()
        console_bus = await bus("breakfix-console")
        specs: list[ConsumerSpec[Any]] = [
            ConsumerSpec(subjects.INCIDENTS.name, "console", subjects.INCIDENTS_ALL, decoder(IncidentChange),
                         console.on_change),
            ConsumerSpec(subjects.ACTIONS.name, "console-actions", subjects.ACTIONS_ALL, decoder(ActionRecord),
                         console.on_action),
            ConsumerSpec(subjects.DEAD_LETTERS.name, "console-dlq", subjects.DLQ_ALL, lambda b: b,
                         console.on_dead_letter),
        ]
        async with asyncio.TaskGroup() as tg:
            tg.create_task(correlator.run(stop), name="correlator")
            tg.create_task(remediator.run(stop), name="remediator")
            for spec in specs:
                tg.create_task(run_consumer(console_bus, spec, stop=stop), name=f"console-{spec.durable}")
            sim = build_sim_collector(scenario, fleet, bus=collector_bus, clock=SystemClock(), catalog=catalog,
                                      speed=speed)
            timed = sim.timed
            progress(f"replaying scenario {scenario.name!r}: {len(timed)} signals over {len(fleet.nodes)} nodes")
            if malformed:
                progress("publishing one malformed signal, as a broken collector would; it must be dead-lettered")
                await collector_bus.publish(subjects.signal_subject(fleet.cluster, "gpu-node-bad"),
                                            b'{"schema": "breakfix.signal/v1", "node": 42}')
            sent = await sim.run()
            deadline = started + duration_s
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                busy = any(not t.done() for t in remediator.tasks.values())
                quiet = time.monotonic() - console.last_message > max(1.0, policy.settle_s + 0.5)
                if not busy and quiet:
                    break
            stop.set()
        return DemoResult(scenario, fleet, cluster, console, sent, sim.publisher.duplicates,
                          time.monotonic() - started, server.url)
    finally:
        for b in buses:
            with contextlib.suppress(Exception):
                await b.close()
        server.stop()
