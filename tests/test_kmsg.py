"""Kernel-log rules: real NVIDIA driver lines in every prefix -> exactly the right events."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg import gpu_map_entry, line_signals, parse_line, records, to_signal
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef
from tests.conftest import T0

REAL = (Path(__file__).parent / "data" / "kmsg_real.log").read_text().splitlines()

EXPECTED = [
    ("xid", "13", "0000:cb:00.0"), ("xid", "13", "0000:38:00.0"), ("xid", "13", "0000:01:00.0"),
    ("xid", "31", "0000:08:00.0"), ("xid", "43", "0000:38:00.0"), ("xid", "45", "0000:dc:00.0"),
    ("xid", "48", "0000:07:00.0"), ("xid", "63", "0000:10:1c.0"), ("xid", "64", "0000:07:00.0"),
    ("xid", "79", "0000:2b:00.0"), ("xid", "79", "0000:91:00.0"), ("xid", "149", "0009:01:00.0"),
    ("xid", "154", "0009:01:00.0"), ("xid", "119", "0002:00:00.0"), ("sxid", "24007", "0000:c3:00.0"),
    ("sxid", "26006", "0004:00:00.0"), ("gpu.lost", None, "0000:2b:00.0"), ("gpu.lost", None, "0000:b3:00.0"),
    None, None, ("gpu.init_failed", None, "0000:0a:00.0"), None, None,
]


class TestParseLine:
    @pytest.mark.parametrize(("line", "expected"), list(zip(REAL, EXPECTED, strict=True)),
                             ids=[f"line{i + 1}" for i in range(len(REAL))])
    def test_real_lines(self, line: str, expected: tuple[str, str | None, str] | None) -> None:
        ev = parse_line(line)
        if expected is None:
            assert ev is None
        else:
            assert ev is not None and (ev.kind, ev.code, ev.pci) == expected

    def test_pid_and_process_are_kept_as_evidence(self) -> None:
        ev = parse_line(REAL[3])
        assert ev is not None and ev.details["pid"] == "169800" and ev.details["process"] == "chrome"

    def test_unknown_pid_is_not_evidence(self) -> None:
        ev = parse_line(REAL[0])
        assert ev is not None and "pid" not in ev.details and "process" not in ev.details

    def test_process_names_with_colons_and_brackets(self) -> None:
        ev = parse_line(REAL[13])
        assert ev is not None and ev.details["process"] == "nvc:[driver]"

    def test_raw_kmsg_sequence_number_distinguishes_repeats(self) -> None:
        ev = parse_line(REAL[11])
        assert ev is not None and ev.seq == "1234"

    def test_sxid_fatal_class_and_link(self) -> None:
        ev = parse_line(REAL[14])
        assert ev is not None and ev.details["fatal"] == "Fatal" and ev.details["link"] == "28"
        linkless = parse_line(REAL[15])
        assert linkless is not None and "link" not in linkless.details

    @pytest.mark.parametrize("detail", [
        "[1108.858290] nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Severity 1 Engine instance 62 "
        "Sub-engine instance 00",
        "[1108.858295] nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Data {0x10000000, 0x00000000, 0x0}",
    ], ids=["severity-line", "data-line"])
    def test_the_detail_lines_after_an_sxid_are_not_another_fault(self, detail: str) -> None:
        """The driver follows an SXid line with its Severity and Data lines (kernel_log_formats.md 4): they carry
        no Fatal/Non-fatal word and name no new fault, so they are not signals of their own."""
        assert parse_line(detail) is None

    @pytest.mark.parametrize("line", [
        "[ 2288.712311] NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1292)",
        "4,812,2288712311,-;NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1292)\\x0aNVRM: installed in this "
        "system is not supported by the 304.116\\x0aNVRM: NVIDIA Linux driver release.",
        "[    5.123456] NVRM: The NVIDIA GPU 0000:41:00.0 (PCI ID: 10de:2684)",
        "6,900,5123456,-;NVRM: The NVIDIA GPU 0000:41:00.0 (PCI ID: 10de:2684)\\x0aNVRM: installed in this system "
        "requires use of the NVIDIA open kernel modules.",
        "[   3.000000] NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:0a65) installed",
        "               NVRM: The NVIDIA GPU 0009:01:00.0 installed in the system",
        "[ 2288.712311] NVRM: installed in this system is not supported by the 304.116",
        "               NVRM: fallen off the bus and is not responding to commands.",
    ], ids=["not-supported-dmesg", "not-supported-kmsg-record", "needs-open-modules-dmesg",
            "needs-open-modules-kmsg-record", "not-supported-older-wording", "memory-onlining-second-line",
            "not-supported-second-line", "fallen-off-third-line"])
    def test_a_gpu_the_driver_does_not_support_is_not_a_lost_gpu(self, line: str) -> None:
        """``The NVIDIA GPU <bdf> (PCI ID: ...)`` opens the driver's configuration complaints (GPU not supported
        by this release, needs the open kernel modules; nv.c): the GPU is on the bus, and restarting the node will
        not make this driver support it. Only the lost-GPU message has the address alone on its first line."""
        assert parse_line(line) is None

    @pytest.mark.parametrize(("line", "pci"), [
        ("[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0", "0000:b3:00.0"),
        ("[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0  ", "0000:b3:00.0"),
        ("<4>[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0", "0000:b3:00.0"),
        ("4,812,1843308145,-;NVRM: The NVIDIA GPU 0000:b3:00.0\\x0aNVRM: (PCI ID: 10de:26b5) installed in this "
         "system has\\x0aNVRM: fallen off the bus and is not responding to commands.", "0000:b3:00.0"),
        ("[  900.000000] NVRM: GPU at 0000:01:00.0 has fallen off the bus.", "0000:01:00.0"),
        ("May 18 19:02:39 kernel: NVRM: GPU 0000:2b:00.0: GPU has fallen off the bus.", "0000:2b:00.0"),
    ], ids=["dmesg-first-line", "trailing-blanks", "dmesg-r", "kmsg-record", "older-driver", "gpu-colon-form"])
    def test_the_fallen_off_the_bus_message_is_a_lost_gpu_in_every_form(self, line: str, pci: str) -> None:
        ev = parse_line(line)
        assert ev is not None and (ev.kind, ev.code, ev.pci) == ("gpu.lost", None, pci)

    def test_gpu_map_line(self) -> None:
        assert gpu_map_entry(REAL[18]) == ("0000:01:00.0", "GPU-8a47641b-dff6-f09f-618c-c3eb58fb430d")


class TestToSignal:
    def test_xid_signal_maps_pci_to_gpu_and_classifies(self, catalog: Catalog) -> None:
        ev = parse_line(REAL[6])
        assert ev is not None
        c = NodeContext(cluster="c1", node="n1", catalog=catalog)
        c.register_gpus([GpuRef(index=1, uuid="GPU-1", pci_bus_id="0000:07:00.0")])
        s = to_signal(ev, c, observed_at=T0)
        assert s.check == "xid" and s.code == "48" and s.gpu is not None and s.gpu.index == 1
        assert s.severity.value == "critical" and s.message.startswith("NVRM: Xid (PCI:0000:07:00): 48")

    def test_same_line_same_id(self, catalog: Catalog) -> None:
        ev = parse_line(REAL[6])
        assert ev is not None
        c = NodeContext(cluster="c1", node="n1", catalog=catalog)
        a = to_signal(ev, c, observed_at=T0)
        b = to_signal(ev, c, observed_at=T0)
        assert a.id == b.id

    @pytest.mark.parametrize(("line", "pci", "minor"), [
        ("[    6.000000] NVRM: GPU 0000:0a:00.0: RmInitAdapter failed! (0x24:0x72:1568)", "0000:0a:00.0", None),
        ("[    6.000100] NVRM: GPU 0000:0a:00.0: rm_init_adapter failed, device minor number 5", "0000:0a:00.0", "5"),
        ("Mar  4 09:12:41 gpu-node-7 kernel: NVRM: RmInitAdapter failed! (0x25:0xffff:1207)", None, None),
        ("kernel: NVRM: rm_init_adapter failed for device bearing minor number 0", None, "0"),
    ], ids=["rminitadapter", "rm-init-adapter-minor", "no-address", "older-minor-form"])
    def test_a_gpu_the_driver_failed_to_initialise_is_an_operator_fault_needing_a_reboot(
            self, catalog: Catalog, line: str, pci: str | None, minor: str | None) -> None:
        """NVRM ``RmInitAdapter failed`` (gpu-operator issue 1146): the GPU is unusable until at least a reboot."""
        ev = parse_line(line)
        assert ev is not None and (ev.kind, ev.pci, ev.details.get("minor")) == ("gpu.init_failed", pci, minor)
        s = to_signal(ev, NodeContext(cluster="c1", node="n1", catalog=catalog), observed_at=T0)
        fc = catalog.classify(check=s.check, code=s.code, message=s.message)
        assert (fc.category, fc.domain.value, fc.known) == ("node_reboot_required", "operator", True)

    @pytest.mark.parametrize("line", [
        "[  912.112233] NVRM: knvlinkDiscoverPostRxDetLinks_GH100: Getting peer0's postRxDetLinkMask failed!",
        "kernel: NVRM: knvlinkDiscoverPostRxDetLinks_GB100_REV2: Getting peer17 postRxDetLinkMask failed!",
        "[  912.112240] NVRM: knvlinkUpdatePostRxDetectLinkMask_IMPL: Failed to update Rx Detect Link mask!",
    ], ids=["gh100-peer0", "gb100-peer17", "update-mask"])
    def test_the_driver_wedged_in_nvlink_discovery_is_a_node_fault_needing_a_reboot(
            self, catalog: Catalog, line: str) -> None:
        """gpud's nvlink_driver_wedge signatures (repair: reboot the system); an ordinary NVLink line is not one."""
        ev = parse_line(line)
        assert ev is not None and (ev.kind, ev.pci) == ("nvlink.driver_wedge", None)
        s = to_signal(ev, NodeContext(cluster="c1", node="n1", catalog=catalog), observed_at=T0)
        fc = catalog.classify(check=s.check, code=s.code, message=s.message)
        assert (fc.category, fc.known, s.gpu) == ("node_reboot_required", True, None)
        assert parse_line("[  913.0] NVRM: NVLink link training completed") is None

    def test_xid154_carries_recovery_action_into_classification(self, catalog: Catalog) -> None:
        ev = parse_line(REAL[12])
        assert ev is not None
        s = to_signal(ev, NodeContext(cluster="c1", node="n1", catalog=catalog), observed_at=T0)
        assert s.details["recovery_action"] == "Drain and Reset"
        assert catalog.classify(check=s.check, code=s.code, message=s.message).category == "gpu_drain_reset_required"

    def test_noise_in_bulk_yields_only_fault_lines(self) -> None:
        lines = REAL * 1000
        events = [e for e in map(parse_line, lines) if e is not None]
        assert len(events) == 19 * 1000


