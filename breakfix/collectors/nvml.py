"""The nvml source: GPU health from NVML, polled, plus XID events from the driver.

``NvmlSource.collect`` reads every GPU through the ``collectors.nvml_api.Nvml`` Protocol
(real ``pynvml`` or ``FakeNvml``) into a ``GpuSample``; the pure ``collectors.nvml_eval.evaluate`` turns a
sample (and the previous one, for counter rates) into state signals: ``gpu.lost`` /
``gpu.reset_required`` (``NVMLError_GpuIsLost`` / ``ResetRequired`` never escape), volatile
``ecc.dbe`` and SBE bursts, ``ecc.sram_threshold``, ``row_remap.pending`` / ``failure``, ``retired_pages.pending`` and
``retired_pages.limit`` (pre-Ampere page retirement near NVIDIA's 64-page limit),
clocks-event reasons (``clock.hw_slowdown`` / ``hw_thermal`` / ``power_brake``),
``temperature.slowdown``, ``pcie.replay`` rate, per-link ``nvlink.down`` / ``nvlink.errors``,
``fabric.gpu`` state, and ``gpu.count_mismatch`` against the expected count. ``watch_xids``
waits on ``nvmlEventSetWait_v2`` in a worker thread (never on the event loop) and yields
``xid`` event signals. The daemon passes both through ``collectors.edge``.

The GPU recovery action (the driver's own remediation verdict, R570+; XID 154 reports its changes) is read
each poll with ``nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])`` (field 230, an
``nvmlDeviceGpuRecoveryAction_t``: NVIDIA ``nvml.h``, nvidia-ml-py ``pynvml.py``) and read exactly as an
``nvidia-smi -q`` dump's ``GPU Recovery Action`` is (``recovery_verdict``, which asks ``collectors.nvsmi``):
NONE is healthy; Reset, Drain P2P, Drain and Reset, Bus Reset -> ``gpu.reset_required``, Node / System
Reboot -> ``gpu.lost``, each with ``code`` the ``DCGM_FR_GPU_RECOVERY_*`` name DCGM gives the same field, so
the catalog classifies it as XID 154 with that action; a number not known there is ``gpu.reset_required``
with an unknown ``DCGM_FR_GPU_RECOVERY_<n>`` code (the cautious path), never healthy. A driver or GPU
without the field (the call or the field's own ``nvmlReturn`` not SUCCESS) is logged once and says nothing;
a read that fails after the field has been read keeps the last verdict (a failed read is no clearing).
The dcgm source reads DCGM's mirror of the field (DCGM_FI_DEV_GPU_RECOVERY_ACTION, 1523) with the same rule.

The SRAM uncorrectable-error threshold (NVIDIA Xid catalog WORKFLOW_XID_48: "SRAM: check SRAM threshold flag
(nvidia-smi sram_threshold_exceeded) -> RUN_FIELDDIAG", RMA if exceeded) is read each poll with
``nvmlDeviceGetSramEccErrorStatus(h, byref(c_nvmlEccSramErrorStatus_v1_t()))`` (``bThresholdExceeded``: "the error
threshold of field diag is exceeded", nvml.h) and judged exactly as a dump's ``SRAM Threshold Exceeded`` is: exceeded
-> ``ecc.sram_threshold`` (hardware_support, the fact DCGM reports as DCGM_FR_SRAM_THRESHOLD), not exceeded ->
healthy, each with the aggregate SRAM uncorrectable counts (parity, SEC-DED, per unit) in ``details``. A driver or GPU
without the call (FunctionNotFound, NotSupported, NoPermission: NVML asks for root, ArgumentVersionMismatch, or a
nvidia-ml-py without it) is logged once per GPU, not asked again and says nothing; a read that fails otherwise keeps
the last reading (the flag is the InfoROM's aggregate: a failed read is no clearing), and an Unknown or Timeout from
this call alone never makes a GPU whose other reads answered lost.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from datetime import datetime
from typing import Any

import pynvml
import structlog

from breakfix.collectors.context import NodeContext, Reading
from breakfix.collectors.edge import Cycle
from breakfix.collectors.nvml_api import Nvml, field_number, handle_address
from breakfix.collectors.nvml_eval import FABRIC_SETTLING, SRAM_COUNTS, GpuSample, LinkSample, Thresholds, readings
from breakfix.schemas.common import GpuRef, normalize_pci_bus_id
from breakfix.schemas.signal import Signal, SignalSource

log = structlog.get_logger("breakfix.collector.nvml")

SBE_PAGES = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
DBE_PAGES = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
NVLINK_COUNTERS = (pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
                   pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA)
# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230 (nvml.h; NVML_FI_DEV_RESET_STATUS 226 and DRAIN_AND_RESET_STATUS 227
# are its deprecated forerunners). DCGM mirrors it as DCGM_FI_DEV_GPU_RECOVERY_ACTION = 1523 (DCGM dcgm_fields.h,
# dcgm_fields.cpp maps 1523 onto NVML field 230).
RECOVERY_FIELD = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
RECOVERY_MAX = 0xFFFF_FFFF  # nvmlDeviceGpuRecoveryAction_t is an unsigned int (pynvml: c_uint)
# Per-field or call errors that say the driver will never have the field for this GPU: stop asking for it.
RECOVERY_ABSENT = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT,
                   pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


# nvmlDeviceGetSramEccErrorStatus errors that say the driver or GPU will never answer it (nvml.h: NOT_SUPPORTED on a
# GPU without it, "Requires root/admin permissions", ARGUMENT_VERSION_MISMATCH for a struct version the driver does
# not know; FUNCTION_NOT_FOUND from a libnvidia-ml without the entry point; AttributeError from a nvidia-ml-py
# without the call or its struct): stop asking for it on that GPU.
SRAM_ABSENT: tuple[type[Exception], ...] = (
    pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_ArgumentVersionMismatch, AttributeError)


def _address(handle: Any) -> int | None:
    """A device handle's address: NVML hands out a new pointer object per call, equal only by address."""
    try:
        return handle_address(handle)
    except (TypeError, ctypes.ArgumentError):
        return None


