"""``nvidia-smi -q`` text and ``nvidia-smi -q -x`` XML -> the nvml source's ``GpuSample``s -> signals.

Both outputs become one tree of (key, value) nodes with normalised keys (``collectors.nvsmi_tree``: ``ECC Errors``
and ``<ecc_errors>`` are both ``ecc_errors``); ``gpu_sample`` reads from it what the nvml source reads
through NVML, and the nvml source's own pure rules (``collectors.nvml_eval.evaluate``) turn it into
signals, so a fault reads the same from a dump as from a live GPU:

- ECC: volatile uncorrectable (DRAM + SRAM, any ``SRAM Uncorrectable*`` field; older drivers'
  ``Double Bit / Total``) -> ``ecc.dbe``; aggregate counts ride along in ``details``;
- ECC Errors / Aggregate ``SRAM Threshold Exceeded`` (R535+; XML ``ecc_errors/aggregate/sram_threshold_exceeded``,
  NVML ``nvmlEccSramErrorStatus_v1_t.bThresholdExceeded``): Yes -> ``ecc.sram_threshold`` (NVIDIA WORKFLOW_XID_48:
  run field diag, RMA; DCGM's DCGM_FR_SRAM_THRESHOLD), No -> healthy, N/A or no line -> nothing; the aggregate SRAM
  uncorrectable counts (Parity, SEC-DED, ``Aggregate Uncorrectable SRAM Sources``) ride along in ``details``;
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
- a reading that says ``GPU is lost`` / ``GPU requires reset`` (NVML's error string printed in its place, as for a GPU
  lost after nvidia-smi opened it) -> ``gpu.lost`` / ``gpu.reset_required``;
- ``Temperature``: ``GPU Current Temp`` against ``GPU Slowdown Temp``, or on R535+ Hopper/Ada/Blackwell the T.Limit
  margins (``GPU T.Limit Temp``, ``GPU Slowdown T.Limit Temp``) turned into the same two -> ``temperature.slowdown``;
- ``Fabric`` Health (Summary Unhealthy / Limited Capacity, Bandwidth Degraded, Route Unhealthy, Incorrect
  Configuration, Partition Assigned) and a Status other than Success -> ``fabric.gpu`` with ``details.fabric_health``,
  ``fabric.config`` and ``fabric.partition`` (``collectors.nvlink_fabric``: the same verdicts as NVML's healthMask);
A GPU's NVML index is claimed only where the dump proves it (``parse_nvsmi``): its position in a log listing all
``Attached GPUs``; ``-i 3`` (one section of 8) names GPUs by UUID and bus id, ``nvsmi_signals`` adds the index the
node's registered GPUs (``NodeContext.register_gpus``, filled by the NVML source in the node daemon; ``breakfix signals
nvsmi`` starts with none) give them. Inputs as they arrive: ``-l N`` captures (one log
or XML document per interval, the latest reading of each GPU wins), XML after the ``Unable to determine ...`` lines
of ``2>&1``, XML cut short (the GPUs before the cut are read; ``attached_gpus`` shows what is missing), indented or
banner-less text, a BOM and CRLF.
MIG mode and MIG devices are read per GPU (``details.mig_mode``, ``details.mig_devices``). Values that read
``N/A``, ``[N/A]``, ``Not Supported`` or ``[Requires Root]`` are absent, never zero. XML with entity
declarations is refused (no entity expansion). Field names: NVIDIA nvidia-smi(1) and ``nvsmi_device_v12.dtd``.
Used by ``breakfix signals nvsmi``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime

from breakfix.collectors.context import NodeContext
from breakfix.collectors.nvlink_fabric import FabricHealth, from_dump
from breakfix.collectors.nvml_eval import SRAM_COUNTS, GpuSample, Thresholds, evaluate
from breakfix.collectors.nvsmi_tree import Node as Node  # re-exported: callers read dumps through this module
from breakfix.collectors.nvsmi_tree import NvsmiFormatError as NvsmiFormatError
from breakfix.collectors.nvsmi_tree import flatten, parse_tree
from breakfix.schemas.common import GpuRef, normalize_pci_bus_id
from breakfix.schemas.signal import Signal, SignalSource

_ABSENT = {"n/a", "[n/a]", "not supported", "[not supported]", "[requires root]", "unknown error", "[unknown error]",
           "none", ""}
# What nvidia-smi prints for a GPU NVML cannot open: "GPU is lost. Reboot the system to recover this GPU",
# "GPU requires reset", "Unknown Error" (the usual face of a GPU off the bus, Xid 79): lost unless it says reset.
# "detect": the wording a Windows nvidia-smi.exe printed (jamesstringer90/Easy-GPU-PV issue 276)
_NO_HANDLE_LINE = re.compile(r"Unable to (?:determine|detect) the device handle for")
_NO_HANDLE = re.compile(r"Unable to (?:determine|detect) the device handle for (?:GPU|gpu)\s*"
                        r"(?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?):\s*(?P<why>[^\n]*)")
FABRIC_STATES = {"not supported": 0, "not started": 1, "in progress": 2, "completed": 3}
# The fabric probe's status is an nvmlReturn_t, printed by its error string ("Success", "Unknown Error", "Timeout",
# ...; nvidia-smi(1) "Fabric": "Status: error status, if any"): anything but Success (or no reading) failed.
_FABRIC_NO_STATUS = {"success", "n/a", "[n/a]", "not supported", "[not supported]", ""}
# What nvidia-smi prints in place of a reading NVML refused with NVML_ERROR_GPU_IS_LOST / NVML_ERROR_RESET_REQUIRED
# (their nvmlErrorString): every reading of a GPU lost after nvidia-smi opened it reads so ("GPU is lost" in each
# element of NVIDIA/k8s-test-infra tests/e2e/go/assertions/nvidiasmi/testdata/qx-gb200-lost.xml, nvidia-smi
# 580.65.06), and a single reading may (``Channel Repair Pending : GPU requires reset``).
_LOST_VALUES = {"gpu is lost": "gpu.lost", "gpu requires reset": "gpu.reset_required"}
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
_RECOVERY_NUMBERS = {"1": "Reset", "2": "Reboot", "3": "Drain P2P", "4": "Drain and Reset", "5": "Recover IMEX Domain",
                     "6": "Bus Reset", "7": "System Reboot"}  # NVML_GPU_RECOVERY_ACTION_*; 0 is NONE
_DEPRECATED = "requested functionality has been deprecated"


def looks_like_nvsmi(text: str) -> bool:
    head = text[:65536]
    return ("NVSMI LOG" in head or "<nvidia_smi_log" in head or _NO_HANDLE_LINE.search(head) is not None
            or bool(re.search(r"^GPU [0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]\s*$", head, re.M)
                    and "Product Name" in head))


def _value(node: Node | None) -> str | None:
    if node is None or node.value.strip().lower() in _ABSENT:
        return None
    return node.value.strip()


def _int(node: Node | None) -> int | None:
    v = _value(node)
    m = re.match(r"^(\d{1,15})\b", v or "")
    return int(m.group(1)) if m else None


def _signed(node: Node | None) -> int | None:
    """A signed reading such as ``-2 C`` (T.Limit margins and offsets)."""
    m = re.match(r"^([+-]?\d{1,4})\b", _value(node) or "")
    return int(m.group(1)) if m else None


def _yes(node: Node | None) -> bool | None:
    v = (_value(node) or "").lower()
    if v in ("yes", "active", "enabled", "true"):
        return True
    return False if v in ("no", "not active", "disabled", "false") else None


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
    fabric_health: str = ""  # what the fabric's Health block reports wrong ("summary Unhealthy, route unhealthy")


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


def lost_reading(gpu: Node) -> tuple[str, str] | None:
    """(check, value) when a reading of this GPU is NVML's GPU-is-lost or reset-required error; lost wins."""
    found = None
    for n in flatten(gpu):
        said = n.value.strip()
        check = _LOST_VALUES.get(said.strip("[]").rstrip(".").strip().lower()) if len(said) < 40 else None
        if check == "gpu.lost":
            return check, said
        found = found or ((check, said) if check else None)
    return found


