"""``nvidia-smi -q`` text and ``nvidia-smi -q -x`` XML -> the nvml source's ``GpuSample``s -> signals.

Both outputs become one tree of (key, value) nodes with normalised keys (``ECC Errors`` and
``<ecc_errors>`` are both ``ecc_errors``); ``gpu_sample`` reads from it what the nvml source reads
through NVML, and the nvml source's own pure rules (``collectors.nvml.evaluate``) turn it into
signals, so a fault reads the same from a dump as from a live GPU:

- ECC: volatile uncorrectable (DRAM + SRAM, any ``SRAM Uncorrectable*`` field; older drivers'
  ``Double Bit / Total``) -> ``ecc.dbe``; aggregate counts ride along in ``details``;
- ``Remapped Rows`` Pending / Remapping Failure Occurred -> ``row_remap.pending`` / ``failure``;
- ``Retired Pages`` (pre-Ampere) single + double bit counts -> ``retired_pages.limit``, Pending Page
  Blacklist -> ``retired_pages.pending``;
- ``Clocks Event Reasons`` (``Clocks Throttle Reasons`` before R535): HW Slowdown, HW Thermal Slowdown,
  HW Power Brake Slowdown -> ``clock.*`` (NVML bits 0x8, 0x40, 0x80);
- ``Fabric`` State / Status -> ``fabric.gpu`` (NVML_GPU_FABRIC_STATE_*; N/A: not an NVSwitch system);
- ``Replays Since Reset`` (one reading: a total, not a rate) against ``pcie_replay_total`` -> ``pcie.replay``;
- the GPU count (``Attached GPUs`` and the GPU sections) against an expected count -> ``gpu.count_mismatch``;
- ``Unable to determine the device handle for GPU <bus>: <why>`` -> ``gpu.lost`` (``gpu.reset_required`` when
  the reason asks for a reset), as NVML's own GpuIsLost / ResetRequired errors are read live;
- ``GPU Recovery Action`` (R570+, NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: the driver's own remediation verdict, the
  state XID 154 reports changes of) and, before it, ``GPU Reset Status`` / ``Reset Required`` and ``Drain and Reset
  Recommended`` (R530-R565; "Requested functionality has been deprecated" on R570+, i.e. nothing): Reset, Drain P2P
  and Drain and Reset -> ``gpu.reset_required``, Reboot -> ``gpu.lost`` (the catalog's node-reboot check), each with
  ``code`` the ``DCGM_FR_GPU_RECOVERY_*`` name DCGM gives the same field (DCGM_FI_DEV_GPU_RECOVERY_ACTION mirrors
  it), so the catalog classifies it as XID 154 with that action (``xid154_actions``: reset, drain-and-reset, node
  reboot); an action name this reader does not know is ``gpu.reset_required`` without a code, never healthy.
  The GPU's other readings (ECC, remaps, ...) are still read: they say what the reset is for.
MIG mode and MIG devices are read per GPU (``details.mig_mode``, ``details.mig_devices``). Values that read
``N/A``, ``[N/A]``, ``Not Supported`` or ``[Requires Root]`` are absent, never zero. XML with entity
declarations is refused (no entity expansion). Field names: NVIDIA nvidia-smi(1) and ``nvsmi_device_v12.dtd``.
Used by ``breakfix signals nvsmi``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime

from breakfix.collectors.context import NodeContext
from breakfix.collectors.nvml import GpuSample, Thresholds, evaluate
from breakfix.schemas.common import GpuRef, normalize_pci_bus_id
from breakfix.schemas.signal import Signal, SignalSource

MAX_NODES = 200_000
_KV = re.compile(r"^(?P<indent> *)(?P<key>\S.*?)\s+:\s?(?P<value>.*?)\s*$")
_GPU = re.compile(r"^GPU (?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*$")
_ABSENT = {"n/a", "[n/a]", "not supported", "[not supported]", "[requires root]", "unknown error", "[unknown error]",
           "none", ""}
# What nvidia-smi prints for a GPU NVML cannot open: "GPU is lost. Reboot the system to recover this GPU",
# "GPU requires reset", "Unknown Error" (the usual face of a GPU off the bus, Xid 79): lost unless it says reset.
_NO_HANDLE = re.compile(r"Unable to determine the device handle for (?:GPU|gpu)\s*"
                        r"(?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?):\s*(?P<why>[^\n]*)")
FABRIC_STATES = {"not supported": 0, "not started": 1, "in progress": 2, "completed": 3}
# GPU Recovery Action as nvidia-smi names it (or NVML's nvmlGpuRecoveryAction_t number) -> (check, code): the
# code is DCGM's name for the same reading, which the catalog reads as XID 154 with that recovery action.
RECOVERY_ACTIONS: dict[str, tuple[str, str | None]] = {
    "reset": ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET"),
    "gpu reset": ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET"),
    "gpu reset required": ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET"),
    "bus reset": ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET"),
    "reboot": ("gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT"),
    "node reboot": ("gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT"),
    "node reboot required": ("gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT"),
    "system reboot": ("gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT"),
    "drain p2p": ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_DRAIN_P2P"),
    "drain and reset": ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_DRAIN_RESET"),
}
_RECOVERY_NUMBERS = {"1": "Reset", "2": "Reboot", "3": "Drain P2P", "4": "Drain and Reset", "6": "Bus Reset",
                     "7": "System Reboot"}  # NVML_GPU_RECOVERY_ACTION_*; 0 is NONE, 5 RECOVER_IMEX_DOMAIN
_DEPRECATED = "requested functionality has been deprecated"


class NvsmiFormatError(ValueError):
    """Not ``nvidia-smi -q`` output."""


@dataclass
class Node:
    key: str
    value: str = ""
    children: list[Node] = field(default_factory=list)

    def get(self, path: str) -> Node | None:
        node: Node | None = self
        for part in path.split("/"):
            node = next((c for c in node.children if c.key == part), None) if node else None
        return node

    def all(self, key: str) -> list[Node]:
        return [c for c in self.children if c.key == key]


def norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")


def looks_like_nvsmi(text: str) -> bool:
    head = text[:65536]
    return ("NVSMI LOG" in head or "<nvidia_smi_log" in head or "Unable to determine the device handle for" in head
            or bool(re.search(r"^GPU [0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]\s*$", head, re.M)
                    and "Product Name" in head))


def _text_tree(text: str) -> Node:
    root = Node("")
    stack: list[tuple[int, Node]] = [(-1, root)]
    count = 0
    for raw in text.expandtabs(4).splitlines():
        if not raw.strip() or raw.startswith("=") or len(raw) > 4096:
            continue
        count += 1
        if count > MAX_NODES:
            break
        if m := _GPU.match(raw):
            node = Node("gpu", m.group("bus"))
            root.children.append(node)
            stack = [(-1, root), (0, node)]
            continue
        m = _KV.match(raw)
        indent = len(raw) - len(raw.lstrip(" "))
        node = Node(norm(m.group("key")), m.group("value")) if m else Node(norm(raw), "")
        while len(stack) > 1 and stack[-1][0] >= indent:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((indent, node))
    return root


def _xml_tree(text: str) -> Node:
    if "<!ENTITY" in text:
        raise NvsmiFormatError("XML entity declarations are not nvidia-smi output")
    try:
        elem = ET.fromstring(text)
    except ET.ParseError as exc:
        raise NvsmiFormatError(f"not nvidia-smi -q -x XML: {exc}") from None

    def conv(e: ET.Element) -> Node:
        n = Node(norm(e.tag), (e.text or "").strip())
        n.children = [conv(c) for c in e]
        if n.key == "gpu":
            n.value = e.get("id", "")
        return n

    return conv(elem)


def parse_tree(text: str) -> Node:
    """The whole dump as one tree; GPUs are the root's ``gpu`` children."""
    if text.lstrip().startswith("<"):
        return _xml_tree(text)
    return _text_tree(text)


