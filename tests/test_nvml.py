"""The nvml source against a faithful fake that raises real pynvml errors, and real NVML on a GPU."""

from __future__ import annotations

import asyncio
import ctypes
import shutil
from collections.abc import Callable
from datetime import timedelta

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle, EdgeFilter
from breakfix.collectors.nvml import NvmlSource
from breakfix.collectors.nvml_api import FakeGpu, FakeNvml, real_nvml
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.signal import Signal
from tests.conftest import T0, wait_until


def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog, labels={"rack": "r1"})


# nvmlGpuFabricInfo_v2 healthMask of a healthy GB200 fabric: bandwidth not degraded, no route or access-timeout
# recovery, route healthy (each FALSE, 2), configuration NONE (1) (nvml.h NVML_GPU_FABRIC_HEALTH_MASK_*)
HEALTHY_FABRIC = 2 | 2 << 2 | 2 << 4 | 2 << 6 | 1 << 8


def faults(cycle: Cycle) -> set[tuple[str, int | None, str | None]]:
    return {(s.check, s.gpu.index if s.gpu else None, s.component) for s in cycle.states if not s.healthy}


def poll(src: NvmlSource, t: float = 0.0) -> Cycle:
    return src.collect(T0 + timedelta(seconds=t), t)


class TestEnumeration:
    def test_gpus_enumerated_with_index_uuid_and_normalised_pci(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(8)
        c = ctx(catalog)
        src = NvmlSource(fake, c, expected_gpus=8)
        cycle = poll(src)
        assert [r.index for r in src.refs.values()] == list(range(8))
        assert src.refs[0].pci_bus_id == "0000:18:00.0" and src.refs[0].uuid == fake.gpus[0].uuid
        assert c.gpu(pci="0000:18:00.0").uuid == fake.gpus[0].uuid
        assert faults(cycle) == set()

    def test_missing_gpu_is_a_count_mismatch(self, catalog: Catalog) -> None:
        src = NvmlSource(FakeNvml.hgx(7), ctx(catalog), expected_gpus=8)
        assert ("gpu.count_mismatch", None, None) in faults(poll(src))

    def test_no_driver_raises_library_not_found(self, catalog: Catalog) -> None:
        with pytest.raises(pynvml.NVMLError_LibraryNotFound):
            NvmlSource(FakeNvml([], library_missing=True), ctx(catalog)).start()


FAULT_CASES = [
    pytest.param(lambda g: setattr(g, "dbe_volatile", 1), "ecc.dbe", None, id="volatile-dbe"),
    pytest.param(lambda g: setattr(g, "remapped", (0, 1, 1, 0)), "row_remap.pending", None, id="remap-pending"),
    pytest.param(lambda g: setattr(g, "remapped", (0, 1, 0, 1)), "row_remap.failure", None, id="remap-failure"),
    pytest.param(lambda g: setattr(g, "retired_pending", 1), "retired_pages.pending", None, id="retired-pending"),
    pytest.param(lambda g: setattr(g, "retired_pages", 61), "retired_pages.limit", None, id="retired-pages-limit"),
    pytest.param(lambda g: setattr(g, "clocks_event_reasons", pynvml.nvmlClocksEventReasonHwSlowdown),
                 "clock.hw_slowdown", None, id="hw-slowdown"),
    pytest.param(lambda g: setattr(g, "clocks_event_reasons", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
                 "clock.hw_thermal", None, id="hw-thermal"),
    pytest.param(lambda g: setattr(g, "clocks_event_reasons", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown),
                 "clock.power_brake", None, id="power-brake"),
    pytest.param(lambda g: setattr(g, "temperature", 90), "temperature.slowdown", None, id="over-slowdown-temp"),
    pytest.param(lambda g: setattr(g.links[3], "up", False), "nvlink.down", "nvlink3", id="nvlink-down"),
    pytest.param(lambda g: setattr(g, "fabric", (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_ERROR_UNKNOWN)),
                 "fabric.gpu", None, id="fabric-training-failed"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~0x3 | 1),  # DEGRADED_BW_TRUE
                 "fabric.gpu", None, id="fabric-bandwidth-degraded"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0x3 << 4) | (1 << 4)),  # ROUTE_UNHEALTHY
                 "fabric.gpu", None, id="fabric-route-unhealthy"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (5 << 8)),
                 "fabric.gpu", None, id="fabric-insufficient-nvlinks"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (8 << 8)),
                 "fabric.gpu", None, id="fabric-gpu-state-invalid"),
    # how the system is set up, not the GPU's state: fabric.config, which no reset fixes
    # in no NVLink partition (the deprecated NO_PARTITION value, or PARTITION_ASSIGNED false): recorded, no action
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (4 << 8)),
                 "fabric.partition", None, id="fabric-no-partition"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC | (2 << 12)),
                 "fabric.partition", None, id="fabric-partition-not-assigned"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (2 << 8)),
                 "fabric.config", None, id="fabric-incorrect-sysguid"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (3 << 8)),
                 "fabric.config", None, id="fabric-incorrect-chassis-sn"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (6 << 8)),
                 "fabric.config", None, id="fabric-incompatible-gpu-fw"),
    pytest.param(lambda g: setattr(g, "fabric_health", HEALTHY_FABRIC & ~(0xF << 8) | (7 << 8)),
                 "fabric.config", None, id="fabric-invalid-location"),
    pytest.param(lambda g: setattr(g, "sram_threshold_exceeded", True), "ecc.sram_threshold", None,
                 id="sram-threshold-exceeded"),
    pytest.param(lambda g: setattr(g, "lost", True), "gpu.lost", None, id="gpu-is-lost"),
    pytest.param(lambda g: setattr(g, "reset_required", True), "gpu.reset_required", None, id="reset-required"),
    pytest.param(lambda g: setattr(g, "recovery_action", pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET),
                 "gpu.reset_required", None, id="recovery-action-gpu-reset"),
    pytest.param(lambda g: setattr(g, "recovery_action", pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT),
                 "gpu.lost", None, id="recovery-action-node-reboot"),
]


