"""Notifications never slow remediation: throughput with a stalling receiver vs. with notifications off.

Each round starts a fresh nats-server, a remediator over a simulated cluster, and publishes N
``unknown_fault`` incidents on N nodes (policy rule ``unknown-fault``: cordon, escalate), so every
incident ends in an escalation that notifies. With notifications on, the remediator process also
runs the notifier with one webhook channel whose receiver accepts the connection and never answers
(each delivery waits for its timeout and retries; the bounded queue fills and drops, counted). The
figure is plans finished per second (publish of the first incident to the last plan's final audit
record). Rounds alternate off / on (off first, then on first) so machine noise hits both; the report is the
median of each. Each round's remediator runs under the collector settings the daemon settles into once started
(``bus.heap.settle_heap``).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from aiohttp import web

from benchmarks.measure import daemon_heap
from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.guards import BudgetSpec
from breakfix.remediator.metrics_serve import run_observed
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.service import NotifierService
from breakfix.remediator.policy import load_policy
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.common import Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
)

FINAL = {ActionOutcome.COMPLETED, ActionOutcome.ESCALATED, ActionOutcome.FAILED, ActionOutcome.DRY_RUN}


async def stalling_receiver() -> tuple[web.AppRunner, str, asyncio.Event]:
    """A webhook that takes the request and never answers (until released at the end)."""
    release = asyncio.Event()

    async def hang(_req: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hang)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook", release


async def one_round(n: int, notify: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="breakfix-notify-bench-") as d, daemon_heap() as settle_heap:
        server = EmbeddedNats(Path(d) / "nats").start()
        runner, url, release = await stalling_receiver()
        try:
            bus = await JetStreamBus.connect(server.url)
            await bus.ensure_streams(subjects.STREAMS)
            policy = load_policy()
            policy = policy.model_copy(update={"settle_s": 0.0, "guards": policy.guards.model_copy(update={
                "soak_s": 0.0, "budget": BudgetSpec(max_nodes=n, max_percent=100), "topology_budgets": (),
                "breaker": policy.guards.breaker.model_copy(update={"max_percent": 100.0})})})
            cluster = SimCluster({f"n{i}": SimNode(f"n{i}") for i in range(n)})
            svc = await build_remediator(RemediatorConfig(cluster="bench", actor="remediator/bench"), bus=bus,
                                         clock=SystemClock(), cluster_api=cluster, policy=policy)
            settle_heap()  # as ``breakfix remediator`` does once the service is built, before it runs
            config = NotifyConfig.model_validate({
                "channels": [{"name": "stall", "type": "webhook", "url": url, "timeout_s": 2, "attempts": 3,
                              "backoff_s": 0.5}], "default": ["stall"], "queue_size": 100,
                "runbook_base": "https://runbooks.example/breakfix/"}) if notify else None
            done: dict[str, float] = {}

            async def on_action(_subject: str, data: bytes) -> None:
                rec = ActionRecord.model_validate_json(data)
                if rec.kind is ActionKind.PLAN and rec.outcome in FINAL:
                    done.setdefault(rec.incident_id, time.perf_counter())

            unsubscribe = await bus.subscribe(subjects.ACTIONS_ALL, on_action)
            stop = asyncio.Event()
            # the daemon's own wiring: the service, its metrics endpoint and (when configured) the notifier
            tasks = [asyncio.create_task(run_observed(svc, stop, clock=SystemClock(), notify=config, port=0,
                                                      host="127.0.0.1"), name="bench-remediator")]
            await asyncio.sleep(0.5)
            notifier = svc.observe.listeners[0] if svc.observe.listeners else None
            if isinstance(notifier, NotifierService):
                await asyncio.wait_for(notifier.ready.wait(), 30)
            t0 = datetime.now(UTC)
            server_proc = psutil.Process(server._proc.pid) if server._proc else None
            cpu0 = time.process_time() + (sum(server_proc.cpu_times()[:2]) if server_proc else 0.0)
            start = time.perf_counter()
            for i in range(n):
                inc = Incident(id=f"inc-nb-{i:05d}", cluster="bench", scope=IncidentScope.NODE, node=f"n{i}",
                               nodes=(f"n{i}",), category="unknown_fault", severity=Severity.CRITICAL,
                               domain=Domain.OPERATOR, codes=("xid:999",), first_seen=t0, last_seen=t0)
                await bus.publish_core(subjects.incident_subject("bench"),
                                         encode(IncidentChange(kind=ChangeKind.OPENED, incident=inc, at=t0)))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            deadline = time.perf_counter() + 120
            while len(done) < n and time.perf_counter() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            elapsed = max(done.values(), default=start) - start
            cpu = time.process_time() + (sum(server_proc.cpu_times()[:2]) if server_proc else 0.0) - cpu0
            settle = time.perf_counter() + 10  # after the measurement: let the notifier read every escalation
            while isinstance(notifier, NotifierService) and notifier.notified < n \
                    and time.perf_counter() < settle:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            queued = notifier.notified if isinstance(notifier, NotifierService) else 0
            dropped = notifier.dispatcher.dropped if isinstance(notifier, NotifierService) else 0
            stop.set()
            release.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await unsubscribe()
            await bus.close()
            return {"plans": len(done), "seconds": round(elapsed, 3), "cpu_s": round(cpu, 3),
                    "plans_per_s": round(len(done) / elapsed, 1) if elapsed > 0 else 0.0,
                    "notifications": queued, "dropped": dropped}
        finally:
            release.set()
            await runner.cleanup()
            server.stop()


async def bench_notify(n: int = 500, rounds: int = 5) -> dict[str, object]:
    await one_round(min(n, 100), notify=False)  # warm-up (imports, first nats-server), not counted
    off: list[dict[str, float]] = []
    on: list[dict[str, float]] = []
    for i in range(rounds):  # off first, then on first: neither always runs after the other
        for notify in (False, True) if i % 2 == 0 else (True, False):
            (on if notify else off).append(await one_round(n, notify=notify))
    off_rate = statistics.median(r["plans_per_s"] for r in off)
    on_rate = statistics.median(r["plans_per_s"] for r in on)
    off_cpu = statistics.median(r["cpu_s"] for r in off)
    on_cpu = statistics.median(r["cpu_s"] for r in on)
    return {"incidents": n, "rounds": rounds, "off_plans_per_s": off_rate, "on_stalling_plans_per_s": on_rate,
            "ratio": round(on_rate / off_rate, 3) if off_rate else 0.0,
            "cpu_s_per_1000_plans_off": round(1000 * off_cpu / n, 2),
            "cpu_s_per_1000_plans_on": round(1000 * on_cpu / n, 2),
            "notifications_queued": on[-1]["notifications"], "notifications_dropped": on[-1]["dropped"],
            "target": ">= 0.9"}


if __name__ == "__main__":
    from breakfix.cli.logs import configure

    configure(json=True, level="WARNING")
    print(asyncio.run(bench_notify()))
