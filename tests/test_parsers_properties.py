"""Property tests for every input parser (kmsg, dcgm, IB sysfs, ibstat, nvidia-smi, ``dcgmi diag -j``, the node
agent's GPU inventory file): arbitrary text never raises anything but the parser's own typed error, never yields a
signal without the NVIDIA marker the format needs, and a diagnostic passes only when its hardware tests passed.
The fleet rules take any Prometheus series (labels, NaN, infinities) and skip what they cannot use.
Fixed example budget, derandomised: the suite costs the same every run."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breakfix.collectors.agent_checks import LEVEL_TESTS, canonical_test, parse_diag
from breakfix.collectors.agent_inventory import Gpu, InventoryStore, Reading, merge, missing
from breakfix.collectors.context import NodeContext
from breakfix.collectors.dcgm import DcgmRules
from breakfix.collectors.fabric import FabricRules, FabricThresholds, read_ports
from breakfix.collectors.ibstat import parse_ibstat
from breakfix.collectors.kmsg import MAX_RECORDS, BadLine, line_signal, parse_line, records
from breakfix.collectors.kmsg_follow import NO_TIME, has_time, line_time, line_time_source
from breakfix.collectors.nvsmi import NvsmiFormatError, nvsmi_signals, parse_nvsmi
from breakfix.collectors.promfleet import FleetRules, Series, load_fleet_rules
from breakfix.collectors.sniff import sniff
from breakfix.schemas.catalog import Catalog, default_catalog
from breakfix.schemas.common import Severity

BUDGET = settings(max_examples=100, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NOW = datetime(2026, 1, 2, tzinfo=UTC)
CATALOG: Catalog = default_catalog()
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
# Fragments of the real formats, so the generator reaches deep into the parsers, not only their first check.
KMSG_BITS = st.sampled_from(["NVRM: Xid (", "PCI:", "0000:", "ffff:", "1ffff:", "01:00", ".0", " GPU-I:", "05", "): ",
                             "48", "99999999", ", pid=", "'<unknown>'", ", name=", "[", "99999999999999999999.0", "] ",
                             "2024-13-45T25:61:00+0000 ", "Feb 30 11:43:09 ", "4,1,99999999999999999999,-;",
                             "nvidia-nvswitch0: SXid (PCI:", "GPU at PCI:", ": GPU-", "has fallen off the bus", "\n",
                             "<4>", "<4>1 ", "kern  :warn  : ", "99999999999.999999 ", "Fri 9999-12-31 23:59:59 -23 ",
                             "Fri 2024-08-30 11:43:09 CEST ", "The NVIDIA GPU ", "0000:01:00.0", " (PCI ID: 10de:1292)",
                             "\\x0a", "fallen off the bus", "NVRM: ", "NVRM: GPU ", ": GPU has fallen off the bus.",
                             "NVRM: The NVIDIA GPU 0000:01:00.0", "RmInitAdapter failed! (0x24:0x72:1568)",
                             "rm_init_adapter failed, device minor number 5",
                             "NVRM: knvlinkDiscoverPostRxDetLinks_GH100: Getting peer0's postRxDetLinkMask failed!"])
# Whole records, each a start the kernel-log rules cut at (kernel_log_formats.md 2-5): glued in any order, they come
# back as they were. The first may carry a syslog prefix; the \\x0a-joined one is one /dev/kmsg record.
KMSG_RECORDS = st.sampled_from([
    "[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable double bit error",
    "NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:07:00): 64, pid='<unkn",
    "[ 1108.858286] nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Fatal, Link 28 sourcetrack timeout error (First)",
    "[  219.480000] NVRM: GPU 0000:07:00.0: GPU has fallen off the bus.",
    "NVRM: GPU at 0000:01:00.0 has fallen off the bus.", "[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0",
    "NVRM: The NVIDIA GPU 0000:b3:00.0\\x0aNVRM: (PCI ID: 10de:26b5) installed in this system has\\x0aNVRM: fallen off "
    "the bus and is not responding to commands.",
    "[    6.000000] NVRM: GPU 0000:0a:00.0: RmInitAdapter failed! (0x24:0x72:1568)",
    "NVRM: rm_init_adapter failed for device bearing minor number 0",
    "[  912.112233] NVRM: knvlinkDiscoverPostRxDetLinks_GH100: Getting peer0's postRxDetLinkMask failed!",
    "NVRM: knvlinkUpdatePostRxDetectLinkMask_IMPL: Failed to update Rx Detect Link mask!",
    "[  219.470990] NVRM: GPU at PCI:0000:07:00: GPU-8a47641b-dff6-f09f-618c-c3eb58fb430d"])
DCGM_BITS = st.sampled_from(["DCGM_FI_DEV_XID_ERRORS", "DCGM_EXP_XID_ERRORS_COUNT", "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
                             "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", '{gpu="0",UUID="GPU-a",pci_bus_id="', "N/A", '"', "}",
                             ' xid="', "1e308", "-Inf", "NaN", "ERROR", " ", "\n", "# TYPE ", " counter", " gauge",
                             'GPU_I_ID="', "-1", "99999999999999999999", "DCGM_EXP_GPU_HEALTH_STATUS",
                             "DCGM_FI_DEV_ROW_REMAP_FAILED", "DCGM_FI_DEV_NVLINK_REPLAY_TOTAL", ' health_watch="',
                             ",health_error_code=\"", "DCGM_FR_", "MEM", "20", "10", "5"])
LABEL_KEYS = st.sampled_from(["Hostname", "hostname", "node", "gpu", "UUID", "uuid", "pci_bus_id", "GPU_I_ID",
                              "GPU_I_PROFILE", "namespace", "endpoint", "pod", "__name__"])
LABEL_VALUES = st.one_of(st.sampled_from(["N/A", "", "0", "00000000:4F:00.0", "GPU-a", "99999999999999999999", "-1"]),
                         TEXT)
SERIES = st.builds(Series, st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=8),
                   st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 79.0, 2.0**31])))
NVSMI_BITS = st.sampled_from(["==============NVSMI LOG==============\n", "GPU 00000000:18:00.0\n", "    ECC Errors\n",
                              "        Volatile\n", "            SRAM Uncorrectable     : ", "N/A", "9" * 30, "Yes",
                              "    Remapped Rows\n", "        Pending      : ", "    Fabric\n", "        State  : ",
                              "In Progress", "<nvidia_smi_log>", "<gpu id=\"x\">", "</gpu>", "<!ENTITY a", "\n", " : ",
                              "        Aggregate\n", "            SRAM Threshold Exceeded : ", "No",
                              "        Aggregate Uncorrectable SRAM Sources\n", "            SRAM L2  : ",
                              "<ecc_errors>", "<aggregate>", "<sram_threshold_exceeded>", "</sram_threshold_exceeded>"])
IBSTAT_BITS = st.sampled_from(["CA 'mlx5_0'\n", "\tPort 1:\n", "\t\tState: ", "\t\tPhysical state: ", "Active", "Down",
                               "4: ACTIVE", "LinkUp", "\t\tRate: ", "400", "9" * 30, "\t\tLink layer: ", "Ethernet",
                               "Infiniband device 'x' port 1 status:\n", "\tphys state:\t ", "\n"])

DIAG_BITS = st.sampled_from(['{"DCGM Diagnostic": {"test_categories": [', '{"DCGM GPU Diagnostic": {',
                             '"test_categories"', ': [', '{"category": "Hardware", "tests": [',
                             '{"name": "memory", "results": [', '{"name": "pcie", ', '"GPU Memory"',
                             '{"status": "Pass"}', '{"status": "Skip"}', '"Warn"',
                             '"info": ["The memory test is skipped."]',
                             '"warnings": [{"warning": "x", "error_id": 48}]',
                             '"test_summary": {"status": "Skip"}', '"runtime_error": "x"', "]", "}", ", ", "[" * 50,
                             "null", "1e999", "9" * 5000])
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT,
                              st.sampled_from(["Pass", "Skip", "Warn", "Fail", "Not Run", "memory", "pcie"])),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
                        st.sampled_from(["name", "results", "status", "info", "warnings", "warning", "error_id",
                                         "test_summary", "tests", "category", "runtime_error"]), inner, max_size=5)),
                    max_leaves=30)
GPUS = st.builds(Gpu, st.one_of(st.none(), st.sampled_from(["GPU-a", "GPU-b", "GPU-c", "GPU-d"])),
                 st.one_of(st.none(), st.integers(0, 7)),
                 st.one_of(st.none(), st.sampled_from(["0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0"])))


def ctx() -> NodeContext:
    return NodeContext(cluster="c", node="n", catalog=CATALOG)


def at(line: str) -> tuple[datetime, str]:
    return line_time(line, booted=NOW, now=NOW), ""


@BUDGET
@given(st.one_of(TEXT, st.lists(st.one_of(KMSG_BITS, TEXT), max_size=12).map("".join)))
def test_kmsg_any_text_is_a_signal_none_or_badline(text: str) -> None:
    for line in text.splitlines() or [text]:
        try:
            sig = line_signal(line, ctx(), observed_at=at, discriminator="d")
        except BadLine:
            continue
        if "NVRM" not in line and "SXid" not in line:
            assert sig is None


@BUDGET
@given(st.one_of(TEXT, st.lists(st.one_of(KMSG_BITS, TEXT), max_size=24).map("".join)))
def test_kmsg_glued_records_split_losing_nothing_and_each_reads_alone(text: str) -> None:
    """A line's records, put back together, are the line; at most MAX_RECORDS; each is a signal, None or a
    BadLine on its own."""
    for line in text.splitlines() or [text]:
        parts = records(line)
        assert "".join(parts) == line and 1 <= len(parts) <= MAX_RECORDS
        for part in parts:
            try:
                line_signal(part, ctx(), observed_at=at, discriminator="d")
            except BadLine:
                continue


@BUDGET
@given(st.sampled_from(["", "2026-04-01T10:00:00+00:00 gpu-1 kernel: "]),
       st.lists(KMSG_RECORDS, min_size=1, max_size=MAX_RECORDS + 4))
def test_kmsg_whole_records_glued_in_any_order_come_back_as_they_were(prefix: str, glued: list[str]) -> None:
    """Xid, SXid and every driver record the rules read, glued one after the other, are cut back into those records
    (the first keeping the line's prefix), up to MAX_RECORDS; the rest stay in the last one's text."""
    parts = records(prefix + "".join(glued))
    kept = [*glued[:MAX_RECORDS - 1], "".join(glued[MAX_RECORDS - 1:])] if len(glued) > MAX_RECORDS else glued
    assert parts == [prefix + kept[0], *kept[1:]]


@BUDGET
@given(st.lists(st.one_of(KMSG_BITS, TEXT), max_size=24).map("".join))
def test_kmsg_a_record_after_the_first_is_an_xid_sxid_or_a_driver_record_the_rules_read(text: str) -> None:
    """Every record a line is cut into after its first starts (after its dmesg time) with an Xid or SXid, or is a
    driver record the rules read on its own: a signal, a BadLine, or the PCI-to-UUID line. Only an Xid or SXid start
    cuts right after a ``\\x0a`` (a /dev/kmsg record's lines, joined, stay one record)."""
    for line in text.splitlines() or [text]:
        parts = records(line)
        for i, part in enumerate(parts[1:], 1):
            body = part.split("]", 1)[1].lstrip() if part.startswith("[") else part
            if body.startswith(("NVRM: Xid", "nvidia-nvswitch")):
                continue
            assert body.startswith("NVRM: ") and not "".join(parts[:i]).endswith("\\x0a")
            try:
                assert parse_line(part) is not None or body.startswith("NVRM: GPU at ")
            except BadLine:
                continue


@BUDGET
@given(st.one_of(TEXT, st.lists(st.one_of(KMSG_BITS, TEXT), max_size=12).map("".join)))
def test_kmsg_line_time_is_a_time_or_valueerror_and_has_time_agrees(text: str) -> None:
    """Whatever the line, its time is read, or it is an impossible date / out of range (ValueError, OverflowError),
    or it is ``NO_TIME``; ``has_time`` (what ``line_signal`` marks by) says False exactly for ``NO_TIME``."""
    for line in text.splitlines() or [text]:
        try:
            _, source = line_time_source(line, booted=NOW, now=NOW)
        except (ValueError, OverflowError):
            assert has_time(line)
            continue
        assert has_time(line) is (source != NO_TIME)


@BUDGET
@given(st.one_of(TEXT, st.lists(st.one_of(DCGM_BITS, TEXT), max_size=16).map("".join)))
def test_dcgm_any_page_is_a_cycle_or_valueerror(text: str) -> None:
    try:
        cycle = DcgmRules(ctx()).apply(text, NOW, 0.0, baseline_xids=False)
    except ValueError:
        return
    if "DCGM_" not in text:
        assert cycle.states == [] and cycle.events == []


@BUDGET
@given(st.lists(SERIES, max_size=6), st.lists(SERIES, max_size=6))
def test_fleet_rules_take_any_series_and_skip_what_they_cannot_use(faults: list[Series],
                                                                   observed: list[Series]) -> None:
    rules = FleetRules(load_fleet_rules(), cluster="c", catalog=CATALOG)
    for rule in rules.spec.rules:
        before = rules.skipped
        cycle = rules.apply(rule, faults, observed, NOW)
        used = len(cycle.states) + len(cycle.events) + (rules.skipped - before)
        assert used <= len(faults) + len(observed)


@BUDGET
@given(st.lists(st.one_of(IBSTAT_BITS, TEXT), max_size=16).map("".join))
def test_ibstat_any_text_never_raises_and_no_block_no_port(text: str) -> None:
    read = parse_ibstat(text)
    cycle = FabricRules(ctx(), FabricThresholds(single_reading=True)).apply(read.ports, NOW, 0.0)
    if "CA '" not in text and "Infiniband device '" not in text:
        assert read.ports == [] and cycle.states == []
    for s in cycle.states:  # a state the kernel never prints is at most a warning
        port = next(p for p in read.ports if p.port == s.component)
        if s.check == "ib.link_down" and (port.state is None or port.phys_state is None) and \
                s.severity is Severity.CRITICAL:
            assert (port.state is not None and port.state not in (4, 5)) or (
                port.phys_state is not None and port.phys_state != 5)


@BUDGET
@given(st.lists(st.one_of(IBSTAT_BITS, TEXT, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
                min_size=4, max_size=4))
def test_ib_sysfs_any_file_content_never_raises(files: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        port = Path(d) / "mlx5_0" / "ports" / "1"
        (port / "counters").mkdir(parents=True)
        for name, content in zip(("state", "phys_state", "rate", "counters/link_downed"), files, strict=True):
            (port / name).write_bytes(content.encode("utf-8", "surrogatepass"))
        skipped: list[str] = []
        ports = read_ports(Path(d), skipped)
        FabricRules(ctx(), FabricThresholds(single_reading=True)).apply(ports, NOW, 0.0)
        assert len(ports) <= 1


@BUDGET
@given(st.one_of(TEXT, st.lists(st.one_of(NVSMI_BITS, TEXT), max_size=16).map("".join)))
def test_nvsmi_any_text_is_signals_or_format_error(text: str) -> None:
    try:
        read = parse_nvsmi(text)
    except NvsmiFormatError:
        return
    assert "NVSMI LOG" in text or "<nvidia_smi_log" in text or "Product Name" in text
    nvsmi_signals(read, ctx(), NOW)


@BUDGET
@given(TEXT)
def test_sniff_never_raises(text: str) -> None:
    assert sniff(text) in (None, "binary", "nvsmi", "nvsmi-table", "ibstat", "signals", "prometheus", "kmsg")


def _diag_verdict_holds(text: str, level: int) -> None:
    got = parse_diag(text, level)
    got.summary()
    if got.passed:  # a pass: nothing failed, and every hardware test of the level passed or is off for this model
        seen = {canonical_test(t.name): t.status for t in got.tests}
        assert not got.problem and not got.failed and all(s != "fail" for s in seen.values())
        required = LEVEL_TESTS[level]
        assert all(k in seen for k in required)
        assert all(seen[k] in ("pass", "warn") or k in {canonical_test(n) for n in got.not_applicable}
                   for k in required)
        assert not required or any(seen[k] in ("pass", "warn") for k in required)


@BUDGET
@given(st.one_of(TEXT, st.lists(st.one_of(DIAG_BITS, TEXT), max_size=16).map("".join)), st.integers(1, 4))
def test_diag_any_text_is_a_verdict_and_a_pass_means_the_hardware_passed(text: str, level: int) -> None:
    _diag_verdict_holds(text, level)


@BUDGET
@given(st.sampled_from(["DCGM Diagnostic", "DCGM GPU Diagnostic"]), JSON, st.integers(1, 4))
def test_diag_any_json_shape_is_a_verdict(key: str, body: object, level: int) -> None:
    for doc in ({key: body}, {key: {"test_categories": body}}, {key: {"test_categories": [{"tests": body}]}},
                {key: {"test_categories": [{"tests": [{"name": "memory", "results": body}]}]}}):
        _diag_verdict_holds(json.dumps(doc), level)


@BUDGET
@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()),
                 JSON.map(lambda gpus: json.dumps({"version": 1, "gpus": gpus}).encode()),
                 st.lists(st.fixed_dictionaries({}, optional={"uuid": JSON, "index": JSON, "pci_bus_id": JSON}))
                 .map(lambda gpus: json.dumps({"version": 1, "gpus": gpus}).encode())))
def test_inventory_file_any_content_is_an_inventory_or_none(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agent-gpu-inventory.json"
        path.write_bytes(content)
        got = InventoryStore(path).load()
        assert got is None or all(g.uuid or g.pci_bus_id for g in got)


def _one_card_per_slot_and_uuid(gpus: tuple[Gpu, ...]) -> bool:
    """GPUs the driver answers for, as a reading gives them: each with its UUID, no two sharing a PCI slot or a UUID,
    and either every one with its slot (``nvidia-smi -q``) or none (``nvidia-smi -L``). (A GPU the driver lists but
    cannot open comes in ``lost``, by its slot only.)"""
    slots = [g.pci_bus_id for g in gpus if g.pci_bus_id]
    ids = [g.uuid for g in gpus if g.uuid]
    return len(ids) == len(gpus) == len(set(ids)) and len(slots) == len(set(slots)) and len(slots) in (0, len(gpus))


@BUDGET
@given(st.lists(GPUS, max_size=6).map(tuple),
       st.lists(GPUS, max_size=6).map(tuple).filter(_one_card_per_slot_and_uuid), st.lists(GPUS, max_size=3))
def test_inventory_merge_forgets_no_gpu_and_what_was_just_seen_with_its_slot_is_never_missing(
        remembered: tuple[Gpu, ...], present: tuple[Gpu, ...], lost: list[Gpu]) -> None:
    reading = Reading(present, tuple(Gpu(pci_bus_id=g.pci_bus_id) for g in lost))
    after = merge(remembered, reading)
    uuids = {g.uuid for g in after}
    slots = {g.pci_bus_id for g in after}
    known = {r.uuid for r in remembered if r.uuid}
    for g in present:  # everything a reading shows with its slot is remembered; a slotless GPU only if known
        if g.pci_bus_id is None and g.uuid not in known:
            continue
        assert (g.uuid in uuids) if g.uuid else (g.pci_bus_id is None or g.pci_bus_id in slots)
    new_in_slot = {g.pci_bus_id for g in present if g.uuid and g.uuid not in {r.uuid for r in remembered}}
    for g in (g for g in remembered if g.uuid or g.pci_bus_id):  # a GPU is kept, unless a new card took its slot
        assert (g.uuid in uuids if g.uuid else g.pci_bus_id in slots) or g.pci_bus_id in new_in_slot
    gone = missing(after, reading)
    assert all(g.uuid not in {p.uuid for p in present if p.uuid} for g in gone)
    with tempfile.TemporaryDirectory() as d:  # and the file gives back what was saved
        store = InventoryStore(Path(d) / "inv.json")
        assert store.save(after, NOW)
        assert store.load() == (tuple(g for g in after if g.uuid or g.pci_bus_id) or None)


@pytest.mark.parametrize("line", ["[99999999999999999999.0] NVRM: Xid (PCI:0000:01:00): 48, x",
                                  "2024-13-45T25:61:00+0000 kernel: NVRM: Xid (PCI:0000:01:00): 48, x"])
def test_examples_that_crashed_the_line_path_are_badlines(line: str) -> None:
    with pytest.raises(BadLine):
        line_signal(line, ctx(), observed_at=at, discriminator="d")
