"""The node's GPUs, remembered across reboots, so that a validation can tell whether every GPU came back.

Where from: the node agent's own readings. ``nvidia-smi -q`` (``collectors.nvsmi.parse_nvsmi``: each GPU's
UUID, index and PCI bus id, and the GPUs the driver knows but cannot open, "Unable to determine the device
handle for GPU <bus>: GPU is lost", by bus id only), read by every validation (its Fabric Manager wait reads it
already) and once more just before a reboot the agent was told to do; and ``nvidia-smi -L`` (UUID and index),
read by ``gpu_pods``. Every reading is merged (``merge``) into ``<state_dir>/agent-gpu-inventory.json``: the
collector's persistent state directory (``state_dir`` in the collector config, ``/var/lib/breakfix`` by
default, where ``kmsg-position.json`` lives too), so the record outlives the reboot it is needed after. Writes
replace the file whole and durably (``keyfile.write_json``); at most ``MAX_GPUS`` entries; a file that cannot
be read or is not this format is ignored with a log line (``agent_inventory_unreadable``), as if none had been
recorded, and the next reading writes a fresh one.

Where to: ``NodeAgent._validate`` asks ``missing`` before it runs ``dcgmi diag``. A GPU that fell off the bus
(XID 79) may need a cold power cycle and does not come back after ``systemctl reboot``; ``dcgmi diag`` then
diagnoses the GPUs that are left and passes. So a remembered GPU that is not back fails the validation,
naming it, before any diagnostic runs (NVIDIA Xid catalog, XID 79 "GPU has fallen off the bus": "the GPU is not
accessible" over PCI Express; resolution RESTART_BM, then CONTACT_SUPPORT). A GPU added is not a failure.

Rules, pure: a remembered GPU is back when the driver answers for its UUID, or for a new card (a UUID not
remembered) in its PCI slot: a card replaced in its slot is a repair, not a loss, and the merge swaps the UUIDs.
The merge only adds and swaps, so any reading may be merged, healthy or not: a GPU seen once stays remembered
until its slot holds a new card or an operator deletes the file (a GPU removed on purpose, without a reinstall
that clears ``state_dir``), and a reading taken while a GPU is already lost still records its slot. With no
file yet (a node whose agent never read its GPUs) the check cannot run; the agent says so once and validates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from breakfix.collectors.keyfile import write_json
from breakfix.collectors.nvsmi import NvsmiFormatError, NvsmiRead, parse_nvsmi
from breakfix.schemas.common import normalize_pci_bus_id

log = structlog.get_logger("breakfix.collector.agent")

MAX_GPUS = 64  # a node has at most a few dozen GPUs; the file stays small
MAX_FILE_BYTES = 1 << 20
VERSION = 1


@dataclass(frozen=True, slots=True)
class Gpu:
    uuid: str | None = None
    index: int | None = None
    pci_bus_id: str | None = None

    def label(self) -> str:
        """``gpu3 GPU-... (0000:5d:00.0)``: what a human needs to find the card."""
        if self.index is None and self.uuid is None:
            return f"GPU at {self.pci_bus_id}"
        parts = (f"gpu{self.index}" if self.index is not None else "", self.uuid or "",
                 f"({self.pci_bus_id})" if self.pci_bus_id else "")
        return " ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at the node's GPUs: those the driver answers for, and those it lists but cannot open."""

    present: tuple[Gpu, ...] = ()
    lost: tuple[Gpu, ...] = ()


def read_nvsmi(out: str) -> NvsmiRead | None:
    """``nvidia-smi -q`` text -> its reading; None when it is no such output (no driver, no nvidia-smi)."""
    try:
        return parse_nvsmi(out)
    except NvsmiFormatError:
        return None


def from_nvsmi(read: NvsmiRead) -> Reading:
    present: list[Gpu] = []
    lost: list[Gpu] = []
    for g in read.gpus:
        ref = g.sample.gpu
        gpu = Gpu(ref.uuid[:100] if ref.uuid else None, ref.index, ref.pci_bus_id)
        if gpu.uuid or gpu.pci_bus_id:
            (lost if g.sample.lost else present).append(gpu)
    return Reading(tuple(present), tuple(lost))


def from_gpu_list(listing: dict[int, tuple[str, tuple[str, ...]]]) -> Reading:
    """``collectors.agent_pods.parse_gpu_list`` (``nvidia-smi -L``): UUID and index, no bus id."""
    return Reading(tuple(Gpu(uuid[:100], index) for index, (uuid, _) in sorted(listing.items())))