def test_signals_kmsg_cli_prints_one_signal_per_fault_line() -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app
    from breakfix.schemas.signal import Signal

    path = Path(__file__).parent / "data" / "kmsg_real.log"
    result = CliRunner().invoke(app, ["signals", "kmsg", str(path), "--node", "n1", "--cluster", "c1"])
    assert result.exit_code == 0, result.output
    signals = [Signal.model_validate_json(x) for x in result.stdout.splitlines()]
    assert len(signals) == 19
    assert {s.check for s in signals} == {"xid", "sxid", "gpu.lost", "gpu.init_failed"}
    assert all(s.node == "n1" and s.cluster == "c1" and s.source.value == "kmsg" for s in signals)


# Real lines of the forms kmsg_real.log lacks, verbatim from their public sources (tests/data/SOURCES.md,
# kmsg_real_forms.log): gpud test data, NVSentinel's SXid tests, imbue-ai/cluster-health, talosctl dmesg output pasted
# in vllm #40652 and open-gpu-kernel-modules #1118, and NVIDIA's Xid documentation. (kind, code, PCI, details subset);
# None: no event. A GPU-to-UUID line is no event either: test_every_form_of_the_gpu_uuid_line_is_learned.
FORMS = (Path(__file__).parent / "data" / "kmsg_real_forms.log").read_text().splitlines()
FORMS_EXPECTED: list[tuple[str, str | None, str | None, dict[str, str]] | None] = [
    None, None,
    ("xid", "43", "0000:38:00.0", {"pid": "2924364", "process": "pt_main_thread"}),
    ("gpu.lost", None, "0000:18:00.0", {}),
    ("sxid", "20009", "0000:06:00.0", {"fatal": "Non-fatal", "link": "4", "switch": "0"}),
    ("sxid", "26006", "0004:00:00.0", {"text": "SOE HALT data[0] = 0x               0"}),
    ("sxid", "20009", "0000:06:00.0", {"fatal": "Non-fatal", "switch": "1"}),
    None,
    ("xid", "94", "0000:0f:00.0", {"pid": "2503421", "process": "python3"}),
    ("xid", "64", "0000:0f:00.0", {"text": "Row Remapper Error: (0x00000002eebc4100) - All reserved rows for bank "
                                           "are remapped"}),
    ("sxid", "12028", "0000:85:00.0", {"fatal": "Non-fatal", "link": "61", "switch": "2"}),
    None, None,
    ("xid", "62", "0000:48:00.0", {}),
    ("xid", "119", "0000:0b:00.0", {"pid": "11431", "process": "gpu-feature-dis"}),
    None, None,
    ("xid", "14", "0000:03:00.0", {"text": "Channel 00000001"}),
]