def _slowdown(temp: Node) -> tuple[int | None, int | None]:
    """(current, slowdown) temperature in C. Drivers from R535 on print Hopper, Ada and Blackwell thresholds as
    T.Limit margins instead (``GPU T.Limit Temp`` the live headroom to the max operating temperature,
    ``GPU Slowdown T.Limit Temp : -2 C`` slowdown 2 C past it; ``GPU Current T.Limit Temp`` / ``... Specification``
    on later drivers; XML ``gpu_temp_tlimit`` / ``gpu_temp_slow_tlimit_threshold``, nvsmi_device_v12.dtd): the
    slowdown temperature is then current + headroom - offset, and reaching it is the headroom falling to the offset
    (leptonai/gpud testdata nvidia-smi-query.535.161.08.out.0.valid, H100; NVIDIA/k8s-test-infra hardware
    captures qx-h100.xml, qx-b200.xml, qx-gb200.xml)."""
    current = _int(first(temp, "gpu_current_temp", "gpu_temp"))
    slowdown = _int(first(temp, "gpu_slowdown_temp", "gpu_temp_slow_threshold"))
    if slowdown is None and current is not None:
        margin = _signed(first(temp, "gpu_t_limit_temp", "gpu_current_t_limit_temp", "gpu_temp_tlimit"))
        offset = _signed(first(temp, "gpu_slowdown_t_limit_temp", "gpu_slowdown_t_limit_temp_specification",
                               "gpu_temp_slow_tlimit_threshold"))
        if margin is not None and offset is not None and -40 <= offset <= 0 and -60 <= margin <= 200:
            slowdown = current + margin - offset
    return current, slowdown


