"""``nvidia-smi -q`` / ``-q -x`` readers against real captures (sources in ``tests/data/SOURCES.md``): a GPU lost after
nvidia-smi opened it, an unhealthy NVLink fabric, T.Limit temperature thresholds (R535+ Hopper/Ada/Blackwell), and the
ways real captures arrive (after ``Unable to determine the device handle`` lines, cut short, one log per ``-l``
interval, indented, without the banner, through Windows), and the SRAM uncorrectable-error threshold flag (R535+)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from breakfix.cli.main import app
from breakfix.collectors.context import NodeContext
from breakfix.collectors.nvsmi import NvsmiFormatError, nvsmi_signals, parse_nvsmi
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.signal import Signal
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
LOST = (DATA / "nvsmi_k8sti_gb200_lost.xml").read_text()
FABRIC = (DATA / "nvsmi_k8sti_gb200_fabric_degraded.xml").read_text()
H100 = (DATA / "nvsmi_gpud_h100_r535_tlimit.txt").read_text()
EIGHT = (DATA / "nvsmi_8gpu_row_remap_pending.txt").read_text()
runner = CliRunner()


def rows(path: Path, *args: str) -> list[dict[str, Any]]:
    res = runner.invoke(app, ["signals", "nvsmi", str(path), "--node", "n1", *args])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


def states(catalog: Catalog, text: str) -> list[Signal]:
    return nvsmi_signals(parse_nvsmi(text), NodeContext(cluster="c1", node="n1", catalog=catalog), T0)


def faults(catalog: Catalog, text: str) -> list[tuple[str, str | None]]:
    return sorted((s.check, s.gpu.pci_bus_id if s.gpu else None) for s in states(catalog, text) if not s.healthy)


class TestLostGpu:
    def test_gpu_whose_readings_say_gpu_is_lost_is_a_lost_gpu_not_a_healthy_one(self, catalog: Catalog) -> None:
        """nvidia-smi 580 prints NVML_ERROR_GPU_IS_LOST's "GPU is lost" in place of every reading of GPU 1."""
        got = states(catalog, LOST)
        lost = [s for s in got if s.check == "gpu.lost" and s.gpu is not None and s.gpu.pci_bus_id == "0000:0b:00.0"]
        assert [(s.healthy, s.severity.value, s.details.get("nvidia_smi")) for s in lost] == [
            (False, "fatal", "GPU is lost")]
        assert faults(catalog, LOST) == [("ecc.dbe", "0000:0a:00.0"), ("gpu.lost", "0000:0b:00.0"),
                                         ("row_remap.failure", "0000:0a:00.0")]

    def test_a_reading_that_says_gpu_requires_reset_is_reset_required(self, catalog: Catalog) -> None:
        text = (DATA / "nvsmi_1gpu_v100_r570.txt").read_text().replace(
            "    ECC Errors\n", "    ECC Errors\n        Channel Repair Pending            : GPU requires reset\n", 1)
        assert faults(catalog, text) == [("gpu.reset_required", "0001:00:00.0")]

    def test_lost_gpu_in_a_text_dump_is_lost(self, catalog: Catalog) -> None:
        text = EIGHT.replace("        Pending                           : Yes",
                             "        Pending                           : [GPU is lost]")
        assert ("gpu.lost", "0000:5d:00.0") in faults(catalog, text)
        assert ("row_remap.pending", "0000:5d:00.0") not in faults(catalog, text)


