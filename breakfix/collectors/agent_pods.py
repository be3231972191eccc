"""The GPU's devices for the node agent's ``gpu_pods``: a GPU and its MIG devices, from ``nvidia-smi -L``.

Input: the text of ``nvidia-smi -L`` on this node (the agent runs the driver's nvidia-smi, as it does
for resets). Each GPU line is followed by its MIG devices, one indented line each (NVIDIA MIG User
Guide; Azure's and NVIDIA's published examples):

    GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-...)
      MIG 1g.5gb     Device  0: (UUID: MIG-c6d4f1ef-...)

Drivers before R470 wrote MIG UUIDs as ``MIG-GPU-<uuid>/<gi>/<ci>``; either form is taken as written,
since the kubelet's device ids (``collectors.podresources.gpu_holders``) carry the same string.
Output: the set of device ids of one GPU, named by index or UUID; an empty set when it is not listed.
"""

from __future__ import annotations

import re

_GPU = re.compile(r"^GPU (\d+): .*\(UUID: ([^)\s]+)\)\s*$")
_MIG = re.compile(r"^\s+MIG .*\(UUID: ([^)\s]+)\)\s*$")
MAX_LINES = 4096  # a node lists 8 GPUs x 8 lines; anything longer is not nvidia-smi -L


def parse_gpu_list(text: str) -> dict[int, tuple[str, tuple[str, ...]]]:
    """``nvidia-smi -L`` -> GPU index -> (GPU UUID, its MIG device UUIDs in listed order)."""
    out: dict[int, tuple[str, list[str]]] = {}
    current: int | None = None
    for line in text.splitlines()[:MAX_LINES]:
        if m := _GPU.match(line):
            current = int(m.group(1))
            out[current] = (m.group(2), [])
        elif (m := _MIG.match(line)) and current is not None:
            out[current][1].append(m.group(1))
        elif line.strip() and not line[0].isspace():  # an unindented line nvidia-smi added ends the GPU
            current = None
    return {i: (uuid, tuple(migs)) for i, (uuid, migs) in out.items()}


def gpu_devices(listing: dict[int, tuple[str, tuple[str, ...]]], *, index: int | None = None,
                uuid: str | None = None) -> frozenset[str]:
    """The device ids of the GPU named by ``index`` or ``uuid``: its UUID and its MIG devices' UUIDs."""
    for i, (gpu, migs) in listing.items():
        if (index is not None and i == index) or (uuid is not None and gpu == uuid):
            return frozenset({gpu, *migs})
    return frozenset()
