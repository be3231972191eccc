"""``make bench``: correlator figures, measured side by side in one run.

1. The pure grouping core (signals/s) on three mixes from ``benchmarks/mixes.py``: an hour of a
   10,000-GPU fleet (the realistic mix), the storm below, and a change-heavy stress mix; compiled (mypyc, as
   ``make`` builds it) and, in a child process, its Python sources, each beside its dict-store baseline.
2. Through one real nats-server: the raw nats-py JetStream pull-and-ack rate, then the
   correlator service (consume, correlate, publish incident changes, checkpoint, ack) over
   the same signals on the same machine, reported as a ratio (fleet hour and stress mix); three rounds on fresh
   servers in alternating order, the medians and each round's ratio, in a child process that holds only those
   signals.
3. Latency from publish to incident published at a steady 1,000 signals/s (p50, p99).
4. Storm: 1,000 nodes x 8 GPUs for 10 s (leaf-switch failures plus 100 flapping GPUs),
   published as fast as the server takes them; catch-up time after the storm and peak RSS.
5. Collector overhead: one node daemon with every source on for 60 s (benchmarks/collector.py).
6. Remediator: incident to first action for 1,000 incidents at once (with decisions/s beside the raw
   read of the same stream) and at a steady 100 incidents/s (benchmarks/remediator.py), and concurrent
   node drains against kmock (benchmarks/drains.py).
7. ``breakfix signals kmsg`` over 100,000 mixed kernel-log lines beside a plain regex pass over the same
   file (benchmarks/parsers.py).
8. Console: 10,000 open incidents in the index beside a long incident history; the console's
   list and ``breakfix incidents`` side by side with a raw KV read (benchmarks/console.py).
Prints one JSON object; nothing here is a pass/fail test.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.collector import bench_collector
from benchmarks.console import bench_console
from benchmarks.drains import bench_drains
from benchmarks.measure import daemon_heap, pct_ms, peak_rss_mb, raw_pull_ack_s, spawn_breakfix
from benchmarks.mixes import fleet_hour, stress_mix
from benchmarks.notify import bench_notify
from benchmarks.parsers import bench_kmsg_cli
from benchmarks.remediator import bench_first_action, bench_steady
from benchmarks.simulate import bench_simulate
from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.cli.logs import configure
from breakfix.collectors.fleet import build_fleet
from breakfix.collectors.storm import switch_storm
from breakfix.correlator import CORE_BUILD, PURE_ENV
from breakfix.correlator.app import CorrelatorConfig, build_core, build_correlator
from breakfix.correlator.service import ServiceConfig
from breakfix.schemas import subjects
from breakfix.schemas.incident import IncidentChange
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def bench_core(signals: list[Signal]) -> dict[str, float]:
    """The core beside a same-run baseline: one dict store per signal keyed by its node and check, the
    least any Python correlator does per signal (so a slower or busier machine shows in both)."""
    start = time.perf_counter()
    last: dict[tuple[str, str], Signal] = {}
    for s in signals:
        last[(s.node, s.check)] = s
    baseline = time.perf_counter() - start
    with daemon_heap() as settle:  # the collector settings the correlator daemon runs its core under
        core = build_core()
        settle()
        start = time.perf_counter()
        for s in signals:
            core.ingest(s, s.observed_at)
        elapsed = time.perf_counter() - start
    return {"signals": len(signals), "seconds": round(elapsed, 3), "signals_per_s": round(len(signals) / elapsed),
            "baseline_dict_store_per_s": round(len(signals) / baseline), "us_per_signal": round(elapsed * 1e6 /
            len(signals), 2), "incidents": len(core.incidents)}


async def bench_nats(signals: list[Signal], data: Path, rounds: int = 3) -> dict[str, object]:
    """The correlator service beside raw nats-py over the same stream, ``rounds`` times, each round on a fresh
    server, the order alternating (raw read, lean pull, service; then service, lean pull, raw read; with three
    rounds two go raw first): the medians, and each round's ratio. One ~2 s raw read per run set most of the
    ratio's run-to-run spread; the median of alternating reads does not hang on one of them. Each median is taken
    on its own, so the median rates need not come from the round whose ratio is the median."""
    runs = [await _nats_round(signals, data / f"round{i}", service_first=i % 2 == 1) for i in range(rounds)]
    out = {k: statistics.median(r[k] for r in runs) for k in ("raw_pull_ack_per_s", "lean_pull_ackall_per_s",
                                                               "correlator_per_s", "ratio_to_raw")}
    return {"signals": len(signals), "rounds": rounds, **{k: round(v, 3) for k, v in out.items()},
            "ratio_per_round": [r["ratio_to_raw"] for r in runs], "incidents": runs[-1]["incidents"]}


async def _nats_round(signals: list[Signal], data: Path, *, service_first: bool) -> dict[str, float]:
    server = EmbeddedNats(data / "nats").start()
    try:
        bus = await JetStreamBus.connect(server.url)
        await bus.ensure_streams(subjects.STREAMS)
        payloads = [(subjects.signal_subject(s.cluster, s.node), encode(s)) for s in signals]
        for subj, body in payloads:
            await bus.publish_core(subj, body)  # core publish; the stream captures it
        await bus.flush()
        while await bus.stream_messages(subjects.SIGNALS.name) < len(payloads):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        n = len(payloads)

        async def raw() -> float:
            """nats-py's own pull subscription, fetch and per-message ack, nothing else."""
            return await raw_pull_ack_s(server.url, stream=subjects.SIGNALS.name, subject=subjects.SIGNALS_ALL,
                                        n=n, durable="raw")

        async def lean() -> float:
            """breakfix's lean puller (bus.puller) with one ack-all per batch: the ceiling for our consume loop."""
            await bus.reset_consumer(stream=subjects.SIGNALS.name, durable="lean",
                                     filter_subject=subjects.SIGNALS_ALL, start_seq=1)
            start, got = time.perf_counter(), 0
            while got < n:
                batch = await bus.pull(stream=subjects.SIGNALS.name, durable="lean", batch=1024, timeout_s=1)
                got += len(batch)
                if batch:
                    await batch[-1].ack()
            return time.perf_counter() - start

        async def service() -> tuple[float, int]:
            """The correlator service over the same stream, under the collector settings the daemon runs with."""
            with daemon_heap() as settle:
                svc = build_correlator(CorrelatorConfig(service=ServiceConfig(durable="bench")), bus=bus,
                                       clock=SystemClock())
                settle()
                stop = asyncio.Event()
                start = time.perf_counter()
                task = asyncio.create_task(svc.run(stop), name="bench-correlator")
                while svc.signal_stats.handled + svc.signal_stats.dead_lettered < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                await svc.flush_index()  # every change's index put written inside the timed run, as its publish is
                took = time.perf_counter() - start
                stop.set()
                await task
                return took, len(svc.core.incidents)

        if service_first:
            (corr_s, incidents), lean_s, raw_s = await service(), await lean(), await raw()
        else:
            raw_s, lean_s, (corr_s, incidents) = await raw(), await lean(), await service()
        await bus.close()
        return {"signals": n, "raw_pull_ack_per_s": round(n / raw_s), "lean_pull_ackall_per_s": round(n / lean_s),
                "correlator_per_s": round(n / corr_s), "ratio_to_raw": round(raw_s / corr_s, 3),
                "incidents": incidents}
    finally:
        server.stop()