class TestFabric:
    def test_fabric_health_unhealthy_is_a_fabric_fault_naming_what_is_wrong(self, catalog: Catalog) -> None:
        """Fabric State Completed / Status Success, but Health Summary Unhealthy with Route Unhealthy True."""
        fab = [s for s in states(catalog, FABRIC) if s.check == "fabric.gpu"]
        assert [(s.gpu.pci_bus_id if s.gpu else None, s.healthy) for s in fab] == [
            ("0000:0a:00.0", True), ("0000:0b:00.0", False)]
        assert fab[1].details["fabric_health"] == "summary Unhealthy, route unhealthy"

    @pytest.mark.parametrize("status", ["Unknown Error", "Timeout", "Insufficient Resources"])
    def test_fabric_status_error_string_is_a_fault(self, catalog: Catalog, status: str) -> None:
        text = LOST.replace("<status>Success</status>", f"<status>{status}</status>", 1)
        assert ("fabric.gpu", "0000:0a:00.0") in faults(catalog, text)

    def test_fabric_recovery_under_way_alone_is_no_fault(self, catalog: Catalog) -> None:
        text = FABRIC.replace("<route_unhealthy>True</route_unhealthy>", "<route_unhealthy>False</route_unhealthy>")
        text = text.replace("<summary>Unhealthy</summary>", "<summary>Healthy</summary>")
        text = text.replace("<route_recovery_in_progress>False", "<route_recovery_in_progress>True")
        assert [c for c, _ in faults(catalog, text)] == []

    def test_text_fabric_health_block_is_read_like_the_xml_one(self, catalog: Catalog) -> None:
        fabric = ("        State                             : Completed\n"
                  "        Status                            : Success\n")
        text = H100.replace(fabric, fabric + "        Health\n"
                            "            Summary                       : Limited Capacity\n"
                            "            Bandwidth                     : Degraded\n", 1)
        assert text != H100
        bad = [s for s in states(catalog, text) if s.check == "fabric.gpu" and not s.healthy]
        assert [s.details["fabric_health"] for s in bad] == ["summary Limited Capacity, bandwidth degraded"]


    @pytest.mark.parametrize("said", ["Incorrect SysGuid", "Incorrect Chassis SN", "Incompatible GPU Firmware",
                                      "Invalid Location"])
    def test_an_incorrect_configuration_no_reset_fixes_is_fabric_config_not_a_fabric_fault(
            self, catalog: Catalog, said: str) -> None:
        """The real GB200 document's healthy GPU 0 with its Incorrect Configuration set (nvml.h
        NVML_GPU_FABRIC_HEALTH_MASK_INCORRECT_CONFIGURATION_*) and the Summary Unhealthy it brings: fabric.config,
        not the fabric.gpu reset ladder."""
        text = FABRIC.replace("<summary>Healthy</summary>", "<summary>Unhealthy</summary>", 1).replace(
            "<incorrect_configuration>None</incorrect_configuration>",
            f"<incorrect_configuration>{said}</incorrect_configuration>", 1)
        got = {(s.check, s.healthy) for s in states(catalog, text) if s.gpu and s.gpu.pci_bus_id == "0000:0a:00.0"}
        assert ("fabric.config", False) in got and ("fabric.gpu", True) in got
        config = next(s for s in states(catalog, text) if s.check == "fabric.config" and not s.healthy)
        assert said in config.message and "a reset cannot fix it" in config.message
        assert catalog.classify(check=config.check, code=config.code).category == "fabric_config"

    @pytest.mark.parametrize("said", ["Insufficient NvLinks", "GPU State Invalid"])
    def test_an_incorrect_configuration_a_reset_may_fix_stays_a_fabric_fault(self, catalog: Catalog,
                                                                             said: str) -> None:
        text = FABRIC.replace("<incorrect_configuration>None</incorrect_configuration>",
                              f"<incorrect_configuration>{said}</incorrect_configuration>", 1)
        got = {(s.check, s.healthy) for s in states(catalog, text) if s.gpu and s.gpu.pci_bus_id == "0000:0a:00.0"}
        assert ("fabric.gpu", False) in got and ("fabric.config", True) in got

    @pytest.mark.parametrize(("old", "new"), [
        ("<incorrect_configuration>None</incorrect_configuration>",
         "<incorrect_configuration>No Partition</incorrect_configuration>"),
        ("<incorrect_configuration>None</incorrect_configuration>",
         "<incorrect_configuration>None</incorrect_configuration><partition_assigned>False</partition_assigned>"),
    ], ids=["no-partition-value", "partition-assigned-false"])
    def test_a_gpu_in_no_nvlink_partition_is_recorded_not_a_fault_to_repair(self, catalog: Catalog, old: str,
                                                                           new: str) -> None:
        text = FABRIC.replace("<summary>Healthy</summary>", "<summary>Unhealthy</summary>", 1).replace(old, new, 1)
        got = {(s.check, s.healthy) for s in states(catalog, text) if s.gpu and s.gpu.pci_bus_id == "0000:0a:00.0"}
        assert {("fabric.partition", False), ("fabric.gpu", True), ("fabric.config", True)} <= got
        assert catalog.classify(check="fabric.partition", code=None).category == "informational"

    def test_the_configuration_verdicts_are_said_only_where_a_dump_has_the_health_block(self, catalog: Catalog) -> None:
        assert {s.healthy for s in states(catalog, FABRIC) if s.check in ("fabric.config", "fabric.partition")} == {
            True}
        h100 = {s.check for s in states(catalog, H100) if s.check.startswith("fabric.")}
        assert h100 == {"fabric.gpu"}, "a fabric without its Health block says nothing of its configuration"


