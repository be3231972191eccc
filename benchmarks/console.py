"""Console and ``breakfix incidents`` figures for ``make bench``: current state without a replay.

On one real nats-server: 10,000 open incidents in the incident index (KV ``breakfix-incidents``,
written through ``IncidentIndex`` as the correlator writes it) and ``history`` older changes in the
``BREAKFIX_INCIDENTS`` stream (1,000,000 asked for by the issue; ``BREAKFIX_BENCH_CONSOLE_HISTORY``
sets it, the default keeps ``make bench`` short and is reported). Measured side by side in one run:
a raw nats-py KV read of every entry, breakfix's index snapshot, the console's start-up (load) and
its incident list rendered over HTTP, and ``breakfix incidents`` as a separate process (table and
JSON, with the package's bytecode compiled first, as a wheel install leaves it), with the old stream
replay for comparison.
"""

from __future__ import annotations

import asyncio
import compileall
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats

import breakfix
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.console.auth import AuthConfig
from breakfix.console.server import start
from breakfix.correlator.index import BUCKET, IncidentIndex
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.incident import (
    ChangeKind,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    Plan,
    Step,
    StepAction,
    TimelineEntry,
)

OPEN = 10_000
HISTORY = int(os.environ.get("BREAKFIX_BENCH_CONSOLE_HISTORY", "200000"))
NOW = datetime.now(UTC)
PLAN = Plan(domain=Domain.OPERATOR, rule="gpu-reset", reason="XID 48", steps=(
    Step(action=StepAction.DRAIN_GPU), Step(action=StepAction.RESET_GPU), Step(action=StepAction.VALIDATE),
    Step(action=StepAction.RETURN_TO_SERVICE)))


def open_incident(i: int) -> Incident:
    node = f"gpu-node-{i // 8:05d}"
    at = NOW - timedelta(minutes=i % 600)
    return Incident(id=f"inc-{i:016x}", cluster=f"c{i % 4}", scope=IncidentScope.GPU, node=node, nodes=(node,),
                    gpus=(GpuRef(index=i % 8),), tenants=(TenantRef(namespace="team-a", pod=f"train-{i}"),),
                    category="gpu_reset_required", severity=Severity.CRITICAL, status=IncidentStatus.MITIGATING,
                    title=f"XID 48 on {node}", codes=("xid:48",), first_seen=at, last_seen=at, version=3, plan=PLAN,
                    labels={"rack": f"rack-{i // 256}"}, evidence=(f"NVRM: Xid (PCI:0000:1a:00): 48, pid={i}",),
                    timeline=(TimelineEntry(at=at, event="opened", note=f"xid:48 on {node}"),))


async def seed(url: str, history: int) -> dict[str, float]:
    bus = await JetStreamBus.connect(url, name="bench-seed")
    await bus.ensure_streams(subjects.STREAMS)
    t = time.perf_counter()
    # history: resolved incidents' changes, as the correlator published them (core publish, the stream stores)
    old = open_incident(0).model_copy(update={"status": IncidentStatus.RESOLVED, "id": "old-000000000000",
                                              "first_seen": NOW - timedelta(days=30)})
    template = encode(IncidentChange(kind=ChangeKind.UPDATED, at=NOW, incident=old))
    subject = subjects.incident_subject("c0")
    for k in range(history):  # five changes per old incident; the id is patched into the encoded bytes
        await bus.publish_core(subject, template.replace(b"old-000000000000", f"old-{k // 5:012x}".encode()))
        if k % 5000 == 4999:
            await bus.flush()
    await bus.flush()
    while await bus.stream_messages(subjects.INCIDENTS.name) < history:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    history_s = time.perf_counter() - t
    t = time.perf_counter()
    incidents = [open_incident(i) for i in range(OPEN)]
    await IncidentIndex(bus).write(incidents)
    index_s = time.perf_counter() - t
    await bus.close()
    return {"history_seed_s": round(history_s, 1), "index_write_10k_s": round(index_s, 2),
            "index_writes_per_s": round(OPEN / index_s)}


async def raw_kv_read(url: str) -> tuple[float, int]:
    """The baseline: nats-py's own KV watcher delivering every current value, nothing decoded."""
    nc = await nats.connect(url, name="bench-raw")  # the baseline is plain nats-py, not breakfix's bus
    t = time.perf_counter()
    kv = await nc.jetstream().key_value(BUCKET)
    watcher = await kv.watchall()
    n = 0
    async for e in watcher:
        if e is None:
            break
        n += 1
    s = time.perf_counter() - t
    await watcher.stop()  # type: ignore[no-untyped-call]
    await nc.close()
    return s, n


