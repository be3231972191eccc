"""The NVML calls breakfix makes, as a Protocol, with the real binding and a faithful fake.

The real adapter is the ``pynvml`` module of nvidia-ml-py itself (``real_nvml()``): the
Protocol names its functions exactly, so nothing sits between breakfix and NVML. The fake
(``FakeNvml``) keeps per-GPU state a test can change and raises the same
``pynvml.NVMLError`` subclasses the driver does (``NVMLError_GpuIsLost``, ``ResetRequired``,
``NotSupported``, ``Timeout``, ...). ``collectors.nvml`` is the only user. Facts from
nvidia-ml-py 13.615.71 ``pynvml.py`` (see ``collectors/SOURCES.md``).

Field values (``nvmlDeviceGetFieldValues``) come back from the real binding and the fake alike as pynvml's
own ``c_nvmlFieldValue_t`` array: the call raises only for the whole request (the device, or a library
without the function: ``NVMLError_FunctionNotFound``), and each field carries its own ``nvmlReturn`` (NVML
``nvml.h``, ``nvmlFieldValue_st``: "This must be checked before looking at value"); ``field_number`` decodes
one by its ``valueType``. The fake answers ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`` (field 230, R570+) from
``FakeGpu.recovery_action`` as an UNSIGNED_INT (as NVIDIA/k8s-test-infra's mock NVML fills it), a per-field
``NVML_ERROR_NOT_SUPPORTED`` for a field it does not hold (``recovery_action=None``: a driver before the
field), and any per-field return a test sets in ``FakeGpu.field_returns``.

``nvmlDeviceGetSramEccErrorStatus(handle, status)`` fills a ``c_nvmlEccSramErrorStatus_v1_t`` (passed by
``ctypes.byref``, as ``nvmlDeviceGetGpuFabricInfoV``'s struct is: nvidia-ml-py hands the argument to NVML as given)
with ``bThresholdExceeded`` and the SRAM error counts; the fake fills it from ``FakeGpu.sram_threshold_exceeded``
and ``FakeGpu.sram_errors``, raises ``NVMLError_ArgumentVersionMismatch`` for a struct version other than
``nvmlEccSramErrorStatus_v1`` and ``NVMLError_NotSupported`` for a GPU without it (``sram_threshold_exceeded=None``);
a driver without the entry point is ``fail["nvmlDeviceGetSramEccErrorStatus"] = NVMLError_FunctionNotFound()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pynvml


class Nvml(Protocol):
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int: ...
    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> list[int]: ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int: ...
    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int: ...
    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int: ...
    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: int, counter: int) -> int: ...
    def nvmlDeviceGetGpuFabricInfo(self, handle: Any, info: Any) -> None: ...
    def nvmlDeviceGetGpuFabricInfoV(self, handle: Any, info: Any) -> None: ...
    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: Sequence[int | tuple[int, int]]) -> Any: ...
    def nvmlDeviceGetSramEccErrorStatus(self, handle: Any, status: Any) -> int: ...
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, mask: int, event_set: Any) -> None: ...
    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any: ...
    def nvmlEventSetFree(self, event_set: Any) -> None: ...


def real_nvml() -> Nvml:
    """The nvidia-ml-py module; ``nvmlInit`` raises ``NVMLError_LibraryNotFound`` without a driver."""
    return pynvml  # type: ignore[no-any-return]


@dataclass
class FakeLink:
    up: bool = True
    errors: dict[int, int] = field(default_factory=dict)  # NVML_NVLINK_ERROR_DL_* -> count


@dataclass
class FakeGpu:
    uuid: str
    pci_bus_id: str  # NVML's form, e.g. 00000000:18:00.0
    dbe_volatile: int = 0
    sbe_volatile: int = 0
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # corrRows, uncRows, isPending, failureOccurred
    retired_pending: int = 0
    retired_pages: int | None = None  # None: NotSupported (Ampere and later use row remapping)
    clocks_event_reasons: int = 0
    temperature: int = 45
    slowdown_temperature: int = 87
    pcie_replay: int = 0
    links: list[FakeLink] = field(default_factory=lambda: [FakeLink() for _ in range(18)])
    fabric: tuple[int, int] | None = None  # (state, status); None: NotSupported
    fabric_health: int | None = None  # nvmlGpuFabricInfo_v2 healthMask; None: a driver with only the v1 call
    # NVML_GPU_RECOVERY_ACTION_* (nvmlDeviceGpuRecoveryAction_t) of field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION;
    # None: a driver before R570 that does not know the field (per-field NVML_ERROR_NOT_SUPPORTED)
    recovery_action: int | None = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    field_returns: dict[int, int] = field(default_factory=dict)  # NVML_FI_* -> a per-field nvmlReturn to report
    # nvmlEccSramErrorStatus_v1_t bThresholdExceeded (the SRAM uncorrectable-error threshold of field diag);
    # None: a GPU without nvmlDeviceGetSramEccErrorStatus (NVMLError_NotSupported, as before Ampere)
    sram_threshold_exceeded: bool | None = False
    sram_errors: dict[str, int] = field(default_factory=dict)  # c_nvmlEccSramErrorStatus_v1_t member -> count
    lost: bool = False
    reset_required: bool = False
    fail: dict[str, pynvml.NVMLError] = field(default_factory=dict)  # method name -> error to raise


@dataclass
class _PciInfo:
    busId: str


_HANDLE_BASE = 0x7F00_0000  # fake device handles are opaque pointers, as the real library's are


def _handle(index: int) -> Any:
    """A fresh ``nvmlDevice_t`` for GPU ``index``: equal by address only, like NVML's own handles."""
    return ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + index), pynvml.c_nvmlDevice_t)