# NVML errors of a device read that mean the GPU itself does not answer, not that it lacks the reading: a GPU
# fallen off the bus commonly reads "Unknown Error" before NVML says GpuIsLost, and a hung GSP firmware times out
# (Xid 79 and 119 situations; NVML API reference, nvmlReturn_t). Two samples in a row like this make it lost.
UNREADABLE: tuple[type[pynvml.NVMLError], ...] = (pynvml.NVMLError_Unknown, pynvml.NVMLError_GpuNotFound,
                                                  pynvml.NVMLError_Timeout, pynvml.NVMLError_IrqIssue)


def _read(fn: Callable[..., Any], *args: Any) -> Any:
    """One NVML read; None when the GPU does not have it (NotSupported, an absent link, ...). Lost, reset-required
    and unreadable-GPU errors propagate."""
    try:
        return fn(*args)
    except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired, *UNREADABLE):
        raise
    except pynvml.NVMLError:
        return None


def in_daemon_thread(fn: Callable[..., Any], *args: Any, name: str) -> Future[Any]:
    """Run ``fn`` in a daemon thread of its own and return its future. An executor's workers are joined at
    interpreter exit, so one NVML call that never returns (a hung GPU) would keep the collector from exiting
    on SIGTERM; a daemon thread does not."""
    fut: Future[Any] = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever waits on the future
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


