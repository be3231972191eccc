"""The NVLink fabric verdicts (collectors.nvlink_fabric): NVML's healthMask and a dump's Health block read alike."""

from __future__ import annotations

import pynvml
import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakfix.collectors.nvlink_fabric import FabricHealth, from_dump, from_mask

HEALTHY = 2 | 2 << 2 | 2 << 4 | 2 << 6 | 1 << 8 | 1 << 12  # every field false, configuration none, partition assigned


def config(value: int) -> int:
    return HEALTHY & ~(0xF << 8) | value << 8


MASKS = [
    pytest.param(HEALTHY, FabricHealth(), id="healthy"),
    pytest.param(0, FabricHealth(), id="nothing-supported"),
    pytest.param(HEALTHY & ~0x3 | 1, FabricHealth(("bandwidth degraded",)), id="bandwidth-degraded"),
    pytest.param(HEALTHY & ~(0x3 << 4) | 1 << 4, FabricHealth(("route unhealthy",)), id="route-unhealthy"),
    pytest.param(HEALTHY & ~(0x3 << 2) | 1 << 2, FabricHealth(), id="route-recovery-under-way-is-no-fault"),
    pytest.param(HEALTHY & ~(0x3 << 6) | 1 << 6, FabricHealth(), id="access-timeout-recovery-is-no-fault"),
    pytest.param(config(2), FabricHealth(config="incorrect system GUID"), id="sysguid"),
    pytest.param(config(3), FabricHealth(config="incorrect chassis serial number"), id="chassis-sn"),
    pytest.param(config(6), FabricHealth(config="incompatible GPU firmware"), id="gpu-firmware"),
    pytest.param(config(7), FabricHealth(config="invalid location"), id="location"),
    pytest.param(config(5), FabricHealth(("incorrect configuration insufficient NVLinks",)), id="insufficient-links"),
    pytest.param(config(8), FabricHealth(("incorrect configuration GPU state invalid",)), id="gpu-state-invalid"),
    pytest.param(config(12), FabricHealth(("incorrect configuration 12",)), id="a-value-nvml-adds-later"),
    pytest.param(config(4), FabricHealth(unpartitioned=True), id="deprecated-no-partition"),
    pytest.param(HEALTHY & ~(0x3 << 12) | 2 << 12, FabricHealth(unpartitioned=True), id="partition-not-assigned"),
]


@pytest.mark.parametrize(("mask", "health"), MASKS)
def test_a_health_mask_gives_the_fabric_config_and_partition_verdicts(mask: int, health: FabricHealth) -> None:
    assert from_mask(mask) == health


def test_the_mask_layout_is_nvmls() -> None:
    """The integers the module uses are nvml.h's (nvidia-ml-py's names, where this nvidia-ml-py has them)."""
    n = pynvml
    assert (n.NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_INCORRECT_CONFIGURATION,
            n.NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_PARTITION_ASSIGNED, n.NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_ROUTE_UNHEALTHY,
            n.NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_DEGRADED_BW) == (8, 12, 4, 0)
    assert (n.NVML_GPU_FABRIC_HEALTH_MASK_INCORRECT_CONFIGURATION_NO_PARTITION,
            n.NVML_GPU_FABRIC_HEALTH_MASK_INCORRECT_CONFIGURATION_INCOMPATIBLE_GPU_FW,
            n.NVML_GPU_FABRIC_HEALTH_MASK_PARTITION_ASSIGNED_FALSE) == (4, 6, 2)


DUMPS = [
    pytest.param({"summary": "Healthy", "bandwidth": "Full", "route_unhealthy": False,
                  "incorrect_configuration": "None"}, FabricHealth(), id="healthy"),
    pytest.param({"summary": "Unhealthy", "route_unhealthy": True},
                 FabricHealth(("summary Unhealthy", "route unhealthy")), id="route-unhealthy-names-the-summary"),
    pytest.param({"summary": "Limited Capacity", "bandwidth": "Degraded"},
                 FabricHealth(("summary Limited Capacity", "bandwidth degraded")), id="bandwidth-degraded"),
    pytest.param({"summary": "Unhealthy"}, FabricHealth(("summary Unhealthy",)), id="unexplained-unhealthy"),
    pytest.param({"summary": "Unhealthy", "incorrect_configuration": "Incorrect SysGuid"},
                 FabricHealth(config="Incorrect SysGuid"), id="configuration-explains-the-summary"),
    pytest.param({"summary": "Unhealthy", "incorrect_configuration": "Incompatible GPU FW"},
                 FabricHealth(config="Incompatible GPU FW"), id="firmware"),
    pytest.param({"summary": "Unhealthy", "incorrect_configuration": "Insufficient NvLinks"},
                 FabricHealth(("summary Unhealthy", "incorrect configuration Insufficient NvLinks")),
                 id="insufficient-links-is-a-fabric-fault"),
    pytest.param({"summary": "Unhealthy", "incorrect_configuration": "No Partition"},
                 FabricHealth(unpartitioned=True), id="no-partition"),
    pytest.param({"incorrect_configuration": "None", "partition_assigned": False}, FabricHealth(unpartitioned=True),
                 id="partition-assigned-false"),
    pytest.param({"incorrect_configuration": "N/A", "partition_assigned": None}, FabricHealth(), id="not-supported"),
]


@pytest.mark.parametrize(("lines", "health"), DUMPS)
def test_a_dumps_health_block_reads_as_the_mask_would(lines: dict[str, object], health: FabricHealth) -> None:
    assert from_dump(**lines) == health  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_any_mask_gives_a_verdict(mask: int) -> None:
    got = from_mask(mask)
    assert isinstance(got, FabricHealth)
    assert not (got.config and got.problems and any("configuration" in p for p in got.problems)), "one verdict a value"


@given(st.one_of(st.none(), st.text(max_size=80)), st.one_of(st.none(), st.text(max_size=80)),
       st.one_of(st.none(), st.text(max_size=80)), st.one_of(st.none(), st.booleans()))
def test_any_dump_text_gives_a_verdict_whose_words_are_bounded(summary: str | None, bandwidth: str | None,
                                                              config: str | None, assigned: bool | None) -> None:
    got = from_dump(summary=summary, bandwidth=bandwidth, incorrect_configuration=config, partition_assigned=assigned)
    assert len(got.config) <= 60 and all(len(p) <= 90 for p in got.problems)
