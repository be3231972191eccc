"""The NVML rules: one GPU's ``GpuSample`` (and the one before it, for rates) in, state signals out. Pure.

``collectors.nvml.NvmlSource`` reads each GPU through NVML into a ``GpuSample``; ``collectors.nvsmi`` builds
the same sample from an ``nvidia-smi -q`` dump, so both give one verdict for one fact. ``evaluate`` turns a
sample into state signals: ``gpu.lost`` / ``gpu.reset_required``, volatile ``ecc.dbe`` and SBE bursts,
``ecc.sram_threshold`` (``sram_reading``), ``row_remap.pending`` / ``failure``, ``retired_pages.pending`` and
``retired_pages.limit``, clocks-event reasons (``clock.hw_slowdown`` / ``hw_thermal`` / ``power_brake``),
``temperature.slowdown``, the ``pcie.replay`` rate, per-link ``nvlink.down`` / ``nvlink.errors``, and ``fabric.gpu``,
``fabric.config`` and ``fabric.partition`` (``collectors.nvlink_fabric`` reads nvmlGpuFabricInfo_v2's healthMask or a
dump's Fabric Health block into those three verdicts). ``recovery_verdict`` reads an
NVML_GPU_RECOVERY_ACTION_* number as a dump's ``GPU Recovery Action`` line is read; the dcgm source uses it too.
Thresholds are data (``Thresholds``, from the collector config). The constants are NVML's (nvml.h via pynvml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

import pynvml

from breakfix.collectors.context import NodeContext, Reading
from breakfix.collectors.nvlink_fabric import FabricHealth, from_mask
from breakfix.schemas.common import GpuRef
from breakfix.schemas.signal import Signal, SignalSource

CLOCK_BITS = (("clock.hw_slowdown", pynvml.nvmlClocksEventReasonHwSlowdown),
              ("clock.hw_thermal", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
              ("clock.power_brake", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown))

# The aggregate SRAM uncorrectable counts that ride with the threshold flag: this breakfix name -> the
# c_nvmlEccSramErrorStatus_v1_t member (nvidia-ml-py) and the ``nvidia-smi -q`` ECC Errors node (text and XML keys
# normalised by ``collectors.nvsmi``: Aggregate "SRAM Uncorrectable Parity" / "SEC-DED", "Aggregate Uncorrectable
# SRAM Sources" L2, SM, Microcontroller, PCIE, Other).
SRAM_COUNTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("parity", "aggregateUncParity", ("aggregate/sram_uncorrectable_parity",)),
    ("sec_ded", "aggregateUncSecDed", ("aggregate/sram_uncorrectable_sec_ded", "aggregate/sram_uncorrectable_secded")),
    ("l2", "aggregateUncBucketL2", ("aggregate_uncorrectable_sram_sources/sram_l2",)),
    ("sm", "aggregateUncBucketSm", ("aggregate_uncorrectable_sram_sources/sram_sm",)),
    ("microcontroller", "aggregateUncBucketMcu", ("aggregate_uncorrectable_sram_sources/sram_microcontroller",)),
    ("pcie", "aggregateUncBucketPcie", ("aggregate_uncorrectable_sram_sources/sram_pcie",)),
    ("other", "aggregateUncBucketOther", ("aggregate_uncorrectable_sram_sources/sram_other",)),
)


class RecoveryVerdict(NamedTuple):
    """A recovery action that asks for something: its NVML number, the name ``nvidia-smi`` reads for it, and the
    (check, code) the nvsmi path gives that name."""

    action: int
    name: str
    check: str
    code: str | None


@lru_cache(maxsize=256)
def recovery_verdict(action: int) -> RecoveryVerdict | None:
    """An NVML_GPU_RECOVERY_ACTION_* number as the nvsmi path reads the same number in a dump's ``GPU Recovery
    Action`` line (``nvsmi.recovery_action`` then ``nvsmi.recovery_check``), so the live NVML, dcgm-exporter and
    ``nvidia-smi -q`` sources give one verdict the same check, code and severity; None for NONE (0, healthy).
    An unknown number is ``gpu.reset_required`` with code ``DCGM_FR_GPU_RECOVERY_<n>``, which the catalog does
    not list: an unknown fault, never an automatic action and never healthy."""
    from breakfix.collectors import nvsmi  # nvsmi imports this module (GpuSample, evaluate): imported when used

    name = nvsmi.recovery_action(nvsmi.Node("gpu", children=[nvsmi.Node("gpu_recovery_action", str(action))]))
    if name is None:
        return None
    check, code = nvsmi.recovery_check(name)
    return RecoveryVerdict(action, name, check, code)


RETIRED_PAGES_LIMIT = 60  # NVIDIA retires at most 64 pages per GPU; near the end, RMA (the dcgm source too)

@dataclass(frozen=True, slots=True)
class Thresholds:
    sbe_burst: int = 100             # new volatile SBEs within one poll
    pcie_replay_per_min: float = 60.0
    nvlink_errors_per_min: float = 10.0
    temperature_margin_c: int = 0    # fault at slowdown threshold minus this
    retired_pages_limit: int = RETIRED_PAGES_LIMIT
    fabric_hold_s: float = 300.0     # GPU fabric NOT_STARTED / IN_PROGRESS (Fabric Manager still training) this long


@dataclass
class LinkSample:
    up: bool
    errors: int


@dataclass
class GpuSample:
    gpu: GpuRef
    lost: str | None = None  # "gpu.lost" | "gpu.reset_required"
    known: bool = True  # False: the GPU did not answer this time; nothing about it is said (not even healthy)
    why: str = ""
    dbe: int | None = None
    sbe: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    retired_pending: bool | None = None
    retired_pages: int | None = None
    clocks: int | None = None
    temperature: int | None = None
    slowdown: int | None = None
    pcie_replay: int | None = None
    links: dict[int, LinkSample] = field(default_factory=dict)
    fabric: tuple[int, int] | None = None
    fabric_health: int | None = None  # nvmlGpuFabricInfo_v2 ``healthMask``; None: not read (a v1-only driver)
    fabric_dump: FabricHealth | None = None  # a dump's Fabric > Health block, read (``collectors.nvsmi``)
    recovery: int | None = None  # NVML_GPU_RECOVERY_ACTION_*; None: not read (no field on this driver or GPU)
    # SRAM uncorrectable-error threshold exceeded (field diag / RMA); None: not read (no call on this driver or GPU,
    # a dump's N/A or no line): nothing said. ``sram_counts``: the aggregate SRAM uncorrectable counts read with it
    # (SRAM_COUNTS names), each only where read
    sram_threshold: bool | None = None
    sram_counts: dict[str, int] = field(default_factory=dict)


FABRIC_SETTLING = (pynvml.NVML_GPU_FABRIC_STATE_NOT_STARTED, pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS)


def sram_reading(ctx: NodeContext, s: GpuSample, at: datetime) -> Reading | None:
    """``ecc.sram_threshold`` for a sample whose SRAM threshold flag was read (NVML or a dump alike), else None. The
    aggregate uncorrectable SRAM count (parity + SEC-DED) is the value; every count read is in ``details``."""
    if s.sram_threshold is None:
        return None
    counts = {k: s.sram_counts[k] for k, _m, _p in SRAM_COUNTS if k in s.sram_counts}
    total = counts["parity"] + counts["sec_ded"] if "parity" in counts and "sec_ded" in counts else None
    details = {f"sram_aggregate_unc_{k}": str(v) for k, v in counts.items()}
    if total is not None:
        details["sram_aggregate_unc"] = str(total)
    said = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in counts.items())
    message = (f"SRAM uncorrectable-error threshold {'exceeded' if s.sram_threshold else 'not exceeded'} on "
               f"{s.gpu.label()}" + (f" (aggregate SRAM uncorrectable: {said})" if said else "")
               + (": run field diagnostics, RMA (NVIDIA WORKFLOW_XID_48)" if s.sram_threshold else ""))
    return ctx.reading(source=SignalSource.NVML, check="ecc.sram_threshold", healthy=not s.sram_threshold, at=at,
                       gpu=s.gpu, value=total, details=details, message=message)


def evaluate(ctx: NodeContext, s: GpuSample, prev: GpuSample | None, at: datetime, elapsed_s: float,
             th: Thresholds, links_seen_up: set[int], *, fabric_settling: bool = False) -> list[Signal]:
    """One GPU's sample -> its state signals (``readings``, each built)."""
    return [r.build() for r in readings(ctx, s, prev, at, elapsed_s, th, links_seen_up,
                                        fabric_settling=fabric_settling)]