def _fabric_health(health: Node | None) -> FabricHealth | None:
    """A fabric ``Health`` block (R550+, NVML nvmlGpuFabricInfo_v3 healthMask / healthSummary; nvidia-smi(1) "Fabric")
    -> ``collectors.nvlink_fabric``'s verdicts. Route Recovery in progress and Access Timeout Recovery are the driver's
    recoveries under way, not faults (NVIDIA/k8s-test-infra qx-gb200-fabric-degraded.xml: Summary Unhealthy with
    route_unhealthy True on nvidia-smi 580.65.06)."""
    if health is None:
        return None
    config = health.get("incorrect_configuration")
    return from_dump(summary=_value(health.get("summary")), bandwidth=_value(health.get("bandwidth")),
                     route_unhealthy=_yes(health.get("route_unhealthy")),
                     incorrect_configuration=config.value if config is not None else None,
                     partition_assigned=_yes(health.get("partition_assigned")))


def gpu_sample(gpu: Node, index: int | None) -> NvsmiGpu:
    bus = gpu.value or _value(first(gpu, "pci/bus_id", "pci/pci_bus_id")) or ""
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
    ecc = gpu.get("ecc_errors")
    if ecc is not None:  # the SRAM threshold flag as NVML's nvmlDeviceGetSramEccErrorStatus reads it (SRAM_COUNTS)
        s.sram_threshold = _yes(ecc.get("aggregate/sram_threshold_exceeded"))
        if s.sram_threshold is not None:
            s.sram_counts = {k: n for k, _m, paths in SRAM_COUNTS if (n := _int(first(ecc, *paths))) is not None}
    rows = gpu.get("remapped_rows")
    if rows is not None:
        s.remap_pending = _yes(first(rows, "pending", "remapped_row_pending"))
        s.remap_failure = _yes(first(rows, "remapping_failure_occurred", "remapped_row_failure"))
    pages = gpu.get("retired_pages")
    if pages is not None:  # pending: "Pending Page Blacklist" (R3xx-R5xx text), XML pending_blacklist and (R450+)
        # pending_retirement, "Pending" (old text): any Yes is pending (nvsmi_device_v12.dtd retired_pages)
        said = [v for k in ("pending_page_blacklist", "pending_blacklist", "pending_page_retirement",
                            "pending_retirement", "pending") if (v := _yes(pages.get(k))) is not None]
        s.retired_pending = any(said) if said else None
        sbe = _int(first(pages, "single_bit_ecc", "multiple_single_bit_retirement/retired_count"))
        dbe = _int(first(pages, "double_bit_ecc", "double_bit_retirement/retired_count"))
        s.retired_pages = None if sbe is None or dbe is None else sbe + dbe
    reasons = first(gpu, "clocks_event_reasons", "clocks_throttle_reasons", "clocks_throttle_reason")
    if reasons is not None:
        bits = 0
        seen = False
        for c in flatten(reasons):
            active = _yes(c)
            name = re.sub(r"^clocks_(event|throttle)_reason_", "", c.key)
            bit = {"hw_slowdown": 0x8, "hw_thermal_slowdown": 0x40, "hw_power_brake_slowdown": 0x80}.get(name)
            if active is None or bit is None:  # only the three reasons read say anything about them
                continue
            seen = True
            bits |= bit if active else 0
        s.clocks = bits if seen else None
    temp = gpu.get("temperature")
    if temp is not None:
        s.temperature, s.slowdown = _slowdown(temp)
    fabric = gpu.get("fabric")
    health: list[str] = []
    if fabric is not None and (fstate := (_value(fabric.get("state")) or "").lower()) in FABRIC_STATES:
        status = fabric.get("status")
        failed = status is not None and status.value.strip().lower() not in _FABRIC_NO_STATUS
        s.fabric_dump = _fabric_health(fabric.get("health"))
        s.fabric = (FABRIC_STATES[fstate], 1 if failed else 0)
        health = list(s.fabric_dump.problems) if s.fabric_dump is not None else []
        if failed and status is not None:
            health.insert(0, f"status {status.value.strip()[:60]}")
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
    lost = lost_reading(gpu)
    if lost is not None:
        s.lost = lost[0]
        details["nvidia_smi"] = lost[1][:200]
    return NvsmiGpu(s, details, replays, recovery_action(gpu), ", ".join(health))



