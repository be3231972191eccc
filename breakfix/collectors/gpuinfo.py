"""GPU UUID -> device minor, from the NVIDIA driver's ``/proc/driver/nvidia/gpus/<pci>/information``.

The driver writes one ``information`` file per GPU, ``Key:<tabs>value`` lines, among them
``GPU UUID: GPU-...`` and ``Device Minor: N``, the N of ``/dev/nvidiaN`` (the same fields
``nvidia-container-cli info`` prints). The minor is not the NVML / nvidia-smi index in general:
nvidia-smi orders GPUs by PCI bus id, the driver numbers device nodes in probe order.

Read by the node agent (which processes hold ``/dev/nvidiaN`` when a reset is refused; which pods hold a
GPU that NVIDIA's DRA driver allocated) and the podresources source (tenants of DRA-allocated GPUs).
NVIDIA's DRA driver for GPUs names its devices by minor: ``gpu-<minor>`` for a whole GPU and
``gpu-<minor>-mig-...`` for a MIG device on it (its ``CanonicalName``: ``-<profile id>-<start>-<size>``
before driver v25.12, ``-<profile name>-<profile id>-<start>`` since); the
kubelet's PodResources API reports those names in a claim's ``device_name``.
"""

from __future__ import annotations

import re
from pathlib import Path

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
MAX_GPUS = 64  # directories read; a node has at most a few dozen GPUs
MAX_BYTES = 64 * 1024  # one information file is well under 1 KiB
# gpu-<minor>; a MIG device on it: gpu-<minor>-mig-<profile id>-<start>-<size> (driver v25.8) or
# gpu-<minor>-mig-<profile name>-<profile id>-<start> (v25.12 on, e.g. gpu-2-mig-1g24gb-19-0): only the minor is used
_DRA = re.compile(r"^gpu-(\d{1,4})(?:-mig-[a-z0-9][a-z0-9.+-]{0,62})?$")


def parse_information(text: str) -> tuple[str | None, int | None]:
    """One ``information`` file -> (GPU UUID, device minor); None for a field that is missing or unreadable."""
    uuid: str | None = None
    minor: int | None = None
    for line in text.splitlines()[:200]:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "GPU UUID" and value.startswith("GPU-"):
            uuid = value.split()[0]
        elif key == "Device Minor" and value.isdigit() and len(value) < 5:
            minor = int(value)
    return uuid, minor


def read_minors(root: Path = PROC_GPUS) -> dict[str, int]:
    """GPU UUID -> device minor for every GPU the driver lists under ``root``; a file that cannot be read or
    parsed is skipped, and a missing ``root`` (no driver loaded, not mounted) reads as no GPUs."""
    out: dict[str, int] = {}
    try:
        dirs = sorted(root.iterdir())[:MAX_GPUS]
    except OSError:
        return out
    for d in dirs:
        try:
            with (d / "information").open(encoding="utf-8", errors="replace") as fh:
                uuid, minor = parse_information(fh.read(MAX_BYTES))
        except OSError:
            continue
        if uuid is not None and minor is not None:
            out[uuid] = minor
    return out


def dra_name(minor: int) -> str:
    """The DRA driver's name of the whole GPU with this minor."""
    return f"gpu-{minor}"


def dra_parent(device_name: str) -> str | None:
    """``gpu-M`` for a DRA device name ``gpu-M`` or ``gpu-M-mig-...``; None for any other name."""
    m = _DRA.match(device_name)
    return None if m is None else dra_name(int(m.group(1)))


def dra_minor(device_name: str) -> int | None:
    m = _DRA.match(device_name)
    return None if m is None else int(m.group(1))
