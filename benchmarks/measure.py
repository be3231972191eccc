"""Small measuring helpers shared by the benchmarks: percentiles, a process's CPU time and peak
RSS from /proc, and starting a ``breakfix`` command as its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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


def spawn_breakfix(*args: str) -> subprocess.Popen[bytes]:
    """``breakfix ARGS`` in a child process, quiet, logging warnings only."""
    return subprocess.Popen([sys.executable, "-c", "from breakfix.cli.main import app; app()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "BREAKFIX_LOG_LEVEL": "WARNING"})