def readings(ctx: NodeContext, s: GpuSample, prev: GpuSample | None, at: datetime, elapsed_s: float,
             th: Thresholds, links_seen_up: set[int], *, fabric_settling: bool = False) -> list[Reading]:
    """One GPU's sample -> its states, each signal built only when asked for (``NodeContext.reading``). Checks
    whose reading failed are simply absent. ``fabric_settling``: the GPU's fabric state is NOT_STARTED or
    IN_PROGRESS within ``fabric_hold_s`` of first being read so (the caller keeps the time), so ``fabric.gpu``
    says nothing yet."""
    out: list[Reading] = []

    def state(check: str, bad: bool, *, value: float | None = None, threshold: float | None = None,
              component: str | None = None, message: str = "") -> None:
        out.append(ctx.reading(source=SignalSource.NVML, check=check, healthy=not bad, at=at, gpu=s.gpu,
                               component=component, value=value, threshold=threshold,
                               message=message or f"{check} on {s.gpu.label()} {'fault' if bad else 'ok'}"))

    if not s.known and not s.lost:
        return out  # one unanswered sample: neither a fault yet nor a reason to say healthy
    # the driver's recovery action, as the nvsmi path reads it (nvsmi.nvsmi_signals): its check is the fault, with
    # the DCGM_FR_GPU_RECOVERY_* code and the action's name; a GPU NVML cannot open says nothing more
    verdict = None if s.lost or s.recovery is None else recovery_verdict(s.recovery)
    for check in ("gpu.lost", "gpu.reset_required"):
        if verdict is not None and verdict.check == check:
            out.append(ctx.reading(source=SignalSource.NVML, check=check, code=verdict.code, healthy=False, at=at,
                                   gpu=s.gpu, details={"recovery_action": verdict.name},
                                   message=f"NVML: GPU recovery action {verdict.name!r} ({verdict.action}) on "
                                           f"{s.gpu.label()}"))
        elif check == "gpu.lost":
            state(check, s.lost == check,
                  message=f"NVML: GPU {s.gpu.label()} is lost{': ' + s.why if s.why else ''}" if s.lost else "")
        else:
            state(check, s.lost == check)
    if s.lost:
        return out
    if s.dbe is not None:
        state("ecc.dbe", s.dbe > 0, value=s.dbe, threshold=0)
    if (sram := sram_reading(ctx, s, at)) is not None:
        out.append(sram)
    if s.sbe is not None and prev is not None and prev.sbe is not None:
        state("ecc.sbe", s.sbe - prev.sbe >= th.sbe_burst, value=s.sbe - prev.sbe, threshold=th.sbe_burst)
    if s.remap_pending is not None:
        state("row_remap.pending", s.remap_pending)
    if s.remap_failure is not None:
        state("row_remap.failure", s.remap_failure)
    if s.retired_pending is not None:
        state("retired_pages.pending", s.retired_pending)
    if s.retired_pages is not None:
        state("retired_pages.limit", s.retired_pages >= th.retired_pages_limit, value=s.retired_pages,
              threshold=th.retired_pages_limit)
    if s.clocks is not None:
        for check, bit in CLOCK_BITS:
            state(check, bool(s.clocks & bit), value=s.clocks)
    if s.temperature is not None and s.slowdown:
        limit = s.slowdown - th.temperature_margin_c
        state("temperature.slowdown", s.temperature >= limit, value=s.temperature, threshold=limit)
    if s.pcie_replay is not None and prev is not None and prev.pcie_replay is not None and elapsed_s > 0:
        rate = max(0, s.pcie_replay - prev.pcie_replay) * 60 / elapsed_s
        state("pcie.replay", rate >= th.pcie_replay_per_min, value=round(rate, 2), threshold=th.pcie_replay_per_min)
    for link, ls in s.links.items():
        if ls.up:
            links_seen_up.add(link)
        if link in links_seen_up:  # a link never up on this GPU is not wired, not down
            state("nvlink.down", not ls.up, component=f"nvlink{link}")
        before = prev.links.get(link) if prev is not None else None
        if before is not None and elapsed_s > 0:
            rate = max(0, ls.errors - before.errors) * 60 / elapsed_s
            state("nvlink.errors", rate >= th.nvlink_errors_per_min, component=f"nvlink{link}", value=round(rate, 2),
                  threshold=th.nvlink_errors_per_min)
    if s.fabric is not None and s.fabric[0] != pynvml.NVML_GPU_FABRIC_STATE_NOT_SUPPORTED and not (
            fabric_settling and s.fabric[0] in FABRIC_SETTLING):
        # anything but COMPLETED with NVML_SUCCESS leaves the GPU out of the NVLink fabric (NVML nvmlGpuFabricInfo_t);
        # NOT_STARTED and IN_PROGRESS are also every NVSwitch GPU's state while Fabric Manager trains the fabric
        # after a boot or a GPU reset, so they are a fault only once they outlast fabric_hold_s (the caller's hold)
        fstate, status = s.fabric
        # a fabric COMPLETED with success can still be unhealthy (GB200 NVL72: degraded bandwidth, an unhealthy
        # route; nvmlGpuFabricInfo_v2 healthMask, as nvidia-smi -q prints it under Fabric Health)
        health = s.fabric_dump or (from_mask(s.fabric_health) if s.fabric_health is not None else None)
        problems = health.problems if health is not None else ()
        state("fabric.gpu", fstate != pynvml.NVML_GPU_FABRIC_STATE_COMPLETED or status != pynvml.NVML_SUCCESS
              or bool(problems), value=fstate, message=f"GPU fabric state {fstate} status {status} on "
              f"{s.gpu.label()}" + (f": {', '.join(problems)}" if problems else ""))
        if health is not None:  # where the health was not read (a v1-only call, a dump without it) nothing is said
            # how the system is set up (no reset fixes it: a human's), and whether the GPU is in an NVLink partition
            # (an administrator's choice as often as not: recorded)
            state("fabric.config", bool(health.config), message=f"GPU fabric configuration on {s.gpu.label()}: "
                  + (f"{health.config} (Fabric Manager / NMX configuration or GPU firmware; a reset cannot fix it)"
                     if health.config else "no incorrect configuration"))
            state("fabric.partition", health.unpartitioned, message=f"GPU {s.gpu.label()} "
                  + ("is in no NVLink partition" if health.unpartitioned else "is not reported outside a partition"))
    return out

