"""Remediator figures for ``make bench``.

1. Burst (``bench_first_action``): 1,000 incidents published at once on a real nats-server (one per node
   of a 1,000-node simulated cluster). Reported: incident to first step record (p50, p99); how long after
   the last incident's publication every incident was decided (its plan or its refusal published);
   decisions/s beside the raw rate at which plain nats-py reads the same incident stream (pull and ack,
   nothing decoded), measured in the same run on the same server.
2. Steady (``bench_steady``): 100 incidents/s for 30 s on a 3,000-node cluster; incident to first step
   record (p50, p99).

``settle_s`` is set to 0 and the budgets opened up so the figures are the remediator's own latency (decide,
guards, store, executor, audit publish); a real policy adds its ``settle_s`` and queues behind its budget
on purpose. The watcher reads the audit stream with plain JSON (no model validation), so its own work
takes as little as possible of the event loop it shares with the remediator.

Concurrent drains against kmock, beside raw eviction POSTs, are in ``benchmarks/drains.py``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson

from benchmarks.measure import daemon_heap, pct_ms, raw_pull_ack_s
from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.guards import BudgetSpec
from breakfix.remediator.policy import Policy, load_policy
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import ChangeKind, Incident, IncidentChange, IncidentScope


def open_policy(nodes: int) -> Policy:
    """The default policy with no settle time, no soak and budgets that never hold a plan back."""
    policy = load_policy()
    return policy.model_copy(update={"settle_s": 0.0, "guards": policy.guards.model_copy(update={
        "soak_s": 0.0, "budget": BudgetSpec(max_nodes=nodes, max_percent=100), "topology_budgets": (),
        "breaker": policy.guards.breaker.model_copy(update={"max_percent": 100.0})})})


def change(i: int) -> bytes:
    now = datetime.now(UTC)
    inc = Incident(id=f"inc-bench-{i:05d}", cluster="bench", scope=IncidentScope.GPU, node=f"n{i}",
                   nodes=(f"n{i}",), gpus=(GpuRef(index=i % 8),), category="gpu_reset_required",
                   severity=Severity.CRITICAL, codes=("xid:48",), first_seen=now, last_seen=now)
    return encode(IncidentChange(kind=ChangeKind.OPENED, incident=inc, at=now))


class Watch:
    """Times, per incident, its publication, its decision (plan or refusal record) and its first step record."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.decided: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.raw_s = 0.0  # plain nats-py reading the same incident stream, after the remediator stopped

    async def on_action(self, _subject: str, data: bytes) -> None:
        rec = orjson.loads(data)
        now = time.perf_counter()
        if rec["kind"] in ("plan", "refusal"):
            self.decided.setdefault(rec["incident_id"], now)
        elif rec["kind"] == "step" and rec["outcome"] == "started":
            self.first.setdefault(rec["incident_id"], now)

    def first_step_s(self) -> list[float]:
        return [self.first[k] - self.sent[k] for k in self.first if k in self.sent]


async def _run(nodes: int, drive: Callable[[JetStreamBus, Watch], Awaitable[None]], raw_n: int = 0) -> Watch:
    """One remediator on a fresh nats-server and simulated cluster, driven by ``drive``; then, with ``raw_n``,
    plain nats-py reads the first ``raw_n`` incident changes of the same stream (the remediator stopped)."""
    with tempfile.TemporaryDirectory(prefix="breakfix-rem-bench-") as d, daemon_heap() as settle:
        server = EmbeddedNats(Path(d) / "nats").start()
        try:
            bus = await JetStreamBus.connect(server.url)
            await bus.ensure_streams(subjects.STREAMS)
            cluster = SimCluster({f"n{i}": SimNode(f"n{i}") for i in range(nodes)})
            svc = await build_remediator(RemediatorConfig(cluster="bench"), bus=bus, clock=SystemClock(),
                                         cluster_api=cluster, policy=open_policy(nodes))
            settle()  # as the daemon does once it is built (breakfix.cli.cli_daemons)
            watch = Watch()
            unsubscribe = await bus.subscribe(subjects.ACTIONS_ALL, watch.on_action)
            stop = asyncio.Event()
            task = asyncio.create_task(svc.run(stop), name="bench-remediator")
            await asyncio.sleep(0.5)
            try:
                await drive(bus, watch)
            finally:
                stop.set()
                await task
                await unsubscribe()
                await bus.close()
            if raw_n:
                watch.raw_s = await raw_pull_ack_s(server.url, stream=subjects.INCIDENTS.name,
                                                   subject=subjects.INCIDENTS_ALL, n=raw_n)
            return watch
        finally:
            server.stop()


async def _wait_for(watch: Watch, n: int, within_s: float) -> None:
    deadline = time.perf_counter() + within_s
    while (len(watch.first) < n or len(watch.decided) < n) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def bench_first_action(n: int = 1000) -> dict[str, float]:
    async def burst(bus: JetStreamBus, watch: Watch) -> None:
        bodies = [change(i) for i in range(n)]
        for i, body in enumerate(bodies):
            watch.sent[f"inc-bench-{i:05d}"] = time.perf_counter()
            await bus.publish_core(subjects.incident_subject("bench"), body)
            if i % 50 == 0:
                await asyncio.sleep(0)
        await _wait_for(watch, n, 120)

    watch = await _run(n, burst, raw_n=n)
    lat = watch.first_step_s()
    first_sent, last_sent = min(watch.sent.values()), max(watch.sent.values())
    last_decided = max(watch.decided.values(), default=float("nan"))
    return {"incidents": n, "with_first_action": len(lat), "decided": len(watch.decided),
            "p50_ms": pct_ms(lat, 0.5), "p99_ms": pct_ms(lat, 0.99),
            "all_decided_after_last_published_s": round(last_decided - last_sent, 3),
            "decisions_per_s": round(len(watch.decided) / (last_decided - first_sent)),
            "raw_pull_ack_per_s": round(n / watch.raw_s) if watch.raw_s else 0}


async def bench_steady(rate: float = 100.0, seconds: float = 30.0) -> dict[str, float]:
    n = int(rate * seconds)

    async def steady(bus: JetStreamBus, watch: Watch) -> None:
        start = time.perf_counter()
        for i in range(n):
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            body = change(i)
            watch.sent[f"inc-bench-{i:05d}"] = time.perf_counter()
            await bus.publish_core(subjects.incident_subject("bench"), body)
        await _wait_for(watch, n, 30)

    watch = await _run(n, steady)
    lat = watch.first_step_s()
    decided = [watch.decided[k] - watch.sent[k] for k in watch.decided if k in watch.sent]
    return {"incidents": n, "rate_per_s": rate, "with_first_action": len(lat), "p50_ms": pct_ms(lat, 0.5),
            "p99_ms": pct_ms(lat, 0.99), "max_ms": pct_ms(lat, 1.0), "decided_p99_ms": pct_ms(decided, 0.99)}


if __name__ == "__main__":
    from breakfix.cli.logs import configure

    configure(json=True, level="WARNING")  # as benchmarks/run.py runs it
    print(asyncio.run(bench_first_action()))
    print(asyncio.run(bench_steady()))
