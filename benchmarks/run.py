"""``make bench``: correlator throughput, measured side by side in one run.

1. The pure grouping core on a realistic signal mix over a 10,000-GPU fleet (signals/s).
2. Through one real nats-server: the raw nats-py JetStream pull-and-ack rate, then the
   correlator service (consume, correlate, publish incident changes, ack) over the same
   signals on the same machine, reported as a ratio.
Prints one JSON object; nothing here is a pass/fail test.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from breakfix.logs import configure
from bus.codec import encode
from bus.jetstream import JetStreamBus
from bus.server import EmbeddedNats
from collectors.fleet import build_fleet
from correlator.grouping import Correlator
from correlator.service import CorrelatorService
from schemas import subjects
from schemas.catalog import default_catalog
from schemas.signal import Signal, SignalSource, make_signal_id

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def mix(n: int, seed: int = 7) -> list[Signal]:
    """Throttle flaps, app XIDs, DBEs with remaps, off-the-bus, re-sends: a busy fleet's hour."""
    rng = random.Random(seed)
    fleet = build_fleet(1250)
    out: list[Signal] = []
    kinds = [("clock.hw_slowdown", None, 0.45), ("xid", "13", 0.2), ("xid", "31", 0.1), ("xid", "48", 0.05),
             ("xid", "63", 0.05), ("xid", "45", 0.05), ("ecc.dbe", None, 0.05), ("xid", "79", 0.01),
             ("xid", "173", 0.04)]
    weights = [k[2] for k in kinds]
    for i in range(n):
        if out and rng.random() < 0.05:
            out.append(out[rng.randrange(len(out))])  # a re-send
            continue
        check, code, _ = rng.choices(kinds, weights)[0]
        node = fleet.node(rng.randrange(len(fleet.nodes)) if rng.random() < 0.3 else rng.randrange(40))
        g = node.gpus[rng.randrange(8)]
        healthy = check == "clock.hw_slowdown" and rng.random() < 0.5
        at = T0 + timedelta(milliseconds=i * 5)
        out.append(Signal(
            id=make_signal_id(cluster="bench", node=node.name, source="sim", check=check, code=code, healthy=healthy,
                              observed_at=at, gpu=g.ref, discriminator=str(i)),
            cluster="bench", node=node.name, source=SignalSource.SIM, check=check, code=code, healthy=healthy,
            gpu=g.ref, tenant=g.tenant, message=f"{check} {code}", labels=dict(node.labels), observed_at=at))
    return out


def bench_core(signals: list[Signal]) -> dict[str, float]:
    core = Correlator(default_catalog())
    start = time.perf_counter()
    for s in signals:
        core.ingest(s, s.observed_at)
    elapsed = time.perf_counter() - start
    return {"signals": len(signals), "seconds": round(elapsed, 3), "signals_per_s": round(len(signals) / elapsed),
            "incidents": len(core.incidents)}


async def bench_nats(signals: list[Signal], data: Path) -> dict[str, float]:
    server = EmbeddedNats(data / "nats").start()
    try:
        bus = await JetStreamBus.connect(server.url)
        await bus.ensure_streams(subjects.STREAMS)
        payloads = [(subjects.signal_subject(s.cluster, s.node), encode(s)) for s in signals]
        for subj, body in payloads:
            await bus.client.publish(subj, body)  # core publish; the stream captures it
        await bus.client.flush()
        while await bus.stream_messages(subjects.SIGNALS.name) < len(payloads):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # raw: nats-py pull + ack, nothing else
        await bus.ensure_consumer(stream=subjects.SIGNALS.name, durable="raw", filter_subject=subjects.SIGNALS_ALL)
        start, got = time.perf_counter(), 0
        while got < len(payloads):
            for m in await bus.pull(stream=subjects.SIGNALS.name, durable="raw", batch=256, timeout_s=1):
                await m.ack()
                got += 1
        raw_s = time.perf_counter() - start
        # correlator service over the same stream
        svc = CorrelatorService(bus, Correlator(default_catalog()), lambda: datetime.now(UTC), durable="bench")
        stop = asyncio.Event()
        start = time.perf_counter()
        task = asyncio.create_task(svc.run(stop), name="bench-correlator")
        while svc.signal_stats.handled + svc.signal_stats.dead_lettered < len(payloads):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        corr_s = time.perf_counter() - start
        stop.set()
        await task
        await bus.close()
        return {"signals": len(payloads), "raw_pull_ack_per_s": round(len(payloads) / raw_s),
                "correlator_per_s": round(len(payloads) / corr_s), "ratio_to_raw": round(raw_s / corr_s, 3),
                "incidents": len(svc.core.incidents)}
    finally:
        server.stop()


def main() -> None:
    configure(json=True, level="WARNING")
    signals = mix(200_000)
    result = {"core": bench_core(signals)}
    with tempfile.TemporaryDirectory(prefix="breakfix-bench-") as d:
        result["nats"] = asyncio.run(bench_nats(signals[:20_000], Path(d)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
