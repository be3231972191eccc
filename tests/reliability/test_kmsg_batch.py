"""One bad kernel-log line never costs the faults around it (issue 12 item 3): the kmsg source skips and counts
the bad line, returns both fatal XIDs of the batch, and the position it returns covers the whole batch."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg_follow import KmsgFollower, PositionStore
from breakfix.collectors.kmsg_source import KmsgSource
from breakfix.schemas.catalog import Catalog

FATAL_A = "[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable DBE"
FATAL_B = "[  220.000001] NVRM: Xid (PCI:0000:2b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
BAD_LINES = {
    "impossible-date": "2024-13-45T25:61:00+0000 host kernel: NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception",
    "pci-domain-above-ffff": "[  219.6] NVRM: Xid (PCI:1ffff:01:00): 48, pid=1, name=x, DBE",
    "huge-timestamp": "[99999999999999999999.000000] NVRM: Xid (PCI:0000:01:00): 48, pid=1, name=x, DBE",
    "impossible-dmesg-T-date": "[Fri Feb 30 11:43:09 2024] NVRM: Xid (PCI:0000:cb:00): 13, pid=1, name=x, y",
    "bad-gpu-map-line": "[  5.1] NVRM: GPU at PCI:fffff:01:00: GPU-8a47641b-dff6-f09f-618c-c3eb58fb430d",
    "nvswitch-bad-pci": "nvidia-nvswitch0: SXid (PCI:1ffff0:c3:00.0): 24007, Fatal, Link 28 sourcetrack timeout error",
}


@pytest.mark.parametrize("bad", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_bad_line_between_two_fatal_xids_both_are_published(catalog: Catalog, tmp_path: Path, bad: str) -> None:
    log = tmp_path / "kern.log"
    log.write_text(f"{FATAL_A}\n{bad}\n{FATAL_B}\n")
    follower = KmsgFollower(log, PositionStore(tmp_path / "pos.json"), boot_id="b", from_start=True)
    source = KmsgSource(follower, NodeContext(cluster="c1", node="n1", catalog=catalog),
                        booted=datetime(2026, 1, 1, tzinfo=UTC))
    with capture_logs() as logs:
        signals, pos = source.poll(datetime(2026, 1, 2, tzinfo=UTC))
    assert [(s.check, s.code, s.severity.value) for s in signals] == [("xid", "48", "critical"),
                                                                     ("xid", "79", "fatal")]
    assert pos is not None and pos.offset == log.stat().st_size, "the whole batch is done, bad line included"
    if "GPU at PCI" in bad:
        assert source.skipped == 0, "an unusable map line is only not learned"
    else:
        assert source.skipped == 1
        assert [e["count"] for e in logs if e["event"] == "kmsg_lines_skipped"] == [1]
