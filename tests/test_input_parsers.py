"""Real-world inputs at the edges (issue 13): MIG and bare Xid lines, anchored dmesg times, dcgm-exporter pages
with bad samples and MIG rows, Ethernet and odd-state IB ports, ibstat and nvidia-smi -q readers, and the
format refusals of every ``breakfix signals`` reader."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from breakfix.cli.main import app
from breakfix.collectors.context import NodeContext
from breakfix.collectors.dcgm import DcgmRules
from breakfix.collectors.edge import Cycle
from breakfix.collectors.fabric import FabricRules, FabricThresholds, PortSample, port_sample
from breakfix.collectors.ibstat import parse_ibstat
from breakfix.collectors.ibstate import PHYS_STATES, PORT_STATES, parse_state
from breakfix.collectors.kmsg import parse_line
from breakfix.collectors.nvsmi import nvsmi_signals, parse_nvsmi
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
runner = CliRunner()


def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


def rows(args: list[str]) -> list[dict[str, Any]]:
    res = runner.invoke(app, ["signals", *args, "--node", "n1"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


class TestXidForms:
    @pytest.mark.parametrize(("line", "code", "pci", "instance"), [
        ("NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=12087, name=python3, Contained: CE User Channel (0x9)",
         "94", "0000:01:00.0", "5"),
        ("NVRM: Xid (0000:03:00): 14, Channel 00000001", "14", "0000:03:00.0", None),
        ("NVRM: Xid (PCI:0000:41:00.0): 48, pid='<unknown>', name=<unknown>, DBE", "48", "0000:41:00.0", None),
        ("kernel: NVRM: Xid (PCI:...): 137, RLW_RXPIPE interrupt hit on link 11 on GPU0: PRIV Error", "137", None,
         None),
        ("[ 9937.000000] NVRM: Xid: 79, GPU has fallen off the bus.", "79", None, None),
    ], ids=["mig-instance", "no-PCI-prefix", "with-function", "redacted-address", "no-address"])
    def test_every_xid_prefix_form_is_read(self, line: str, code: str, pci: str | None, instance: str | None) -> None:
        ev = parse_line(line)
        assert ev is not None and (ev.code, ev.pci, ev.details.get("GPU_I_ID")) == (code, pci, instance)

    def test_mig_line_signal_names_the_gpu_and_its_instance(self) -> None:
        got = rows(["kmsg", str(DATA / "kmsg_mig_and_bare.log"), "--boot-time", "2025-03-04T00:00:00Z"])
        assert [(r["code"], r["details"].get("GPU_I_ID")) for r in got] == [
            ("94", "5"), ("14", None), ("48", None), ("137", None), ("79", None)]
        assert got[0]["gpu"] == {"index": None, "uuid": "GPU-0f6a1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d",
                                 "pci_bus_id": "0000:01:00.0"}
        assert got[3]["gpu"] is None, "a line without an address names no GPU"


class TestKmsgTimes:
    LOG = DATA / "kmsg_mig_and_bare.log"

    def test_boot_time_anchors_relative_stamps(self) -> None:
        got = rows(["kmsg", str(self.LOG), "--boot-time", "2025-03-04T00:00:00Z"])
        assert got[0]["observed_at"] == "2025-03-04T02:45:34.120417Z"
        assert all("time_source" not in r["details"] for r in got)

    def test_reference_line_anchors_relative_stamps(self) -> None:
        got = rows(["kmsg", str(self.LOG), "--reference", "9934.120417=2025-03-04T02:45:34.120417+00:00"])
        assert got[0]["observed_at"] == "2025-03-04T02:45:34.120417Z"

    def test_coloured_dmesg_reads_like_plain(self, tmp_path: Path) -> None:
        f = tmp_path / "dmesg-color.txt"
        f.write_text("".join(f"\x1b[32m{x[:15]}\x1b[0m\x1b[33m{x[15:]}\x1b[0m\n"
                             for x in self.LOG.read_text().splitlines()))
        got = rows(["kmsg", str(f), "--boot-time", "2025-03-04T00:00:00Z"])
        assert got[0]["observed_at"] == "2025-03-04T02:45:34.120417Z" and got[0]["code"] == "94"

    def test_unanchored_relative_stamps_are_marked_and_warned_about(self) -> None:
        res = runner.invoke(app, ["signals", "kmsg", str(self.LOG), "--node", "n1"])
        assert res.exit_code == 0
        got = [json.loads(x) for x in res.stdout.splitlines()]
        assert {r["details"]["time_source"] for r in got} == {"relative"}
        assert "--boot-time" in res.stderr

    def test_a_dmesg_human_capture_places_its_delta_lines_after_the_minute_stamp(self) -> None:
        """``dmesg -H``: the Xid lines carry only ``[  +0.000004]``; each is placed after the ``[Dec 2 11:38]`` stamp
        before it, counting the deltas of every line between (util-linux dmesg.c)."""
        res = runner.invoke(app, ["signals", "kmsg", str(DATA / "kmsg_dmesg_human.log"), "--node", "n1"])
        assert res.exit_code == 0, res.output
        got = [json.loads(x) for x in res.stdout.splitlines()]
        xids = [r for r in got if r["check"] == "xid"]
        assert [r["code"] for r in xids][:3] == ["48", "64", "79"]
        assert {r["details"]["time_source"] for r in xids} == {"delta"}
        first = datetime.fromisoformat(xids[0]["observed_at"])
        assert (first.month, first.day, first.hour, first.minute) == (12, 2, 11, 38)
        assert datetime.fromisoformat(xids[1]["observed_at"]) - first == timedelta(microseconds=56)

    def test_a_syslog_with_the_nuls_an_unclean_shutdown_leaves_is_read_and_a_nul_file_refused(
            self, tmp_path: Path) -> None:
        f = tmp_path / "syslog"
        f.write_bytes(b"Mar  4 09:12:40 gpu-node-7 kernel: eth0: link up\n" + b"\0" * 8192 +
                      b"Mar  4 09:12:41 gpu-node-7 kernel: NVRM: Xid (PCI:0000:3b:00): 79, pid=1, GPU has fallen off "
                      b"the bus.\n")
        res = runner.invoke(app, ["signals", "kmsg", str(f), "--node", "n1"])
        assert res.exit_code == 0, res.output
        (sig,) = [json.loads(x) for x in res.stdout.splitlines()]
        assert sig["code"] == "79" and "NUL bytes dropped" in res.stderr
        zeros = tmp_path / "zeros.log"
        zeros.write_bytes(b"\0" * 4096)
        res = runner.invoke(app, ["signals", "kmsg", str(zeros), "--node", "n1"])
        assert res.exit_code == 2 and "binary data" in res.stderr and len(res.stderr.strip().splitlines()) == 1

    @pytest.mark.parametrize("args", [["--boot-time", "yesterday"], ["--reference", "abc"],
                                      ["--boot-time", "2025-03-04T00:00:00"]],
                             ids=["bad-boot-time", "bad-reference", "boot-time-without-zone"])
    def test_bad_anchor_is_one_line_exit_2(self, args: list[str]) -> None:
        res = runner.invoke(app, ["signals", "kmsg", str(self.LOG), "--node", "n1", *args])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


# One boot's kernel log (8 ordinary lines, then an Xid 79 and the driver's fallen-off line) as ``dmesg`` prints it,
# and the prefix each other capture puts before a line: ``dmesg -r`` (util-linux raw_print: ``<%d>[%5d.%06d] ``),
# ``dmesg -x`` (``%-6s:%-6s: `` facility:level) and RFC 5424 syslog (``<PRI>1 ISO host app - - - msg``).
BOOT = [
    (5, 0.0, "Linux version 5.15.0-105-generic (buildd@lcy02-amd64-054) (gcc (Ubuntu 11.4.0-1ubuntu1~22.04) 11.4.0, "
             "GNU ld (GNU Binutils for Ubuntu) 2.38) #115-Ubuntu SMP Mon Apr 15 09:52:04 UTC 2024"),
    (6, 0.0, "Command line: BOOT_IMAGE=/boot/vmlinuz-5.15.0-105-generic root=UUID=1b2c ro"),
    (6, 0.0, "KERNEL supported cpus:"),
    (6, 0.0, "  Intel GenuineIntel"),
    (6, 0.0, "  AMD AuthenticAMD"),
    (6, 1.234567, "pci 0000:07:00.0: [10de:2330] type 00 class 0x030200"),
    (6, 9.876543, "mlx5_core 0000:0c:00.0: firmware version: 28.39.1002"),
    (6, 12.345678, "EXT4-fs (nvme0n1p2): mounted filesystem with ordered data mode. Opts: (null). Quota mode: none."),
    (4, 219.470994, "NVRM: Xid (PCI:0000:07:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."),
    (4, 219.471012, "NVRM: GPU 0000:07:00.0: GPU has fallen off the bus."),
]
LEVELS = {4: "warn", 5: "notice", 6: "info"}
CAPTURES = {
    "dmesg-r": lambda i, pri, ts, msg: f"<{pri}>[{ts:12.6f}] {msg}",
    "dmesg-x": lambda i, pri, ts, msg: f"{'kern':<6}:{LEVELS[pri]:<6}: [{ts:12.6f}] {msg}",
    "rfc5424": lambda i, pri, ts, msg: f"<{pri}>1 2024-08-30T11:{i:02d}:09.123456+00:00 gpu-node-7 kernel - - - {msg}",
}


class TestKernelLogCaptures:
    @pytest.mark.parametrize("capture", list(CAPTURES))
    def test_dmesg_r_dmesg_x_and_rfc5424_captures_are_kernel_logs(self, capture: str) -> None:
        from breakfix.collectors.sniff import sniff

        assert sniff("\n".join(CAPTURES[capture](i, *x) for i, x in enumerate(BOOT)) + "\n") == "kmsg"

    @pytest.mark.parametrize(("capture", "xid_at", "lost_at"), [
        ("dmesg-r", "2024-08-30T11:43:09.470994Z", "2024-08-30T11:43:09.471012Z"),
        ("dmesg-x", "2024-08-30T11:43:09.470994Z", "2024-08-30T11:43:09.471012Z"),
        ("rfc5424", "2024-08-30T11:08:09.123456Z", "2024-08-30T11:09:09.123456Z"),
    ])
    def test_their_xid_79_and_lost_gpu_are_read_at_the_lines_time(self, tmp_path: Path, capture: str, xid_at: str,
                                                                   lost_at: str) -> None:
        f = tmp_path / f"{capture}.log"
        f.write_text("".join(CAPTURES[capture](i, *x) + "\n" for i, x in enumerate(BOOT)))
        got = rows(["kmsg", str(f), "--boot-time", "2024-08-30T11:39:30Z"])
        assert [(r["check"], r["code"], r["severity"], r["gpu"]["pci_bus_id"], r["observed_at"]) for r in got] == [
            ("xid", "79", "fatal", "0000:07:00.0", xid_at), ("gpu.lost", None, "fatal", "0000:07:00.0", lost_at)]
        assert all("time_source" not in r["details"] for r in got)

    def test_every_stamp_is_read_from_its_line_and_a_line_without_one_says_so(self, tmp_path: Path) -> None:
        f = tmp_path / "kern.log"
        f.write_text(
            "<4>[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable DBE\n"
            "kern  :warn  : [Fri Aug 30 11:43:09 2024] NVRM: Xid (PCI:0000:cb:00): 13, pid='<unknown>', "
            "name=<unknown>, Graphics SM Warp Exception\n"
            "<4>1 2024-08-30T11:43:09.123456+00:00 gpu-node-7 kernel - - - NVRM: Xid (PCI:0000:cb:00): 79, "
            "pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n"
            "1725018189.123456 gpu-node-7 kernel: NVRM: Xid (PCI:0000:cb:00): 31, pid=1, name=x, Ch 00000001\n"
            "Fri 2024-08-30 11:43:09 UTC gpu-node-7 kernel: NVRM: Xid (PCI:0000:cb:00): 31, pid=1, name=x, "
            "Ch 00000001\n"
            "[  +0.000005] NVRM: Xid (PCI:0000:cb:00): 43, pid=1, name=x, Ch 00000001\n")
        got = rows(["kmsg", str(f), "--boot-time", "2024-08-30T11:39:30Z"])
        assert [(r["code"], r["observed_at"], r["details"].get("time_source")) for r in got] == [
            ("48", "2024-08-30T11:43:09.470994Z", None), ("13", "2024-08-30T11:43:09Z", None),
            ("79", "2024-08-30T11:43:09.123456Z", None), ("31", "2024-08-30T11:43:09.123456Z", None),
            ("31", "2024-08-30T11:43:09Z", None), ("43", got[-1]["observed_at"], "none")]
        assert got[-1]["observed_at"] > "2025", "a dmesg -H delta is no time: stamped now, and marked"

    def test_an_unsupported_gpu_at_boot_is_no_lost_gpu_and_the_fallen_off_message_still_is(self,
                                                                                         tmp_path: Path) -> None:
        """The driver's "not supported by this release" boot message names the GPU like the fallen-off one
        (``The NVIDIA GPU <bdf>``), but with ``(PCI ID: ...)`` on the same line: a configuration error, no gpu.lost
        (kernel_log_formats.md section 3 for the fallen-off form)."""
        f = tmp_path / "kern.log"
        f.write_text("[ 2288.712311] NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1292)\n"
                     "[ 2288.712311] NVRM: installed in this system is not supported by the 304.116\n"
                     "[ 2288.712311] NVRM: NVIDIA Linux driver release.  Please see 'Appendix\n"
                     "[ 2288.712311] NVRM: A - Supported NVIDIA GPU Products' in this release's\n"
                     "[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0\n"
                     "               NVRM: (PCI ID: 10de:26b5) installed in this system has\n"
                     "               NVRM: fallen off the bus and is not responding to commands.\n")
        got = rows(["kmsg", str(f), "--boot-time", "2024-08-30T11:39:30Z"])
        assert [(r["check"], r["severity"], r["gpu"]["pci_bus_id"]) for r in got] == [
            ("gpu.lost", "fatal", "0000:b3:00.0")]


class TestDcgmEdges:
    PAGE = (DATA / "dcgm_exporter_mig_bad_sample.txt").read_text()

    def test_bad_samples_are_skipped_counted_and_logged_once_per_family(self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        with capture_logs() as logs:
            cycle = rules.apply(self.PAGE, T0, 0.0, baseline_xids=False)
            rules.apply(self.PAGE, T0, 30.0)
        assert rules.skipped == 4, "the unconvertible value and the -Inf, twice"
        assert sorted(e["family"] for e in logs if e["event"] == "dcgm_sample_skipped") == [
            "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "DCGM_FI_DEV_NVML_INDEX"]
        bad = {(s.check, s.component, s.gpu.uuid if s.gpu else None) for s in cycle.states if not s.healthy}
        assert bad == {("ecc.dbe", "mig2", "GPU-0f6a1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d"),
                       ("ecc.dbe", None, "GPU-1a7b2d3e-4f50-6b7c-8d9e-0f1a2b3c4d5e")}, "N/A pci_bus_id costs nothing"

    def test_skipped_samples_are_exported_by_the_daemon_metrics(self, catalog: Catalog, tmp_path: Path) -> None:
        from prometheus_client import generate_latest

        from breakfix.collectors.daemon import Metrics
        from breakfix.collectors.fabric import read_ports

        metrics = Metrics()
        rules = DcgmRules(ctx(catalog))
        fabric = FabricRules(ctx(catalog))
        metrics.parse_skipped.watch("dcgm", lambda: rules.skipped)
        metrics.parse_skipped.watch("fabric", lambda: fabric.skipped_files.n)
        rules.apply(self.PAGE, T0, 0.0)
        port = tmp_path / "mlx5_0" / "ports" / "1"
        (port / "counters").mkdir(parents=True)
        (port / "state").write_text("4: ACTIVE\n")
        (port / "phys_state").write_text("5: LinkUp\n")
        (port / "counters" / "symbol_error").write_bytes(b"\xff\xfe\n")
        assert len(read_ports(tmp_path, fabric.skipped_files)) == 1
        page = generate_latest(metrics.registry).decode()
        assert 'breakfix_collector_parse_skipped_total{source="dcgm"} 2.0' in page
        assert 'breakfix_collector_parse_skipped_total{source="fabric"} 1.0' in page

    def test_mig_labels_ride_on_signals(self, catalog: Catalog) -> None:
        cycle = DcgmRules(ctx(catalog)).apply(self.PAGE, T0, 0.0, baseline_xids=False)
        dbe = next(s for s in cycle.states if s.component == "mig2")
        assert dbe.details == {"GPU_I_ID": "2", "GPU_I_PROFILE": "3g.40gb"}

    def test_xid_count_family_is_one_event_per_rise(self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        (ev,) = rules.apply(self.PAGE, T0, 0.0, baseline_xids=False).events
        assert (ev.code, ev.details["window_size_in_ms"], ev.details["GPU_I_ID"]) == ("94", "300000", "2")
        assert rules.apply(self.PAGE, T0, 30.0).events == [], "the same count is not a new XID"
        risen = self.PAGE.replace('xid="94"} 1', 'xid="94"} 2')
        assert [e.code for e in rules.apply(risen, T0, 60.0).events] == ["94"]
        active = risen.replace("DCGM_EXP_XID_ERRORS_COUNT", "DCGM_FI_DEV_XID_ERRORS_ACTIVE")
        assert [e.code for e in DcgmRules(ctx(catalog)).apply(active, T0, 0.0, baseline_xids=False).events] == ["94"]


class TestDcgmClockEventsCount:
    """dcgm-exporter's DCGM_EXP_CLOCK_EVENTS_COUNT (counters CSV; label ``clock_event``, the names of its
    clockThrottleReasons map; a series only for reasons seen in the window), on the real sample page's two GPUs, whose
    page carries no clocks-event bitmask."""
    SAMPLE = (DATA / "dcgm_exporter_sample.txt").read_text()
    LABELS = ('gpu="{g}",UUID="{uuid}",pci_bus_id="{bus}",device="nvidia{g}",modelName="NVIDIA H100 80GB HBM3",'
              'Hostname="gpu-node-074"')
    GPUS = {0: ("GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77", "00000000:1A:00.0"),
            1: ("GPU-6043e4b2-feaa-8010-34c7-61d1a01576bb", "00000000:40:00.0")}

    def page(self, *events: tuple[int, str, int]) -> str:
        lines = ["# HELP DCGM_EXP_CLOCK_EVENTS_COUNT Count of clock events within the user-specified time window.",
                 "# TYPE DCGM_EXP_CLOCK_EVENTS_COUNT gauge"]
        for g, event, n in events:
            uuid, bus = self.GPUS[g]
            labels = self.LABELS.format(g=g, uuid=uuid, bus=bus)
            lines.append(f'DCGM_EXP_CLOCK_EVENTS_COUNT{{{labels},clock_event="{event}",'
                         f'window_size_in_ms="300000"}} {n}')
        return self.SAMPLE + "\n".join(lines) + "\n"

    @staticmethod
    def clocks(cycle: Cycle) -> set[tuple[str, int | None, bool]]:
        return {(s.check, s.gpu.index if s.gpu else None, s.healthy) for s in cycle.states
                if s.check.startswith("clock.")}

    def test_a_hardware_reason_seen_in_the_window_is_a_fault_and_its_absence_later_clears_it(
            self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        first = self.clocks(rules.apply(self.page((1, "hw_slowdown", 3), (0, "power_cap", 12)), T0, 0.0))
        assert ("clock.hw_slowdown", 1, False) in first and ("clock.power_brake", 1, True) in first
        assert ("clock.hw_slowdown", 0, True) in first, "a software power cap is normal under load"
        later = self.clocks(rules.apply(self.page((0, "power_cap", 4)), T0, 300.0))
        assert ("clock.hw_slowdown", 1, True) in later, "the series went with the window: seen 0 times"

    @pytest.mark.parametrize(("event", "check"), [("hw_thermal", "clock.hw_thermal"),
                                                  ("hw_power_brake", "clock.power_brake")])
    def test_each_hardware_reason_is_its_check(self, catalog: Catalog, event: str, check: str) -> None:
        got = self.clocks(DcgmRules(ctx(catalog)).apply(self.page((0, event, 1)), T0, 0.0))
        assert (check, 0, False) in got

    def test_a_page_without_the_family_says_nothing_of_it_even_after_pages_with_it(self, catalog: Catalog) -> None:
        """A counters CSV changed, or a partial scrape: no family on the page is no evidence, so nothing clears."""
        rules = DcgmRules(ctx(catalog))
        assert ("clock.hw_slowdown", 1, False) in self.clocks(rules.apply(self.page((1, "hw_slowdown", 3)), T0, 0.0))
        assert self.clocks(rules.apply(self.SAMPLE, T0, 30.0)) == set()
        assert self.clocks(DcgmRules(ctx(catalog)).apply(self.SAMPLE, T0, 0.0)) == set()

    def test_a_bad_count_is_skipped_not_read(self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        rules.apply(self.page((1, "hw_slowdown", -5)), T0, 0.0)
        assert rules.skipped >= 1 and "DCGM_EXP_CLOCK_EVENTS_COUNT: value -5 out of range" in rules.reasons


def port(state: str, phys: str, rate: str = "400 Gb/sec (4X NDR)", layer: str = "InfiniBand",
         **counters: int) -> PortSample:
    return port_sample("mlx5_0/1", parse_state(state, PORT_STATES), parse_state(phys, PHYS_STATES), rate, layer,
                       counters)


class TestFabricEdges:
    @pytest.mark.parametrize(("state", "phys", "expected"), [
        ("4: ACTIVE", "5: LinkUp", None), ("1: DOWN", "2: Polling", "critical"),
        ("4: ACTIVE", "3: Disabled", "critical"),
        ("4: ACTIVE", "4: ACTIVE", "warning"), ("4: ACTIVE", "9: Strange", "warning"), ("Active", "LinkUp", None),
        ("5: ACTIVE_DEFER", "5: LinkUp", None), ("", "5: LinkUp", "warning"),
    ], ids=["healthy", "down", "disabled", "phys-reads-4-ACTIVE", "unknown-phys", "ibstat-names", "active-defer",
            "empty-state"])
    def test_states_by_number_and_name_unknown_is_never_critical(self, catalog: Catalog, state: str, phys: str,
                                                                 expected: str | None) -> None:
        rules = FabricRules(ctx(catalog))
        rules.apply([port("4: ACTIVE", "5: LinkUp")], T0, 0.0)  # the port was up: losing it is a fault
        (s,) = [x for x in rules.apply([port(state, phys)], T0, 10.0).states if x.check == "ib.link_down"]
        assert (None if s.healthy else s.severity.value) == expected

    def test_a_port_down_since_start_is_not_judged_and_ignored_ports_say_nothing(self, catalog: Catalog) -> None:
        """DGX storage and management ports are often uncabled: DOWN/Polling from the start is not a fault (it
        would cordon every such node), only logged and listed; once the port was up, losing it is critical."""
        rules = FabricRules(ctx(catalog))
        first = rules.apply([port("1: DOWN", "2: Polling")], T0, 0.0).states
        assert [(x.check, x.healthy) for x in first] == [("ib.link_down", True)] and rules.inactive == {"mlx5_0/1"}
        rules.apply([port("4: ACTIVE", "5: LinkUp")], T0, 10.0)
        after = rules.apply([port("1: DOWN", "2: Polling")], T0, 20.0).states
        (down,) = [x for x in after if x.check == "ib.link_down"]
        assert not down.healthy and rules.inactive == set()
        quiet = FabricRules(ctx(catalog), FabricThresholds(ignore_ports=("mlx5_*/1",)))
        assert quiet.apply([port("1: DOWN", "2: Polling")], T0, 0.0).states == []

    def test_ethernet_port_is_judged_by_its_own_rate_or_skipped(self, catalog: Catalog) -> None:
        roce = port("4: ACTIVE", "5: LinkUp", "200 Gb/sec (4X HDR)", "Ethernet")
        th = FabricThresholds(expected_rate_gbps=400)
        rate = [s for s in FabricRules(ctx(catalog), th).apply([roce], T0, 0.0).states if s.check == "ib.rate_degraded"]
        assert [s.healthy for s in rate] == [True]
        slow = FabricThresholds(expected_rate_gbps=400, expected_ethernet_rate_gbps=400)
        assert not next(s for s in FabricRules(ctx(catalog), slow).apply([roce], T0, 0.0).states
                        if s.check == "ib.rate_degraded").healthy
        skip = FabricThresholds(expected_rate_gbps=400, skip_ethernet=True)
        assert FabricRules(ctx(catalog), skip).apply([roce], T0, 0.0).states == []

    def test_a_port_the_subnet_manager_cycles_between_init_and_active_is_flapping(self, catalog: Catalog) -> None:
        """INIT with the physical link up restarts the bring-up hold each time and moves no counter: only the
        state read down after ACTIVE shows the cycling (flap_count times within flap_window_s)."""
        rules = FabricRules(ctx(catalog), FabricThresholds(flap_count=2, flap_window_s=600))
        up, init = port("4: ACTIVE", "5: LinkUp"), port("2: INIT", "5: LinkUp")
        got = [rules.apply([p], T0, t) for t, p in enumerate([up, init, up, init, up], start=1)]
        flapping = [s.healthy for c in got for s in c.states if s.check == "ib.flapping"]
        assert flapping[-1] is False, "two drops from ACTIVE within the window"
        assert not any(s.check == "ib.link_down" and not s.healthy for c in got for s in c.states), "held each time"
        quiet = rules.apply([up], T0, 1000.0)
        assert next(s for s in quiet.states if s.check == "ib.flapping").healthy, "healthy after a quiet window"

    def test_a_down_port_with_odd_readings_between_is_not_flapping(self, catalog: Catalog) -> None:
        """A reading that is no kernel value (phys_state ``4: ACTIVE``) is not up: no drop when the next reads DOWN."""
        rules = FabricRules(ctx(catalog), FabricThresholds(flap_count=2, flap_window_s=600))
        up, down, odd = port("4: ACTIVE", "5: LinkUp"), port("1: DOWN", "2: Polling"), port("4: ACTIVE", "4: ACTIVE")
        for t, p in enumerate([up, down, odd, down, odd, down, up], start=1):
            last = rules.apply([p], T0, float(t))
        flap = next(s for s in last.states if s.check == "ib.flapping")
        assert flap.healthy and flap.value == 1

    def test_a_link_drop_seen_in_its_counter_and_its_state_counts_once(self, catalog: Catalog) -> None:
        rules = FabricRules(ctx(catalog), FabricThresholds(flap_count=2, flap_window_s=600))
        rules.apply([port("4: ACTIVE", "5: LinkUp", link_downed=0)], T0, 0.0)
        rules.apply([port("1: DOWN", "2: Polling", link_downed=1)], T0, 10.0)
        back = rules.apply([port("4: ACTIVE", "5: LinkUp", link_downed=1)], T0, 20.0)
        flap = next(s for s in back.states if s.check == "ib.flapping")
        assert flap.healthy and flap.value == 1

    def test_single_reading_counters_against_limits_then_rates(self, catalog: Catalog) -> None:
        rules = FabricRules(ctx(catalog), FabricThresholds(single_reading=True))
        first = rules.apply([port("4: ACTIVE", "5: LinkUp", link_downed=3, symbol_error=5000)], T0, 0.0)
        assert {s.check for s in first.states if not s.healthy} == {"ib.flapping", "ib.errors"}
        again = rules.apply([port("4: ACTIVE", "5: LinkUp", link_downed=3, symbol_error=5000)], T0, 60.0)
        assert {s.check for s in again.states if not s.healthy} == set(), "the second reading judges the rise"


class TestIbstat:
    def test_ibstat_down_port_and_ethernet_bond(self) -> None:
        got = rows(["ibstat", str(DATA / "ibstat_down_and_ethernet.txt"), "--expected-rate", "400"])
        assert [(r["check"], r["component"], r["severity"]) for r in got] == [("ib.link_down", "mlx5_1/1", "critical")]

    def test_ibstatus_odd_phys_state_is_a_warning(self) -> None:
        got = rows(["ibstat", str(DATA / "ibstatus_phys_4_active.txt"), "--expected-rate",
                    "400"])
        assert [(r["check"], r["component"], r["severity"]) for r in got] == [("ib.link_down", "mlx5_3/1", "warning")]

    def test_ibstat_and_sysfs_read_the_same_port_alike(self, catalog: Catalog) -> None:
        text = "CA 'mlx5_1'\n\tPort 1:\n\t\tState: Down\n\t\tPhysical state: Polling\n\t\tRate: 400\n" \
               "\t\tLink layer: InfiniBand\n"
        (p,) = parse_ibstat(text).ports
        assert (p.port, p.state, p.phys_state, p.rate_gbps) == ("mlx5_1/1", 1, 2, 400.0)


class TestNvsmi:
    def test_eight_gpu_text_dump_with_a_pending_row_remap(self) -> None:
        got = rows(["nvsmi", str(DATA / "nvsmi_8gpu_row_remap_pending.txt"), "--expected-gpus", "8"])
        assert [(r["check"], r["gpu"]["index"]) for r in got] == [("row_remap.pending", 3)]

    def test_missing_gpu_is_a_count_mismatch(self) -> None:
        got = rows(["nvsmi", str(DATA / "nvsmi_8gpu_row_remap_pending.txt"), "--expected-gpus", "9"])
        assert ("gpu.count_mismatch", 8.0) in [(r["check"], r["value"]) for r in got]

    def test_xml_dump_with_mig_sram_error_slowdowns_replays_and_fabric(self) -> None:
        got = rows(["nvsmi", str(DATA / "nvsmi_1gpu_mig.xml")])
        assert sorted(r["check"] for r in got) == ["clock.hw_slowdown", "clock.power_brake", "ecc.dbe", "fabric.gpu",
                                                   "pcie.replay"]
        dbe = next(r for r in got if r["check"] == "ecc.dbe")
        assert dbe["details"]["ecc_volatile_sram_unc"] == "1" and dbe["details"]["ecc_aggregate_sram_unc"] == "3"
        assert dbe["details"]["mig_mode"] == "Enabled" and dbe["details"]["mig_devices"] == "2"

    def test_gpu_nvidia_smi_cannot_open_is_lost_or_reset_required(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.txt"
        text = (DATA / "nvsmi_8gpu_row_remap_pending.txt").read_text()
        head = text.partition("GPU 00000000:DB:00.0")  # the 8th GPU fell off: nvidia-smi prints one line
        f.write_text(head[0] + "Unable to determine the device handle for GPU0000:DB:00.0: Unknown Error\n"
                     "Unable to determine the device handle for gpu 0000:e1:00.0: GPU requires reset\n")
        got = rows(["nvsmi", str(f), "--expected-gpus", "8"])
        assert sorted((r["check"], r["gpu"]["pci_bus_id"] if r["gpu"] else None) for r in got) == [
            ("gpu.count_mismatch", None), ("gpu.lost", "0000:db:00.0"), ("gpu.reset_required", "0000:e1:00.0"),
            ("row_remap.pending", "0000:5d:00.0")]
        lost = next(r for r in got if r["check"] == "gpu.lost")
        assert lost["severity"] == "fatal" and lost["details"] == {"nvidia_smi": "Unknown Error"}

    def test_no_devices_found_is_a_clear_error(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.txt"
        f.write_text("No devices were found\n")
        res = runner.invoke(app, ["signals", "nvsmi", str(f), "--node", "n1"])
        assert res.exit_code == 2 and "found no GPU" in res.stderr

    def test_zero_attached_gpus_is_a_count_mismatch(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.txt"
        f.write_text("==============NVSMI LOG==============\n\nAttached GPUs                             : 0\n")
        assert [(r["check"], r["value"]) for r in rows(["nvsmi", str(f), "--expected-gpus", "8"])] == [
            ("gpu.count_mismatch", 0.0)]

    def test_mig_text_dump_reads_instances_and_thermal_slowdown(self) -> None:
        got = rows(["nvsmi", str(DATA / "nvsmi_1gpu_mig_a100.txt"), "--all"])
        assert [r["check"] for r in got if not r["healthy"]] == ["clock.hw_thermal"]
        dbe = next(r for r in got if r["check"] == "ecc.dbe")
        assert (dbe["details"]["mig_mode"], dbe["details"]["mig_devices"]) == ("Enabled", "2")

    def test_xml_names_the_mig_instance_with_sram_errors(self) -> None:
        dbe = next(r for r in rows(["nvsmi", str(DATA / "nvsmi_1gpu_mig.xml")]) if r["check"] == "ecc.dbe")
        assert dbe["details"]["GPU_I_ID"] == "1"

    def test_pre_r535_layout_double_bit_totals_and_retired_pages(self) -> None:
        got = rows(["nvsmi", str(DATA / "nvsmi_1gpu_v100_r470.txt")])
        assert sorted((r["check"], r["value"]) for r in got) == [
            ("ecc.dbe", 2.0), ("retired_pages.limit", 62.0), ("retired_pages.pending", None)]

    def test_dump_and_live_nvml_give_the_same_signal(self, catalog: Catalog) -> None:
        from breakfix.collectors.nvml_eval import Thresholds, evaluate

        read = parse_nvsmi((DATA / "nvsmi_8gpu_row_remap_pending.txt").read_text())
        offline = {s.id for s in nvsmi_signals(read, ctx(catalog), T0) if s.check == "row_remap.pending"}
        live = {s.id for g in read.gpus for s in evaluate(ctx(catalog), g.sample, None, T0, 0.0, Thresholds(), set())
                if s.check == "row_remap.pending"}
        assert offline == live and len(offline) == 8


R570 = (DATA / "nvsmi_1gpu_v100_r570.txt").read_text()
NO_ACTION = "    GPU Recovery Action                   : None\n"


def with_action(action: str) -> str:
    assert NO_ACTION in R570
    return R570.replace(NO_ACTION, f"    GPU Recovery Action                   : {action}\n")


class TestNvsmiRecoveryAction:
    """The driver's own remediation verdict (``GPU Recovery Action``, R570+; ``GPU Reset Status`` before it): a GPU
    that asks for a reset or a reboot is never read as healthy, and classifies as XID 154 with that action would."""

    def test_r570_capture_with_recovery_action_none_and_deprecated_reset_status_is_healthy(self) -> None:
        assert rows(["nvsmi", str(DATA / "nvsmi_1gpu_v100_r570.txt")]) == []

    def test_r570_recovery_action_reset_reads_gpu_reset_required(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.txt"
        f.write_text(with_action("Reset"))
        (got,) = rows(["nvsmi", str(f)])
        assert (got["check"], got["code"], got["severity"], got["gpu"]["pci_bus_id"]) == (
            "gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RESET", "critical", "0001:00:00.0")
        assert got["details"]["recovery_action"] == "Reset"

    def test_r550_reset_required_and_drain_recommended_read_drain_and_reset(self, catalog: Catalog) -> None:
        (got,) = rows(["nvsmi", str(DATA / "nvsmi_1gpu_v100_r550_reset_required.txt")])
        assert (got["check"], got["code"], got["details"]["recovery_action"]) == (
            "gpu.reset_required", "DCGM_FR_GPU_RECOVERY_DRAIN_RESET", "Drain and Reset")
        assert catalog.classify(check=got["check"], code=got["code"]).category == "gpu_drain_reset_required"

    def test_r550_reset_required_alone_reads_reset(self) -> None:
        text = (DATA / "nvsmi_1gpu_v100_r550_reset_required.txt").read_text()
        text = text.replace("Drain and Reset Recommended       : Yes", "Drain and Reset Recommended       : No")
        read = parse_nvsmi(text)
        assert [g.recovery for g in read.gpus] == ["Reset"]

    @pytest.mark.parametrize(("action", "check", "xid154_action"), [
        ("Reset", "gpu.reset_required", "GPU Reset Required"),
        ("Drain P2P", "gpu.reset_required", "Drain P2P"),
        ("Drain and Reset", "gpu.reset_required", "Drain and Reset"),
        ("Reboot", "gpu.lost", "Node Reboot Required"),
        ("2", "gpu.lost", "Node Reboot Required"),  # NVML_GPU_RECOVERY_ACTION_NODE_REBOOT as a number
    ])
    def test_each_recovery_action_classifies_as_xid_154_with_that_action(self, catalog: Catalog, action: str,
                                                                          check: str, xid154_action: str) -> None:
        bad = [s for s in nvsmi_signals(parse_nvsmi(with_action(action)), ctx(catalog), T0) if not s.healthy]
        assert [s.check for s in bad] == [check]
        fc = catalog.classify(check=bad[0].check, code=bad[0].code)
        assert fc.category == catalog.classes.xid154_actions[xid154_action]
        assert bad[0].severity is fc.severity

    def test_reboot_action_is_a_node_reboot_fault(self, catalog: Catalog) -> None:
        (s,) = [s for s in nvsmi_signals(parse_nvsmi(with_action("Reboot")), ctx(catalog), T0) if not s.healthy]
        assert (s.check, s.severity.value) == ("gpu.lost", "fatal")
        assert catalog.classify(check=s.check, code=s.code).category == "node_reboot_required"

    @pytest.mark.parametrize("action", ["None", "N/A", "Requested functionality has been deprecated", "0",
                                        "[Requires Root]"])
    def test_no_action_deprecated_or_unreadable_says_nothing(self, catalog: Catalog, action: str) -> None:
        assert [s.check for s in nvsmi_signals(parse_nvsmi(with_action(action)), ctx(catalog), T0)
                if not s.healthy] == []

    def test_an_action_this_reader_does_not_know_is_a_fault_on_the_cautious_path(self, catalog: Catalog) -> None:
        """Never healthy, and never an automatic reset: the catalog does not know the code, so unknown_fault."""
        bad = [s for s in nvsmi_signals(parse_nvsmi(with_action("Recover IMEX Domain")), ctx(catalog), T0)
               if not s.healthy]
        assert [(s.check, s.code, s.details["recovery_action"]) for s in bad] == [
            ("gpu.reset_required", "DCGM_FR_GPU_RECOVERY_RECOVER_IMEX_DOMAIN", "Recover IMEX Domain")]
        assert catalog.classify(check=bad[0].check, code=bad[0].code).category == "unknown_fault"

    def test_xml_recovery_action_is_read_and_the_gpus_other_faults_still_are(self, tmp_path: Path) -> None:
        text = (DATA / "nvsmi_1gpu_mig.xml").read_text()
        head, sep, tail = text.partition("</uuid>")
        assert sep
        f = tmp_path / "smi.xml"
        f.write_text(head + sep + "<gpu_reset_status><reset_required>Requested functionality has been deprecated"
                     "</reset_required><drain_and_reset_recommended>Requested functionality has been deprecated"
                     "</drain_and_reset_recommended></gpu_reset_status>"
                     "<gpu_recovery_action>Drain P2P</gpu_recovery_action>" + tail)
        got = rows(["nvsmi", str(f)])
        assert sorted(r["check"] for r in got) == ["clock.hw_slowdown", "clock.power_brake", "ecc.dbe", "fabric.gpu",
                                                   "gpu.reset_required", "pcie.replay"]
        reset = next(r for r in got if r["check"] == "gpu.reset_required")
        assert reset["code"] == "DCGM_FR_GPU_RECOVERY_DRAIN_P2P" and reset["details"]["mig_mode"] == "Enabled"

    def test_recovery_action_joins_the_gpus_incident_as_xid_154(self, catalog: Catalog) -> None:
        from breakfix.correlator.grouping import Correlator

        core = Correlator(catalog)
        for s in nvsmi_signals(parse_nvsmi(with_action("Drain and Reset")), ctx(catalog), T0):
            core.ingest(s, T0)
        assert [(i.category, dict(i.counts)) for i in core.state.incidents.values()] == [
            ("gpu_drain_reset_required", {"xid:154": 1})]


class TestFormatRefusals:
    @pytest.mark.parametrize(("cmd", "fixture", "hint"), [
        ("kmsg", "nvsmi_8gpu_row_remap_pending.txt", "breakfix signals nvsmi"),
        ("dcgm", "nvsmi_1gpu_mig.xml", "breakfix signals nvsmi"),
        ("kmsg", "dcgm_exporter_sample.txt", "breakfix signals dcgm"),
        ("nvsmi", "kmsg_real.log", "breakfix signals kmsg"),
        ("ibstat", "dcgm_exporter_sample.txt", "breakfix signals dcgm"),
        ("dcgm", "ibstat_down_and_ethernet.txt", "breakfix signals ibstat"),
        ("ib", "ibstat_down_and_ethernet.txt", "breakfix signals ibstat"),
    ], ids=lambda x: x.replace(".", "-") if isinstance(x, str) else str(x))
    def test_wrong_format_is_one_line_with_the_right_command(self, cmd: str, fixture: str, hint: str) -> None:
        res = runner.invoke(app, ["signals", cmd, str(DATA / fixture), "--node", "n1"])
        assert res.exit_code == 2 and res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1 and hint in res.stderr

    def test_ib_folder_of_ibstat_files_points_to_ibstat(self, tmp_path: Path) -> None:
        (tmp_path / "node1.txt").write_text((DATA / "ibstat_down_and_ethernet.txt").read_text())
        res = runner.invoke(app, ["signals", "ib", str(tmp_path), "--node", "n1"])
        assert res.exit_code == 2 and "breakfix signals ibstat" in res.stderr

    @pytest.mark.parametrize("cmd", ["kmsg", "dcgm", "ibstat", "nvsmi"])
    def test_arbitrary_text_is_refused(self, cmd: str, tmp_path: Path) -> None:
        f = tmp_path / "notes.txt"
        f.write_text("shopping list\neggs\nmilk\n")
        res = runner.invoke(app, ["signals", cmd, str(f), "--node", "n1"])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1

    def test_a_skipped_sample_is_reported_on_stderr_and_stdout_stays_one_signal_json_per_line(self) -> None:
        """The real A800 page has samples dcgm-exporter could not convert: their warnings go to stderr, so a pipe
        into jq reads only signals."""
        import subprocess
        import sys

        done = subprocess.run([sys.executable, "-c", "from breakfix.cli.main import app; app()", "signals", "dcgm",
                               str(DATA / "dcgm_exporter_mig_bad_sample.txt"), "--node", "n1", "--all"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines and all(json.loads(line)["schema"] == "breakfix.signal/v1" for line in lines)
        assert "dcgm_sample_skipped" in done.stderr

    def test_prometheus_page_of_another_exporter_is_not_dcgm(self, tmp_path: Path) -> None:
        f = tmp_path / "node.prom"
        f.write_text("# TYPE node_load1 gauge\nnode_load1 0.42\n")
        res = runner.invoke(app, ["signals", "dcgm", str(f), "--node", "n1"])
        assert res.exit_code == 2 and "not dcgm-exporter" in res.stderr

    def test_plain_nvidia_smi_table_points_to_nvidia_smi_q(self, tmp_path: Path) -> None:
        f = tmp_path / "smi.txt"
        f.write_text("+-----------------------------------------------------------------------------+\n"
                     "| NVIDIA-SMI 535.161.08   Driver Version: 535.161.08   CUDA Version: 12.2     |\n"
                     "|-------------------------------+----------------------+----------------------+\n")
        res = runner.invoke(app, ["signals", "nvsmi", str(f), "--node", "n1"])
        assert res.exit_code == 2 and "nvidia-smi -q" in res.stderr

    def test_files_copied_through_windows_read_the_same(self, tmp_path: Path) -> None:
        f = tmp_path / "ibstat.txt"
        f.write_bytes(b"\xef\xbb\xbf" + (DATA / "ibstat_down_and_ethernet.txt").read_bytes().replace(b"\n", b"\r\n"))
        def strip(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in r.items() if k not in ("id", "observed_at")} for r in got]

        assert strip(rows(["ibstat", str(f)])) == strip(rows(["ibstat", str(DATA / "ibstat_down_and_ethernet.txt")]))

    def test_kernel_log_with_a_stray_byte_is_read_with_a_warning(self, tmp_path: Path) -> None:
        f = tmp_path / "kern.log"
        f.write_bytes(b"[    3.1] usb 1-1: Product: \xff\xfe\n" + (DATA / "kmsg_mig_and_bare.log").read_bytes())
        res = runner.invoke(app, ["signals", "kmsg", str(f), "--node", "n1", "--boot-time", "2025-03-04T00:00:00Z"])
        assert res.exit_code == 0 and len(res.stdout.splitlines()) == 5
        assert "not UTF-8 at byte 28" in res.stderr

    def test_timezone_reads_syslog_stamps_in_the_logs_zone_and_an_unknown_zone_is_one_line(self,
                                                                                         tmp_path: Path) -> None:
        f = tmp_path / "syslog"
        f.write_text("Mar  4 09:12:41 gpu-node-17 kernel: NVRM: Xid (PCI:0000:01:00): 13, pid=1, name=x, y\n")
        res = runner.invoke(app, ["signals", "kmsg", str(f), "--node", "n1", "--timezone", "Asia/Tokyo"])
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["observed_at"].endswith("T00:12:41Z")
        bad = runner.invoke(app, ["signals", "kmsg", str(f), "--node", "n1", "--timezone", "Nowhere/Else"])
        assert bad.exit_code == 2 and "unknown time zone 'Nowhere/Else'" in bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    def test_healthy_input_of_the_right_format_is_empty_exit_0(self, tmp_path: Path) -> None:
        f = tmp_path / "dmesg.txt"
        f.write_text("[    0.000000] Linux version 6.8.0\n"
                     "[    5.223456] NVRM: loading NVIDIA UNIX x86_64 Kernel Module\n")
        res = runner.invoke(app, ["signals", "kmsg", str(f), "--node", "n1"])
        assert res.exit_code == 0 and res.stdout == ""


@pytest.mark.parametrize(("line", "expected"), [
    ("Mar 04 09:12:41.250000 gpu-node-17 kernel: NVRM: Xid (PCI:0000:01:00): 13, x", "2025-03-04T09:12:41.250000"),
    ("Mar  4 09:12:41 gpu-node-17 kernel: NVRM: Xid (PCI:0000:01:00): 13, x", "2025-03-04T09:12:41"),
    ("2025-03-04T09:12:41,123456+00:00 NVRM: Xid (PCI:0000:01:00): 13, x", "2025-03-04T09:12:41.123456"),
    ("kern  :warn  : [   10.500000] NVRM: Xid (PCI:0000:01:00): 13, x", "2025-03-04T00:00:10.500000"),
], ids=["journalctl-short-precise", "syslog", "dmesg-time-format-iso", "dmesg-x-facility"])
def test_more_copied_log_time_forms(line: str, expected: str) -> None:
    from breakfix.collectors.kmsg_follow import line_time

    booted = datetime(2025, 3, 4, tzinfo=UTC)
    assert line_time(line, booted=booted, now=datetime(2025, 3, 5, tzinfo=UTC)).isoformat() == expected + "+00:00"


def test_a_line_without_a_time_is_stamped_now_and_says_so() -> None:
    from breakfix.collectors.kmsg_follow import NO_TIME, line_time_source

    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert line_time_source("NVRM: Xid (PCI:0000:01:00): 13, x", booted=now, now=now) == (now, NO_TIME)