class TestRealForms:
    @pytest.mark.parametrize(("line", "expected"), list(zip(FORMS, FORMS_EXPECTED, strict=True)),
                             ids=[f"line{i + 1}" for i in range(len(FORMS))])
    def test_each_real_line_is_exactly_its_event(
            self, line: str, expected: tuple[str, str | None, str | None, dict[str, str]] | None) -> None:
        ev = parse_line(line)
        if expected is None:
            assert ev is None
            return
        assert ev is not None and (ev.kind, ev.code, ev.pci) == expected[:3]
        assert {k: ev.details.get(k) for k in expected[3]} == expected[3]

    def test_a_fallen_off_gpu_without_its_domain_is_in_domain_0000(self) -> None:
        """gpud's fallback regexes take the domain as optional (``NVRM: GPU 18:00.0: GPU has fallen off the bus.``,
        components/accelerator/nvidia/xid/kmsg_test.go); the three-line form too."""
        for line in (FORMS[3], "[ 1843.308145] NVRM: The NVIDIA GPU 18:00.0"):
            ev = parse_line(line)
            assert ev is not None and (ev.kind, ev.pci) == ("gpu.lost", "0000:18:00.0")

    @pytest.mark.parametrize(("line", "expected"), [
        (FORMS[0], ("0000:9b:00.0", "GPU-509665ad-b600-ac93-3616-d754b23d636d")),
        (FORMS[11], ("0000:48:00.0", "GPU-5fc0bcec-c2e1-38dc-8994-2a9f9f3b709e")),
        (FORMS[16], ("0000:03:00.0", "GPU-b850f46d-d5ea-c752-ddf3-c4453e44d3f7")),
        (FORMS[1], None),
        ("[  412.331] NVRM: GPU at 0000:01:00.0 has fallen off the bus.", None),
    ], ids=["dmesg-T", "talosctl", "nvidia-doc-without-PCI", "rate-limit-notice", "old-fallen-off-form"])
    def test_every_form_of_the_gpu_uuid_line_is_learned(self, line: str, expected: tuple[str, str] | None) -> None:
        """Older drivers print the PCI-to-UUID line without ``PCI:`` (NVIDIA's Xid documentation: ``NVRM: GPU at
        0000:03:00: GPU-b850f46d-...``): the UUID is learned all the same, so the Xids after it name their GPU."""
        assert gpu_map_entry(line) == expected

    def test_a_mig_compute_instance_is_kept_beside_its_gpu_instance(self) -> None:
        """kernel_rc.c krcReportXid prints ``(PCI:%04x:%02x:%02x GPU-I:%02u GPU-CI:%02u)`` when the Xid is
        attributed to a compute instance."""
        ev = parse_line("NVRM: Xid (PCI:0000:3b:00 GPU-I:01 GPU-CI:02): 13, pid=9, name=a, Graphics Exception")
        assert ev is not None and (ev.code, ev.pci) == ("13", "0000:3b:00.0")
        assert (ev.details["GPU_I_ID"], ev.details["GPU_CI_ID"]) == ("1", "2")

    def test_a_crlf_or_nul_padded_line_reads_like_the_plain_one(self) -> None:
        plain = parse_line(REAL[10])
        for line in (REAL[10] + "\r", REAL[10] + "\r\n", REAL[10] + "\x00\x00\x00", "\x00\x00" + REAL[10]):
            assert parse_line(line) == plain
        for tail in ("\r", " ", "\x00"):
            ev = parse_line("NVRM: Xid (PCI:0000:04:00): 69" + tail)
            assert ev is not None and (ev.code, ev.message) == ("69", "NVRM: Xid (PCI:0000:04:00): 69")

    def test_a_line_cut_inside_its_pid_and_glued_to_the_next_names_no_process(self) -> None:
        """The driver prints ``pid=%u`` or ``pid='<unknown>'``; a record cut mid-line and glued to the next one keeps
        its code and GPU, and the glued text is never taken for a pid or a process name."""
        ev = parse_line("[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unkn[  219.471050] NVRM: Xid "
                        "(PCI:0000:07:00): 64, pid='<unknown>', name=<unknown>, Dynamic Page Retirement")
        assert ev is not None and (ev.code, ev.pci) == ("48", "0000:07:00.0")
        assert "pid" not in ev.details and "process" not in ev.details

    @pytest.mark.parametrize(("line", "codes"), [
        ("[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unkn[  219.471050] NVRM: Xid (PCI:0000:07:00): 64, "
         "pid='<unknown>', name=<unknown>, Dynamic Page Retirement", [("xid", "48"), ("xid", "64")]),
        ("NVRM: Xid (PCI:0000:3b:00): 79, pid=12, name=pt, GPU has fallen oNVRM: Xid (PCI:0000:86:00): 48, pid=9, "
         "name=x, An uncorrectable double bit error", [("xid", "79"), ("xid", "48")]),
        ("[ 5.1] nvidia-nvswitch2: SXid (PCI:0000:05:00.0): 24007, Fatal, Link 44 sourcetrack timeout error (Non-fat"
         "[ 5.2] NVRM: Xid (PCI:0000:18:00): 74, pid=1, name=x, NVLink: fatal error detected on link 2",
         [("sxid", "24007"), ("xid", "74")]),
        ("NVRM: The NVIDIA GPU 0000:01:00.0\\x0aNVRM: (PCI ID: 10de:2330) installed in this system has"
         "\\x0aNVRM: fallen off the bus and is not responding to commands.", [("gpu.lost", None)]),
    ], ids=["dmesg-times", "bare-records", "sxid-then-xid", "kmsg-joined-lines-stay-one-record"])
    def test_a_record_glued_to_the_next_is_read_as_two(self, line: str, codes: list[tuple[str, str | None]]) -> None:
        """A record cut short and glued to the next one (a log copy that lost a newline) loses neither: each record
        is read on its own. The lines of one /dev/kmsg record, joined by ``\\x0a``, stay one record."""
        events = [parse_line(r) for r in records(line)]
        assert [(e.kind, e.code) for e in events if e is not None] == codes