async def snapshot(url: str) -> tuple[float, int]:
    bus = await JetStreamBus.connect(url, name="bench-snapshot")
    t = time.perf_counter()
    n = len(await IncidentIndex(bus).snapshot())
    s = time.perf_counter() - t
    await bus.close()
    return s, n


async def console_render(url: str) -> dict[str, float]:
    t = time.perf_counter()
    run = await start(url, auth=AuthConfig(mode="lab"))
    load_s = time.perf_counter() - t
    try:
        async with httpx.AsyncClient(base_url=run.url, timeout=30) as c:
            first = time.perf_counter()
            r = await c.get("/incidents")
            first_s = time.perf_counter() - first
            assert r.status_code == 200 and f"{OPEN} incidents" in r.text, r.text[:300]
            times = []
            for _ in range(5):
                t = time.perf_counter()
                await c.get("/incidents")
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            await c.get("/incidents", params={"cluster": "c2", "node": "gpu-node-00100"})
            filtered_s = time.perf_counter() - t
    finally:
        await run.close()
    return {"console_load_s": round(load_s, 3), "list_first_render_s": round(first_s, 3),
            "list_render_median_s": round(sorted(times)[2], 3), "list_filtered_render_s": round(filtered_s, 3),
            "load_plus_first_render_s": round(load_s + first_s, 3), "rows_per_page": 200}


def cli(url: str, *args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from breakfix.cli.main import app; app()", "incidents", "--nats", url,
                    *args], check=True, capture_output=True, env={**os.environ, "COLUMNS": "200"})
    return time.perf_counter() - t


def python_startup() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import breakfix.cli.main"], check=True, capture_output=True)
    return time.perf_counter() - t


async def stream_replay(url: str) -> float:
    """What ``breakfix incidents`` did before the index: read the whole stream, keep the latest."""
    bus = await JetStreamBus.connect(url, name="bench-replay")
    t = time.perf_counter()
    await bus.reset_consumer(stream=subjects.INCIDENTS.name, durable="bench-replay",
                             filter_subject=subjects.INCIDENTS_ALL, start_seq=1, ack_all=False,
                             max_ack_pending=1_000_000)
    latest: dict[str, int] = {}
    while batch := await bus.pull(stream=subjects.INCIDENTS.name, durable="bench-replay", batch=1000,
                                  timeout_s=0.5):
        for m in batch:
            inc = IncidentChange.model_validate_json(m.data).incident
            latest[inc.id] = max(latest.get(inc.id, 0), inc.version)
    s = time.perf_counter() - t - 0.5  # the last empty pull's timeout
    await bus.close()
    return s


def bench_console(data: Path, history: int = HISTORY) -> dict[str, object]:
    server = EmbeddedNats(data / "nats-console").start()
    try:
        t = time.perf_counter()
        sum(range(1_000_000))
        out: dict[str, object] = {"open_incidents": OPEN, "history_changes_in_stream": history,
                                  "cpu_calibration_sum_1e6_ms": round((time.perf_counter() - t) * 1000, 1)}
        out.update(asyncio.run(seed(server.url, history)))
        raw_s, raw_n = asyncio.run(raw_kv_read(server.url))
        snap_s, snap_n = asyncio.run(snapshot(server.url))
        out.update({"raw_kv_read_s": round(raw_s, 3), "raw_kv_entries": raw_n,
                    "index_snapshot_s": round(snap_s, 3), "index_snapshot_incidents": snap_n,
                    "snapshot_to_raw": round(snap_s / raw_s, 2)})
        out.update(asyncio.run(console_render(server.url)))
        # as installed from the wheel: pip compiles the bytecode at install time (here it may be off)
        compileall.compile_dir(Path(breakfix.__file__).parent, quiet=1)
        out["load_average_1m_before_cli"] = round(os.getloadavg()[0], 2)  # other work on the machine shows here
        out["cli_python_startup_s"] = round(python_startup(), 2)
        for name, args in (("table", ()), ("json", ("--format", "json"))):  # median of 3: one call is noisy
            runs = sorted(cli(server.url, *args) for _ in range(3))
            out[f"cli_incidents_{name}_s"] = round(runs[1], 2)
            out[f"cli_incidents_{name}_runs_s"] = [round(r, 2) for r in runs]
        out["old_stream_replay_s"] = round(asyncio.run(stream_replay(server.url)), 2)
        return out
    finally:
        server.stop()


if __name__ == "__main__":
    import json
    import tempfile

    from breakfix.cli.logs import configure

    configure(json=True, level="WARNING")
    with tempfile.TemporaryDirectory(prefix="breakfix-bench-console-") as d:
        print(json.dumps(bench_console(Path(d)), indent=2))
