"""Who has the NVIDIA devices open: named in a failed GPU reset's reply, for the human who reads it.

``nvidia-smi --gpu-reset`` refuses ("In use by another client") while any process has the GPU open,
monitoring clients included (nvidia-smi documentation; NVSentinel's reset controller stops the GPU
operator's components first). The agent's busy check lists compute processes only, so when a reset
is refused this way the agent reads ``/proc/<pid>/fd`` (it runs in the host's PID namespace) for links
to a GPU's ``/dev/nvidia<N>`` and names the holders, the target GPU's first:
``nv-hostengine (pid 4411: nvidia0,nvidia1)``. Read-only and bounded (processes and descriptors looked
at); an unreadable process or descriptor is skipped.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

MAX_PIDS = 65536
MAX_NAMED = 10


_GPU_NODE = re.compile(r"/dev/nvidia(\d+)$")  # a GPU's device node; nvidiactl and nvidia-uvm are every client's
MAX_FDS = 4096  # descriptors looked at per process


def _devices(fds: Path) -> set[int]:
    """The GPU device minors a process has open (one vanished descriptor is skipped, not the process)."""
    found: set[int] = set()
    try:
        entries = list(itertools.islice(fds.iterdir(), MAX_FDS))
    except OSError:  # gone, or not ours to read
        return found
    for fd in entries:
        try:
            m = _GPU_NODE.match(os.readlink(fd))
        except OSError:
            continue
        if m:
            found.add(int(m.group(1)))
    return found


def nvidia_clients(proc: Path = Path("/proc"), *, minor: int | None = None, exclude: int | None = None) -> list[str]:
    """``name (pid N: nvidiaM,...)`` of the processes with a GPU device node open, those holding ``/dev/nvidia<minor>``
    (the target GPU; its minor is usually its index) first, then by pid, at most ten."""
    found: list[tuple[bool, int, str]] = []
    try:
        pids = sorted(int(p.name) for p in itertools.islice(proc.iterdir(), MAX_PIDS) if p.name.isdigit())
    except OSError:
        return []
    for pid in pids:
        if pid == exclude:
            continue
        held = _devices(proc / str(pid) / "fd")
        if not held:
            continue
        try:
            name = (proc / str(pid) / "comm").read_text().strip()
        except OSError:
            name = "?"
        devs = ",".join(f"nvidia{d}" for d in sorted(held))
        found.append((minor not in held, pid, f"{name or '?'} (pid {pid}: {devs})"))
    return [label for _, _, label in sorted(found)[:MAX_NAMED]]