def _value(node: Node | None) -> str | None:
    if node is None or node.value.strip().lower() in _ABSENT:
        return None
    return node.value.strip()


def _int(node: Node | None) -> int | None:
    v = _value(node)
    m = re.match(r"^(\d{1,15})\b", v or "")
    return int(m.group(1)) if m else None


def _yes(node: Node | None) -> bool | None:
    v = (_value(node) or "").lower()
    return True if v in ("yes", "active", "enabled") else False if v in ("no", "not active", "disabled") else None


def first(gpu: Node, *paths: str) -> Node | None:
    return next((n for p in paths if (n := gpu.get(p)) is not None), None)


def _ecc(section: Node | None) -> dict[str, int]:
    """ECC counters of one section (volatile or aggregate): ``dram_unc``, ``sram_unc``, ... whatever is there."""
    out: dict[str, int] = {}
    if section is None:
        return out
    for c in section.children:
        n = _int(c)
        if n is None:
            continue
        for kind in ("sram", "dram"):
            if c.key.startswith(f"{kind}_uncorrectable"):
                out[f"{kind}_unc"] = out.get(f"{kind}_unc", 0) + n
            elif c.key == f"{kind}_correctable":
                out[f"{kind}_corr"] = n
    double = section.get("double_bit/total") or section.get("double_bit/device_memory")
    if not out and _int(double) is not None:
        out["dram_unc"] = _int(double) or 0
    return out