@dataclass
class NvsmiRead:
    gpus: list[NvsmiGpu]
    attached: int | None


def _logs(tree: Node) -> list[tuple[int | None, list[Node]]]:
    """(``Attached GPUs``, GPU sections) of each log of the dump: one per ``-l N`` interval, the whole dump if one."""
    logs: list[tuple[int | None, list[Node]]] = [(None, [])]
    for node in tree.children:
        if node.key == "nvsmi_log":
            logs.append((None, []))
        elif node.key == "attached_gpus":
            logs[-1] = (_int(node), logs[-1][1])
        elif node.key == "gpu":
            logs[-1][1].append(node)
    return logs


def parse_nvsmi(text: str) -> NvsmiRead:
    """Every GPU of a dump. ``NvsmiFormatError`` when the text is no nvidia-smi -q output.

    A GPU's ``index`` (NVML's, the one the remediator resets by) is its position only in a log that lists every
    attached GPU (as many sections as ``Attached GPUs``: nvidia-smi lists them in index order); a log of fewer
    (``-i 3``, ``--id=<uuid>``, a GPU it could not open, a cut) or with no count proves no index, and its GPUs are
    known by UUID and bus id (``Minor Number`` is the /dev/nvidia<N> minor, not the NVML index). A GPU read in an
    earlier, whole log of the same dump keeps the index that log gave it (same UUID and bus id)."""
    if not looks_like_nvsmi(text):
        raise NvsmiFormatError("not nvidia-smi -q output")
    tree = parse_tree(text)
    latest: dict[str, NvsmiGpu] = {}
    attached = next((_int(n) for n in reversed(tree.children) if n.key == "attached_gpus"), None)
    for count, sections in _logs(tree):  # -l N: the latest reading of each GPU wins
        whole = count is not None and len(sections) == count
        for index, node in enumerate(sections):
            if len(latest) >= 4096:
                break
            g = gpu_sample(node, index if whole else None)
            ref = g.sample.gpu
            key = ref.pci_bus_id or ref.uuid or f"#{index}"
            was = latest[key].sample.gpu if key in latest else None
            if ref.index is None and was is not None and (was.uuid, was.pci_bus_id) == (ref.uuid, ref.pci_bus_id):
                g.sample.gpu = was  # numbered by an earlier, whole log (or not at all)
            latest[key] = g
    lost_now: set[str] = set()
    for m in _NO_HANDLE.finditer(text[:1 << 20]):
        try:
            pci = normalize_pci_bus_id(m.group("bus"))
        except ValueError:
            continue
        if pci in lost_now or (pci not in latest and len(latest) >= 4096):
            continue
        # a GPU nvidia-smi could not open in any interval of the capture is lost, even where another interval
        # (an earlier one of ``-l N``) read it: the cautious reading, and the one a hung GPU gives last
        lost_now.add(pci)
        why = m.group("why").lower()
        lost = "gpu.reset_required" if "reset" in why and "reboot" not in why else "gpu.lost"
        latest[pci] = NvsmiGpu(GpuSample(gpu=GpuRef(pci_bus_id=pci), lost=lost), {"nvidia_smi": m.group("why")[:200]},
                               None)
    return NvsmiRead(list(latest.values()), attached)