class TestTLimitTemperature:
    def test_tlimit_thresholds_give_the_slowdown_temperature(self, catalog: Catalog) -> None:
        """H100 on 535.161.08: current 29 C, T.Limit headroom 56 C, slowdown 2 C past T.Limit: slowdown at 87 C."""
        temps = [s for s in states(catalog, H100) if s.check == "temperature.slowdown"]
        assert len(temps) == 8 and all(s.healthy for s in temps)
        assert (temps[0].value, temps[0].threshold) == (29.0, 87.0)

    def test_headroom_down_to_the_slowdown_offset_is_a_fault(self, catalog: Catalog) -> None:
        text = H100.replace("GPU T.Limit Temp                  : 56 C", "GPU T.Limit Temp                  : -2 C", 1)
        hot = [s for s in states(catalog, text) if s.check == "temperature.slowdown" and not s.healthy]
        assert [(s.gpu.index if s.gpu else None, s.value, s.threshold) for s in hot] == [(0, 29.0, 29.0)]

    def test_r535_h100_dump_reads_its_real_hw_slowdown_and_power_brake(self) -> None:
        got = rows(DATA / "nvsmi_gpud_h100_r535_tlimit.txt", "--expected-gpus", "8")
        assert sorted({r["check"] for r in got}) == ["clock.hw_slowdown", "clock.power_brake"]
        assert len(got) == 16