async def bench_latency(data: Path, rate: int = 1000, seconds: int = 10) -> dict[str, float]:
    """Each signal opens a new incident; time from publish to the incident change arriving."""
    server = EmbeddedNats(data / "nats-latency").start()
    try:
        bus = await JetStreamBus.connect(server.url)
        await bus.ensure_streams(subjects.STREAMS)
        fleet = build_fleet(rate * seconds // 8 + 1)
        refs = [(n, g) for n in fleet.nodes for g in n.gpus][: rate * seconds]
        sent: dict[str, float] = {}
        lat: list[float] = []

        async def on_incident(_subject: str, data: bytes) -> None:
            ch = IncidentChange.model_validate_json(data)
            t = sent.get(ch.incident.signal_ids[0]) if ch.incident.signal_ids else None
            if t is not None and ch.kind.value == "opened":
                lat.append(time.perf_counter() - t)

        unsubscribe = await bus.subscribe(subjects.INCIDENTS_ALL, on_incident)
        with daemon_heap() as settle:
            svc = build_correlator(CorrelatorConfig(service=ServiceConfig(durable="latency")), bus=bus,
                                   clock=SystemClock())
            settle()
            stop = asyncio.Event()
            task = asyncio.create_task(svc.run(stop), name="bench-latency-correlator")
            await svc.ready.wait()
            start = time.perf_counter()
            for i, (node, g) in enumerate(refs):
                at = T0 + timedelta(milliseconds=i)
                s = Signal(id=make_signal_id(cluster="bench", node=node.name, source="sim", check="ecc.dbe", code=None,
                                             healthy=False, observed_at=at, gpu=g.ref),
                           cluster="bench", node=node.name, source=SignalSource.SIM, check="ecc.dbe", gpu=g.ref,
                           labels=dict(node.labels), observed_at=at)
                sent[s.id] = time.perf_counter()
                await bus.publish_core(subjects.signal_subject(s.cluster, s.node), encode(s))
                delay = start + (i + 1) / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            deadline = time.perf_counter() + 10
            while len(lat) < len(refs) and time.perf_counter() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            stop.set()
            await task
        await unsubscribe()
        await bus.close()
        return {"rate_per_s": rate, "signals": len(refs), "measured": len(lat), "p50_ms": pct_ms(lat, 0.5),
                "p99_ms": pct_ms(lat, 0.99), "max_ms": pct_ms(lat, 1.0)}
    finally:
        server.stop()


async def bench_storm(data: Path) -> dict[str, object]:
    """The storm through a separate ``breakfix correlator`` process; catch-up and its peak RSS."""
    server = EmbeddedNats(data / "nats-storm").start()
    storm = switch_storm(build_fleet(1000), start=T0)
    proc = spawn_breakfix("correlator", "--nats", server.url, "--checkpoint-interval", "0.5")
    try:
        bus = await JetStreamBus.connect(server.url)
        await bus.ensure_streams(subjects.STREAMS)
        while await bus.consumer_state(subjects.SIGNALS.name, "correlator") is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        payloads = [(subjects.signal_subject(s.cluster, s.node), encode(s)) for s in storm.signals]
        start = time.perf_counter()
        per_tick = len(payloads) // 100
        for k in range(100):  # emitted over 10 s, as the storm happened
            for subj, body in payloads[k * per_tick:(k + 1) * per_tick if k < 99 else len(payloads)]:
                await bus.publish_core(subj, body)
            await bus.flush()
            delay = start + (k + 1) * 0.1 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        storm_end = time.perf_counter()
        last = await bus.stream_messages(subjects.SIGNALS.name)
        while True:
            state = await bus.consumer_state(subjects.SIGNALS.name, "correlator")
            if state is not None and state.ack_floor >= last:
                break
            await asyncio.sleep(0.05)
        done = time.perf_counter()
        rss = peak_rss_mb(proc.pid)
        incidents: dict[str, IncidentChange] = {}
        await bus.reset_consumer(stream=subjects.INCIDENTS.name, durable="bench-reader",
                                 filter_subject=subjects.INCIDENTS_ALL, start_seq=1, ack_all=False)
        while batch := await bus.pull(stream=subjects.INCIDENTS.name, durable="bench-reader", batch=1000,
                                      timeout_s=0.5):
            for m in batch:
                ch = IncidentChange.model_validate_json(m.data)
                prev = incidents.get(ch.incident.id)
                if prev is None or ch.incident.version >= prev.incident.version:
                    incidents[ch.incident.id] = ch
        await bus.close()
        top = [c.incident for c in incidents.values() if c.incident.parent is None]
        return {"signals": len(payloads), "publish_s": round(storm_end - start, 2),
                "catch_up_after_storm_s": round(max(0.0, done - storm_end), 2),
                "fabric_incidents": sum(1 for i in top if i.scope.value == "fabric"),
                "failed_switches": len(storm.failed_switches),
                "gpu_incidents": sum(1 for i in top if i.scope.value == "gpu"), "flapping_gpus": len(storm.flapping),
                "other_top_level_incidents": sum(1 for i in top if i.scope.value not in ("fabric", "gpu")),
                "correlator_peak_rss_mb": rss}
    finally:
        proc.terminate()
        proc.wait(10)
        server.stop()


def core_figures(hour: list[Signal], storm: list[Signal], stress: list[Signal]) -> dict[str, object]:
    """The pure core on the three mixes, in this process's build of it (``breakfix.correlator.CORE_BUILD``)."""
    return {"core_build": CORE_BUILD, "core_fleet_hour": bench_core(hour), "core_storm_mix": bench_core(storm),
            "core_stress_mix": bench_core(stress)}


def core_figures_python() -> dict[str, object]:
    """``core_figures`` in a child process that runs the core's Python sources (``BREAKFIX_PURE_CORE=1``), for the
    compiled core's ratio in the same run."""
    return _child_json("import gc, json; from benchmarks.run import core_figures, mixes; h, st, sx = mixes(); "
                       "gc.freeze(); print(json.dumps(core_figures(h, st, sx)))", env={PURE_ENV: "1"})


def _child_json(code: str, *, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` in a child Python and read the JSON object on its last line of output. Its stderr (logs, and
    a traceback when it fails) passes through to this process's."""
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          text=True, timeout=900, check=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    try:
        figures: dict[str, object] = json.loads(last)
    except json.JSONDecodeError:
        raise RuntimeError(f"a benchmark child printed no JSON figures; its last line: {last[:300]!r}") from None
    return figures


def nats_figures(mix: str) -> dict[str, object]:
    """``bench_nats`` over the first 60,000 signals of ``mix`` (``fleet_hour`` or ``stress_mix``), in a process that
    holds nothing else once they are built (``nats_figures_child``)."""
    configure(json=True, level="WARNING")
    signals = fleet_hour()[:60_000] if mix == "fleet_hour" else stress_mix(200_000)[:60_000]
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory(prefix="breakfix-bench-") as d:
        return {"core_build": CORE_BUILD, **asyncio.run(bench_nats(signals, Path(d)))}


def nats_figures_child(mix: str) -> dict[str, object]:
    """``nats_figures`` in a child process. The correlator daemon holds only its own state; this process holds the
    three mixes (about 440,000 signals) when the service runs, and beside them the service handled about 5 % fewer
    signals a second (see the README), so the service and its raw read are measured where neither carries them."""
    return _child_json(f"import json; from benchmarks.run import nats_figures; "
                       f"print(json.dumps(nats_figures({mix!r})))")


def mixes() -> tuple[list[Signal], list[Signal], list[Signal]]:
    """The fleet hour, the storm and the stress mix."""
    return fleet_hour(), switch_storm(build_fleet(1000), start=T0).signals, stress_mix(200_000)


def main() -> None:
    configure(json=True, level="WARNING")
    hour, storm, stress = mixes()
    gc.freeze()  # the inputs are long-lived; keep the collector off them, as the daemon does with its state
    result: dict[str, object] = core_figures(hour, storm, stress)
    result["core_python_sources"] = core_figures_python()
    result["nats_fleet_hour"] = nats_figures_child("fleet_hour")
    result["nats_stress_mix"] = nats_figures_child("stress_mix")
    del hour, storm, stress  # nothing after this reads the mixes: the daemons measured next do not run beside them
    with tempfile.TemporaryDirectory(prefix="breakfix-bench-") as d:
        result["latency"] = asyncio.run(bench_latency(Path(d)))
        result["storm"] = asyncio.run(bench_storm(Path(d)))
        result["console"] = bench_console(Path(d))
    result["collector"] = asyncio.run(bench_collector())
    result["remediator_first_action"] = asyncio.run(bench_first_action())
    result["remediator_steady_100_per_s"] = asyncio.run(bench_steady())
    result["remediator_drains_kmock"] = asyncio.run(bench_drains())
    result["remediator_notify_stalling_receiver"] = asyncio.run(bench_notify())
    result["simulate"] = bench_simulate()
    result["signals_kmsg_100k_lines"] = bench_kmsg_cli()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