class TestPolledChecks:
    @pytest.mark.parametrize(("mutate", "check", "component"), FAULT_CASES)
    def test_fault_appears_then_clears(self, catalog: Catalog, mutate, check: str, component: str | None) -> None:  # type: ignore[no-untyped-def]
        fake = FakeNvml.hgx(8)
        fake.gpus[2].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS)
        fake.gpus[2].fabric_health = HEALTHY_FABRIC
        src = NvmlSource(fake, ctx(catalog))
        assert faults(poll(src)) == set()
        mutate(fake.gpus[2])
        assert faults(poll(src, 10)) == {(check, 2, component)}
        fake.gpus[2] = FakeNvml.hgx(8).gpus[2]
        fake.gpus[2].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS)
        fake.gpus[2].fabric_health = HEALTHY_FABRIC
        assert faults(poll(src, 20)) == set()

    def test_a_configuration_fault_holds_while_the_mask_is_unread_and_clears_when_it_reads_none(
            self, catalog: Catalog) -> None:
        """A v2 call that fails once (the source falls back to v1) says nothing about the configuration: the fault
        is neither repeated nor cleared (a clear mid-repair would let the node return with it), until read again."""
        fake = FakeNvml.hgx(8)
        fake.gpus[2].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS)
        fake.gpus[2].fabric_health = HEALTHY_FABRIC & ~(0xF << 8) | (2 << 8)  # incorrect system GUID
        src = NvmlSource(fake, ctx(catalog))
        assert faults(poll(src)) == {("fabric.config", 2, None)}
        fake.gpus[2].fabric_health = None
        assert [s for s in poll(src, 10).states if s.check == "fabric.config"] == []
        fake.gpus[2].fabric_health = HEALTHY_FABRIC
        assert faults(poll(src, 20)) == set()

    def test_a_driver_with_only_the_v1_fabric_call_is_judged_on_state_and_status(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(8)
        fake.gpus[2].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS)  # fabric_health None
        src = NvmlSource(fake, ctx(catalog))
        assert faults(poll(src)) == set()
        fake.gpus[2].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_ERROR_UNKNOWN)
        assert faults(poll(src, 10)) == {("fabric.gpu", 2, None)}

    @pytest.mark.parametrize("training", [pynvml.NVML_GPU_FABRIC_STATE_NOT_STARTED,
                                          pynvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS], ids=["not-started", "in-progress"])
    def test_a_fabric_still_training_is_a_fault_only_after_its_hold(self, catalog: Catalog, training: int) -> None:
        """Every NVSwitch GPU reads NOT_STARTED, then IN_PROGRESS, while Fabric Manager trains the fabric after a
        boot or a reset: a fault only when it outlasts fabric_hold_s, and each new training gets a fresh hold."""
        fake = FakeNvml.hgx(2)
        fake.gpus[1].fabric = (training, pynvml.NVML_SUCCESS)
        src = NvmlSource(fake, ctx(catalog))
        assert ("fabric.gpu", 1, None) not in faults(poll(src, 100))
        assert ("fabric.gpu", 1, None) not in faults(poll(src, 399))
        assert ("fabric.gpu", 1, None) in faults(poll(src, 400)), "300 s in training: Fabric Manager is not done"
        fake.gpus[1].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS)
        assert ("fabric.gpu", 1, None) not in faults(poll(src, 410))
        fake.gpus[1].fabric = (training, pynvml.NVML_SUCCESS)  # a GPU reset retrains it
        assert ("fabric.gpu", 1, None) not in faults(poll(src, 1000))
        assert ("fabric.gpu", 1, None) in faults(poll(src, 1300))

    @pytest.mark.parametrize(("attr", "check", "delta"), [
        ("pcie_replay", "pcie.replay", 500), ("sbe_volatile", "ecc.sbe", 1000)], ids=["pcie-replay-rate", "sbe-burst"])
    def test_counter_rates_need_two_samples(self, catalog: Catalog, attr: str, check: str, delta: int) -> None:
        fake = FakeNvml.hgx(2)
        src = NvmlSource(fake, ctx(catalog))
        poll(src)
        setattr(fake.gpus[1], attr, delta)
        assert (check, 1, None) in faults(poll(src, 60))
        assert (check, 1, None) not in faults(poll(src, 120)), "a counter that stopped rising is healthy again"

    def test_nvlink_error_rate_per_link(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(1)
        src = NvmlSource(fake, ctx(catalog))
        poll(src)
        fake.gpus[0].links[5].errors[pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT] = 100
        assert faults(poll(src, 60)) == {("nvlink.errors", 0, "nvlink5")}

    def test_unsupported_reads_are_absent_not_faults(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(1)
        fake.gpus[0].fail["nvmlDeviceGetRemappedRows"] = pynvml.NVMLError_NotSupported()
        checks = {s.check for s in poll(NvmlSource(fake, ctx(catalog))).states}
        assert "row_remap.pending" not in checks and "ecc.dbe" in checks

    def test_lost_gpu_never_crashes_and_others_keep_reporting(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(8)
        src = NvmlSource(fake, ctx(catalog))
        poll(src)
        fake.gpus[4].lost = True
        fake.gpus[6].dbe_volatile = 2
        assert faults(poll(src, 5)) == {("gpu.lost", 4, None), ("ecc.dbe", 6, None)}

    @pytest.mark.parametrize("error", [pynvml.NVMLError_Unknown, pynvml.NVMLError_Timeout,
                                       pynvml.NVMLError_IrqIssue, pynvml.NVMLError_GpuNotFound],
                             ids=["unknown-error", "timeout", "irq-issue", "gpu-not-found"])
    def test_a_gpu_that_stops_answering_is_lost_after_two_samples_never_healthy(self, catalog: Catalog,
                                                                              error: type) -> None:
        """A GPU off the bus often reads "Unknown Error" (a hung GSP times out) before NVML says GpuIsLost: its
        reads are not "unsupported", so it must not go quiet or, worse, read healthy."""
        fake = FakeNvml.hgx(2)
        src = NvmlSource(fake, ctx(catalog))
        poll(src)
        fake.gpus[1].fail["nvmlDeviceGetTotalEccErrors"] = error()
        first = poll(src, 1)
        assert not [x for x in first.states if x.gpu and x.gpu.index == 1], "one unanswered sample says nothing"
        second = poll(src, 2)
        assert faults(second) == {("gpu.lost", 1, None)}
        assert "NVML" in next(x for x in second.states if x.check == "gpu.lost" and not x.healthy).message
        del fake.gpus[1].fail["nvmlDeviceGetTotalEccErrors"]
        assert ("gpu.lost", 1, None) not in faults(poll(src, 3)), "it answers again: healthy"

    def test_a_gpu_whose_calls_hang_holds_up_only_itself_and_is_lost_after_three_polls(self, catalog: Catalog
                                                                                      ) -> None:
        import threading

        fake = FakeNvml.hgx(4)
        src = NvmlSource(fake, ctx(catalog), sample_timeout_s=0.2)
        poll(src)
        hung = threading.Event()
        real = fake.nvmlDeviceGetTotalEccErrors

        def ecc(handle: object, *args: int) -> int:
            if FakeNvml.index_of(handle) == 2:
                hung.wait(10)  # the GSP does not answer
            return real(handle, *args)

        fake.nvmlDeviceGetTotalEccErrors = ecc  # type: ignore[method-assign]
        fake.gpus[0].dbe_volatile = 1
        try:
            first = poll(src, 1)
            assert faults(first) == {("ecc.dbe", 0, None)}, "the other GPUs still report, on time"
            assert not [x for x in first.states if x.gpu and x.gpu.index == 2], "nothing said about gpu2 yet"
            poll(src, 2)
            assert ("gpu.lost", 2, None) in faults(poll(src, 3))
            stuck = [t for t in threading.enumerate() if t.name == "nvml-gpu2"]
            assert stuck and all(t.daemon for t in stuck), "a hung call never keeps the process from exiting"
        finally:
            hung.set()

    def test_the_gpu_list_other_sources_trust_is_left_unknown_when_a_gpu_did_not_answer_at_start(
            self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(2)
        fake.gpus[1].fail["nvmlDeviceGetPciInfo"] = pynvml.NVMLError_Unknown()
        c = ctx(catalog)
        NvmlSource(fake, c).start()
        assert c.nvml_uuids == set(), "else the sick GPU's faults from dcgm would be dropped as another node's"
        healthy = ctx(catalog)
        NvmlSource(FakeNvml.hgx(2), healthy).start()
        assert len(healthy.nvml_uuids) == 2

    def test_signals_carry_tenant_of_the_pod_on_the_gpu(self, catalog: Catalog) -> None:
        from breakfix.schemas.common import TenantRef
        fake = FakeNvml.hgx(2)
        c = ctx(catalog)
        src = NvmlSource(fake, c)
        poll(src)
        c.set_tenants({fake.gpus[1].uuid: TenantRef(namespace="ml", pod="train-0", container="main")})
        fake.gpus[1].dbe_volatile = 1
        (s,) = [s for s in poll(src, 5).states if not s.healthy]
        assert s.tenant is not None and s.tenant.pod == "train-0" and s.labels == {"rack": "r1"}


def _healthy(fake: FakeNvml, i: int) -> None:
    fake.gpus[i] = FakeNvml.hgx(8).gpus[i]
    fake.gpus[i].fabric = (pynvml.NVML_GPU_FABRIC_STATE_COMPLETED, pynvml.NVML_SUCCESS)
    fake.gpus[i].fabric_health = HEALTHY_FABRIC


class TestReadings:
    """The daemon's poll hands the edge filter ``Reading``s (a signal built only when sent); what it sends must be
    exactly what it sent when every state was built as a signal."""

    @pytest.mark.parametrize(("mutate", "check", "component"), FAULT_CASES)
    def test_readings_send_exactly_the_signals_built_states_send(  # type: ignore[no-untyped-def]
            self, catalog: Catalog, mutate, check: str, component: str | None) -> None:
        fakes = [FakeNvml.hgx(8), FakeNvml.hgx(8)]
        for fake in fakes:
            _healthy(fake, 2)
        built, lazy = NvmlSource(fakes[0], ctx(catalog)), NvmlSource(fakes[1], ctx(catalog))
        edges = [EdgeFilter(resync_s=30.0, catalog=catalog), EdgeFilter(resync_s=30.0, catalog=catalog)]
        sent: list[list[list[dict[str, object]]]] = [[], []]
        # healthy, then the fault (read again and again, across resyncs), then healthy again, every 10 s
        plan = [None] * 3 + [mutate] * 8 + [_healthy] * 8
        for n, step in enumerate(plan):
            t = 10.0 * n
            at = T0 + timedelta(seconds=t)
            for fake in fakes:
                if step is _healthy:
                    _healthy(fake, 2)
                elif step is not None:
                    step(fake.gpus[2])
            cycles = [built.evaluate(built.read(), at, t), lazy.evaluate_readings(lazy.read(), at, t)]
            assert cycles[1].states == [] and len(cycles[1].readings) == len(cycles[0].states)
            for r, s in zip(cycles[1].readings, cycles[0].states, strict=True):
                assert (r.key, r.check, r.healthy, r.code, r.severity) == (s.fault_key(), s.check, s.healthy, s.code,
                                                                            s.severity)
            for side in (0, 1):
                sent[side].append([s.model_dump() for s in edges[side].apply(cycles[side], at)])
        assert sent[1] == sent[0]
        flat = [s for cycle in sent[0] for s in cycle]
        assert any(s["check"] == check and not s["healthy"] for s in flat), "the fault was sent"
        assert any(s["details"].get("resync") == "true" for s in flat), "a resync was sent"  # type: ignore[union-attr]

    @given(check=st.sampled_from(["xid", "nvlink.down", "thermal.slowdown", " ecc.dbe "]), healthy=st.booleans(),
           code=st.sampled_from([None, "48", "79", "DCGM_FR_NVLINK_DOWN"]),
           component=st.sampled_from([None, "", "nvlink3", " link 2 ", "   "]),
           ident=st.sampled_from(["uuid", "index", "pci", "none"]),
           tenant=st.sampled_from(["none", "pod", "endpoint"]),
           value=st.none() | st.floats(allow_nan=False, allow_infinity=False, width=32),
           message=st.sampled_from(["", "  spaced  ", "XID 48 Double Bit ECC Error"]),
           node=st.sampled_from(["n1", " n2 "]))
    @settings(max_examples=300, deadline=None)
    def test_a_reading_builds_the_signal_and_fault_key_the_context_builds_when_read(  # type: ignore[no-untyped-def]
            self, check, healthy, code, component, ident, tenant, value, message, node) -> None:
        from breakfix.schemas.catalog import default_catalog
        from breakfix.schemas.common import GpuRef, TenantRef
        from breakfix.schemas.signal import SignalSource
        uuid = "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd"
        g = {"uuid": GpuRef(index=2, uuid=uuid, pci_bus_id="0000:1a:00.0"), "index": GpuRef(index=2),
             "pci": GpuRef(pci_bus_id="0000:1a:00.0"), "none": None}[ident]
        c = NodeContext(cluster="c1", node=node, catalog=default_catalog(), labels={"rack": "r1"})
        if tenant != "none":
            c.set_tenants({uuid: TenantRef(namespace="team-a", pod="p-0",
                                           endpoint="http://p-0:8000" if tenant == "endpoint" else None)})
        kw = {"source": SignalSource.NVML, "check": check, "healthy": healthy, "at": T0, "code": code, "gpu": g,
              "component": component, "value": value, "message": message}
        r = c.reading(**kw)  # type: ignore[arg-type]
        expected = c.signal(**kw)  # type: ignore[arg-type]
        c.set_tenants({})  # what changes after the read does not reach the signal built later
        c.labels = {"rack": "r2"}
        assert r.key == expected.fault_key()
        assert (r.check, r.healthy, r.code, r.severity) == (check, expected.healthy, code, expected.severity)
        assert r.build() == expected

    def test_a_state_whose_signal_cannot_be_built_changes_nothing_and_is_tried_again(self, catalog: Catalog) -> None:
        from breakfix.schemas.common import GpuRef
        from breakfix.schemas.signal import SignalSource
        c = ctx(catalog)
        kw = {"source": SignalSource.NVML, "healthy": False, "at": T0, "gpu": GpuRef(index=0, uuid="GPU-0")}
        good = c.reading(check="nvlink.down", **kw)  # type: ignore[arg-type]
        bad = c.reading(check="nvlink.down", **kw)  # type: ignore[arg-type]
        bad._args["details"] = {"n": 1}  # not a string: the Signal refuses it
        edge = EdgeFilter()
        assert edge.apply(Cycle(readings=[bad]), T0) == []
        assert edge.stats.unbuildable == 1 and edge.faulted_keys() == []
        assert edge.apply(Cycle(readings=[good]), T0 + timedelta(seconds=1)) == [good.build()]
        assert edge.faulted_keys() == [good.key]

    def test_a_reading_that_is_not_finite_skips_its_gpu_as_a_signal_that_would_not_build_did(
            self, catalog: Catalog) -> None:
        src = NvmlSource(FakeNvml.hgx(2), ctx(catalog), expected_gpus=2)
        src.expected = float("nan")  # type: ignore[assignment]  # count_mismatch's threshold: refused when read
        with pytest.raises(ValueError, match="not finite"):
            src.evaluate_readings(src.read(), T0, 0.0)


class TestFakeFieldValues:
    """``nvmlDeviceGetFieldValues`` as nvidia-ml-py returns it: a ``c_nvmlFieldValue_t`` array, each entry with its
    own ``nvmlReturn`` (per-field errors do not raise; NVML nvml.h ``nvmlFieldValue_st``)."""

    def test_the_recovery_action_is_an_unsigned_int_field_and_an_unknown_field_is_not_supported(self) -> None:
        fake = FakeNvml.hgx(1)
        fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET
        fake.nvmlInit()
        h = fake.nvmlDeviceGetHandleByIndex(0)
        action, other = fake.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION,
                                                          (pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL, 3)])
        assert isinstance(action, pynvml.c_nvmlFieldValue_t)
        assert (action.fieldId, action.nvmlReturn, action.valueType, action.value.uiVal) == (
            230, pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, 4)
        assert (other.fieldId, other.scopeId, other.nvmlReturn) == (38, 3, pynvml.NVML_ERROR_NOT_SUPPORTED)

    def test_a_driver_before_r570_reads_the_field_not_supported_and_a_lost_gpu_raises(self) -> None:
        fake = FakeNvml.hgx(2)
        fake.gpus[0].recovery_action = None
        fake.nvmlInit()
        old, lost = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
        (v,) = fake.nvmlDeviceGetFieldValues(old, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
        assert v.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
        fake.gpus[1].lost = True
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            fake.nvmlDeviceGetFieldValues(lost, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])

    def test_a_recovery_action_never_hides_the_gpus_other_faults(self, catalog: Catalog) -> None:
        """As a dump's ``GPU Recovery Action`` does not: the other readings say what the reset is for."""
        fake = FakeNvml.hgx(1)
        fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET
        fake.gpus[0].dbe_volatile = 3
        cycle = poll(NvmlSource(fake, ctx(catalog)))
        assert faults(cycle) == {("gpu.reset_required", 0, None), ("ecc.dbe", 0, None)}
        (s,) = [s for s in cycle.states if s.check == "gpu.reset_required"]
        assert (s.code, s.details) == ("DCGM_FR_GPU_RECOVERY_RESET", {"recovery_action": "Reset"})


# c_nvmlEccSramErrorStatus_v1_t counts of a GPU past its SRAM threshold: aggregate parity 2 + SEC-DED 10, in L2 4 and
# SM 8; the volatile counts are not what the threshold counts and do not ride along
SRAM_ERRORS = {"aggregateUncParity": 2, "aggregateUncSecDed": 10, "aggregateUncBucketL2": 4,
               "aggregateUncBucketSm": 8, "volatileUncSecDed": 1, "aggregateCor": 7}
SRAM_DETAILS = {"sram_aggregate_unc": "12", "sram_aggregate_unc_parity": "2", "sram_aggregate_unc_sec_ded": "10",
                "sram_aggregate_unc_l2": "4", "sram_aggregate_unc_sm": "8", "sram_aggregate_unc_microcontroller": "0",
                "sram_aggregate_unc_pcie": "0", "sram_aggregate_unc_other": "0"}


def sram(cycle: Cycle) -> dict[int, Signal]:
    return {s.gpu.index: s for s in cycle.states if s.check == "ecc.sram_threshold" and s.gpu and
            s.gpu.index is not None}


class TestSramThreshold:
    """``nvmlDeviceGetSramEccErrorStatus`` (NVIDIA WORKFLOW_XID_48: SRAM threshold flag set -> field diag, RMA)."""

    def test_an_exceeded_sram_threshold_is_a_critical_hardware_support_fault_with_the_aggregate_counts(
            self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(2)
        fake.gpus[1].sram_threshold_exceeded = True
        fake.gpus[1].sram_errors = dict(SRAM_ERRORS)
        cycle = poll(NvmlSource(fake, ctx(catalog)))
        assert faults(cycle) == {("ecc.sram_threshold", 1, None)}
        s = sram(cycle)[1]
        assert (s.healthy, s.severity.value, s.value, s.details) == (False, "critical", 12.0, SRAM_DETAILS)
        assert "exceeded" in s.message and "parity 2, sec-ded 10, l2 4, sm 8" in s.message
        assert catalog.classify(check=s.check, code=s.code).category == "hardware_support"

    def test_a_threshold_not_exceeded_reads_healthy_on_every_gpu_every_poll(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(8)
        fake.gpus[3].sram_errors = {"aggregateUncSecDed": 3}  # errors below the threshold: counted, not a fault
        src = NvmlSource(fake, ctx(catalog))
        for t in (0, 10):
            got = sram(poll(src, t))
            assert sorted(got) == list(range(8)) and all(s.healthy for s in got.values())
        assert (got[3].value, got[3].details["sram_aggregate_unc_sec_ded"]) == (3.0, "3")

    @pytest.mark.parametrize("absent", [
        pytest.param(lambda g: setattr(g, "sram_threshold_exceeded", None), id="gpu-not-supported"),
        pytest.param(lambda g: g.fail.update({"nvmlDeviceGetSramEccErrorStatus": pynvml.NVMLError_FunctionNotFound()}),
                     id="driver-without-the-function"),
        pytest.param(lambda g: g.fail.update({"nvmlDeviceGetSramEccErrorStatus": pynvml.NVMLError_NoPermission()}),
                     id="not-root"),
        pytest.param(lambda g: g.fail.update(
            {"nvmlDeviceGetSramEccErrorStatus": pynvml.NVMLError_ArgumentVersionMismatch()}), id="struct-version"),
    ])
    def test_a_gpu_or_driver_without_the_call_is_asked_once_logged_once_and_says_nothing(
            self, catalog: Catalog, absent: Callable[[FakeGpu], object]) -> None:
        fake = FakeNvml.hgx(4)
        for g in fake.gpus[:3]:
            absent(g)
        asked: list[int] = []
        real = fake.nvmlDeviceGetSramEccErrorStatus

        def counted(handle: object, status: object) -> int:
            asked.append(FakeNvml.index_of(handle))
            return real(handle, status)

        fake.nvmlDeviceGetSramEccErrorStatus = counted  # type: ignore[method-assign]
        src = NvmlSource(fake, ctx(catalog))
        with capture_logs() as logs:
            cycles = [poll(src, t) for t in (0, 10, 20)]
        assert sorted(asked) == [0, 1, 2] + [3] * 3, "an absent call is never asked again"
        assert all(sorted(sram(c)) == [3] for c in cycles), "nothing said for the GPUs without it, never healthy"
        assert all(faults(c) == set() for c in cycles) and src.sram_absent == {0, 1, 2}
        assert sorted(e["gpu"] for e in logs if e["event"] == "gpu_sram_ecc_status_unavailable") == [0, 1, 2]
        assert {"gpu.lost", "ecc.dbe"} <= {s.check for s in cycles[-1].states if s.gpu and s.gpu.index == 0}

    def test_a_nvidia_ml_py_without_the_struct_is_absent_not_a_crash(self, catalog: Catalog,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delattr(pynvml, "c_nvmlEccSramErrorStatus_v1_t")
        src = NvmlSource(FakeNvml.hgx(2), ctx(catalog))
        cycle = poll(src)
        assert sram(cycle) == {} and faults(cycle) == set() and src.sram_absent == {0, 1}

    def test_a_read_that_fails_after_the_threshold_was_read_keeps_it_never_clears_it(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(2)
        fake.gpus[0].sram_threshold_exceeded = True
        src = NvmlSource(fake, ctx(catalog))
        edge = EdgeFilter(resync_s=3600)
        sent = edge.apply(poll(src), T0)
        for g in fake.gpus:  # GPU 1 was never read: a failed read says nothing about it
            g.fail["nvmlDeviceGetSramEccErrorStatus"] = pynvml.NVMLError_InsufficientResources()
        cycle = poll(src, 10)
        sent += edge.apply(cycle, T0 + timedelta(seconds=10))
        assert [(s.check, s.healthy, s.gpu.index if s.gpu else None) for s in sent
                if s.check == "ecc.sram_threshold"] == [("ecc.sram_threshold", False, 0)], "no clearing"
        assert sorted(sram(cycle)) == [0, 1] and src.sram_absent == set(), "a transient failure is no absence"

    def test_a_gpu_lost_while_the_sram_status_is_read_is_lost_not_unsupported(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(1)
        fake.gpus[0].fail["nvmlDeviceGetSramEccErrorStatus"] = pynvml.NVMLError_GpuIsLost()
        src = NvmlSource(fake, ctx(catalog))
        assert faults(poll(src)) == {("gpu.lost", 0, None)} and src.sram_absent == set()

    @pytest.mark.parametrize("error", [pynvml.NVMLError_Unknown, pynvml.NVMLError_Timeout],
                             ids=["unknown-error", "timeout"])
    def test_the_sram_call_alone_failing_never_makes_an_answering_gpu_lost(self, catalog: Catalog,
                                                                           error: type) -> None:
        """Every other read of the GPU answered: the optional SRAM call failing is no GPU off the bus (a node reboot
        for a failed optional read would be the costliest false positive)."""
        fake = FakeNvml.hgx(1)
        fake.gpus[0].fail["nvmlDeviceGetSramEccErrorStatus"] = error()
        src = NvmlSource(fake, ctx(catalog))
        with capture_logs() as logs:
            cycles = [poll(src, t) for t in (0, 10, 20)]
        assert all(faults(c) == set() and sram(c) == {} for c in cycles)
        assert {"gpu.lost", "ecc.dbe"} <= {s.check for s in cycles[-1].states} and src.sram_absent == set()
        assert [e["event"] for e in logs if "sram" in e["event"]] == ["gpu_sram_ecc_status_unavailable"], \
            "asked every poll (it may answer again), logged once"

    def test_the_fake_fills_pynvmls_own_struct_and_raises_the_drivers_errors(self) -> None:
        fake = FakeNvml([FakeGpu(uuid="GPU-a", pci_bus_id="00000000:18:00.0", sram_threshold_exceeded=True,
                                 sram_errors={"aggregateUncSecDed": 5, "aggregateUncBucketPcie": 5}),
                         FakeGpu(uuid="GPU-b", pci_bus_id="00000000:2a:00.0", sram_threshold_exceeded=None)])
        fake.nvmlInit()
        h0, h1 = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
        status = pynvml.c_nvmlEccSramErrorStatus_v1_t()
        assert fake.nvmlDeviceGetSramEccErrorStatus(h0, ctypes.byref(status)) == pynvml.NVML_SUCCESS
        assert (status.version, status.bThresholdExceeded, status.aggregateUncSecDed, status.aggregateUncBucketPcie,
                status.aggregateUncParity) == (pynvml.nvmlEccSramErrorStatus_v1, 1, 5, 5, 0)
        old = pynvml.c_nvmlEccSramErrorStatus_v1_t()
        old.version = 0
        with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
            fake.nvmlDeviceGetSramEccErrorStatus(h0, ctypes.byref(old))
        with pytest.raises(pynvml.NVMLError_NotSupported):
            fake.nvmlDeviceGetSramEccErrorStatus(h1, ctypes.byref(status))
        fake.gpus[0].lost = True
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            fake.nvmlDeviceGetSramEccErrorStatus(h0, ctypes.byref(status))


class TestXidEvents:
    async def test_xid_event_becomes_signal_without_blocking_the_loop(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(8)
        src = NvmlSource(fake, ctx(catalog))
        stop = asyncio.Event()
        got: list[Signal] = []
        ticks = 0

        async def consume() -> None:
            async for s in src.watch_xids(stop, lambda: T0):
                got.append(s)
                stop.set()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(consume(), name="test-xids")
        tick = asyncio.create_task(ticker(), name="test-ticker")

        async def registered() -> bool:
            return len(fake.registered) == 8

        await wait_until(registered, 5, "XID events registered on every GPU")
        await asyncio.sleep(0.2)  # let the ticker prove the loop runs while NVML waits
        fake.xid(3, 79)
        await asyncio.wait_for(task, 5)
        await tick
        assert [(s.check, s.code, s.gpu.index if s.gpu else None) for s in got] == [("xid", "79", 3)]
        assert ticks > 10, "the event loop kept running while NVML waited"

    async def test_xid_on_a_gpu_that_fell_off_keeps_its_identity(self, catalog: Catalog) -> None:
        """XID 79: the GPU is gone, so NVML cannot read its UUID from the event's handle. The event's
        handle (a new pointer object, as from nvmlEventSetWait_v2) still names the GPU it came from."""
        fake = FakeNvml.hgx(8)
        src = NvmlSource(fake, ctx(catalog))
        stop = asyncio.Event()
        got: list[Signal] = []

        async def consume() -> None:
            async for s in src.watch_xids(stop, lambda: T0):
                got.append(s)
                stop.set()

        task = asyncio.create_task(consume(), name="test-xids-lost")

        async def registered() -> bool:
            return len(fake.registered) == 8

        await wait_until(registered, 5, "XID events registered on every GPU")
        fake.gpus[3].lost = True  # fell off the bus: every read of it now raises GpuIsLost
        fake.xid(3, 79)
        await asyncio.wait_for(task, 5)
        (s,) = got
        assert s.gpu is not None and (s.gpu.index, s.gpu.uuid) == (3, fake.gpus[3].uuid)
        assert s.gpu.pci_bus_id == "0000:5d:00.0"

    def test_edge_filter_sends_the_fault_once(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(2)
        src = NvmlSource(fake, ctx(catalog))
        edge = EdgeFilter(resync_s=3600)
        sent = edge.apply(poll(src), T0)
        fake.gpus[0].dbe_volatile = 1
        sent += edge.apply(poll(src, 1), T0 + timedelta(seconds=1))
        sent += edge.apply(poll(src, 2), T0 + timedelta(seconds=2))
        fake.gpus[0].dbe_volatile = 0
        sent += edge.apply(poll(src, 3), T0 + timedelta(seconds=3))
        assert [(s.check, s.healthy) for s in sent] == [("ecc.dbe", False), ("ecc.dbe", True)]


@pytest.mark.gpu
def test_real_nvml_enumerates_and_polls_without_faults_on_a_healthy_gpu(catalog: Catalog) -> None:
    """Runs only where a GPU and driver exist (the ``gpu`` marker); skipped elsewhere with the reason."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA driver on this machine (gpu marker)")
    src = NvmlSource(real_nvml(), ctx(catalog))
    cycle = poll(src)
    assert src.refs and all(r.uuid and r.pci_bus_id for r in src.refs.values())
    assert {s.check for s in cycle.states} >= {"gpu.lost", "ecc.dbe"}


@pytest.mark.gpu
def test_real_nvml_handles_match_by_address_as_xid_events_need(catalog: Catalog) -> None:
    """A second handle for the same GPU is a new pointer object with the same address (what an event carries)."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA driver on this machine (gpu marker)")
    from breakfix.collectors.nvml_api import handle_address

    nvml = real_nvml()
    src = NvmlSource(nvml, ctx(catalog))
    src.start()
    for i, h in src.handles.items():
        again = nvml.nvmlDeviceGetHandleByIndex(i)
        assert handle_address(again) == handle_address(h) and src.event_gpu(again) == src.refs[i]


@pytest.mark.gpu
def test_real_nvml_reads_the_recovery_action_or_marks_it_absent(catalog: Catalog) -> None:
    """R570+ drivers answer NVML_FI_DEV_GET_GPU_RECOVERY_ACTION (0 on a healthy GPU); older ones do not have it,
    which is no fault and no crash."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA driver on this machine (gpu marker)")
    src = NvmlSource(real_nvml(), ctx(catalog))
    cycle = poll(src)
    assert set(src.refs) == set(src.recovery_last) | src.recovery_absent
    assert [s for s in cycle.states if s.check in ("gpu.lost", "gpu.reset_required") and not s.healthy] == []


@pytest.mark.gpu
def test_real_nvml_reads_the_sram_threshold_or_marks_it_absent(catalog: Catalog) -> None:
    """The real ``nvmlDeviceGetSramEccErrorStatus`` on every GPU: a driver and GPU that have it fill pynvml's struct
    (version 1) and the source reads the same flag; one without it (NotSupported, FunctionNotFound, NoPermission when
    not root) is absent, with no signal and no crash. A healthy GPU's threshold is not exceeded."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA driver on this machine (gpu marker)")
    from breakfix.collectors.nvml import SRAM_ABSENT

    nvml = real_nvml()
    src = NvmlSource(nvml, ctx(catalog))
    got = sram(poll(src))
    assert set(src.refs) == set(src.sram_last) | src.sram_absent and not set(src.sram_last) & src.sram_absent
    assert sorted(got) == sorted(src.sram_last)
    for i, h in src.handles.items():
        status = pynvml.c_nvmlEccSramErrorStatus_v1_t()
        try:
            nvml.nvmlDeviceGetSramEccErrorStatus(h, ctypes.byref(status))
        except SRAM_ABSENT:
            assert i in src.sram_absent
            continue
        assert status.version == pynvml.nvmlEccSramErrorStatus_v1
        assert got[i].healthy is (not status.bThresholdExceeded) is (not src.sram_last[i][0])
        assert got[i].details["sram_aggregate_unc_sec_ded"] == str(status.aggregateUncSecDed)
