"""The dcgm source: a local dcgm-exporter's ``/metrics`` -> GPU health signals.

Scrapes ``http://127.0.0.1:9400/metrics`` (or a file for ``breakfix signals dcgm``), parses it
with prometheus_client (``collectors.promtext``) and applies pure rules per GPU (labels
``gpu``, ``UUID``/``uuid``, ``pci_bus_id``; ``Hostname`` and the newer ``hostname`` are both
accepted):

- ``DCGM_FI_DEV_XID_ERRORS`` holds the *last* XID, not a count: a change to a non-zero value is
  one ``xid`` event (the first scrape only sets the baseline; the kmsg source is the durable
  XID record);
- ``DCGM_FI_DEV_ECC_DBE_VOL_TOTAL`` > 0 -> ``ecc.dbe``; ``DCGM_FI_DEV_ROW_REMAP_FAILURE`` /
  ``..._PENDING`` -> ``row_remap.failure`` / ``pending``;
- NVLink CRC/replay/recovery counters rising faster than the threshold -> ``nvlink.errors``;
- clocks-event reasons bitmask -> ``clock.hw_slowdown`` / ``hw_thermal`` / ``power_brake``; without
  it, the share of time under ``DCGM_FI_DEV_THERMAL_VIOLATION`` -> ``clock.hw_thermal``;
- ``DCGM_FI_DEV_PCIE_REPLAY_COUNTER`` rate -> ``pcie.replay``; GPU temperature at its slowdown
  threshold -> ``temperature.slowdown``.
Field facts: NVIDIA dcgm-exporter ``etc/default-counters.csv`` and DCGM ``dcgm_fields.h``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.promtext import Sample, parse
from breakfix.schemas.common import GpuRef, normalize_pci_bus_id
from breakfix.schemas.signal import Signal, SignalSource

XID = ("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_XID_ERROR")
DBE = ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",)
REMAP_FAILURE = ("DCGM_FI_DEV_ROW_REMAP_FAILURE",)
REMAP_PENDING = ("DCGM_FI_DEV_ROW_REMAP_PENDING",)
NVLINK = ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
          "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
          "DCGM_FI_DEV_NVLINK_CRC_ERROR_TOTAL")
CLOCK_REASONS = ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS")
THERMAL_VIOLATION = ("DCGM_FI_DEV_THERMAL_VIOLATION",)
PCIE_REPLAY = ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER",)
GPU_TEMP = ("DCGM_FI_DEV_GPU_TEMP",)
SLOWDOWN_TEMP = ("DCGM_FI_DEV_SLOWDOWN_TEMP",)
CLOCK_BITS = (("clock.hw_slowdown", 0x8), ("clock.hw_thermal", 0x40), ("clock.power_brake", 0x80))


@dataclass(frozen=True, slots=True)
class DcgmThresholds:
    nvlink_errors_per_min: float = 10.0
    pcie_replay_per_min: float = 60.0
    thermal_violation_share: float = 0.05  # of wall time throttled for thermal reasons


@dataclass
class GpuFields:
    gpu: GpuRef
    values: dict[str, float] = field(default_factory=dict)
    xid_labels: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None


def gpu_of(labels: dict[str, str]) -> tuple[str, GpuRef, str | None]:
    uuid = labels.get("UUID") or labels.get("uuid")
    pci = labels.get("pci_bus_id")
    index = labels.get("gpu")
    ref = GpuRef(index=int(index) if index and index.isdigit() else None, uuid=uuid,
                 pci_bus_id=normalize_pci_bus_id(pci) if pci else None)
    return ref.key(), ref, labels.get("Hostname") or labels.get("hostname")


def by_gpu(samples: dict[str, list[Sample]]) -> dict[str, GpuFields]:
    """Fields of interest per GPU, first name found wins for each aliased field."""
    out: dict[str, GpuFields] = {}
    groups = (XID, DBE, REMAP_FAILURE, REMAP_PENDING, CLOCK_REASONS, THERMAL_VIOLATION, PCIE_REPLAY, GPU_TEMP,
              SLOWDOWN_TEMP)
    for names in (*groups, *((n,) for n in NVLINK)):
        for name in names:
            for s in samples.get(name, ()):
                if "GPU_I_ID" in s.labels:  # MIG instance rows repeat the parent GPU's device fields
                    continue
                key, ref, host = gpu_of(s.labels)
                g = out.setdefault(key, GpuFields(ref, hostname=host))
                g.values.setdefault(names[0], s.value)
                if names is XID:
                    g.xid_labels = {k: v for k, v in s.labels.items() if k in ("err_code", "err_msg")}
            if any(names[0] in g.values for g in out.values()):
                break
    return out


class DcgmRules:
    """Pure rules with the previous scrape's counters; one instance per scraped exporter."""

    def __init__(self, ctx: NodeContext, thresholds: DcgmThresholds | None = None) -> None:
        self.ctx = ctx
        self.th = thresholds or DcgmThresholds()
        self.prev: dict[str, tuple[dict[str, float], float]] = {}

    def apply(self, text: str, at: datetime, mono: float, *, baseline_xids: bool = True) -> Cycle:
        states: list[Signal] = []
        events: list[Signal] = []
        for key, g in by_gpu(parse(text)).items():
            gpu = self.ctx.gpu(uuid=g.gpu.uuid, pci=g.gpu.pci_bus_id, index=g.gpu.index)
            prev, prev_t = self.prev.get(key, ({}, mono))
            elapsed = mono - prev_t
            v = g.values

            def state(check: str, bad: bool, value: float | None = None, threshold: float | None = None,
                      component: str | None = None, gpu: GpuRef = gpu) -> None:
                states.append(self.ctx.signal(source=SignalSource.DCGM, check=check, healthy=not bad, at=at, gpu=gpu,
                                              component=component, value=value, threshold=threshold,
                                              message=f"dcgm-exporter: {check} {'fault' if bad else 'ok'} on "
                                                      f"{gpu.label()}"))

            def rate(name: str, v: dict[str, float] = v, prev: dict[str, float] = prev,
                     elapsed: float = elapsed) -> float | None:
                if name not in v or name not in prev or elapsed <= 0:
                    return None
                return max(0.0, v[name] - prev[name]) * 60 / elapsed

            xid = v.get(XID[0])
            if xid and (xid != prev.get(XID[0]) if (prev or not baseline_xids) else False):
                code = str(int(xid))
                msg = g.xid_labels.get("err_msg", "")
                events.append(self.ctx.signal(source=SignalSource.DCGM, check="xid", code=code, healthy=False, at=at,
                                              gpu=gpu, message=f"dcgm-exporter: last Xid {code} on {gpu.label()}"
                                                               + (f": {msg}" if msg else ""),
                                              details=g.xid_labels, discriminator=f"dcgm-xid-{code}-{at.timestamp()}"))
            if DBE[0] in v:
                state("ecc.dbe", v[DBE[0]] > 0, v[DBE[0]], 0)
            if REMAP_FAILURE[0] in v:
                state("row_remap.failure", v[REMAP_FAILURE[0]] >= 1)
            if REMAP_PENDING[0] in v:
                state("row_remap.pending", v[REMAP_PENDING[0]] >= 1)
            nv = [r for n in NVLINK if (r := rate(n)) is not None]
            if nv:
                total = sum(nv)
                state("nvlink.errors", total >= self.th.nvlink_errors_per_min, round(total, 2),
                      self.th.nvlink_errors_per_min, component="nvlink")
            if CLOCK_REASONS[0] in v:
                bits = int(v[CLOCK_REASONS[0]])
                for check, bit in CLOCK_BITS:
                    state(check, bool(bits & bit), bits)
            elif THERMAL_VIOLATION[0] in v and THERMAL_VIOLATION[0] in prev and elapsed > 0:
                share = max(0.0, v[THERMAL_VIOLATION[0]] - prev[THERMAL_VIOLATION[0]]) / 1e9 / elapsed
                state("clock.hw_thermal", share >= self.th.thermal_violation_share, round(share, 3),
                      self.th.thermal_violation_share)
            replay = rate(PCIE_REPLAY[0])
            if replay is not None:
                limit = self.th.pcie_replay_per_min
                state("pcie.replay", replay >= limit, round(replay, 2), limit)
            if GPU_TEMP[0] in v and v.get(SLOWDOWN_TEMP[0]):
                state("temperature.slowdown", v[GPU_TEMP[0]] >= v[SLOWDOWN_TEMP[0]], v[GPU_TEMP[0]],
                      v[SLOWDOWN_TEMP[0]])
            self.prev[key] = (dict(v), mono)
        return Cycle(states=states, events=events)
