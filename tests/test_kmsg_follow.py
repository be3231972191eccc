"""Following the kernel log: rotation, truncation, restarts, boot ids, and 100,000 lines in bulk."""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg_follow import KmsgFollower, PositionStore, line_time
from breakfix.collectors.kmsg_source import KmsgSource
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
REAL = (DATA / "kmsg_real.log").read_text().splitlines()
XID = "[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable DBE"
NOISE = "[  219.470000] NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.90.07"


def follower(tmp_path: Path, log: Path, **kw: object) -> KmsgFollower:
    return KmsgFollower(log, PositionStore(tmp_path / "state" / "kmsg.json"), boot_id="boot-a", **kw)  # type: ignore[arg-type]


def texts(f: KmsgFollower, commit: bool = True) -> list[str]:
    lines = f.read()
    if commit and lines:
        f.commit(lines[-1].position)
    return [ln.text for ln in lines]


def write(path: Path, *lines: str) -> None:
    with path.open("a") as fh:
        fh.write("".join(f"{ln}\n" for ln in lines))


class TestFileFollower:
    def test_first_run_skips_history_then_follows(self, tmp_path: Path) -> None:
        log = tmp_path / "kern.log"
        write(log, "old 1", "old 2")
        f = follower(tmp_path, log)
        assert texts(f) == []
        write(log, "new 1", "new 2")
        assert texts(f) == ["new 1", "new 2"]

    def test_partial_line_waits_for_its_newline(self, tmp_path: Path) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        f = follower(tmp_path, log)
        with log.open("a") as fh:
            fh.write("half a li")
        assert texts(f) == []
        write(log, "ne")
        assert texts(f) == ["half a line"]

    def test_restart_resumes_after_the_committed_line(self, tmp_path: Path) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        f = follower(tmp_path, log)
        write(log, "a", "b")
        lines = f.read()
        f.commit(lines[0].position)  # only "a" was safely published before the crash
        f.close()
        write(log, "c")
        again = follower(tmp_path, log)
        assert texts(again) == ["b", "c"], "nothing missed, nothing committed replayed"

    def test_rotation_by_rename_reads_old_tail_then_new_file(self, tmp_path: Path) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        f = follower(tmp_path, log)
        write(log, "a")
        assert texts(f) == ["a"]
        write(log, "b")  # written just before rotation, not yet read
        os.rename(log, tmp_path / "kern.log.1")
        write(log, "c")
        assert texts(f) == ["b", "c"]

    def test_rotation_while_down_finds_the_rotated_file_by_inode(self, tmp_path: Path) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        f = follower(tmp_path, log)
        write(log, "a")
        assert texts(f) == ["a"]
        f.close()
        write(log, "b")
        os.rename(log, tmp_path / "kern.log.1")
        write(log, "c")
        assert texts(follower(tmp_path, log)) == ["b", "c"]

    def test_copytruncate_starts_over(self, tmp_path: Path) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        f = follower(tmp_path, log)
        write(log, "a", "b", "c")
        assert texts(f) == ["a", "b", "c"]
        log.write_text("")
        write(log, "d")
        assert texts(f) == ["d"]


class TestDevKmsg:
    def test_sequence_numbers_skip_what_was_read_this_boot(self, tmp_path: Path) -> None:
        store = PositionStore(tmp_path / "kmsg.json")
        f = KmsgFollower(Path("/dev/kmsg"), store, boot_id="boot-a")
        from breakfix.collectors.kmsg_follow import Position
        f.commit(Position(boot_id="boot-a", seq=41))
        again = KmsgFollower(Path("/dev/kmsg"), store, boot_id="boot-a")
        assert again.pos.seq == 41
        rebooted = KmsgFollower(Path("/dev/kmsg"), store, boot_id="boot-b")
        assert rebooted.pos.seq == -1, "a new boot starts from the oldest record in the ring"

    @pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg is not readable here")
    def test_reads_real_dev_kmsg_records(self, tmp_path: Path) -> None:
        f = KmsgFollower(Path("/dev/kmsg"), PositionStore(tmp_path / "k.json"))
        lines = f.read()
        assert all(ln.key.startswith(f.boot_id) for ln in lines)
        assert f.read() == [] or all(ln.position.seq > lines[-1].position.seq for ln in f.read())