@dataclass
class NvsmiGpu:
    sample: GpuSample
    details: dict[str, str]
    pcie_replays: int | None
    recovery: str | None = None  # the driver's recovery action when it asks for one: "Reset", "Drain and Reset", ...


def recovery_action(gpu: Node) -> str | None:
    """The recovery action the driver asks for on this GPU, None when it asks for none (or does not say).
    ``GPU Recovery Action`` first; without a named action there, the pre-R570 ``GPU Reset Status`` Yes/No pair."""
    raw = _value(gpu.get("gpu_recovery_action"))
    if raw is not None and raw.lower() != _DEPRECATED and raw.strip() != "0":
        return _RECOVERY_NUMBERS.get(raw.strip(), raw[:100])
    status = gpu.get("gpu_reset_status")
    if status is None:
        return None
    if _yes(status.get("drain_and_reset_recommended")):
        return "Drain and Reset"
    if _yes(status.get("reset_required")):
        return "Reset"
    return None


def recovery_check(action: str) -> tuple[str, str | None]:
    """(check, code) for a recovery action. An action not known here (RECOVER_IMEX_DOMAIN, one a later driver adds)
    gets a DCGM-style code the catalog does not list, so it classifies as an unknown fault: the cautious path, as
    an unreadable XID 154 action does, never an automatic reset and never healthy."""
    words = " ".join(action.lower().split())
    known = RECOVERY_ACTIONS.get(words)
    if known is not None:
        return known
    name = re.sub(r"[^A-Z0-9]+", "_", words.upper()).strip("_")[:48] or "UNKNOWN"
    return "gpu.reset_required", f"DCGM_FR_GPU_RECOVERY_{name}"


def gpu_sample(gpu: Node, index: int) -> NvsmiGpu:
    bus = gpu.value
    try:
        pci = normalize_pci_bus_id(bus) if bus else None
    except ValueError:
        pci = None
    uuid = _value(first(gpu, "gpu_uuid", "uuid"))
    s = GpuSample(gpu=GpuRef(index=index, uuid=uuid, pci_bus_id=pci))
    vol = _ecc(gpu.get("ecc_errors/volatile"))
    agg = _ecc(gpu.get("ecc_errors/aggregate"))
    if "dram_unc" in vol or "sram_unc" in vol:
        s.dbe = vol.get("dram_unc", 0) + vol.get("sram_unc", 0)
    rows = gpu.get("remapped_rows")
    if rows is not None:
        s.remap_pending = _yes(first(rows, "pending", "remapped_row_pending"))
        s.remap_failure = _yes(first(rows, "remapping_failure_occurred", "remapped_row_failure"))
    pages = gpu.get("retired_pages")
    if pages is not None:
        s.retired_pending = _yes(first(pages, "pending_page_blacklist", "pending_blacklist", "pending"))
        sbe = _int(first(pages, "single_bit_ecc", "multiple_single_bit_retirement/retired_count"))
        dbe = _int(first(pages, "double_bit_ecc", "double_bit_retirement/retired_count"))
        s.retired_pages = None if sbe is None or dbe is None else sbe + dbe
    reasons = first(gpu, "clocks_event_reasons", "clocks_throttle_reasons", "clocks_throttle_reason")
    if reasons is not None:
        bits = 0
        seen = False
        for c in _flatten(reasons):
            active = _yes(c)
            if active is None:
                continue
            seen = True
            name = re.sub(r"^clocks_(event|throttle)_reason_", "", c.key)
            bit = {"hw_slowdown": 0x8, "hw_thermal_slowdown": 0x40, "hw_power_brake_slowdown": 0x80}.get(name, 0)
            bits |= bit if active else 0
        s.clocks = bits if seen else None
    temp = gpu.get("temperature")
    if temp is not None:
        s.temperature = _int(first(temp, "gpu_current_temp", "gpu_temp"))
        s.slowdown = _int(first(temp, "gpu_slowdown_temp", "gpu_temp_slow_threshold"))
    fabric = gpu.get("fabric")
    if fabric is not None and (fstate := (_value(fabric.get("state")) or "").lower()) in FABRIC_STATES:
        status = (_value(fabric.get("status")) or "success").lower()
        s.fabric = (FABRIC_STATES[fstate], 0 if status == "success" else 1)
    details = {f"ecc_volatile_{k}": str(v) for k, v in vol.items()} | {f"ecc_aggregate_{k}": str(v) for k, v in
                                                                       agg.items()}
    mig = _value(first(gpu, "mig_mode/current", "mig_mode/current_mig"))
    if mig:
        details["mig_mode"] = mig
        holder = first(gpu, "mig_devices")
        devices = gpu.all("mig_device") + (holder.all("mig_device") if holder is not None else [])
        details["mig_devices"] = str(len(devices))
        bad = [gi for d in devices if (gi := _value(first(d, "gpu_instance_id"))) and
               (_int(first(d, "ecc_errors/volatile/sram_uncorrectable",
                           "ecc_error_count/volatile_count/sram_uncorrectable")) or 0) > 0]
        if bad:  # the instances that saw the uncorrectable SRAM errors, named as dcgm-exporter names them
            details["GPU_I_ID"] = ",".join(bad[:16])
    replays = _int(first(gpu, "pci/replays_since_reset", "pci/replay_counter"))
    return NvsmiGpu(s, details, replays, recovery_action(gpu))