_FIELD_MEMBERS = {  # nvmlValueType_t -> the c_nvmlValue_t union member holding the value (pynvml.py, nvml.h)
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def field_number(value: Any) -> float | None:
    """One ``c_nvmlFieldValue_t``'s value by its ``valueType``; None for a type NVML has not defined. The caller
    checks ``nvmlReturn`` first: the value is undefined unless it is NVML_SUCCESS (nvml.h, nvmlFieldValue_st)."""
    member = _FIELD_MEMBERS.get(int(value.valueType))
    if member is None:
        return None
    number = getattr(value.value, member)
    return float(number) if isinstance(number, int | float) else None


def handle_address(handle: Any) -> int | None:
    """The address an NVML device handle points at (the one stable identity a handle has)."""
    if handle is None:
        return None
    return ctypes.cast(handle, ctypes.c_void_p).value


@dataclass
class _Event:
    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


class FakeNvml:
    """In-memory NVML with the real error types. Handles are opaque ``nvmlDevice_t`` pointers, and an event
    carries a new pointer object for its device, as ``nvmlEventSetWait_v2`` does."""

    def __init__(self, gpus: list[FakeGpu], *, library_missing: bool = False) -> None:
        self.gpus = gpus
        self.library_missing = library_missing
        self.initialised = False
        self.events: queue.Queue[_Event] = queue.Queue()
        self.registered: dict[int, int] = {}
        self.calls = 0

    @classmethod
    def hgx(cls, n: int = 8, seed: str = "fake") -> FakeNvml:
        buses = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")
        tag = hashlib.sha256(seed.encode()).hexdigest()[:4]  # NVML UUIDs are hex, as the agent checks
        return cls([FakeGpu(uuid=f"GPU-{tag}{i:04x}-0000-1111-2222-{i:012x}",
                            pci_bus_id=f"00000000:{buses[i % 8]}:00.0") for i in range(n)])

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def index_of(handle: Any) -> int:
        addr = handle_address(handle)
        if addr is None or not _HANDLE_BASE <= addr < _HANDLE_BASE + 1024:
            raise pynvml.NVMLError_InvalidArgument()
        return addr - _HANDLE_BASE

    def _gpu(self, handle: Any, method: str) -> FakeGpu:
        self.calls += 1
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()
        g = self.gpus[self.index_of(handle)]
        if g.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if g.reset_required and method != "nvmlDeviceGetUUID":
            raise pynvml.NVMLError_ResetRequired()
        err = g.fail.get(method)
        if err is not None:
            raise err
        return g

    def xid(self, index: int, xid: int) -> None:
        """The driver reports XID ``xid`` on GPU ``index`` (delivered if registered)."""
        if self.registered.get(index, 0) & pynvml.nvmlEventTypeXidCriticalError:
            self.events.put(_Event(_handle(index), pynvml.nvmlEventTypeXidCriticalError, xid))

    # -- the NVML surface ------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        if self.library_missing:
            raise pynvml.NVMLError_LibraryNotFound()
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False
        self.registered.clear()

    def nvmlDeviceGetCount(self) -> int:
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        if self.gpus[index].lost:
            raise pynvml.NVMLError_GpuIsLost()
        return _handle(index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetPciInfo(self, handle: Any) -> _PciInfo:
        return _PciInfo(self._gpu(handle, "nvmlDeviceGetPciInfo").pci_bus_id)

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        g = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        if counter_type != pynvml.NVML_VOLATILE_ECC:
            raise pynvml.NVMLError_NotSupported()
        return g.dbe_volatile if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else g.sbe_volatile

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return self._gpu(handle, "nvmlDeviceGetRemappedRows").remapped

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetRetiredPagesPendingStatus").retired_pending

    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> list[int]:
        g = self._gpu(handle, "nvmlDeviceGetRetiredPages")
        if g.retired_pages is None:
            raise pynvml.NVMLError_NotSupported()
        share = g.retired_pages // 2 + (g.retired_pages % 2 if cause else 0)
        return [0x1000 * i for i in range(share)]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").clocks_event_reasons

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        g = self._gpu(handle, "nvmlDeviceGetTemperatureThreshold")
        if threshold != pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
            raise pynvml.NVMLError_NotSupported()
        return g.slowdown_temperature

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetPcieReplayCounter").pcie_replay

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        g = self._gpu(handle, "nvmlDeviceGetNvLinkState")
        if link >= len(g.links):
            raise pynvml.NVMLError_InvalidArgument()
        return int(pynvml.NVML_FEATURE_ENABLED if g.links[link].up else pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: int, counter: int) -> int:
        g = self._gpu(handle, "nvmlDeviceGetNvLinkErrorCounter")
        if link >= len(g.links):
            raise pynvml.NVMLError_InvalidArgument()
        return g.links[link].errors.get(counter, 0)

    def nvmlDeviceGetGpuFabricInfo(self, handle: Any, info: Any) -> None:
        g = self._gpu(handle, "nvmlDeviceGetGpuFabricInfo")
        if g.fabric is None:
            raise pynvml.NVMLError_NotSupported()
        struct = getattr(info, "_obj", info)  # ctypes.byref(...) or the struct itself
        struct.state, struct.status = g.fabric

    def nvmlDeviceGetGpuFabricInfoV(self, handle: Any, info: Any) -> None:
        g = self._gpu(handle, "nvmlDeviceGetGpuFabricInfoV")
        if g.fabric is None:
            raise pynvml.NVMLError_NotSupported()
        if g.fabric_health is None:
            raise pynvml.NVMLError_FunctionNotFound()
        struct = getattr(info, "_obj", info)
        struct.state, struct.status = g.fabric
        struct.healthMask = g.fabric_health

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: Sequence[int | tuple[int, int]]) -> Any:
        """pynvml's ``c_nvmlFieldValue_t`` array, one entry per id (an int, or a (fieldId, scopeId) pair as
        pynvml takes them); each entry carries its own ``nvmlReturn``, and the call raises only for the device."""
        g = self._gpu(handle, "nvmlDeviceGetFieldValues")
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for v, fid in zip(values, field_ids, strict=True):
            v.fieldId, v.scopeId = fid if isinstance(fid, tuple) else (fid, 0)
            v.timestamp = time.time_ns() // 1000  # microseconds since 1970, as NVML stamps a value
            if v.fieldId in g.field_returns:
                v.nvmlReturn = g.field_returns[v.fieldId]
            elif v.fieldId == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and g.recovery_action is not None:
                v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT  # an unsigned int, as the driver fills it
                v.value.uiVal = g.recovery_action
                v.nvmlReturn = pynvml.NVML_SUCCESS
            else:
                v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetSramEccErrorStatus(self, handle: Any, status: Any) -> int:
        """Fills pynvml's ``c_nvmlEccSramErrorStatus_v1_t`` (by ``byref`` or the struct itself) as the driver does;
        returns NVML_SUCCESS as nvidia-ml-py's wrapper does."""
        g = self._gpu(handle, "nvmlDeviceGetSramEccErrorStatus")
        if g.sram_threshold_exceeded is None:
            raise pynvml.NVMLError_NotSupported()
        struct = getattr(status, "_obj", status)
        if not isinstance(struct, pynvml.c_nvmlEccSramErrorStatus_v1_t):
            raise pynvml.NVMLError_InvalidArgument()
        if struct.version != pynvml.nvmlEccSramErrorStatus_v1:
            raise pynvml.NVMLError_ArgumentVersionMismatch()
        counts = [name for name, _ctype in struct._fields_ if name not in ("version", "bThresholdExceeded")]
        if set(g.sram_errors) - set(counts):
            raise ValueError(f"no such c_nvmlEccSramErrorStatus_v1_t count: {sorted(set(g.sram_errors) - set(counts))}")
        for name in counts:
            setattr(struct, name, g.sram_errors.get(name, 0))
        struct.bThresholdExceeded = int(g.sram_threshold_exceeded)
        return int(pynvml.NVML_SUCCESS)

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        self._gpu(handle, "nvmlDeviceGetSupportedEventTypes")
        return int(pynvml.nvmlEventTypeAll)

    def nvmlDeviceRegisterEvents(self, handle: Any, mask: int, event_set: Any) -> None:
        self._gpu(handle, "nvmlDeviceRegisterEvents")
        self.registered[self.index_of(handle)] = mask

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> _Event:
        try:
            return self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError_Timeout() from None

    def nvmlEventSetFree(self, event_set: Any) -> None:
        return None
