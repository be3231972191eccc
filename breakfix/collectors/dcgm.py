"""The dcgm source: a local dcgm-exporter's ``/metrics`` -> GPU health signals.

Scrapes ``http://127.0.0.1:9400/metrics`` (or a file for ``breakfix signals dcgm``), parses it
with prometheus_client (``collectors.promtext``) and applies pure rules per GPU (labels
``gpu``, ``UUID``/``uuid``, ``pci_bus_id``; ``Hostname`` and the newer ``hostname`` are both
accepted):

- ``DCGM_FI_DEV_XID_ERRORS`` holds the *last* XID, not a count: a change to a non-zero value is
  one ``xid`` event (the first scrape only sets the baseline; the kmsg source is the durable
  XID record);
- ``DCGM_FI_DEV_ECC_DBE_VOL_TOTAL`` > 0 -> ``ecc.dbe``; ``DCGM_FI_DEV_ROW_REMAP_FAILURE`` /
  ``..._PENDING`` -> ``row_remap.failure`` / ``pending``; ``DCGM_FI_DEV_RETIRED_PENDING`` >= 1 ->
  ``retired_pages.pending`` and ``DCGM_FI_DEV_RETIRED_SBE`` + ``..._DBE`` near NVIDIA's 64-page limit ->
  ``retired_pages.limit`` (the nvml source's checks; pre-Ampere GPUs retire pages where newer ones remap rows);
- NVLink CRC/replay/recovery counters rising faster than the threshold -> ``nvlink.errors``; a field the exporter
  writes per link (``nvlink`` label, ``gpu_uuid``: ``render_metrics.go`` ``linkMetricsFormat``) counts as the sum of
  the GPU's links;
- clocks-event reasons bitmask -> ``clock.hw_slowdown`` / ``hw_thermal`` / ``power_brake``; without it, the
  exporter's ``DCGM_EXP_CLOCK_EVENTS_COUNT`` (a hardware reason seen in its window: a fault; on a page that carries
  the family, a reason with no series reads 0); else the share of time under ``DCGM_FI_DEV_THERMAL_VIOLATION`` ->
  ``clock.hw_thermal``;
- ``DCGM_FI_DEV_PCIE_REPLAY_COUNTER`` rate -> ``pcie.replay``; GPU temperature at its slowdown
  threshold -> ``temperature.slowdown``;
- the exporter's XID-count family (dcgm-exporter PR 239: ``DCGM_EXP_XID_ERRORS_COUNT``, some builds
  ``DCGM_FI_DEV_XID_ERRORS_ACTIVE``; labels ``xid`` and ``window_size_in_ms``): a count that rises is
  one ``xid`` event per XID (the first scrape is a baseline too, unless ``baseline_xids=False``);
- DCGM's own health watches (``DCGM_EXP_GPU_HEALTH_STATUS``, one series per GPU and ``health_watch``,
  value ``dcgmHealthWatchResults_t``: 0 PASS, 10 WARN, 20 FAIL, label ``health_error_code`` =
  ``DCGM_FR_*``) -> one ``dcgm.health`` state per GPU and watch (component: the watch, lower case),
  ``code`` the ``DCGM_FR_*`` code. WARN is a fault as FAIL is: DCGM reports some faults only as WARN
  (XID 94 as ``DCGM_FR_CONTAINED_ERROR``, pending page retirements, PCIe replay rate), and the
  catalog (``Catalog.dcgm_code``) decides what each code is worth: a code DCGM marks "can perform
  workload" is capped to monitoring there, whatever the result.
- ``DCGM_FI_DEV_GPU_RECOVERY_ACTION`` (field 1523, R570+ drivers; go-dcgm also resolves the deprecated name
  ``DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION``, so a counters CSV may export either; not in dcgm-exporter's default
  CSV) is DCGM's mirror of NVML_FI_DEV_GET_GPU_RECOVERY_ACTION (DCGM ``dcgm_fields.cpp``): the driver's own
  remediation verdict, read as the nvml source and an ``nvidia-smi -q`` dump read it
  (``collectors.nvml_eval.recovery_verdict``), under the check ``dcgm.recovery_action``: 0 NONE -> healthy (a
  verdict that is gone clears its fault); 1 GPU reset, 2 node reboot, 3 drain P2P, 4 drain and reset -> a fault
  with code ``DCGM_FR_GPU_RECOVERY_*`` (DCGM ``DcgmHealthWatch.cpp`` ``MonitorGpuRecoveryAction``), which the
  catalog classifies as XID 154 with that action, so it joins the GPU's incident of the verdict from any source;
  a number that is no known action -> an unknown code (the cautious path). Its own check, not the nvml source's
  ``gpu.lost`` / ``gpu.reset_required``: an exporter that lags or misses a verdict must not clear NVML's.
  A value that is no unsigned 32-bit integer (``nvmlDeviceGpuRecoveryAction_t``) is a bad sample.
Every field is read under its DCGM 4.x canonical name too (DCGM 4.6 ``dcgm_fields.h``, as listed in
the reference ``dcgm_fields.csv``: ``DCGM_FI_DEV_XID_ERROR``, ``..._ROW_REMAP_FAILED``,
``..._PCIE_REPLAY_TOTAL``, ``..._GPU_TEMP_CELSIUS``, ``..._GPU_TEMP_SLOWDOWN_CELSIUS``, the NVLink
``..._ERROR_TOTAL`` counters and ``..._NVLINK_REPLAY_TOTAL`` / ``..._NVLINK_RECOVERY_TOTAL``); the first
name of a field found on the page wins, so an exporter that writes both is not counted twice.
MIG rows (``GPU_I_ID``, ``GPU_I_PROFILE``) are their own entities (component ``mig<id>``) and carry
both labels in ``details``, so incidents name the instance. One bad sample (a value no parser takes,
a non-finite or out-of-range number, a ``pci_bus_id`` of ``N/A``) is skipped, counted in
``DcgmRules.skipped`` (``breakfix_collector_parse_skipped_total{source="dcgm"}``) and logged once per
family; the rest of the page is used (``collectors.promlines``).
Field facts: NVIDIA dcgm-exporter ``etc/default-counters.csv`` and DCGM ``dcgm_fields.h``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.nvml_eval import RETIRED_PAGES_LIMIT, recovery_verdict
from breakfix.collectors.promlines import parse_tolerant
from breakfix.collectors.promtext import Sample
from breakfix.schemas.common import GpuRef, normalize_pci_bus_id
from breakfix.schemas.signal import Signal, SignalSource

log = structlog.get_logger("breakfix.collector.dcgm")

# Each field: the dcgm-exporter name first, then the DCGM 4.x canonical name(s) (dcgm_fields.csv column
# canonical_field_name_dcgm_4.6; NVLINK_REPLAY_TOTAL / RECOVERY_TOTAL are DCGM 4.6's newer totals of the same counts).
XID = ("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_XID_ERROR")
DBE = ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",)
REMAP_FAILURE = ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_ROW_REMAP_FAILED")
REMAP_PENDING = ("DCGM_FI_DEV_ROW_REMAP_PENDING",)
NVLINK = (("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_TOTAL"),
          ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_TOTAL"),
          ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_TOTAL",
           "DCGM_FI_DEV_NVLINK_REPLAY_TOTAL"),
          ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_TOTAL",
           "DCGM_FI_DEV_NVLINK_RECOVERY_TOTAL"),
          ("DCGM_FI_DEV_NVLINK_CRC_ERROR_TOTAL",))
CLOCK_REASONS = ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS")
THERMAL_VIOLATION = ("DCGM_FI_DEV_THERMAL_VIOLATION",)
PCIE_REPLAY = ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_PCIE_REPLAY_TOTAL")
GPU_TEMP = ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_TEMP_CELSIUS")
SLOWDOWN_TEMP = ("DCGM_FI_DEV_SLOWDOWN_TEMP", "DCGM_FI_DEV_GPU_TEMP_SLOWDOWN_CELSIUS")
XID_COUNT = ("DCGM_EXP_XID_ERRORS_COUNT", "DCGM_FI_DEV_XID_ERRORS_ACTIVE")
# dcgm-exporter's own family (counters CSV, off by default): per GPU and ``clock_event`` (gpu_idle, clocks_setting,
# power_cap, hw_slowdown, sync_boost, sw_thermal, hw_thermal, hw_power_brake, display_clocks), how many times the
# reason was seen in the last DCGM_EXPORTER_CLOCK_EVENTS_COUNT_WINDOW_SIZE (5 min); only reasons seen have a series,
# a GPU that saw none has one zero row without ``clock_event``
CLOCK_EVENTS_COUNT = ("DCGM_EXP_CLOCK_EVENTS_COUNT",)
CLOCK_EVENTS = (("clock.hw_slowdown", "hw_slowdown"), ("clock.hw_thermal", "hw_thermal"),
                ("clock.power_brake", "hw_power_brake"))
# Page retirement (pre-Ampere; dcgm-exporter etc/default-counters.csv "Retired pages", fields 390-392, DCGM 4.x names
# from dcgm_fields.csv): pages pending retirement need a GPU reset / reboot, as the nvml source's retired_pages.pending
RETIRED_PENDING = ("DCGM_FI_DEV_RETIRED_PENDING", "DCGM_FI_DEV_PAGE_RETIRED_PENDING")
RETIRED_SBE = ("DCGM_FI_DEV_RETIRED_SBE", "DCGM_FI_DEV_PAGE_RETIRED_SBE_TOTAL")
RETIRED_DBE = ("DCGM_FI_DEV_RETIRED_DBE", "DCGM_FI_DEV_PAGE_RETIRED_DBE_TOTAL")
HEALTH = ("DCGM_EXP_GPU_HEALTH_STATUS",)
# DCGM 4.x name first (dcgm_fields.h: DCGM_FI_DEV_GPU_RECOVERY_ACTION 1523), then the deprecated alias that
# go-dcgm's legacyDCGMFields still resolves (pkg/dcgm/const_fields.go): an exporter writes the name its CSV uses
RECOVERY = ("DCGM_FI_DEV_GPU_RECOVERY_ACTION", "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION")
RECOVERY_MAX = 0xFFFF_FFFF  # nvmlDeviceGpuRecoveryAction_t: an unsigned int
RECOVERY_CHECK = "dcgm.recovery_action"
FIELDS = (XID, DBE, REMAP_FAILURE, REMAP_PENDING, CLOCK_REASONS, THERMAL_VIOLATION, PCIE_REPLAY, GPU_TEMP,
          SLOWDOWN_TEMP, XID_COUNT, CLOCK_EVENTS_COUNT, HEALTH, RECOVERY, RETIRED_PENDING, RETIRED_SBE, RETIRED_DBE,
          *NVLINK)  # every family read, each with its aliases
HEALTH_RESULTS = {0.0: "PASS", 10.0: "WARN", 20.0: "FAIL"}  # dcgmHealthWatchResults_t
HEALTH_WARN = 10.0
_WATCH = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_FR_CODE = re.compile(r"^DCGM_FR_[A-Z0-9_]{1,64}$")
MIG_LABELS = ("GPU_I_ID", "GPU_I_PROFILE")
MAX_XID = 65535
CLOCK_BITS = (("clock.hw_slowdown", 0x8), ("clock.hw_thermal", 0x40), ("clock.power_brake", 0x80))


@dataclass(frozen=True, slots=True)
class DcgmThresholds:
    nvlink_errors_per_min: float = 10.0
    retired_pages_limit: int = RETIRED_PAGES_LIMIT  # as the nvml source
    pcie_replay_per_min: float = 60.0
    thermal_violation_share: float = 0.05  # of wall time throttled for thermal reasons


@dataclass
class GpuFields:
    gpu: GpuRef
    values: dict[str, float] = field(default_factory=dict)
    xid_labels: dict[str, str] = field(default_factory=dict)
    xid_counts: dict[str, tuple[float, str]] = field(default_factory=dict)  # xid -> (count, window ms)
    hostname: str | None = None
    mig: dict[str, str] = field(default_factory=dict)  # GPU_I_ID / GPU_I_PROFILE of a MIG row
    health: dict[str, tuple[float, str]] = field(default_factory=dict)  # watch -> (result, DCGM_FR_* code or "")
    clock_events: dict[str, float] = field(default_factory=dict)  # clock_event -> times seen in the exporter's window
    links: dict[str, dict[str, float]] = field(default_factory=dict)  # NVLink field -> link -> counter (per-link rows)


class BadSample(ValueError):
    """A sample whose labels or value cannot name a GPU reading."""


def gpu_of(labels: dict[str, str]) -> tuple[str, GpuRef, str | None]:
    """(entity key, GPU, hostname) of one sample. A ``pci_bus_id`` that is no address (``N/A``) is dropped,
    not fatal: the UUID or index still names the GPU. MIG rows key by GPU and instance. A GPU's per-link row
    (dcgm-exporter ``render_metrics.go`` ``linkMetricsFormat``: ``nvlink``, ``gpu``, ``gpu_uuid``, ``model_name``)
    names its GPU by ``gpu_uuid``, so it keys with the GPU's own rows."""
    uuid = labels.get("UUID") or labels.get("uuid") or labels.get("gpu_uuid") or None
    pci = labels.get("pci_bus_id")
    try:
        pci = normalize_pci_bus_id(pci) if pci else None
    except ValueError:
        pci = None
    index = labels.get("gpu")
    idx = int(index) if index and index.isdigit() and len(index) <= 6 else None
    if uuid is None and pci is None and idx is None:
        raise BadSample("no gpu, UUID or pci_bus_id label")
    ref = GpuRef(index=idx, uuid=uuid, pci_bus_id=pci)
    key = ref.key()
    if labels.get("GPU_I_ID"):
        key += f"/mig{labels['GPU_I_ID']}"
    return key, ref, labels.get("Hostname") or labels.get("hostname")