def merge(remembered: tuple[Gpu, ...], reading: Reading) -> tuple[Gpu, ...]:
    """The inventory after ``reading``: every GPU it shows with its PCI slot is remembered (its fields refreshed; a
    GPU shown without a slot only refreshes one already known); a remembered GPU whose slot now holds a GPU with
    another UUID was replaced and gives way; nothing else is ever dropped."""
    out = [g for g in remembered if g.uuid or g.pci_bus_id]
    for gpu in (g for g in (*reading.present, *reading.lost) if g.uuid or g.pci_bus_id):
        same = next((i for i, g in enumerate(out) if gpu.uuid and g.uuid == gpu.uuid), None)
        if same is None and gpu.pci_bus_id:
            slot = [i for i, g in enumerate(out) if g.pci_bus_id == gpu.pci_bus_id]
            if slot and gpu.uuid:  # a GPU (or only its slot) known there before: this card is the one there now
                out = [g for i, g in enumerate(out) if i not in slot[1:]]
                same = slot[0]
            elif slot:  # lost now, known before: keep what we knew (its UUID)
                continue
        if same is None:
            if gpu.pci_bus_id:  # a reading without slots (``nvidia-smi -L``) refreshes known GPUs, never adds one:
                out.append(gpu)  # a new card recorded slotless would no longer count as its slot's replacement
        else:
            old = out[same]
            out[same] = Gpu(gpu.uuid or old.uuid, gpu.index if gpu.index is not None else old.index,
                            gpu.pci_bus_id or old.pci_bus_id)
    return tuple(out[:MAX_GPUS])


def missing(remembered: tuple[Gpu, ...], reading: Reading, *, index: int | None = None) -> tuple[Gpu, ...]:
    """The remembered GPUs that are not back: the driver answers neither for their UUID nor for a new card in their
    PCI slot (one whose UUID is not remembered: a slot that another remembered GPU moved into does not count).
    ``index``: only the GPU that was at this index (a validation of one GPU after its reset)."""
    known = {g.uuid for g in remembered if g.uuid}
    uuids = {g.uuid for g in reading.present if g.uuid}
    slots = {g.pci_bus_id for g in reading.present if g.pci_bus_id and g.uuid not in known}
    return tuple(g for g in remembered if (index is None or g.index == index)
                 and not (g.uuid in uuids or g.pci_bus_id in slots))


def _entry(raw: object) -> Gpu:
    """One stored GPU; ``ValueError`` when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError("entry is not an object")
    uuid, index, bus = raw.get("uuid"), raw.get("index"), raw.get("pci_bus_id")
    if not (uuid is None or (isinstance(uuid, str) and 0 < len(uuid) <= 100)):
        raise ValueError("bad uuid")
    if not (index is None or (type(index) is int and 0 <= index <= 1024)):
        raise ValueError("bad index")
    if not (bus is None or isinstance(bus, str)):
        raise ValueError("bad pci_bus_id")
    gpu = Gpu(uuid, index, normalize_pci_bus_id(bus) if bus else None)
    if not (gpu.uuid or gpu.pci_bus_id):
        raise ValueError("entry names no GPU")
    return gpu


class InventoryStore:
    """``agent-gpu-inventory.json`` under the collector's ``state_dir``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[Gpu, ...] | None:
        """The remembered GPUs; None when none were ever recorded, or the file is unreadable (logged)."""
        try:
            with self.path.open("rb") as fh:
                data = json.loads(fh.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES])
            if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("gpus"), list):
                raise ValueError(f"not a version-{VERSION} GPU inventory")
            return tuple(_entry(g) for g in data["gpus"][:MAX_GPUS]) or None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("agent_inventory_unreadable", path=str(self.path), error=repr(exc)[:200])
            return None

    def save(self, gpus: tuple[Gpu, ...], at: datetime) -> bool:
        """Replace the file; False (logged) when the disk refused: the next reading tries again."""
        body = {"version": VERSION, "updated_at": at.isoformat(), "gpus": [
            {"uuid": g.uuid, "index": g.index, "pci_bus_id": g.pci_bus_id} for g in gpus[:MAX_GPUS]]}
        try:
            write_json(self.path, body)
        except OSError as exc:
            log.warning("agent_inventory_not_saved", path=str(self.path), error=repr(exc)[:200])
            return False
        return True