class NvmlSource:
    name = "nvml"

    def __init__(self, nvml: Nvml, ctx: NodeContext, *, expected_gpus: int | None = None,
                 thresholds: Thresholds | None = None, max_links: int = 18, sample_timeout_s: float = 20.0) -> None:
        self.nvml = nvml
        self.ctx = ctx
        self.expected = expected_gpus
        self.th = thresholds or Thresholds()
        self.max_links = max_links
        self.handles: dict[int, Any] = {}
        self.refs: dict[int, GpuRef] = {}
        self.prev: dict[int, tuple[GpuSample, float]] = {}
        self.links_up: dict[int, set[int]] = {}
        self.fabric_since: dict[int, float] = {}  # GPU index -> when its fabric was first read still training
        self.started = False
        self._starting = threading.Lock()
        self.skipped = 0
        self.sample_timeout_s = sample_timeout_s
        self._busy: dict[int, Future[GpuSample]] = {}  # GPU index -> its sample in flight
        self.stalled: dict[int, int] = {}  # GPU index -> polls in a row its sample did not return in time
        self.unreadable: dict[int, int] = {}  # GPU index -> samples in a row it did not answer
        self.recovery_absent: set[int] = set()  # GPUs whose driver does not have the recovery-action field
        self.recovery_last: dict[int, int] = {}  # GPU index -> its last recovery action read
        self.recovery_logged = False  # the field's absence or a failed read is logged once per source
        self.sram_absent: set[int] = set()  # GPUs whose driver or GPU does not answer nvmlDeviceGetSramEccErrorStatus
        self.sram_last: dict[int, tuple[bool, dict[str, int]]] = {}  # GPU index -> its last SRAM status read
        self.sram_logged = False  # a failed SRAM status read (other than its absence) is logged once per source

    def start(self) -> None:
        """``nvmlInit`` and enumerate GPUs (index, UUID, PCI bus id) into the node context, once: the poll's
        thread and the XID watcher may both ask first, and neither may see a half-built GPU list."""
        with self._starting:
            if self.started:
                return
            self._start()
            self.started = True

    def _start(self) -> None:
        self.nvml.nvmlInit()
        for i in range(self.nvml.nvmlDeviceGetCount()):
            try:
                h = self.nvml.nvmlDeviceGetHandleByIndex(i)
                ref = GpuRef(index=i, uuid=self.nvml.nvmlDeviceGetUUID(h),
                             pci_bus_id=normalize_pci_bus_id(self.nvml.nvmlDeviceGetPciInfo(h).busId))
            except pynvml.NVMLError as exc:
                log.warning("gpu_enumeration_failed", gpu=i, error=str(exc))
                ref = GpuRef(index=i)
                h = None
            self.handles[i] = h
            self.refs[i] = ref
        self.ctx.register_gpus(list(self.refs.values()))
        if all(r.uuid for r in self.refs.values()):  # a GPU that did not answer at start leaves the list unknown,
            self.ctx.nvml_uuids = {r.uuid for r in self.refs.values() if r.uuid}  # so its faults are never dropped

    def sample(self, index: int) -> GpuSample:
        ref, h, n = self.refs[index], self.handles[index], self.nvml
        s = GpuSample(gpu=ref)
        try:
            if h is None:
                h = self.handles[index] = n.nvmlDeviceGetHandleByIndex(index)
            s.dbe = _read(n.nvmlDeviceGetTotalEccErrors, h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                          pynvml.NVML_VOLATILE_ECC)
            s.sbe = _read(n.nvmlDeviceGetTotalEccErrors, h, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                          pynvml.NVML_VOLATILE_ECC)
            rows = _read(n.nvmlDeviceGetRemappedRows, h)
            if rows is not None:
                s.remap_pending, s.remap_failure = bool(rows[2]), bool(rows[3])
            pending = _read(n.nvmlDeviceGetRetiredPagesPendingStatus, h)
            s.retired_pending = None if pending is None else bool(pending)
            sbe_pages = _read(n.nvmlDeviceGetRetiredPages, h, SBE_PAGES)
            dbe_pages = _read(n.nvmlDeviceGetRetiredPages, h, DBE_PAGES)
            if sbe_pages is not None and dbe_pages is not None:
                s.retired_pages = len(sbe_pages) + len(dbe_pages)
            s.clocks = _read(n.nvmlDeviceGetCurrentClocksEventReasons, h)
            s.temperature = _read(n.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)
            s.slowdown = _read(n.nvmlDeviceGetTemperatureThreshold, h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            s.pcie_replay = _read(n.nvmlDeviceGetPcieReplayCounter, h)
            for link in range(self.max_links):
                st = _read(n.nvmlDeviceGetNvLinkState, h, link)
                if st is None:
                    break
                errs = [_read(n.nvmlDeviceGetNvLinkErrorCounter, h, link, c) for c in NVLINK_COUNTERS]
                s.links[link] = LinkSample(up=st == pynvml.NVML_FEATURE_ENABLED, errors=sum(e or 0 for e in errs))
            s.fabric, s.fabric_health = self._fabric(h)
            s.recovery = self._recovery(index, h)
            sram = self._sram(index, h)
            if sram is not None:
                s.sram_threshold, s.sram_counts = sram[0], dict(sram[1])
        except pynvml.NVMLError_GpuIsLost:
            s = GpuSample(gpu=ref, lost="gpu.lost")
        except pynvml.NVMLError_ResetRequired:
            s = GpuSample(gpu=ref, lost="gpu.reset_required")
        except UNREADABLE as exc:  # the handle stays: NVML's handles are stable, and XID events match by it
            self.unreadable[index] = self.unreadable.get(index, 0) + 1
            s = GpuSample(gpu=ref, lost="gpu.lost" if self.unreadable[index] >= 2 else None, known=False,
                          why=f"NVML {type(exc).__name__.removeprefix('NVMLError_')} on every read")
            return s
        self.unreadable.pop(index, None)
        return s

    def _fabric(self, h: Any) -> tuple[tuple[int, int] | None, int | None]:
        """(state, status) and the health mask where the driver has the versioned call (R550+), else the v1 call's
        (state, status) alone; (None, None) where there is no fabric (not an NVSwitch/NVL system, an older driver)."""
        info = pynvml.c_nvmlGpuFabricInfo_v2_t()
        try:
            self.nvml.nvmlDeviceGetGpuFabricInfoV(h, ctypes.byref(info))  # NVML fills the struct in place
            return (int(info.state), int(info.status)), int(info.healthMask)
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired):
            raise
        except (pynvml.NVMLError, AttributeError):
            pass  # no versioned call in this library or driver: the v1 call below
        v1 = pynvml.c_nvmlGpuFabricInfo_t()
        try:
            self.nvml.nvmlDeviceGetGpuFabricInfo(h, ctypes.byref(v1))
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired):
            raise
        except pynvml.NVMLError:
            return None, None
        return (int(v1.state), int(v1.status)), None

    def _recovery(self, index: int, h: Any) -> int | None:
        """The GPU's NVML_GPU_RECOVERY_ACTION_*, or None where the driver does not have the field. A field the
        driver does not know (R570 added it) reads NOT_SUPPORTED or INVALID_ARGUMENT in its own ``nvmlReturn``
        (per-field errors do not raise: nvml.h, nvmlFieldValue_st); a library without the call raises
        FunctionNotFound: the GPU is not asked again. Any other failure keeps the last action read, so a read
        that fails is never taken for a GPU that no longer asks for a reset. Logged once."""
        if index in self.recovery_absent:
            return None
        try:
            (fv,) = self.nvml.nvmlDeviceGetFieldValues(h, [RECOVERY_FIELD])
            ret = int(fv.nvmlReturn)
            number = field_number(fv) if ret == pynvml.NVML_SUCCESS else None
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired, *UNREADABLE):
            raise  # the GPU itself does not answer: the sample says so, as for any other read
        except pynvml.NVMLError as exc:
            ret, number = int(exc.value), None
        if ret == pynvml.NVML_SUCCESS and number is not None and number.is_integer() and 0 <= number <= RECOVERY_MAX:
            self.recovery_last[index] = int(number)
            return int(number)
        if ret in RECOVERY_ABSENT:
            self.recovery_absent.add(index)
            why = f"not available on this driver or GPU ({pynvml.NVMLError(ret)})"
        elif ret != pynvml.NVML_SUCCESS:
            why = f"read failed ({pynvml.NVMLError(ret)}); the last action read stands"
        else:
            why = f"value {number!r} of type {int(fv.valueType)} is no recovery action; the last action read stands"
        if not self.recovery_logged:
            self.recovery_logged = True
            log.warning("gpu_recovery_action_unavailable", node=self.ctx.node, gpu=index, reason=why)
        return self.recovery_last.get(index)

    def _sram(self, index: int, h: Any) -> tuple[bool, dict[str, int]] | None:
        """(threshold exceeded, aggregate SRAM uncorrectable counts) from ``nvmlDeviceGetSramEccErrorStatus``, or
        None where the driver or GPU does not have it (SRAM_ABSENT, or a nvidia-ml-py without the call or struct):
        that GPU is logged once and not asked again. Any other failure keeps the last reading (the flag is the
        InfoROM's aggregate, so a read that fails is never taken for a threshold no longer exceeded). GpuIsLost and
        ResetRequired say what the GPU is, as from any read; an Unknown or Timeout here alone, after the sample's
        other reads answered, is this call failing, not the GPU off the bus, so it never makes the GPU lost."""
        if index in self.sram_absent:
            return None
        try:
            status = pynvml.c_nvmlEccSramErrorStatus_v1_t()  # its constructor sets version nvmlEccSramErrorStatus_v1
            self.nvml.nvmlDeviceGetSramEccErrorStatus(h, ctypes.byref(status))  # NVML fills the struct in place
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired):
            raise  # the GPU itself is lost or needs a reset: the sample says so, as for any other read
        except SRAM_ABSENT as exc:
            self.sram_absent.add(index)
            log.warning("gpu_sram_ecc_status_unavailable", node=self.ctx.node, gpu=index,
                        reason=f"not available on this driver or GPU ({type(exc).__name__}: {exc})"[:200])
            return None
        except pynvml.NVMLError as exc:
            if not self.sram_logged:
                self.sram_logged = True
                log.warning("gpu_sram_ecc_status_unavailable", node=self.ctx.node, gpu=index,
                            reason=f"read failed ({exc}); the last reading stands"[:200])
            return self.sram_last.get(index)
        reading = (bool(status.bThresholdExceeded), {k: int(getattr(status, m)) for k, m, _p in SRAM_COUNTS})
        self.sram_last[index] = reading
        return reading

    def read(self) -> list[GpuSample]:
        """One sample of every GPU (blocking NVML calls: the daemon runs this in a worker thread).

        A GPU whose read fails in a way NVML does not name is skipped and counted (``skipped``);
        the other GPUs' samples still go out."""
        if not self.started:
            self.start()
        begun: dict[int, Future[GpuSample]] = {}
        out: dict[int, GpuSample] = {}
        for i in self.refs:  # one thread per GPU: a GPU whose calls hang (a GSP timeout) holds up only itself
            running = self._busy.get(i)
            if running is not None and not running.done():
                out[i] = self._stalled(i)
                continue
            begun[i] = self._busy[i] = in_daemon_thread(self.sample, i, name=f"nvml-gpu{i}")
        deadline = time.monotonic() + self.sample_timeout_s  # a thread-level I/O bound, like a socket timeout
        for i, fut in begun.items():
            try:
                out[i] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                self.stalled.pop(i, None)
            except FutureTimeout:
                out[i] = self._stalled(i)
            except Exception as exc:
                self.skipped += 1
                log.warning("gpu_sample_skipped", node=self.ctx.node, gpu=i, error=repr(exc)[:200])
        return [out[i] for i in sorted(out)]

    def _stalled(self, index: int) -> GpuSample:
        """A GPU whose NVML calls have not returned within ``sample_timeout_s``: nothing is said about it at first,
        and after three polls in a row it is lost (a GPU that stops answering is as gone as one off the bus)."""
        n = self.stalled[index] = self.stalled.get(index, 0) + 1
        log.warning("gpu_sample_stalled", node=self.ctx.node, gpu=index, polls=n)
        return GpuSample(gpu=self.refs[index], known=False, lost="gpu.lost" if n >= 3 else None,
                         why=f"NVML calls on it have not returned for {n} polls")

    def evaluate(self, samples: list[GpuSample], at: datetime, mono: float) -> Cycle:
        """Samples -> state signals, each built (``collect``; the daemon's poll takes ``evaluate_readings``)."""
        return Cycle(states=[r.build() for r in self._readings(samples, at, mono, built=True)])

    def evaluate_readings(self, samples: list[GpuSample], at: datetime, mono: float) -> Cycle:
        """Samples -> states whose signals are built only when the edge filter sends them: a poll reads every check
        of every GPU, and almost all of them say what the last poll said (``context.Reading``)."""
        return Cycle(readings=self._readings(samples, at, mono, built=False))

    def _readings(self, samples: list[GpuSample], at: datetime, mono: float, *, built: bool) -> list[Reading]:
        """With counter rates against each GPU's previous sample; ``built``: each signal built here, so a GPU
        whose signal would not build is skipped with the rest of its sample, as a reading that fails is."""
        states: list[Reading] = []
        if self.expected is not None:
            count = len(self.refs)
            states.append(self.ctx.reading(source=SignalSource.NVML, check="gpu.count_mismatch",
                                           healthy=count == self.expected, at=at, value=count, threshold=self.expected,
                                           message=f"NVML sees {count} GPUs, expected {self.expected}"))
        for sample in samples:
            i = sample.gpu.index if sample.gpu.index is not None else -1
            prev, prev_t = self.prev.get(i, (None, mono))
            try:
                got = readings(self.ctx, sample, prev, at, mono - prev_t, self.th, self.links_up.setdefault(i, set()),
                               fabric_settling=self._fabric_settling(i, sample, mono))
                if built:
                    for r in got:
                        r.build()
            except Exception as exc:  # one GPU's odd reading never hides another GPU's fault
                self.skipped += 1
                log.warning("gpu_sample_skipped", node=self.ctx.node, gpu=i, error=repr(exc)[:200])
                continue
            states.extend(got)
            if sample.lost is None and sample.known:
                self.prev[i] = (sample, mono)
        return states

    def _fabric_settling(self, index: int, sample: GpuSample, mono: float) -> bool:
        """True while the GPU's fabric state has read NOT_STARTED / IN_PROGRESS for less than ``fabric_hold_s``."""
        f = sample.fabric
        if f is None or f[0] not in FABRIC_SETTLING or self.th.fabric_hold_s <= 0:
            if sample.known:
                self.fabric_since.pop(index, None)
            return False
        return mono - self.fabric_since.setdefault(index, mono) < self.th.fabric_hold_s

    def collect(self, at: datetime, mono: float) -> Cycle:
        """One poll of every GPU: ``read`` then ``evaluate`` (blocking)."""
        return self.evaluate(self.read(), at, mono)

    def event_gpu(self, device: Any) -> GpuRef:
        """The GPU an event's device handle names (blocking: call it off the event loop). The handle is a new
        pointer object, so it is matched by address against the handles enumerated at start first, which
        needs no NVML call (a GPU that fell off the bus keeps its index, UUID and PCI id that way); only
        a handle not known by address costs a UUID read."""
        addr = _address(device)
        for i, h in self.handles.items():
            if h is not None and addr is not None and _address(h) == addr:
                return self.refs[i]
        try:
            return self.ctx.gpu(uuid=self.nvml.nvmlDeviceGetUUID(device))
        except pynvml.NVMLError:
            return GpuRef(index=None)

    async def watch_xids(self, stop: asyncio.Event, clock: Callable[[], datetime],
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncIterator[Signal]:
        """XID events from ``nvmlEventSetWait_v2``; each wait runs in a worker thread."""
        n = self.nvml
        if not self.started:
            await asyncio.wrap_future(in_daemon_thread(self.start, name="nvml-start"))
        es = n.nvmlEventSetCreate()
        for i, h in self.handles.items():
            if h is None:
                continue
            try:
                mask = n.nvmlDeviceGetSupportedEventTypes(h) & pynvml.nvmlEventTypeXidCriticalError
                n.nvmlDeviceRegisterEvents(h, mask, es)
            except pynvml.NVMLError as exc:
                log.warning("xid_events_unavailable", gpu=i, error=str(exc))
        waiting: Future[Any] | None = None
        try:
            while not stop.is_set():
                try:
                    waiting = in_daemon_thread(n.nvmlEventSetWait_v2, es, 1000, name="nvml-xid")  # a cancel of
                    ev = await asyncio.wrap_future(waiting)  # this task leaves the thread running until it returns
                except pynvml.NVMLError_Timeout:
                    continue
                except pynvml.NVMLError as exc:  # e.g. a GPU fell off: the poll reports it; keep watching
                    log.warning("xid_wait_failed", error=str(exc))
                    await sleep(1.0)
                    continue
                if ev.eventType != pynvml.nvmlEventTypeXidCriticalError:
                    continue
                gpu = await asyncio.wrap_future(in_daemon_thread(self.event_gpu, ev.device, name="nvml-xid-gpu"))
                at = clock()
                yield self.ctx.signal(source=SignalSource.NVML, check="xid", code=str(ev.eventData), healthy=False,
                                      at=at, gpu=gpu, message=f"NVML event: Xid {ev.eventData} on {gpu.label()}",
                                      discriminator=f"nvml-event-{at.timestamp()}")
        finally:
            if waiting is not None and not waiting.done():  # cancelled mid-wait: the thread still holds the set
                await asyncio.to_thread(futures_wait, [waiting], 5.0)  # (its wait ends within 1 s, unless hung)
            if waiting is None or waiting.done():
                n.nvmlEventSetFree(es)
            else:  # freeing a set a hung wait still uses would be a use-after-free in the driver: leave it
                log.error("xid_event_set_leaked", reason="nvmlEventSetWait_v2 has not returned")