def _value(s: Sample) -> float:
    if not math.isfinite(s.value) or abs(s.value) > 2.0**63:
        raise BadSample(f"value {s.value!r} out of range")
    return s.value


def by_gpu(samples: dict[str, list[Sample]], skipped: list[tuple[str, str]] | None = None) -> dict[str, GpuFields]:
    """Fields of interest per GPU (and MIG instance), first name found wins for each aliased field.
    Bad samples are appended to ``skipped`` as (family, reason) and left out."""
    out: dict[str, GpuFields] = {}
    bad = skipped if skipped is not None else []
    for names in FIELDS:
        for name in names:
            for s in samples.get(name, ()):
                try:
                    key, ref, host = gpu_of(s.labels)
                    value = _value(s)
                    if names in (XID, XID_COUNT, CLOCK_EVENTS_COUNT) \
                            and not (0 <= value <= (MAX_XID if names is XID else 2.0**31)):
                        raise BadSample(f"value {value:g} out of range")
                    xid = s.labels.get("xid", "")
                    if names is XID_COUNT and not (xid.isdigit() and int(xid) <= MAX_XID):
                        raise BadSample(f"xid label {xid[:20]!r} is no XID")
                    watch = s.labels.get("health_watch", "")
                    if names is HEALTH and value not in HEALTH_RESULTS:
                        raise BadSample(f"value {value:g} is no health result (0 PASS, 10 WARN, 20 FAIL)")
                    if names is HEALTH and not _WATCH.match(watch):
                        raise BadSample(f"health_watch label {watch[:40]!r} is no health watch")
                    if names is RECOVERY and not (value.is_integer() and 0 <= value <= RECOVERY_MAX):
                        raise BadSample(f"value {value:g} is no recovery action (an unsigned 32-bit integer)")
                except BadSample as exc:
                    bad.append((names[0], str(exc)))
                    continue
                g = out.setdefault(key, GpuFields(ref, hostname=host,
                                                  mig={k: s.labels[k] for k in MIG_LABELS if s.labels.get(k)}))
                if names is XID_COUNT:
                    g.xid_counts[str(int(xid))] = (value, s.labels.get("window_size_in_ms", ""))
                    continue
                if names is CLOCK_EVENTS_COUNT:
                    event = s.labels.get("clock_event", "")
                    if _WATCH.match(event) and len(g.clock_events) < 32:
                        g.clock_events[event.lower()] = value
                    continue
                if names is HEALTH:  # one result per watch (the exporter's rule); two: the worse one counts
                    code = s.labels.get("health_error_code", "")
                    watch = watch.upper()
                    if value > g.health.get(watch, (-1.0, ""))[0]:
                        g.health[watch] = (value, code if _FR_CODE.match(code) else "")
                    continue
                link = s.labels.get("nvlink", "")
                if link and names in NVLINK:  # one row per link: the GPU's count is their sum (below)
                    g.links.setdefault(names[0], {})[link] = value
                    continue
                g.values.setdefault(names[0], value)
                if names is XID:
                    g.xid_labels = {k: v for k, v in s.labels.items() if k in ("err_code", "err_msg")}
            if any(names[0] in g.values or names[0] in g.links for g in out.values()):
                break
    for g in out.values():  # a GPU-level total row, when the page has one, wins over the sum of its links
        for name, links in g.links.items():
            g.values.setdefault(name, sum(links.values()))
    return out