@dataclass(frozen=True, slots=True)
class NvsmiThresholds:
    nvml: Thresholds = field(default_factory=Thresholds)
    pcie_replay_total: int = 1000  # replays since the last reset in one reading
    expected_gpus: int | None = None


def known_gpu(ctx: NodeContext, ref: GpuRef) -> GpuRef:
    """``ref`` with the NVML index the node's GPUs (``ctx.register_gpus``: the nvml source's enumeration) give the
    same GPU when the dump proves none; one known there with another UUID or bus id is another card: no index."""
    known = ctx.gpu(uuid=ref.uuid, pci=ref.pci_bus_id)
    if ref.index is not None or known.index is None or (ref.uuid and known.uuid and ref.uuid != known.uuid) or (
            ref.pci_bus_id and known.pci_bus_id and ref.pci_bus_id != known.pci_bus_id):
        return ref
    return GpuRef(index=known.index, uuid=ref.uuid or known.uuid, pci_bus_id=ref.pci_bus_id or known.pci_bus_id)


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
        gpu = known_gpu(ctx, g.sample.gpu)
        ctx.register_gpus([gpu])
        sample = g.sample if gpu == g.sample.gpu else replace(g.sample, gpu=gpu)
        action = None if g.sample.lost else g.recovery  # a GPU nvidia-smi cannot open says nothing more
        asked = recovery_check(action) if action else None
        for sig in evaluate(ctx, sample, None, at, 0.0, th.nvml, set()):
            if action and asked is not None and sig.check == asked[0]:  # the driver's verdict, not a healthy GPU
                sig = ctx.signal(source=SignalSource.NVML, check=asked[0], code=asked[1], healthy=False, at=at,
                                 gpu=gpu, details={**g.details, "recovery_action": action},
                                 message=f"nvidia-smi: GPU Recovery Action {action!r} on {gpu.label()}")
            elif g.details and (sig.check == "ecc.dbe" or (g.sample.lost and sig.check == g.sample.lost)):
                sig = sig.model_copy(update={"details": {**sig.details, **g.details}})
            elif sig.check == "fabric.gpu" and g.fabric_health:
                sig = sig.model_copy(update={"details": {**sig.details, "fabric_health": g.fabric_health},
                                             "message": f"{sig.message.partition(': ')[0]}: {g.fabric_health}"})
            out.append(sig)
        if g.pcie_replays is not None:
            out.append(ctx.signal(source=SignalSource.NVML, check="pcie.replay", at=at, gpu=gpu,
                                  healthy=g.pcie_replays < th.pcie_replay_total, value=g.pcie_replays,
                                  threshold=th.pcie_replay_total, details={"basis": "total"},
                                  message=f"{g.pcie_replays} PCIe replays since reset on {gpu.label()}"))
    return out
