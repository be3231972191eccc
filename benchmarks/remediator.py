"""Remediator figures for ``make bench``.

1. Incident to first action: 1,000 incidents published on a real nats-server (one per node of a
   1,000-node simulated cluster) and the time until each one's first step record arrives
   (p50, p99). ``settle_s`` is set to 0 and the budget opened up so the figure is the
   remediator's own latency (decide, guards, store, executor, audit publish); a real policy adds
   its ``settle_s`` and queues behind its budget on purpose.
2. Concurrent node drains against kmock: N nodes x M pods drained at once through the official
   Kubernetes client, with bounded-parallel evictions; drains completed, evictions per second.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import kmock
from kubernetes import client

from benchmarks.measure import pct_ms
from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.guards import BudgetSpec
from breakfix.remediator.k8s import DrainPolicy, KubernetesActuator, api_for
from breakfix.remediator.policy import load_policy
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentScope,
)


async def bench_first_action(n: int = 1000) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="breakfix-rem-bench-") as d:
        server = EmbeddedNats(Path(d) / "nats").start()
        try:
            bus = await JetStreamBus.connect(server.url)
            await bus.ensure_streams(subjects.STREAMS)
            policy = load_policy()
            policy = policy.model_copy(update={"settle_s": 0.0, "guards": policy.guards.model_copy(update={
                "soak_s": 0.0, "budget": BudgetSpec(max_nodes=n, max_percent=100), "topology_budgets": (),
                "breaker": policy.guards.breaker.model_copy(update={"max_percent": 100.0})})})
            cluster = SimCluster({f"n{i}": SimNode(f"n{i}") for i in range(n)})
            svc = await build_remediator(RemediatorConfig(cluster="bench"), bus=bus, clock=SystemClock(),
                                         cluster_api=cluster, policy=policy)
            sent: dict[str, float] = {}
            first: dict[str, float] = {}

            async def on_action(_subject: str, data: bytes) -> None:
                rec = ActionRecord.model_validate_json(data)
                if rec.kind is ActionKind.STEP and rec.outcome is ActionOutcome.STARTED:
                    first.setdefault(rec.incident_id, time.perf_counter())

            unsubscribe = await bus.subscribe(subjects.ACTIONS_ALL, on_action)
            stop = asyncio.Event()
            task = asyncio.create_task(svc.run(stop), name="bench-remediator")
            await asyncio.sleep(0.5)
            t0 = datetime.now(UTC)
            for i in range(n):
                inc = Incident(id=f"inc-bench-{i:05d}", cluster="bench", scope=IncidentScope.GPU, node=f"n{i}",
                               nodes=(f"n{i}",), gpus=(GpuRef(index=i % 8),), category="gpu_reset_required",
                               severity=Severity.CRITICAL, codes=("xid:48",), first_seen=t0, last_seen=t0)
                sent[inc.id] = time.perf_counter()
                await bus.publish_core(subjects.incident_subject("bench"),
                                         encode(IncidentChange(kind=ChangeKind.OPENED, incident=inc, at=t0)))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            deadline = time.perf_counter() + 120
            while len(first) < n and time.perf_counter() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            stop.set()
            await task
            await unsubscribe()
            await bus.close()
            lat = [first[k] - sent[k] for k in first if k in sent]
            return {"incidents": n, "with_first_action": len(lat), "p50_ms": pct_ms(lat, 0.5),
                    "p99_ms": pct_ms(lat, 0.99)}
        finally:
            server.stop()


async def bench_drains(nodes: int = 50, pods: int = 20, parallel: int = 32) -> dict[str, float]:
    async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
        for res, namespaced, kind in (("v1/nodes", False, "Node"), ("v1/pods", True, "Pod")):
            k.resources[res] = kmock.ResourceInfo(namespaced=namespaced, kind=kind)
        api = api_for(str(srv.url).rstrip("/"))
        core = client.CoreV1Api(api)

        def seed() -> None:
            for n in range(nodes):
                core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=f"n{n}")))
                for p in range(pods):
                    core.create_namespaced_pod("ml", client.V1Pod(
                        metadata=client.V1ObjectMeta(name=f"n{n}-p{p}", namespace="ml"),
                        spec=client.V1PodSpec(node_name=f"n{n}", containers=[client.V1Container(name="c")])))

        await asyncio.to_thread(seed)
        # kmock has no eviction subresource: after seeding, every POST is an eviction, and succeeds
        ok = kmock.Response(status=201, payload={"kind": "Status", "code": 201})  # type: ignore[attr-defined]
        k["post"] << (lambda req: ok)
        act = KubernetesActuator(api, drain=DrainPolicy(parallel=parallel))
        start = time.perf_counter()
        results = await asyncio.gather(*(act.drain(f"n{n}", incident=f"inc-{n}") for n in range(nodes)))
        elapsed = time.perf_counter() - start
        return {"concurrent_drains": nodes, "pods_per_node": pods, "drains_ok": sum(r.ok for r in results),
                "evictions": act.evictions, "seconds": round(elapsed, 2),
                "evictions_per_s": round(act.evictions / elapsed, 1)}


if __name__ == "__main__":
    print(asyncio.run(bench_first_action()), asyncio.run(bench_drains()))