class TestCaptureShapes:
    def test_xml_after_device_handle_lines_reads_every_gpu(self, catalog: Catalog) -> None:
        """``nvidia-smi -q -x 2>&1``: the line for a GPU it cannot open comes before the document."""
        text = "Unable to determine the device handle for GPU0000:0C:00.0: Unknown Error\n" + LOST
        read = parse_nvsmi(text)
        assert [g.sample.gpu.pci_bus_id for g in read.gpus] == ["0000:0a:00.0", "0000:0b:00.0", "0000:0c:00.0"]
        assert [g.sample.lost for g in read.gpus] == [None, "gpu.lost", "gpu.lost"]

    def test_xml_cut_short_reads_the_gpus_before_the_cut(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.xml"
        f.write_text(LOST[:LOST.index('<gpu id="0000:0B:00.0">') + 200])
        got = rows(f, "--expected-gpus", "2", "--all")
        assert {r["gpu"]["pci_bus_id"] for r in got if r["gpu"]} >= {"0000:0a:00.0"}
        assert ("ecc.dbe", False) in [(r["check"], r["healthy"]) for r in got]
        read = parse_nvsmi(f.read_text())
        assert read.attached == 2

    def test_other_xml_is_still_refused(self) -> None:
        with pytest.raises(NvsmiFormatError):
            parse_nvsmi("<?xml version='1.0'?><html><body>NVSMI LOG</body></html>")

    def test_one_log_per_interval_keeps_one_reading_per_gpu_numbered_within_its_log(self, catalog: Catalog) -> None:
        """``nvidia-smi -q -l 5``: GPU 3's remap is pending in the second log only; the latest reading wins."""
        later = EIGHT.replace("Pending                           : Yes", "Pending                           : No")
        read = parse_nvsmi(later + EIGHT)
        assert [g.sample.gpu.index for g in read.gpus] == list(range(8))
        assert [c for c, _ in faults(catalog, later + EIGHT)] == ["row_remap.pending"]
        assert [c for c, _ in faults(catalog, EIGHT + later)] == []

    def test_one_xml_document_per_interval_is_read_as_one_node(self) -> None:
        read = parse_nvsmi(LOST + LOST)
        assert [(g.sample.gpu.index, g.sample.gpu.pci_bus_id) for g in read.gpus] == [
            (0, "0000:0a:00.0"), (1, "0000:0b:00.0")]

    def test_indented_dump_reads_the_same(self, catalog: Catalog) -> None:
        indented = "".join("    " + line for line in EIGHT.splitlines(keepends=True))
        assert faults(catalog, indented) == faults(catalog, EIGHT) == [("row_remap.pending", "0000:5d:00.0")]

    def test_dump_without_its_banner_is_read(self, catalog: Catalog) -> None:
        body = EIGHT[EIGHT.index("GPU 00000000:"):]
        assert len(parse_nvsmi(body).gpus) == 8
        assert faults(catalog, body) == [("row_remap.pending", "0000:5d:00.0")]

    def test_windows_copy_with_bom_and_crlf_reads_the_same(self, catalog: Catalog) -> None:
        for text in (LOST, EIGHT):
            assert faults(catalog, "\ufeff" + text.replace("\n", "\r\n")) == faults(catalog, text)

    def test_windows_device_handle_wording_is_read(self) -> None:
        read = parse_nvsmi("Unable to detect the device handle for GPU0000:B1:00.0: Unknown Error\n")
        assert [(g.sample.gpu.pci_bus_id, g.sample.lost) for g in read.gpus] == [("0000:b1:00.0", "gpu.lost")]


class TestReadings:
    def test_pending_retirement_alone_is_a_pending_retirement(self, catalog: Catalog) -> None:
        text = LOST.replace("<pending_retirement>No</pending_retirement>",
                            "<pending_retirement>Yes</pending_retirement>", 1)
        assert ("retired_pages.pending", "0000:0a:00.0") in faults(catalog, text)

    def test_clock_reasons_without_the_hw_ones_say_nothing_about_them(self, catalog: Catalog) -> None:
        """leptonai/gpud nvidia-smi-query.535.183.01.out.0.invalid: the HW reason lines do not parse as such."""
        text = H100.replace("        HW Slowdown  ", "        Invalid HW Slowdown  ").replace(
            "            HW Thermal Slowdown", "            Invalid HW Thermal Slowdown").replace(
            "            HW Power Brake Slowdown", "            Invalid HW Power Brake Slowdown")
        assert not [s for s in states(catalog, text) if s.check.startswith("clock.")]

    @pytest.mark.parametrize("depth", [3000])
    def test_deeply_nested_input_is_read_without_a_traceback(self, catalog: Catalog, depth: int) -> None:
        text = "==============NVSMI LOG==============\nGPU 00000000:01:00.0\n" + "".join(
            " " * (i + 4) + f"Level {i} : GPU is lost\n" for i in range(depth))
        assert faults(catalog, text) == [("gpu.lost", "0000:01:00.0")]
        clocks = "==============NVSMI LOG==============\nGPU 00000000:01:00.0\n    Clocks Event Reasons\n" + "".join(
            " " * (i + 8) + "HW Slowdown : Active\n" for i in range(depth))
        assert faults(catalog, clocks) == [("clock.hw_slowdown", "0000:01:00.0")]
        xml = "<nvidia_smi_log><gpu id='0000:01:00.0'>" + "<a>" * depth + "</a>" * depth + "</gpu></nvidia_smi_log>"
        assert [g.sample.gpu.pci_bus_id for g in parse_nvsmi(xml).gpus] == ["0000:01:00.0"]


# The first H100's aggregate ECC block as nvidia-smi 535.161.08 prints it, then with its SRAM threshold exceeded after
# 2 parity and 10 SEC-DED uncorrectable SRAM errors (4 in L2, 8 in the SMs)
SRAM_NO = ("            SRAM Uncorrectable Parity     : 0\n            SRAM Uncorrectable SEC-DED    : 0\n"
           "            DRAM Correctable              : 0\n            DRAM Uncorrectable            : 0\n"
           "            SRAM Threshold Exceeded       : No\n        Aggregate Uncorrectable SRAM Sources\n"
           "            SRAM L2                       : 0\n            SRAM SM                       : 0\n")
SRAM_YES = SRAM_NO.replace("Parity     : 0", "Parity     : 2").replace("SEC-DED    : 0", "SEC-DED    : 10").replace(
    ": No", ": Yes").replace("L2                       : 0", "L2                       : 4").replace(
    "SM                       : 0", "SM                       : 8")
SRAM_DETAILS = {"sram_aggregate_unc": "12", "sram_aggregate_unc_parity": "2", "sram_aggregate_unc_sec_ded": "10",
                "sram_aggregate_unc_l2": "4", "sram_aggregate_unc_sm": "8", "sram_aggregate_unc_microcontroller": "0",
                "sram_aggregate_unc_pcie": "0", "sram_aggregate_unc_other": "0"}


def sram(catalog: Catalog, text: str) -> list[Signal]:
    return [s for s in states(catalog, text) if s.check == "ecc.sram_threshold"]


class TestSramThreshold:
    """ECC Errors / Aggregate ``SRAM Threshold Exceeded`` (NVIDIA Xid catalog WORKFLOW_XID_48: the SRAM threshold flag
    set -> run field diag, RMA; DCGM_FR_SRAM_THRESHOLD)."""

    def test_the_real_r535_h100_text_capture_reads_no_as_healthy_on_every_gpu(self, catalog: Catalog) -> None:
        got = sram(catalog, H100)
        assert len(got) == 8 and all(s.healthy and s.value == 0 for s in got)
        assert got[0].details == {k: "0" for k in SRAM_DETAILS}

    def test_a_real_xml_capture_reading_no_is_healthy_with_its_aggregate_sram_errors(self, catalog: Catalog) -> None:
        """nvsmi_1gpu_mig.xml: 3 aggregate SEC-DED SRAM errors, the threshold not exceeded."""
        (s,) = sram(catalog, (DATA / "nvsmi_1gpu_mig.xml").read_text())
        assert (s.healthy, s.value, s.details) == (True, 3.0, {
            "sram_aggregate_unc": "3", "sram_aggregate_unc_parity": "0", "sram_aggregate_unc_sec_ded": "3"})

    def test_the_real_gb200_xml_reading_n_a_says_nothing(self, catalog: Catalog) -> None:
        assert "<sram_threshold_exceeded>N/A</sram_threshold_exceeded>" in FABRIC
        assert [g.sample.sram_threshold for g in parse_nvsmi(FABRIC).gpus] == [None, None], "not read, not No"
        assert sram(catalog, FABRIC) == [] and sram(catalog, LOST) == []

    def test_a_dump_without_the_line_says_nothing(self, catalog: Catalog) -> None:
        """Drivers before R535 print no SRAM Threshold Exceeded line (nvsmi_1gpu_v100_r470.txt)."""
        (r470,) = parse_nvsmi((DATA / "nvsmi_1gpu_v100_r470.txt").read_text()).gpus
        assert r470.sample.sram_threshold is None and r470.sample.sram_counts == {}
        assert sram(catalog, (DATA / "nvsmi_1gpu_v100_r470.txt").read_text()) == []
        assert sram(catalog, H100.replace("SRAM Threshold Exceeded       : No", "SRAM Threshold Exceeded : N/A")) == []

    def test_yes_in_the_text_capture_is_a_critical_hardware_support_fault_with_the_aggregate_counts(
            self, catalog: Catalog) -> None:
        text = H100.replace(SRAM_NO, SRAM_YES, 1)
        assert text != H100
        bad = [s for s in sram(catalog, text) if not s.healthy]
        assert [(s.gpu.pci_bus_id if s.gpu else None, s.severity.value, s.value) for s in bad] == [
            ("0000:19:00.0", "critical", 12.0)]
        assert bad[0].details == SRAM_DETAILS and "parity 2, sec-ded 10, l2 4, sm 8" in bad[0].message
        assert catalog.classify(check=bad[0].check, code=bad[0].code).category == "hardware_support"
        assert len([s for s in sram(catalog, text) if s.healthy]) == 7, "the other GPUs stay healthy"

    def test_yes_in_the_xml_captures_is_the_fault_and_counts_read_n_a_are_absent_never_zero(
            self, catalog: Catalog) -> None:
        mig = (DATA / "nvsmi_1gpu_mig.xml").read_text().replace(
            "<sram_threshold_exceeded>No<", "<sram_threshold_exceeded>Yes<")
        (s,) = sram(catalog, mig)
        assert (s.healthy, s.value, s.details["sram_aggregate_unc_sec_ded"]) == (False, 3.0, "3")
        gb200 = FABRIC.replace("<sram_threshold_exceeded>N/A<", "<sram_threshold_exceeded>Yes<", 1)
        (bad,) = [s for s in sram(catalog, gb200) if not s.healthy]
        assert (bad.gpu.pci_bus_id if bad.gpu else None, bad.value, bad.details) == ("0000:0a:00.0", None, {})

    def test_the_cli_prints_the_fault_of_a_dump_with_the_flag_set(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.txt"
        f.write_text(H100.replace(SRAM_NO, SRAM_YES, 1))
        got = [r for r in rows(f) if r["check"] == "ecc.sram_threshold"]
        assert [(r["healthy"], r["severity"], r["gpu"]["index"], r["details"]["sram_aggregate_unc"]) for r in got] == [
            (False, "critical", 0, "12")]

    def test_the_dump_and_live_nvml_read_the_same_flag_and_counts_alike(self, catalog: Catalog) -> None:
        """One fact, one signal: what ``nvidia-smi -q`` prints and what ``nvmlDeviceGetSramEccErrorStatus`` fills."""
        from breakfix.collectors.nvml import NvmlSource
        from breakfix.collectors.nvml_api import FakeGpu, FakeNvml

        (dump,) = [s for s in sram(catalog, H100.replace(SRAM_NO, SRAM_YES, 1)) if not s.healthy]
        assert dump.gpu is not None and dump.gpu.uuid
        fake = FakeNvml([FakeGpu(uuid=dump.gpu.uuid, pci_bus_id="00000000:19:00.0", sram_threshold_exceeded=True,
                                 sram_errors={"aggregateUncParity": 2, "aggregateUncSecDed": 10,
                                              "aggregateUncBucketL2": 4, "aggregateUncBucketSm": 8})])
        c = NodeContext(cluster="c1", node="n1", catalog=catalog)
        (live,) = [s for s in NvmlSource(fake, c).collect(T0, 0.0).states if s.check == "ecc.sram_threshold"]
        assert (live.healthy, live.severity, live.value, live.details, live.message, live.id) == (
            dump.healthy, dump.severity, dump.value, dump.details, dump.message, dump.id)


# --- from a review ------------------------------------------------------------------------------------------------
def test_a_text_dump_cut_mid_line_reads_no_half_written_value() -> None:
    """``nvidia-smi -q`` killed by a timeout on a hung GPU: ``GPU Slowdown Temp : 8`` (of 87) is no reading."""
    from breakfix.collectors.nvsmi import parse_nvsmi

    text = (DATA / "nvsmi_1gpu_v100_r470.txt").read_text()
    cut = text[:text.index(":", text.index("GPU Slowdown Temp")) + 3]
    (gpu,) = parse_nvsmi(cut).gpus
    assert gpu.sample.slowdown is None


def test_a_gpu_that_cannot_be_opened_in_a_later_interval_is_lost_though_an_earlier_one_read_it() -> None:
    from breakfix.collectors.nvsmi import parse_nvsmi

    text = (DATA / "nvsmi_8gpu_row_remap_pending.txt").read_text()
    later = "Unable to determine the device handle for GPU0000:18:00.0: Unknown Error\n" + text
    gpus = {g.sample.gpu.pci_bus_id: g.sample.lost for g in parse_nvsmi(text + "\n" + later).gpus}
    assert gpus["0000:18:00.0"] == "gpu.lost" and len(gpus) == 8
