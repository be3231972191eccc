"""A GPU's NVLink fabric health (NVSwitch and NVL72 systems) as three verdicts. Pure.

In: NVML's ``nvmlGpuFabricInfo_v2`` healthMask (``from_mask``, read by ``collectors.nvml``) or the Fabric > Health
block of an ``nvidia-smi -q`` dump (``from_dump``, read by ``collectors.nvsmi``). Out: a ``FabricHealth`` that the
NVML rules (``collectors.nvml_eval.evaluate``) turn into three state signals, so a fault reads the same from both:

- ``fabric.gpu`` (``problems``): the GPU's fabric is unhealthy: bandwidth degraded, a route unhealthy, or an incorrect
  configuration that retraining the links may fix (insufficient NVLinks, GPU state invalid, a value not known here).
  The GPU reset ladder repairs it.
- ``fabric.config`` (``config``): an incorrect configuration that says how the system is set up: an incorrect system
  GUID or chassis serial number, incompatible GPU firmware, an invalid location. No reset fixes it; a human does.
- ``fabric.partition`` (``unpartitioned``): the GPU is in no NVLink partition (PARTITION_ASSIGNED false, or the
  INCORRECT_CONFIGURATION_NO_PARTITION value that NVIDIA deprecated for it): as often an administrator's choice as a
  mistake, so it is recorded for on-call and never acted on.

Route recovery and access-timeout recovery under way are the driver's own recoveries, not faults. A Summary of
Unhealthy or Limited Capacity counts as a fabric problem only when no configuration or partition verdict explains it
(a misconfigured GPU also reads Unhealthy).

Values: nvml.h ``NVML_GPU_FABRIC_HEALTH_MASK_*`` (nvidia-ml-py 13.615.71), written as integers so an older
nvidia-ml-py without those names still imports; NVIDIA open-gpu-kernel-modules ``NVLINK_INBAND_FABRIC_HEALTH_MASK_*``
(NO_PARTITION marked deprecated beside PARTITION_ASSIGNED). Dump wording: nvidia-smi(1) "Fabric" and the real GB200
capture in tests/data (``nvsmi_k8sti_gb200_fabric_degraded.xml``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# healthMask fields, (shift, width): nvml.h NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_* / _WIDTH_*
_DEGRADED_BW = (0, 0x3)
_ROUTE_UNHEALTHY = (4, 0x3)
_INCORRECT_CONFIGURATION = (8, 0xF)
_PARTITION_ASSIGNED = (12, 0x3)
_TRUE, _FALSE = 1, 2  # the 2-bit fields: 0 not supported, 1 true, 2 false
_CONFIG_NONE = 1
NO_PARTITION = 4  # INCORRECT_CONFIGURATION_NO_PARTITION (deprecated for PARTITION_ASSIGNED)
# INCORRECT_CONFIGURATION values that describe the system's setup: fabric.config
CONFIG_VALUES: dict[int, str] = {2: "incorrect system GUID", 3: "incorrect chassis serial number",
                                 6: "incompatible GPU firmware", 7: "invalid location"}
# INCORRECT_CONFIGURATION values a link retrain may fix: fabric.gpu (with any value not listed here)
RETRAIN_VALUES: dict[int, str] = {5: "insufficient NVLinks", 8: "GPU state invalid"}
_CONFIG_WORDS = frozenset({"sysguid", "guid", "chassis", "sn", "serial", "firmware", "fw", "location"})
_ABSENT = frozenset({"", "none", "n/a", "[n/a]", "false", "no", "not supported", "[not supported]"})


@dataclass(frozen=True, slots=True)
class FabricHealth:
    problems: tuple[str, ...] = ()  # fabric.gpu, in nvidia-smi's words
    config: str = ""  # fabric.config: what is set up wrong ("" none)
    unpartitioned: bool = False  # fabric.partition


def _field(mask: int, spec: tuple[int, int]) -> int:
    return (mask >> spec[0]) & spec[1]


def from_mask(mask: int) -> FabricHealth:
    """NVML's healthMask -> the three verdicts."""
    problems = []
    if _field(mask, _DEGRADED_BW) == _TRUE:
        problems.append("bandwidth degraded")
    if _field(mask, _ROUTE_UNHEALTHY) == _TRUE:
        problems.append("route unhealthy")
    value = _field(mask, _INCORRECT_CONFIGURATION)
    config = CONFIG_VALUES.get(value, "")
    if value > _CONFIG_NONE and not config and value != NO_PARTITION:
        problems.append(f"incorrect configuration {RETRAIN_VALUES.get(value, value)}")
    unpartitioned = value == NO_PARTITION or _field(mask, _PARTITION_ASSIGNED) == _FALSE
    return FabricHealth(tuple(problems), config, unpartitioned)


def _said(value: str | None) -> str:
    return "" if value is None or value.strip().lower() in _ABSENT else value.strip()[:60]


def from_dump(*, summary: str | None = None, bandwidth: str | None = None, route_unhealthy: bool | None = None,
              incorrect_configuration: str | None = None, partition_assigned: bool | None = None) -> FabricHealth:
    """A dump's Fabric > Health lines (each None where the dump has no such line) -> the three verdicts. nvidia-smi
    prints an incorrect configuration by its name ("No Partition", "Incorrect SysGuid", "Incompatible GPU Firmware",
    "Insufficient NvLinks", ...)."""
    problems = []
    if _said(bandwidth).lower() == "degraded":
        problems.append("bandwidth degraded")
    if route_unhealthy:
        problems.append("route unhealthy")
    said = _said(incorrect_configuration)
    words = set(re.split(r"[^a-z]+", said.lower()))
    unpartitioned = "partition" in words or partition_assigned is False
    config = said if said and not unpartitioned and not words.isdisjoint(_CONFIG_WORDS) else ""
    if said and not config and "partition" not in words:
        problems.append(f"incorrect configuration {said}")
    mood = _said(summary)
    if mood.lower() in ("unhealthy", "limited capacity") and (problems or not (config or unpartitioned)):
        problems.insert(0, f"summary {mood}")
    return FabricHealth(tuple(problems), config, unpartitioned)