class TestLineTime:
    @pytest.mark.parametrize(("line", "expected"), [
        ("6,1234,5000000,-;NVRM: Xid", datetime(2026, 11, 23, 0, 0, 5, tzinfo=UTC)),
        ("[   10.500000] NVRM: Xid", datetime(2026, 11, 23, 0, 0, 10, 500000, tzinfo=UTC)),
        ("2026-11-22T08:15:30+0000 host kernel: NVRM: Xid", datetime(2026, 11, 22, 8, 15, 30, tzinfo=UTC)),
        ("[Sun Nov 22 08:15:30 2026] NVRM: Xid", datetime(2026, 11, 22, 8, 15, 30, tzinfo=UTC)),
        ("Nov 22 08:15:30 host kernel: NVRM: Xid", datetime(2026, 11, 22, 8, 15, 30, tzinfo=UTC)),
    ], ids=["raw-kmsg-usec", "dmesg-mono", "journald-iso", "dmesg-T", "syslog"])
    def test_time_comes_from_the_line(self, line: str, expected: datetime) -> None:
        assert line_time(line, booted=datetime(2026, 11, 23, tzinfo=UTC), now=T0) == expected

    @pytest.mark.parametrize(("line", "zone", "expected", "source"), [
        ("<4>[   10.500000] NVRM: Xid", "UTC", datetime(2026, 11, 23, 0, 0, 10, 500000, tzinfo=UTC), "relative"),
        ("kern  :warn  : [   10.500000] NVRM: Xid", "UTC", datetime(2026, 11, 23, 0, 0, 10, 500000, tzinfo=UTC),
         "relative"),
        ("kern  :err   : [Sun Nov 22 08:15:30 2026] NVRM: Xid", "UTC", datetime(2026, 11, 22, 8, 15, 30, tzinfo=UTC),
         "absolute"),
        ("<4>1 2026-11-22T08:15:30.123456+00:00 gpu-node-7 kernel - - - NVRM: Xid", "Europe/Berlin",
         datetime(2026, 11, 22, 8, 15, 30, 123456, tzinfo=UTC), "absolute"),
        ("<4>Nov 22 08:15:30 gpu-node-7 kernel: NVRM: Xid", "UTC", datetime(2026, 11, 22, 8, 15, 30, tzinfo=UTC),
         "absolute"),
        ("1725018189.123456 gpu-node-7 kernel: NVRM: Xid", "Asia/Tokyo",
         datetime(2024, 8, 30, 11, 43, 9, 123456, tzinfo=UTC), "absolute"),
        ("Fri 2024-08-30 11:43:09 UTC gpu-node-7 kernel: NVRM: Xid", "Asia/Tokyo",
         datetime(2024, 8, 30, 11, 43, 9, tzinfo=UTC), "absolute"),
        ("Fri 2024-08-30 13:43:09 CEST gpu-node-7 kernel: NVRM: Xid", "Europe/Berlin",
         datetime(2024, 8, 30, 11, 43, 9, tzinfo=UTC), "absolute"),
        ("Fri 2024-08-30 14:43:09 +03 gpu-node-7 kernel: NVRM: Xid", "UTC",
         datetime(2024, 8, 30, 11, 43, 9, tzinfo=UTC), "absolute"),
        ("<4>1 - gpu-node-7 kernel - - - NVRM: Xid", "UTC", T0, "none"),
        ("[Aug30 11:43] NVRM: Xid", "UTC", datetime(2026, 8, 30, 11, 43, tzinfo=UTC), "absolute"),
        ("[Dec 2 10:37] NVRM: Xid", "Europe/Berlin", datetime(2025, 12, 2, 9, 37, tzinfo=UTC), "absolute"),
        ("[  +0.000004] NVRM: Xid", "UTC", T0, "none"),
        ("192.168.11.119: kern: warning: [2026-04-22T21:30:51.494604223Z]: NVRM: Xid", "Asia/Tokyo",
         datetime(2026, 4, 22, 21, 30, 51, 494604, tzinfo=UTC), "absolute"),
        ("kern:    info: [2022-07-28T11:49:42.504764063Z]: NVRM: Xid", "UTC",
         datetime(2022, 7, 28, 11, 49, 42, 504764, tzinfo=UTC), "absolute"),
        ("[1105056.784211 <    0.000123>] NVRM: Xid", "UTC", datetime(2026, 12, 5, 18, 57, 36, 784211, tzinfo=UTC),
         "relative"),
        ("[Fri Aug 30 11:43:09 2024 <    0.000123>] NVRM: Xid", "UTC", datetime(2024, 8, 30, 11, 43, 9, tzinfo=UTC),
         "absolute"),
        ("\x00\x00\x00Mar  4 09:12:41 gpu-node-17 kernel: NVRM: Xid", "UTC",
         datetime(2026, 3, 4, 9, 12, 41, tzinfo=UTC), "absolute"),
    ], ids=["dmesg-r", "dmesg-x", "dmesg-x-T", "rfc5424", "rfc3164-pri", "journalctl-short-unix",
            "journalctl-short-full-utc", "journalctl-short-full-abbreviation-in-log-zone",
            "journalctl-short-full-numeric-zone", "rfc5424-nil-time", "dmesg-H-minute", "dmesg-H-minute-in-log-zone",
            "dmesg-H-delta-alone", "talosctl-dmesg", "talos-machined-without-node", "dmesg-d-delta",
            "dmesg-T-d-delta", "syslog-after-nul-run"])
    def test_time_is_read_behind_a_priority_or_facility_and_in_journalctl_unix_and_full_forms(
            self, line: str, zone: str, expected: datetime, source: str) -> None:
        from breakfix.collectors.kmsg_follow import has_time, line_time_source, log_zone

        got = line_time_source(line, booted=datetime(2026, 11, 23, tzinfo=UTC), now=T0, tz=log_zone(zone))
        assert got == (expected, source) and got[0].utcoffset() == timedelta(0)
        assert has_time(line) is (source != "none")

    @pytest.mark.parametrize(("line", "zone", "expected"), [
        ("Nov 22 08:15:30 host kernel: NVRM: Xid", "America/New_York", datetime(2026, 11, 22, 13, 15, 30, tzinfo=UTC)),
        ("Jul  1 08:15:30 host kernel: NVRM: Xid", "America/New_York", datetime(2026, 7, 1, 12, 15, 30, tzinfo=UTC)),
        ("[Sun Nov 22 08:15:30 2026] NVRM: Xid", "Asia/Kolkata", datetime(2026, 11, 22, 2, 45, 30, tzinfo=UTC)),
        ("2026-11-22T08:15:30 host kernel: NVRM: Xid", "Europe/Berlin", datetime(2026, 11, 22, 7, 15, 30, tzinfo=UTC)),
        ("2026-11-22T08:15:30+0000 host kernel: NVRM: Xid", "Europe/Berlin", datetime(2026, 11, 22, 8, 15, 30,
                                                                                   tzinfo=UTC)),
        ("[   10.500000] NVRM: Xid", "Asia/Kolkata", datetime(2026, 11, 23, 0, 0, 10, 500000, tzinfo=UTC)),
        ("6,1234,5000000,-;NVRM: Xid", "America/New_York", datetime(2026, 11, 23, 0, 0, 5, tzinfo=UTC)),
    ], ids=["syslog-winter", "syslog-summer-dst", "dmesg-T-half-hour-zone", "iso-without-offset",
            "iso-offset-wins", "boot-relative-ignores-zone", "raw-kmsg-ignores-zone"])
    def test_wall_clock_stamps_are_read_in_the_logs_zone(self, line: str, zone: str, expected: datetime) -> None:
        from breakfix.collectors.kmsg_follow import log_zone

        got = line_time(line, booted=datetime(2026, 11, 23, tzinfo=UTC), now=T0, tz=log_zone(zone))
        assert got == expected and got.utcoffset() == timedelta(0)

    @pytest.mark.parametrize("name", ["Mars/Olympus", "Europe", "", "../etc/passwd", "Europe/Berlin\x00"])
    def test_an_unknown_zone_is_refused_with_a_config_error(self, name: str) -> None:
        from breakfix.collectors.kmsg_follow import log_zone

        with pytest.raises(ValueError, match="unknown time zone"):
            log_zone(name)

    def test_local_follows_this_machines_daylight_saving_rules_per_date(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import time

        from breakfix.collectors.kmsg_follow import log_zone

        monkeypatch.setenv("TZ", "Europe/Berlin")
        time.tzset()
        try:
            local = log_zone("local")
            winter = line_time("[Sun Jan 11 12:00:00 2026] NVRM: Xid", booted=T0, now=T0, tz=local)
            summer = line_time("[Sat Jul 11 12:00:00 2026] NVRM: Xid", booted=T0, now=T0, tz=local)
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()
        assert winter == datetime(2026, 1, 11, 11, tzinfo=UTC) and summer == datetime(2026, 7, 11, 10, tzinfo=UTC)

    @pytest.mark.parametrize(("line", "zone", "now", "expected"), [
        ("Jan  1 00:30:00 host kernel: NVRM: Xid", "Asia/Tokyo", datetime(2024, 12, 31, 15, 31, tzinfo=UTC),
         datetime(2024, 12, 31, 15, 30, tzinfo=UTC)),  # already the new year in Tokyo
        ("Dec 31 23:59:00 host kernel: NVRM: Xid", "Asia/Tokyo", datetime(2024, 12, 31, 15, 31, tzinfo=UTC),
         datetime(2024, 12, 31, 14, 59, tzinfo=UTC)),
        ("Dec 31 20:00:00 host kernel: NVRM: Xid", "America/New_York", datetime(2025, 1, 1, 2, tzinfo=UTC),
         datetime(2025, 1, 1, 1, tzinfo=UTC)),  # still the old year in New York
        ("Dec 31 23:00:00 host kernel: NVRM: Xid", "UTC", datetime(2025, 1, 1, 0, 10, tzinfo=UTC),
         datetime(2024, 12, 31, 23, tzinfo=UTC)),
        ("Feb 29 10:00:00 host kernel: NVRM: Xid", "UTC", datetime(2025, 1, 10, tzinfo=UTC),
         datetime(2024, 2, 29, 10, tzinfo=UTC)),  # read in a year that has no 29 February
        ("Feb 29 10:00:00 host kernel: NVRM: Xid", "UTC", datetime(2028, 3, 1, tzinfo=UTC),
         datetime(2028, 2, 29, 10, tzinfo=UTC)),
    ], ids=["east-of-utc-new-year", "east-of-utc-old-year", "west-of-utc-old-year", "utc-rollover",
            "29-feb-read-the-next-january", "29-feb-in-its-leap-year"])
    def test_a_syslog_line_takes_the_year_of_its_own_wall_clock(self, line: str, zone: str, now: datetime,
                                                                 expected: datetime) -> None:
        from breakfix.collectors.kmsg_follow import log_zone

        assert line_time(line, booted=now, now=now, tz=log_zone(zone)) == expected


class TestKmsgSource:
    def test_real_lines_become_signals_with_gpu_identity(self, tmp_path: Path, catalog: Catalog) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        ctx = NodeContext(cluster="c1", node="n1", catalog=catalog)
        src = KmsgSource(follower(tmp_path, log), ctx, booted=T0)
        write(log, "[    5.000000] NVRM: GPU at PCI:0000:07:00: GPU-abcdef01-2345-6789-abcd-ef0123456789", XID)
        signals, pos = src.poll(T0)
        assert pos is not None
        (s,) = signals
        assert (s.check, s.code) == ("xid", "48") and s.gpu is not None
        assert s.gpu.uuid == "GPU-abcdef01-2345-6789-abcd-ef0123456789"

    def test_a_line_without_a_time_is_marked_none_not_passed_off_as_read(self, tmp_path: Path,
                                                                          catalog: Catalog) -> None:
        """The daemon stamps a line that carries no time with its poll's now: the signal says so
        (``details.time_source=none``); a line whose time was read carries no marker."""
        log = tmp_path / "kern.log"
        log.write_text("")
        src = KmsgSource(follower(tmp_path, log), NodeContext(cluster="c1", node="n1", catalog=catalog), booted=T0)
        write(log, "NVRM: Xid (PCI:0000:38:00): 43, pid=2924364, name=pt_main_thread, Ch 00000008",
              "1725018189.123456 gpu-node-7 kernel: NVRM: Xid (PCI:0000:cb:00): 31, pid=1, name=x, Ch 00000001", XID)
        bare, unix, dmesg = src.poll(T0 + timedelta(hours=1))[0]
        assert (bare.observed_at, bare.details["time_source"]) == (T0 + timedelta(hours=1), "none")
        assert unix.observed_at == datetime(2024, 8, 30, 11, 43, 9, 123456, tzinfo=UTC)
        assert "time_source" not in unix.details and "time_source" not in dmesg.details

    def test_nvlink5_xid_carries_nvidia_decode(self, tmp_path: Path, catalog: Catalog) -> None:
        log = tmp_path / "kern.log"
        log.write_text("")
        src = KmsgSource(follower(tmp_path, log), NodeContext(cluster="c1", node="n1", catalog=catalog), booted=T0)
        write(log, next(ln for ln in REAL if "): 149," in ln))
        (s,), _ = src.poll(T0)
        assert s.details["nvlink5_immediate_action"] == "RESET_GPU" and s.details["link"] == "1"
        assert catalog.classify(check="xid", code="149", message=s.message).category == "gpu_reset_required"

    def test_hundred_thousand_lines_yield_exactly_their_xids_quickly(self, tmp_path: Path, catalog: Catalog) -> None:
        """Acceptance: 100,000 mixed lines through the kmsg source in under 5 s, exactly the XIDs in them."""
        log = tmp_path / "kern.log"
        log.write_text("")
        src = KmsgSource(follower(tmp_path, log, max_lines=200_000), NodeContext(cluster="c1", node="n1",
                                                                               catalog=catalog), booted=T0)
        rng = random.Random(3)
        lines, xids = [], 0
        for i in range(100_000):
            if rng.random() < 0.1:
                lines.append(f"[{i}.000000] NVRM: Xid (PCI:0000:{rng.choice(['07', '18', '2a'])}:00): "
                             f"{rng.choice([13, 31, 48, 63, 79, 94])}, pid=1, name=python3, line {i}")
                xids += 1
            else:
                lines.append(rng.choice([NOISE, "[1.0] eth0: link up", "[2.0] systemd[1]: Started cron",
                                         *(x for x in REAL[-5:] if "RmInitAdapter" not in x)]))  # no fault lines
        write(log, *lines)
        started = time.perf_counter()
        signals, _ = src.poll(T0)
        elapsed = time.perf_counter() - started
        assert len(signals) == xids and len({s.id for s in signals}) == xids
        assert elapsed < 5.0, f"{elapsed:.2f}s"


class TestDmesgHuman:
    """``dmesg -H`` (util-linux dmesg.c, DMESG_TIMEFTM_RELTIME): ``[Dec 2 11:38]`` opens each minute, every other
    record carries ``[  +0.000004]``, its seconds since the record before. kmsg_dmesg_human.log is such a capture
    (written in that grammar around real driver lines, tests/data/SOURCES.md)."""

    LOG = (DATA / "kmsg_dmesg_human.log").read_text().splitlines()

    def test_delta_lines_follow_the_last_minute_stamp_and_every_line_between(self) -> None:
        from breakfix.collectors.kmsg_follow import HumanClock

        clock = HumanClock()
        placed = [clock.step(line, now=T0) for line in self.LOG]
        assert placed == [None, datetime(2025, 12, 2, 11, 38, 0, 4, tzinfo=UTC),
                          datetime(2025, 12, 2, 11, 38, 0, 60, tzinfo=UTC), None,
                          datetime(2025, 12, 2, 11, 39, 12, 345678, tzinfo=UTC),
                          datetime(2025, 12, 2, 11, 39, 12, 345681, tzinfo=UTC)]

    @pytest.mark.parametrize("lines", [
        ["[  +0.000004] NVRM: Xid (PCI:0000:07:00): 48, pid=1, name=x, y"],
        ["[Dec 2 11:38] usb 1-1: x", "[   10.500000] eth0: link up", "[  +0.000004] NVRM: Xid (PCI:0000:07:00): 48"],
        ["[Feb 30 11:38] usb 1-1: x", "[  +0.000004] NVRM: Xid (PCI:0000:07:00): 48, pid=1, name=x, y"],
        ["[Dec 2 11:38] usb 1-1: x", "[ +99999999999999999999.0] x", "[  +0.000004] NVRM: Xid (PCI:0000:07:00): 48"],
    ], ids=["no-minute-stamp-yet", "another-stamp-stops-the-clock", "impossible-date", "delta-out-of-range"])
    def test_a_delta_the_clock_cannot_place_is_left_unplaced_never_raised(self, lines: list[str]) -> None:
        from breakfix.collectors.kmsg_follow import HumanClock

        clock = HumanClock()
        assert [clock.step(line, now=T0) for line in lines][-1] is None

    def test_unstamped_lines_between_do_not_stop_the_clock(self) -> None:
        from breakfix.collectors.kmsg_follow import HumanClock

        clock = HumanClock(tz=None)
        lines = ("kern  :warn  : [Mar24 11:26] NVRM: The NVIDIA GPU 0000:b3:00.0",
                 "               NVRM: (PCI ID: 10de:26b5) installed in this system has",
                 "kern  :warn  : [  +0.126349] NVRM: GPU 0000:b3:00.0: GPU has fallen off the bus.")
        steps = [clock.step(x, now=T0) for x in lines]
        assert steps[:2] == [None, None] and steps[2] is not None

    def test_the_kmsg_source_stamps_delta_lines_from_the_clock_and_says_so(self, tmp_path: Path,
                                                                            catalog: Catalog) -> None:
        log = tmp_path / "dmesg-H.txt"
        log.write_text("")
        src = KmsgSource(follower(tmp_path, log), NodeContext(cluster="c1", node="n1", catalog=catalog), booted=T0)
        write(log, *self.LOG[:2])
        first, _ = src.poll(T0)
        write(log, *self.LOG[2:])  # the next batch: the clock carries over
        rest, _ = src.poll(T0)
        got = [(s.check, s.code, s.observed_at, s.details.get("time_source")) for s in first + rest]
        assert got == [
            ("xid", "48", datetime(2025, 12, 2, 11, 38, 0, 4, tzinfo=UTC), "delta"),
            ("xid", "64", datetime(2025, 12, 2, 11, 38, 0, 60, tzinfo=UTC), "delta"),
            ("xid", "79", datetime(2025, 12, 2, 11, 39, 12, 345678, tzinfo=UTC), "delta"),
            ("gpu.lost", None, datetime(2025, 12, 2, 11, 39, 12, 345681, tzinfo=UTC), "delta")]
        assert first[0].gpu is not None and first[0].gpu.uuid == "GPU-8a47641b-dff6-f09f-618c-c3eb58fb430d"

    def test_a_minute_stamped_fault_line_is_read_at_its_minute(self, tmp_path: Path, catalog: Catalog) -> None:
        log = tmp_path / "dmesg-H.txt"
        log.write_text("")
        src = KmsgSource(follower(tmp_path, log), NodeContext(cluster="c1", node="n1", catalog=catalog), booted=T0)
        write(log, "[Dec 2 11:40] NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus.")
        (s,), _ = src.poll(T0)
        assert s.observed_at == datetime(2025, 12, 2, 11, 40, tzinfo=UTC) and "time_source" not in s.details


# The stamp forms this module reads, and broken ones, so the generator reaches every branch of the readers.
STAMP_BITS = ["[Dec 2 10:37] ", "[Mar24 11:26]", "[Feb 30 11:38] ", "[Dec 99 99:99] ", "[  +0.000004] ",
              "[ +99999999999999999999.0] ", "[-1.5]", "192.168.11.119: kern: warning: [", "kern:    info: [",
              "2026-04-22T21:30:51.494604223Z", "9999-99-99T99:99:99Z", "]: ", "\x00", "\r", " <    0.000123>]",
              "[1105056.784211 <    0.000123>] ", "[Fri Aug 30 11:43:09 2024 <   -0.1>] ", "kern  :warn  : ", "<4>",
              "Mar  4 09:12:41 host kernel: ", "[   10.500000] ", "6,1,99999999999999999999,-;", "NVRM: Xid ", " "]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.sampled_from(STAMP_BITS), st.text(max_size=40)), max_size=10).map("".join))
def test_any_text_is_a_time_a_valueerror_or_no_time_and_the_human_clock_never_raises(text: str) -> None:
    from breakfix.collectors.kmsg_follow import NO_TIME, HumanClock, has_time, line_time_source, log_zone

    clock = HumanClock(tz=log_zone("Europe/Berlin"))
    for line in text.splitlines() or [text]:
        placed = clock.step(line, now=T0)
        assert placed is None or placed.utcoffset() == timedelta(0)
        try:
            _, source = line_time_source(line, booted=T0, now=T0, tz=log_zone("Europe/Berlin"))
        except (ValueError, OverflowError):
            assert has_time(line)
            continue
        assert has_time(line) is (source != NO_TIME)