def _flatten(node: Node) -> list[Node]:
    out: list[Node] = []
    for c in node.children:
        out.append(c)
        out.extend(_flatten(c))
    return out


@dataclass
class NvsmiRead:
    gpus: list[NvsmiGpu]
    attached: int | None


def parse_nvsmi(text: str) -> NvsmiRead:
    """Every GPU of a dump. ``NvsmiFormatError`` when the text is no nvidia-smi -q output."""
    if not looks_like_nvsmi(text):
        raise NvsmiFormatError("not nvidia-smi -q output")
    tree = parse_tree(text) if "NVSMI LOG" in text or text.lstrip().startswith("<") else Node("")
    gpus = [gpu_sample(g, i) for i, g in enumerate(tree.all("gpu"))]
    seen = {g.sample.gpu.pci_bus_id for g in gpus}
    for m in _NO_HANDLE.finditer(text[:1 << 20]):
        try:
            pci = normalize_pci_bus_id(m.group("bus"))
        except ValueError:
            continue
        if pci in seen or len(gpus) >= 4096:
            continue
        seen.add(pci)
        why = m.group("why").lower()
        lost = "gpu.reset_required" if "reset" in why and "reboot" not in why else "gpu.lost"
        gpus.append(NvsmiGpu(GpuSample(gpu=GpuRef(pci_bus_id=pci), lost=lost), {"nvidia_smi": m.group("why")[:200]},
                             None))
    return NvsmiRead(gpus, _int(tree.get("attached_gpus")))


@dataclass(frozen=True, slots=True)
class NvsmiThresholds:
    nvml: Thresholds = field(default_factory=Thresholds)
    pcie_replay_total: int = 1000  # replays since the last reset in one reading
    expected_gpus: int | None = None


def nvsmi_signals(read: NvsmiRead, ctx: NodeContext, at: datetime, th: NvsmiThresholds | None = None) -> list[Signal]:
    """The nvml source's rules over one dump, plus the one-reading checks (replay total, GPU count)."""
    th = th or NvsmiThresholds()
    out: list[Signal] = []
    if th.expected_gpus is not None:
        count = len(read.gpus)
        out.append(ctx.signal(source=SignalSource.NVML, check="gpu.count_mismatch", healthy=count == th.expected_gpus,
                              at=at, value=count, threshold=th.expected_gpus,
                              message=f"nvidia-smi lists {count} GPUs (attached: {read.attached}), "
                                      f"expected {th.expected_gpus}"))
    for g in read.gpus:
        ctx.register_gpus([g.sample.gpu])
        action = None if g.sample.lost else g.recovery  # a GPU nvidia-smi cannot open says nothing more
        asked = recovery_check(action) if action else None
        for sig in evaluate(ctx, g.sample, None, at, 0.0, th.nvml, set()):
            if action and asked is not None and sig.check == asked[0]:  # the driver's verdict, not a healthy GPU
                sig = ctx.signal(source=SignalSource.NVML, check=asked[0], code=asked[1], healthy=False, at=at,
                                 gpu=g.sample.gpu, details={**g.details, "recovery_action": action},
                                 message=f"nvidia-smi: GPU Recovery Action {action!r} on {g.sample.gpu.label()}")
            elif g.details and (sig.check == "ecc.dbe" or (g.sample.lost and sig.check == g.sample.lost)):
                sig = sig.model_copy(update={"details": {**sig.details, **g.details}})
            out.append(sig)
        if g.pcie_replays is not None:
            out.append(ctx.signal(source=SignalSource.NVML, check="pcie.replay", at=at, gpu=g.sample.gpu,
                                  healthy=g.pcie_replays < th.pcie_replay_total, value=g.pcie_replays,
                                  threshold=th.pcie_replay_total, details={"basis": "total"},
                                  message=f"{g.pcie_replays} PCIe replays since reset on {g.sample.gpu.label()}"))
    return out
