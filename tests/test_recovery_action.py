"""The GPU recovery action (the driver's own remediation verdict, R570+) read live from NVML and from dcgm-exporter,
giving the signals an ``nvidia-smi -q`` dump of the same verdict gives, so the correlator holds one fault.

Inputs: NVML field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION (230) through the faithful ``FakeNvml``; dcgm-exporter
pages carrying DCGM_FI_DEV_GPU_RECOVERY_ACTION (1523; ``tests/data/dcgm_recovery_action_page.txt``, sources in
``tests/data/SOURCES.md``); the real ``nvidia-smi -q`` capture ``tests/data/nvsmi_1gpu_v100_r570.txt`` cut after its
``GPU Recovery Action`` line, and the real XID 154 line of ``tests/data/kmsg_real.log``. Values:
nvmlDeviceGpuRecoveryAction_t (NVIDIA nvml.h; nvidia-ml-py 13.615.71 pynvml.py NVML_GPU_RECOVERY_ACTION_*).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pynvml
import pytest
from structlog.testing import capture_logs

from breakfix.collectors.context import NodeContext
from breakfix.collectors.dcgm import RECOVERY, RECOVERY_CHECK, DcgmRules
from breakfix.collectors.edge import EdgeFilter
from breakfix.collectors.kmsg import parse_line, to_signal
from breakfix.collectors.nvml import NvmlSource
from breakfix.collectors.nvml_api import FakeGpu, FakeNvml
from breakfix.collectors.nvsmi import nvsmi_signals, parse_nvsmi
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.signal import Signal
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
R570 = (DATA / "nvsmi_1gpu_v100_r570.txt").read_text()
# The capture through its GPU identity, up to its "GPU Recovery Action" line: no ECC, PCI or MIG sections, whose
# own readings a dump adds to its signal's details (nvsmi.nvsmi_signals), so the three sources can match exactly.
DUMP_HEAD = R570[: R570.index("    GPU Recovery Action")]
UUID = "GPU-a2db1942-76d6-3572-10f1-3d0b0e1fbd72"  # the capture's GPU
BUS = "00000001:00:00.0"
CHECKS = ("gpu.lost", "gpu.reset_required")
PAGE = (DATA / "dcgm_recovery_action_page.txt").read_text()
XID154 = next(line for line in (DATA / "kmsg_real.log").read_text().splitlines() if "): 154," in line)

# NVML_GPU_RECOVERY_ACTION_* -> (faulted check, code, action name as nvidia-smi reads it, catalog category); the
# other of gpu.lost / gpu.reset_required reads healthy. 5 (RECOVER_IMEX_DOMAIN: its number and its name give one code)
# and numbers no driver defines take the nvsmi path's cautious unknown code: never healthy, never an automatic action.
TABLE = [
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_NONE, None, None, None, None, id="0-none-healthy"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, "gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET",
                 "Reset", "gpu_reset_required", id="1-gpu-reset"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT, "gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT", "Reboot",
                 "node_reboot_required", id="2-node-reboot"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P, "gpu.reset_required", "DCGM_FR_GPU_RECOVERY_DRAIN_P2P",
                 "Drain P2P", "gpu_drain_reset_required", id="3-drain-p2p"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET, "gpu.reset_required",
                 "DCGM_FR_GPU_RECOVERY_DRAIN_RESET", "Drain and Reset", "gpu_drain_reset_required",
                 id="4-drain-and-reset"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN, "gpu.reset_required",
                 "DCGM_FR_GPU_RECOVERY_RECOVER_IMEX_DOMAIN", "Recover IMEX Domain", "unknown_fault",
                 id="5-recover-imex-domain-cautious"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET, "gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET",
                 "Bus Reset", "gpu_reset_required", id="6-bus-reset"),
    pytest.param(pynvml.NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT, "gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT",
                 "System Reboot", "node_reboot_required", id="7-system-reboot"),
    pytest.param(99, "gpu.reset_required", "DCGM_FR_GPU_RECOVERY_99", "99", "unknown_fault", id="99-unknown-cautious"),
]
ACTIONS = [0, 1, 2, 3, 4, 5, 6, 7, 99]


def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


def recovery_states(states: list[Signal]) -> list[Signal]:
    return sorted((s for s in states if s.check in CHECKS), key=lambda s: s.check)


def seen(states: list[Signal]) -> list[tuple[object, ...]]:
    """What the correlator acts on, per recovery check: state, code, severity, details, GPU."""
    return [(s.check, s.healthy, s.code, s.severity, s.details, s.gpu) for s in recovery_states(states)]


def nvsmi_states(c: NodeContext, action: int) -> list[Signal]:
    return nvsmi_signals(parse_nvsmi(DUMP_HEAD + f"    GPU Recovery Action                   : {action}\n"), c, T0)


def nvml_states(c: NodeContext, action: int | None) -> list[Signal]:
    fake = FakeNvml([FakeGpu(uuid=UUID, pci_bus_id=BUS, recovery_action=action)])
    return NvmlSource(fake, c).collect(T0, 0.0).states


def dcgm_page(value: object, name: str = RECOVERY[0]) -> str:
    return (f"# TYPE {name} gauge\n{name}{{gpu=\"0\",UUID=\"{UUID}\",pci_bus_id=\"{BUS}\",device=\"nvidia0\","
            f"modelName=\"Tesla V100-PCIE-16GB\",hostname=\"n1\",DCGM_FI_DRIVER_VERSION=\"570.124.06\"}} {value}\n")


def dcgm_states(c: NodeContext, value: object, name: str = RECOVERY[0]) -> list[Signal]:
    return DcgmRules(c).apply(dcgm_page(value, name), T0, 0.0).states


def assert_verdict(catalog: Catalog, states: list[Signal], check: str | None, code: str | None, name: str | None,
                   category: str | None) -> None:
    got = recovery_states(states)
    assert [s.check for s in got] == list(CHECKS), "both checks are read every time: a gone verdict clears"
    bad = [s for s in got if not s.healthy]
    if check is None:
        assert bad == [] and all(s.code is None for s in got)
        return
    (s,) = bad
    assert (s.check, s.code, s.details.get("recovery_action")) == (check, code, name)
    fc = catalog.classify(check=s.check, code=s.code)
    assert (fc.category, s.severity) == (category, fc.severity)


def assert_dcgm_verdict(catalog: Catalog, states: list[Signal], code: str | None, name: str | None,
                        category: str | None) -> None:
    """dcgm-exporter's reading of the field: one check of its own, faulted with the verdict's code or healthy."""
    (s,) = [s for s in states if s.check == RECOVERY_CHECK]
    assert not [x for x in states if x.check in CHECKS], "never the nvml source's checks: it must not clear them"
    if code is None:
        assert s.healthy and s.code is None
        return
    assert (s.healthy, s.code, s.details.get("recovery_action")) == (False, code, name)
    fc = catalog.classify(check=s.check, code=s.code)
    assert (fc.category, s.severity) == (category, fc.severity)


class TestNvmlRecoveryAction:
    @pytest.mark.parametrize(("action", "check", "code", "name", "category"), TABLE)
    def test_each_recovery_action_reads_as_the_nvsmi_check_code_and_class(
            self, catalog: Catalog, action: int, check: str | None, code: str | None, name: str | None,
            category: str | None) -> None:
        assert_verdict(catalog, nvml_states(ctx(catalog), action), check, code, name, category)

    def test_a_verdict_is_sent_once_and_cleared_when_the_driver_reads_none_again(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(2)
        src = NvmlSource(fake, ctx(catalog))
        edge = EdgeFilter(resync_s=3600)
        sent = edge.apply(src.collect(T0, 0.0), T0)
        fake.gpus[1].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET
        for t in (1, 2):
            sent += edge.apply(src.collect(T0 + timedelta(seconds=t), t), T0 + timedelta(seconds=t))
        fake.gpus[1].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_NONE  # the GPU was reset
        sent += edge.apply(src.collect(T0 + timedelta(seconds=3), 3), T0 + timedelta(seconds=3))
        assert [(s.check, s.healthy, s.code, s.gpu.index if s.gpu else None) for s in sent] == [
            ("gpu.reset_required", False, "DCGM_FR_GPU_RECOVERY_DRAIN_RESET", 1),
            ("gpu.reset_required", True, None, 1)]

    def test_a_verdict_that_changes_moves_the_fault_to_its_check(self, catalog: Catalog) -> None:
        """XID 154 "from 0x2 (Node Reboot Required) to 0x1 (GPU Reset Required)": gpu.lost clears, reset raises."""
        fake = FakeNvml.hgx(1)
        src = NvmlSource(fake, ctx(catalog))
        fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT
        assert [(s.check, s.code) for s in src.collect(T0, 0.0).states if not s.healthy] == [
            ("gpu.lost", "DCGM_FR_GPU_RECOVERY_REBOOT")]
        fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET
        assert [(s.check, s.code) for s in src.collect(T0, 1.0).states if not s.healthy] == [
            ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET")]

    @pytest.mark.parametrize("absent", [
        pytest.param(lambda g: setattr(g, "recovery_action", None), id="field-not-supported-pre-r570"),
        pytest.param(lambda g: g.field_returns.update({230: pynvml.NVML_ERROR_INVALID_ARGUMENT}),
                     id="field-id-unknown-to-driver"),
        pytest.param(lambda g: g.fail.update({"nvmlDeviceGetFieldValues": pynvml.NVMLError_FunctionNotFound()}),
                     id="library-without-field-values"),
        pytest.param(lambda g: g.fail.update({"nvmlDeviceGetFieldValues": pynvml.NVMLError_NotSupported()}),
                     id="call-not-supported"),
    ])
    def test_a_driver_without_the_field_says_nothing_logs_once_and_is_not_asked_again(
            self, catalog: Catalog, absent: Callable[[FakeGpu], object]) -> None:
        fake = FakeNvml.hgx(4)
        for g in fake.gpus:
            absent(g)
        src = NvmlSource(fake, ctx(catalog))
        with capture_logs() as logs:
            cycles = [src.collect(T0 + timedelta(seconds=t), float(t)) for t in range(3)]
        assert [s for c in cycles for s in c.states if not s.healthy] == [], "no fault, no crash"
        assert all(s.code is None and not s.details for c in cycles for s in recovery_states(c.states))
        assert {s.check for s in cycles[-1].states} >= {"gpu.lost", "ecc.dbe"}, "the GPU's other readings go on"
        assert [e["event"] for e in logs if "recovery" in e["event"]] == ["gpu_recovery_action_unavailable"]
        assert src.recovery_absent == {0, 1, 2, 3}
        fake.gpus[0].fail["nvmlDeviceGetFieldValues"] = pynvml.NVMLError_GpuIsLost()  # would show if asked
        assert [s.check for s in src.collect(T0 + timedelta(seconds=9), 9.0).states if not s.healthy] == []

    @pytest.mark.parametrize("error", [pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_UNKNOWN,
                                       pynvml.NVML_ERROR_NO_DATA], ids=["no-permission", "unknown", "no-data"])
    def test_a_read_that_fails_after_a_verdict_keeps_it_never_clears_it(self, catalog: Catalog, error: int) -> None:
        fake = FakeNvml.hgx(1)
        src = NvmlSource(fake, ctx(catalog))
        edge = EdgeFilter(resync_s=3600)
        fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET
        sent = edge.apply(src.collect(T0, 0.0), T0)
        fake.gpus[0].field_returns[pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION] = error  # the field's own nvmlReturn
        with capture_logs() as logs:
            for t in (1, 2):
                sent += edge.apply(src.collect(T0 + timedelta(seconds=t), t), T0 + timedelta(seconds=t))
        assert [(s.check, s.healthy, s.code) for s in sent] == [
            ("gpu.reset_required", False, "DCGM_FR_GPU_RECOVERY_RESET")], "no clearing, no second fault"
        assert len([e for e in logs if e["event"] == "gpu_recovery_action_unavailable"]) == 1
        del fake.gpus[0].field_returns[pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        fake.gpus[0].recovery_action = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
        assert [(s.check, s.healthy) for s in edge.apply(src.collect(T0 + timedelta(seconds=3), 3.0),
                                                         T0 + timedelta(seconds=3))] == [("gpu.reset_required", True)]

    def test_a_gpu_lost_while_the_field_is_read_is_lost_not_unsupported(self, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(1)
        fake.gpus[0].fail["nvmlDeviceGetFieldValues"] = pynvml.NVMLError_GpuIsLost()
        src = NvmlSource(fake, ctx(catalog))
        assert [(s.check, s.code) for s in src.collect(T0, 0.0).states if not s.healthy] == [("gpu.lost", None)]
        assert src.recovery_absent == set()


class TestDcgmRecoveryAction:
    @pytest.mark.parametrize(("action", "check", "code", "name", "category"), TABLE)
    def test_each_recovery_action_reads_as_the_nvsmi_check_code_and_class(
            self, catalog: Catalog, action: int, check: str | None, code: str | None, name: str | None,
            category: str | None) -> None:
        assert_dcgm_verdict(catalog, dcgm_states(ctx(catalog), action), code, name, category)

    def test_the_deprecated_field_name_an_older_counters_csv_uses_is_read_too(self, catalog: Catalog) -> None:
        states = dcgm_states(ctx(catalog), 4, name="DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION")
        assert [(s.check, s.code) for s in states if not s.healthy] == [
            (RECOVERY_CHECK, "DCGM_FR_GPU_RECOVERY_DRAIN_RESET")]

    @pytest.mark.parametrize("value", ["9223372036854775792", "9223372036854775794", "140737488355328", "NaN"],
                             ids=["int64-blank", "int64-not-supported", "fp64-blank", "nan"])
    def test_blank_sentinels_say_nothing(self, catalog: Catalog, value: str) -> None:
        rules = DcgmRules(ctx(catalog))
        assert rules.apply(dcgm_page(value), T0, 0.0).states == [] and rules.skipped == 0

    @pytest.mark.parametrize("value", ["-1", "1.5", "4294967296"], ids=["negative", "fraction", "over-uint32"])
    def test_a_value_that_is_no_recovery_action_is_skipped_and_counted(self, catalog: Catalog, value: str) -> None:
        rules = DcgmRules(ctx(catalog))
        assert rules.apply(dcgm_page(value), T0, 0.0).states == []
        assert rules.skipped == 1 and "no recovery action" in rules.reasons[0]

    def test_a_verdict_is_sent_once_and_cleared_when_the_exporter_reads_none_again(self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        edge = EdgeFilter(resync_s=3600)
        sent = []
        for t, value in enumerate((0, 2, 2, 0)):
            at = T0 + timedelta(seconds=30 * t)
            sent += edge.apply(rules.apply(dcgm_page(value), at, 30.0 * t), at)
        assert [(s.check, s.healthy, s.code) for s in sent] == [
            (RECOVERY_CHECK, False, "DCGM_FR_GPU_RECOVERY_REBOOT"), (RECOVERY_CHECK, True, None)]

    def test_recovery_action_page_gives_each_gpu_its_verdict_as_dcgms_own_health_watch_does(
            self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        cycle = rules.apply(PAGE, T0, 0.0)
        assert rules.skipped == 0
        faults = {(s.gpu.index if s.gpu else None, s.check, s.code) for s in cycle.states if not s.healthy}
        assert faults == {
            (1, RECOVERY_CHECK, "DCGM_FR_GPU_RECOVERY_RESET"),
            (1, "dcgm.health", "DCGM_FR_GPU_RECOVERY_RESET"),  # DCGM's DRIVER watch over the same field
            (2, RECOVERY_CHECK, "DCGM_FR_GPU_RECOVERY_REBOOT"),
            (3, RECOVERY_CHECK, "DCGM_FR_GPU_RECOVERY_DRAIN_P2P"),
            (3, "dcgm.health", "DCGM_FR_GPU_RECOVERY_DRAIN_P2P"),
            (4, RECOVERY_CHECK, "DCGM_FR_GPU_RECOVERY_DRAIN_RESET"),
            (5, RECOVERY_CHECK, "DCGM_FR_GPU_RECOVERY_RECOVER_IMEX_DOMAIN"),
        }
        healthy = {(s.gpu.index if s.gpu else None, s.check) for s in cycle.states if s.healthy}
        assert {(0, RECOVERY_CHECK), (7, RECOVERY_CHECK)} <= healthy
        assert not [s for s in cycle.states if s.gpu and s.gpu.index == 6], "a blank value says nothing"
        for s in cycle.states:
            if not s.healthy and s.check != "dcgm.health":
                assert s.details["recovery_action"] and s.message.startswith("dcgm-exporter: GPU recovery action")

    @pytest.mark.parametrize(("gpu", "category"), [(1, "gpu_reset_required"), (3, "gpu_drain_reset_required")],
                             ids=["gpu-reset-fail", "drain-p2p-warn"])
    def test_the_field_and_dcgms_driver_watch_over_it_are_one_incident(self, catalog: Catalog, gpu: int,
                                                                        category: str) -> None:
        from breakfix.correlator.grouping import Correlator

        core = Correlator(catalog)
        for s in DcgmRules(ctx(catalog)).apply(PAGE, T0, 0.0).states:
            if s.gpu is not None and s.gpu.index == gpu:
                core.ingest(s, T0)
        (inc,) = core.state.incidents.values()
        assert (inc.category, dict(inc.counts)) == (category, {"xid:154": 2})


class TestOneFaultAcrossSources:
    @pytest.mark.parametrize("action", ACTIONS)
    def test_nvsmi_nvml_and_dcgm_give_one_verdict_the_same_check_code_severity_and_details(
            self, catalog: Catalog, action: int) -> None:
        dump = seen(nvsmi_states(ctx(catalog), action))
        assert len(dump) == 2
        assert seen(nvml_states(ctx(catalog), action)) == dump
        (dcgm,) = [s for s in dcgm_states(ctx(catalog), action) if s.check == RECOVERY_CHECK]
        faulted = [(code, severity, details, gpu) for _c, healthy, code, severity, details, gpu in dump if not healthy]
        assert ([] if dcgm.healthy else [(dcgm.code, dcgm.severity, dcgm.details, dcgm.gpu)]) == faulted

    def test_the_exporter_reading_none_never_clears_the_nvml_sources_gpu_lost(self, catalog: Catalog) -> None:
        """NVML says the GPU needs a node reboot (or is lost) while dcgm-exporter still reads 0, as a lagging or
        restarted exporter does: the incident stays open, the two sources never clear each other."""
        from breakfix.correlator.grouping import Correlator

        c = ctx(catalog)
        core = Correlator(catalog)
        for s in nvml_states(c, pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT):
            core.ingest(s, T0)
        for s in dcgm_states(c, 0):
            core.ingest(s, T0 + timedelta(seconds=30))
        (inc,) = core.state.incidents.values()
        assert inc.status.value == "open" and inc.category == "node_reboot_required"

    @pytest.mark.parametrize(("action", "category"), [
        (pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, "gpu_reset_required"),
        (pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT, "node_reboot_required"),
        (pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET, "gpu_drain_reset_required"),
    ], ids=["gpu-reset", "node-reboot", "drain-and-reset"])
    def test_the_correlator_holds_one_incident_for_the_verdict_from_every_source_and_the_xid_154(
            self, catalog: Catalog, action: int, category: str) -> None:
        from breakfix.correlator.grouping import Correlator

        c = ctx(catalog)
        live, dump = nvml_states(c, action), nvsmi_states(c, action)
        signals = live + dump + dcgm_states(c, action)
        name = {1: "GPU Reset Required", 2: "Node Reboot Required", 4: "Drain and Reset"}[action]
        line = XID154.replace("PCI:0009:01:00", "PCI:0001:00:00").replace("(Drain and Reset)", f"({name})")
        ev = parse_line(line)  # the real GB200 line, moved to the capture's GPU, with this verdict
        assert ev is not None
        signals.append(to_signal(ev, c, observed_at=T0))
        core = Correlator(catalog)
        for s in signals:
            core.ingest(s, T0)
        (inc,) = core.state.incidents.values()
        assert inc.category == category and set(inc.counts) == {"xid:154"}
        assert [s.id for s in live if not s.healthy] == [s.id for s in dump if not s.healthy], \
            "a dump of the live verdict is the same observation (nvsmi signals are nvml-source signals)"