def test_signals_kmsg_cli_reads_the_real_forms_with_their_gpus_and_talos_times() -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app
    from breakfix.schemas.signal import Signal

    path = Path(__file__).parent / "data" / "kmsg_real_forms.log"
    result = CliRunner().invoke(app, ["signals", "kmsg", str(path), "--node", "n1", "--boot-time",
                                      "2026-04-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    got = [Signal.model_validate_json(x) for x in result.stdout.splitlines()]
    assert [(s.check, s.code) for s in got] == [(e[0], e[1]) for e in FORMS_EXPECTED if e is not None]
    by_code = {s.code: s for s in got}
    assert by_code["62"].gpu is not None and by_code["62"].gpu.uuid == "GPU-5fc0bcec-c2e1-38dc-8994-2a9f9f3b709e"
    assert by_code["14"].gpu is not None and by_code["14"].gpu.uuid == "GPU-b850f46d-d5ea-c752-ddf3-c4453e44d3f7"
    assert by_code["119"].observed_at.isoformat() == "2026-04-22T21:30:51.494604+00:00"
    assert "time_source" not in by_code["119"].details, "a talosctl stamp is the kernel's own time"


@pytest.mark.parametrize(("line", "severity"), [
    ("nvidia-nvswitch0: SXid (PCI:0004:00:00.0): 26006, SOE HALTED", "fatal"),
    ("nvidia-nvswitch0: SXid (PCI:0004:00:00.0): 26008, SOE Watchdog error", "warning"),
    (REAL[14], "fatal"),
    (FORMS[4], "warning"),
], ids=["soe-halt-always-fatal-without-its-word", "soe-watchdog", "fatal-word", "non-fatal-word"])
def test_an_sxid_signal_has_the_catalogs_severity(line: str, severity: str, catalog: Catalog) -> None:
    """The link-less SXid lines carry no Fatal/Non-fatal word (NVSentinel sxid_handler_test.go); 26006 SOE_HALT is
    always fatal (sxid_catalog.csv), so its signal must not say "warning" while its class says fatal."""
    ev = parse_line(line)
    assert ev is not None
    s = to_signal(ev, NodeContext(cluster="c1", node="n1", catalog=catalog), observed_at=T0)
    assert s.severity.value == severity
    assert s.severity is catalog.classify(check="sxid", code=s.code, message=s.message).severity


def test_signals_kmsg_reads_both_glued_records_with_their_own_ids_at_the_lines_time(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app
    from breakfix.schemas.signal import Signal

    log = tmp_path / "glued.log"
    log.write_text("2026-04-01T10:00:00+00:00 gpu-1 kernel: NVRM: Xid (PCI:0000:07:00): 48, pid='<unkn"
                   "NVRM: Xid (PCI:0000:07:00): 64, pid='<unknown>', name=<unknown>, Dynamic Page Retirement\n")
    result = CliRunner().invoke(app, ["signals", "kmsg", str(log), "--node", "n1"])
    assert result.exit_code == 0, result.output
    got = [Signal.model_validate_json(x) for x in result.stdout.splitlines()]
    assert [s.code for s in got] == ["48", "64"]
    assert got[0].id != got[1].id and got[0].observed_at == got[1].observed_at
    assert all(s.gpu is not None and s.gpu.pci_bus_id == "0000:07:00.0" for s in got)
    assert all("time_source" not in s.details for s in got), "the line's own time, not the reader's now"


# A record a driver record is glued after (a log copy that lost a newline), verbatim from kernel_log_formats.md 2 and 4
# (gpu-operator #1146, NVSentinel's SXid tests), with the event it is.
GLUED_AFTER = {
    "after-xid": ("Dec  2 11:38:47 worker4 kernel: [  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unknown>', "
                  "name=<unknown>, An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer "
                  "at physAddr 0x7fffa8860 partition 7, subpartition 1.", ("xid", "48")),
    "after-sxid": ("[ 1108.858286] nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Fatal, Link 28 sourcetrack "
                   "timeout error (First)", ("sxid", "24007")),
}
# Every other driver record the rules read (kernel_log_formats.md 3 and 5; kmsg_real.log, gpud's kmsg tests), with its
# event: each starts a record of its own when it follows another one on the same line.
DRIVER_RECORDS = {
    "gpu-colon-fallen-off": ("[  219.480000] NVRM: GPU 0000:07:00.0: GPU has fallen off the bus.", "gpu.lost"),
    "older-gpu-at-fallen-off": ("[  900.000000] NVRM: GPU at 0000:01:00.0 has fallen off the bus.", "gpu.lost"),
    "domainless-fallen-off": ("NVRM: GPU 18:00.0: GPU has fallen off the bus.", "gpu.lost"),
    "the-nvidia-gpu-first-line": ("[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0", "gpu.lost"),
    "the-nvidia-gpu-kmsg-joined": ("NVRM: The NVIDIA GPU 0000:b3:00.0\\x0aNVRM: (PCI ID: 10de:26b5) installed in this "
                                   "system has\\x0aNVRM: fallen off the bus and is not responding to commands.",
                                   "gpu.lost"),
    "rminitadapter-failed": ("[    6.000000] NVRM: GPU 0000:0a:00.0: RmInitAdapter failed! (0x24:0x72:1568)",
                             "gpu.init_failed"),
    "rm-init-adapter-failed-minor": ("[    6.000100] NVRM: GPU 0000:0a:00.0: rm_init_adapter failed, device minor "
                                     "number 5", "gpu.init_failed"),
    "rminitadapter-failed-no-address": ("NVRM: RmInitAdapter failed! (0x25:0xffff:1207)", "gpu.init_failed"),
    "nvlink-discovery-wedged": ("[  912.112233] NVRM: knvlinkDiscoverPostRxDetLinks_GH100: Getting peer0's "
                                "postRxDetLinkMask failed!", "nvlink.driver_wedge"),
    "nvlink-rx-detect-mask-wedged": ("[  912.112240] NVRM: knvlinkUpdatePostRxDetectLinkMask_IMPL: Failed to update Rx "
                                     "Detect Link mask!", "nvlink.driver_wedge"),
}
GPU_UUID_LINE = "[  219.470990] NVRM: GPU at PCI:0000:07:00: GPU-8a47641b-dff6-f09f-618c-c3eb58fb430d"


def _at(_line: str) -> tuple[datetime, str]:
    return T0, ""


class TestGluedDriverRecords:
    @pytest.mark.parametrize("second", list(DRIVER_RECORDS), ids=list(DRIVER_RECORDS))
    @pytest.mark.parametrize("first", list(GLUED_AFTER), ids=list(GLUED_AFTER))
    def test_a_driver_record_glued_after_an_xid_or_sxid_is_a_record_of_its_own(
            self, catalog: Catalog, first: str, second: str) -> None:
        """A fallen-off-the-bus, GPU-init-failed or NVLink-wedged record glued after an Xid or SXid record is cut
        off like a second Xid (its dmesg time with it): neither fault is lost, and each signal has its own id."""
        (head, head_event), (tail, kind) = GLUED_AFTER[first], DRIVER_RECORDS[second]
        assert records(head + tail) == [head, tail]
        sigs, bad = line_signals(head + tail, NodeContext(cluster="c1", node="n1", catalog=catalog), observed_at=_at,
                                 discriminator="f:1")
        assert [(s.check, s.code) for s in sigs] == [head_event, (kind, None)] and bad == []
        assert sigs[0].id != sigs[1].id

    @pytest.mark.parametrize("first", list(GLUED_AFTER), ids=list(GLUED_AFTER))
    def test_a_gpu_uuid_line_glued_after_a_record_is_learned_and_the_record_kept(
            self, catalog: Catalog, first: str) -> None:
        """The PCI-to-UUID line is a record of its own too: glued after an Xid or SXid it neither swallows that record
        (read whole, the line would be taken for the UUID line alone) nor is lost."""
        head, head_event = GLUED_AFTER[first]
        assert records(head + GPU_UUID_LINE) == [head, GPU_UUID_LINE]
        c = NodeContext(cluster="c1", node="n1", catalog=catalog)
        sigs, bad = line_signals(head + GPU_UUID_LINE, c, observed_at=_at, discriminator="f:1")
        assert [(s.check, s.code) for s in sigs] == [head_event] and bad == []
        assert c.gpus_by_pci["0000:07:00.0"].uuid == "GPU-8a47641b-dff6-f09f-618c-c3eb58fb430d"

    def test_driver_records_glued_together_are_each_read(self) -> None:
        """No Xid needed: the init failure and the minor-number line after it, then a lost GPU, are three records."""
        line = (DRIVER_RECORDS["rminitadapter-failed"][0] + DRIVER_RECORDS["rm-init-adapter-failed-minor"][0]
                + DRIVER_RECORDS["gpu-colon-fallen-off"][0])
        events = [parse_line(r) for r in records(line)]
        assert [(e.kind, e.pci, e.details.get("minor")) for e in events if e is not None] == [
            ("gpu.init_failed", "0000:0a:00.0", None), ("gpu.init_failed", "0000:0a:00.0", "5"),
            ("gpu.lost", "0000:07:00.0", None)]

    @pytest.mark.parametrize("line", [
        "4,812,1843308145,-;NVRM: The NVIDIA GPU 0000:b3:00.0\\x0aNVRM: (PCI ID: 10de:26b5) installed in this system "
        "has\\x0aNVRM: fallen off the bus and is not responding to commands.",
        "6,900,6000000,-;NVRM: GPU 0000:0a:00.0: RmInitAdapter failed! (0x24:0x72:1568)\\x0aNVRM: GPU 0000:0a:00.0: "
        "rm_init_adapter failed, device minor number 5",
        "NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
        "[ 2288.7] NVRM: Xid (PCI:0000:01:00): 79, pid=1, name=x, GPU has fallen off the bus.[ 2288.712311] NVRM: The "
        "NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1292)",
        "[16450076.435595] NVRM: Xid (PCI:0002:00:00): 119, pid=1582259, name=nvc:[driver], Timeout after 6s of "
        "waiting for RPC response from GPU1 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20802a02 0x8)."
        "[16450076.435600] NVRM: GPU1 GSP RPC buffer contains function 76 (GSP_RM_CONTROL) and data "
        "0x0000000020802a02 0x0000000000000008.",
        "[ 1108.858286] nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Fatal, Link 28 sourcetrack timeout error "
        "(First)NVRM: knvlinkCoreShutdownDeviceLinks: link 3 is not in L2",
    ], ids=["kmsg-joined-fallen-off-record", "kmsg-joined-line-that-reads-like-a-record", "xid79-text-says-fallen-off",
            "xid-then-driver-not-supported-message", "xid119-then-gsp-rpc-history", "sxid-then-nvlink-chatter"])
    def test_what_starts_no_driver_record_is_no_cut_and_the_record_reads_as_before(self, line: str) -> None:
        """The lines of one /dev/kmsg record, joined by ``\\x0a``, are one record whatever they say; an Xid's own text
        (``GPU has fallen off the bus``), and driver chatter the rules do not read, cut nothing: the line stays one
        record and reads as it did before any driver record started one."""
        assert records(line) == [line]
