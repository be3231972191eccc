"""Who has the NVIDIA devices open: named in a failed GPU reset's reply, for the human who reads it.

``nvidia-smi --gpu-reset`` refuses ("In use by another client") while any process has the GPU open,
monitoring clients included (nvidia-smi documentation; NVSentinel's reset controller stops the GPU
operator's components first). The agent's busy check lists compute processes only, so when a reset
is refused this way the agent reads ``/proc/<pid>/fd`` (it runs in the host's PID namespace) for links
to ``/dev/nvidia*`` and names the holders: ``nv-hostengine (pid 4411)``, ``dcgm-exporter (pid 5120)``.
Read-only and bounded; an unreadable process is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_PIDS = 65536
MAX_NAMED = 10


def nvidia_clients(proc: Path = Path("/proc"), *, exclude: int | None = None) -> list[str]:
    """``name (pid N)`` of each process with a ``/dev/nvidia*`` device open, sorted by pid, at most ten."""
    out: list[tuple[int, str]] = []
    try:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())[:MAX_PIDS]
    except OSError:
        return []
    for pid in pids:
        if pid == exclude:
            continue
        fds = proc / str(pid) / "fd"
        try:
            holds = any(os.readlink(fd).startswith("/dev/nvidia") for fd in fds.iterdir())
            name = (proc / str(pid) / "comm").read_text().strip() if holds else ""
        except OSError:  # gone, or not ours to read
            continue
        if holds:
            out.append((pid, f"{name or '?'} (pid {pid})"))
            if len(out) >= MAX_NAMED:
                break
    return [label for _, label in out]