class DcgmRules:
    """Pure rules with the previous scrape's counters; one instance per scraped exporter."""

    def __init__(self, ctx: NodeContext, thresholds: DcgmThresholds | None = None) -> None:
        self.ctx = ctx
        self.th = thresholds or DcgmThresholds()
        self.prev: dict[str, tuple[dict[str, float], float]] = {}
        self.prev_counts: dict[str, dict[str, float]] = {}
        self.skipped = 0  # bad samples since start
        self.foreign = 0  # GPUs on the page that NVML does not list on this node (skipped, counted)
        self.logged: set[str] = set()  # families already logged as bad (once each)
        self.reasons: list[str] = []  # the first bad samples' reasons, for the offline command

    def _skip(self, bad: list[tuple[str, str]]) -> None:
        self.skipped += len(bad)
        self.reasons.extend(f"{family}: {reason}" for family, reason in bad[: max(0, 100 - len(self.reasons))])
        for family, reason in bad:
            if family not in self.logged and len(self.logged) < 1000:
                self.logged.add(family)
                log.warning("dcgm_sample_skipped", node=self.ctx.node, family=family, reason=reason)

    def apply(self, text: str, at: datetime, mono: float, *, baseline_xids: bool = True) -> Cycle:
        """One scrape -> states and events. ``ValueError`` only when nothing on the page is Prometheus text."""
        samples, skipped = parse_tolerant(text)
        bad = [(s.family, s.reason) for s in skipped]
        gpus = by_gpu(samples, bad)
        self._skip(bad)
        # this page carries the family (a zero row without clock_event where a GPU saw nothing): a hardware reason
        # with no series of a GPU was seen 0 times; a page without it says nothing through it
        clock_events = any(samples.get(n) for n in CLOCK_EVENTS_COUNT)
        states: list[Signal] = []
        events: list[Signal] = []
        for key, g in gpus.items():
            self._gpu(key, g, at, mono, baseline_xids, states, events, clock_events)
        return Cycle(states=states, events=events)

    def _gpu(self, key: str, g: GpuFields, at: datetime, mono: float, baseline_xids: bool,
             states: list[Signal], events: list[Signal], clock_events: bool) -> None:
        known = self.ctx.nvml_uuids
        if known and g.gpu.uuid and g.gpu.uuid not in known:  # another node's GPU (an exporter URL that reaches
            if not self.foreign:                             # past this node): never reported as this node's
                log.warning("dcgm_foreign_gpu", node=self.ctx.node, uuid=g.gpu.uuid)
            self.foreign += 1
            return
        gpu = self.ctx.gpu(uuid=g.gpu.uuid, pci=g.gpu.pci_bus_id, index=g.gpu.index)
        prev, prev_t = self.prev.get(key, ({}, mono))
        elapsed = mono - prev_t
        v = g.values
        mig = g.mig
        where = gpu.label() + (f" GPU-I {mig['GPU_I_ID']}" if mig.get("GPU_I_ID") else "")

        def comp(name: str | None) -> str | None:
            if not mig.get("GPU_I_ID"):
                return name
            return f"{name}:mig{mig['GPU_I_ID']}" if name else f"mig{mig['GPU_I_ID']}"

        def state(check: str, bad: bool, value: float | None = None, threshold: float | None = None,
                  component: str | None = None, code: str | None = None, details: dict[str, str] | None = None,
                  what: str = "") -> None:
            states.append(self.ctx.signal(source=SignalSource.DCGM, check=check, code=code, healthy=not bad, at=at,
                                          gpu=gpu, component=comp(component), value=value, threshold=threshold,
                                          details={**(details or {}), **mig} or None,
                                          message=f"dcgm-exporter: {what or check} {'fault' if bad else 'ok'} "
                                                  f"on {where}"))

        def rate(name: str) -> float | None:
            if name not in v or name not in prev or elapsed <= 0:
                return None
            return max(0.0, v[name] - prev[name]) * 60 / elapsed

        def xid_event(code: str, msg: str, details: dict[str, str], disc: str) -> None:
            events.append(self.ctx.signal(source=SignalSource.DCGM, check="xid", code=code, healthy=False, at=at,
                                          gpu=gpu, component=comp(None), message=f"dcgm-exporter: {msg}",
                                          details={**details, **mig}, discriminator=disc))

        xid = v.get(XID[0])
        if xid and (xid != prev.get(XID[0]) if (prev or not baseline_xids) else False):
            code = str(int(xid))
            msg = g.xid_labels.get("err_msg", "")
            xid_event(code, f"last Xid {code} on {where}" + (f": {msg}" if msg else ""), g.xid_labels,
                      f"dcgm-xid-{code}-{at.timestamp()}")
        before = self.prev_counts.get(key)
        for code, (count, window) in g.xid_counts.items():
            if (before is not None or not baseline_xids) and count > (before or {}).get(code, 0):
                xid_event(code, f"{count:g} x Xid {code} on {where} in the last {window or '?'} ms",
                          {"count": f"{count:g}", "window_size_in_ms": window},
                          f"dcgm-xidcount-{code}-{at.timestamp()}")
        self.prev_counts[key] = {c: n for c, (n, _w) in g.xid_counts.items()}
        if DBE[0] in v:
            state("ecc.dbe", v[DBE[0]] > 0, v[DBE[0]], 0)
        if REMAP_FAILURE[0] in v:
            state("row_remap.failure", v[REMAP_FAILURE[0]] >= 1)
        if REMAP_PENDING[0] in v:
            state("row_remap.pending", v[REMAP_PENDING[0]] >= 1)
        if RETIRED_PENDING[0] in v:  # the nvml source's checks, from DCGM's page-retirement fields
            state("retired_pages.pending", v[RETIRED_PENDING[0]] >= 1, v[RETIRED_PENDING[0]], 0)
        if RETIRED_SBE[0] in v or RETIRED_DBE[0] in v:
            retired = v.get(RETIRED_SBE[0], 0.0) + v.get(RETIRED_DBE[0], 0.0)
            state("retired_pages.limit", retired >= self.th.retired_pages_limit, retired, self.th.retired_pages_limit)
        nv = [r for names in NVLINK if (r := rate(names[0])) is not None]
        if nv:
            total = sum(nv)
            state("nvlink.errors", total >= self.th.nvlink_errors_per_min, round(total, 2),
                  self.th.nvlink_errors_per_min, component="nvlink")
        if CLOCK_REASONS[0] in v and v[CLOCK_REASONS[0]] >= 0:
            bits = int(v[CLOCK_REASONS[0]])
            for check, bit in CLOCK_BITS:
                state(check, bool(bits & bit), bits)
        elif clock_events:  # how often each hardware reason was seen in the exporter's window
            for check, event in CLOCK_EVENTS:
                seen = g.clock_events.get(event, 0.0)
                state(check, seen > 0, seen, what=f"{check} ({event} seen {seen:g}x in the exporter's window)")
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
        if RECOVERY[0] in v:  # the nvsmi and nvml sources' verdict and code (``nvml_eval.recovery_verdict``),
            # under a check of its own: a healthy reading here must never clear the nvml source's gpu.lost (an NVML
            # GpuIsLost) nor its verdict, which the exporter can lag or miss
            verdict = recovery_verdict(int(v[RECOVERY[0]]))
            if verdict is not None:
                state(RECOVERY_CHECK, True, code=verdict.code, details={"recovery_action": verdict.name},
                      what=f"GPU recovery action {verdict.name!r} ({verdict.action})")
            else:
                state(RECOVERY_CHECK, False, what="GPU recovery action")
        for watch, (result, code) in sorted(g.health.items()):
            bad = result >= HEALTH_WARN  # WARN too: the catalog caps "can perform workload" codes to monitoring
            fr = code if bad and code not in ("", "DCGM_FR_OK") else None  # a fault without one: the cautious class
            state("dcgm.health", bad, result, HEALTH_WARN, component=watch.lower(), code=fr,
                  details={"health_watch": watch, "health_result": HEALTH_RESULTS[result]},
                  what=f"DCGM health watch {watch} {HEALTH_RESULTS[result]}" + (f" {fr}" if fr else ""))
        self.prev[key] = (dict(v), mono)
