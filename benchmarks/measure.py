"""Small measuring helpers shared by the benchmarks: percentiles, a process's CPU time and peak
RSS from /proc, a daemon's collector settings for an in-process run, starting a ``breakfix`` command
as its own process, and the raw nats-py read that figures are compared with."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats

from breakfix.bus.heap import settle_heap


def pct_ms(values: list[float], q: float) -> float:
    """The q-quantile of durations in seconds, in milliseconds."""
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


@contextlib.contextmanager
def daemon_heap() -> Iterator[Callable[[], None]]:
    """Yields ``settle``: call it once the daemon under test is built, as the CLI calls ``bus.heap.settle_heap``;
    on the way out the benchmark process's own collector thresholds come back, so the figures measured next keep
    theirs. On the way in everything frozen before is unfrozen, so ``settle``'s collection frees what a daemon
    measured earlier left behind (``settle_heap`` froze it, reference cycles and all) instead of measuring this
    one beside it."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    try:
        yield settle_heap
    finally:
        gc.set_threshold(*thresholds)


def spawn_breakfix(*args: str) -> subprocess.Popen[bytes]:
    """``breakfix ARGS`` in a child process, quiet, logging warnings only."""
    return subprocess.Popen([sys.executable, "-c", "from breakfix.cli.main import app; app()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "BREAKFIX_LOG_LEVEL": "WARNING"})


async def raw_pull_ack_s(url: str, *, stream: str, subject: str, n: int, durable: str = "bench-raw") -> float:
    """Seconds plain nats-py takes to pull (its ``fetch``) and ack, one by one, the first ``n`` messages of
    ``stream`` on ``subject``, nothing decoded: the baseline, not breakfix's bus."""
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject, durable=durable, stream=stream)
        start, got = time.perf_counter(), 0
        while got < n:
            for m in await sub.fetch(batch=min(256, n - got), timeout=2):
                await m.ack()
                got += 1
        took = time.perf_counter() - start
        await sub.unsubscribe()
        return took
    finally:
        await nc.close()
