"""A live pipeline for the console's browser tests: correlator and remediator services on a real
nats-server (JetStream bus), a simulated cluster, and the console, all in the test's event loop.

The policy is the shipped default with the node-reboot rule's reboot step waiting for approval,
a short settle and soak, so a test drives: XID 79 -> cordon, drain -> reboot waits -> an operator
approves in the browser -> reboot, validate, soak, return to service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.console.server import Running, start
from breakfix.correlator.app import CorrelatorConfig, build_correlator
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.policy import Policy
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id
from tests.console_fixtures import auth_config

NODES = [f"gpu-node-{i:03d}" for i in range(1, 9)]


def approval_policy(policy: Policy) -> Policy:
    rules = []
    for r in policy.rules:
        if r.name == "node-reboot":
            steps = tuple(s.model_copy(update={"requires_approval": s.action.value == "reboot"}) for s in r.steps)
            r = r.model_copy(update={"steps": steps})
        rules.append(r)
    guards = policy.guards.model_copy(update={"soak_s": 0.5, "cooldown_s": 1.0})
    return policy.model_copy(update={"rules": tuple(rules), "settle_s": 0.2, "guards": guards})


def xid(node: str, code: str, gpu: int = 0) -> Signal:
    now = datetime.now(UTC)
    g = GpuRef(index=gpu)
    return Signal(id=make_signal_id(cluster="c1", node=node, source="sim", check="xid", code=code, healthy=False,
                                    observed_at=now, gpu=g, discriminator="console-test"),
                  cluster="c1", node=node, source=SignalSource.SIM, check="xid", code=code, healthy=False, gpu=g,
                  message=f"NVRM: Xid (PCI:0000:1a:00): {code}, pid=4242, name=python", observed_at=now,
                  labels={"rack": "rack-a" if node < "gpu-node-005" else "rack-b"})


@dataclass
class Pipeline:
    bus: JetStreamBus
    cluster: SimCluster
    console: Running

    async def signal(self, s: Signal) -> None:
        await self.bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=s.id)


@contextlib.asynccontextmanager
async def pipeline(url: str, catalog: Catalog, policy: Policy) -> AsyncIterator[Pipeline]:
    stop = asyncio.Event()
    buses = [await JetStreamBus.connect(url, name=n) for n in ("test", "correlator", "remediator")]
    await buses[0].ensure_streams(subjects.STREAMS)
    cluster = SimCluster({n: SimNode(n, labels={"rack": "rack-a" if n < "gpu-node-005" else "rack-b"})
                          for n in NODES})
    correlator = build_correlator(CorrelatorConfig(catalog=catalog), bus=buses[1], clock=SystemClock())
    remediator = await build_remediator(RemediatorConfig(cluster="c1", actor="remediator/test"), bus=buses[2],
                                        clock=SystemClock(), cluster_api=cluster, policy=approval_policy(policy),
                                        catalog=catalog, retry_refused_s=0.5)
    tasks = [asyncio.create_task(correlator.run(stop), name="test-correlator"),
             asyncio.create_task(remediator.run(stop), name="test-remediator")]
    console = await start(url, auth=auth_config())
    try:
        yield Pipeline(buses[0], cluster, console)
    finally:
        await console.close()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in buses:
            await b.close()
