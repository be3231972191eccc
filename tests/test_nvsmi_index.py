"""Which NVML index an ``nvidia-smi -q`` dump proves for a GPU (``collectors.nvsmi.parse_nvsmi``).

The remediator and on-call address a GPU by its index (``nvidia-smi -r -i 3``), so a wrong index resets the wrong GPU.
nvidia-smi lists every attached GPU in NVML index order, so a GPU's position is its index only in a log that lists
them all (as many sections as ``Attached GPUs``). ``nvidia-smi -q -i 3`` prints ``Attached GPUs : 8`` and one section
(as a real ``-q -i 1`` of an 8 x V100 node does): that GPU is known by UUID and bus id, never as GPU 0. ``Minor Number``
is the /dev/nvidia<N> minor (nvidia-smi(1), nvmlDeviceGetMinorNumber), which NVIDIA says is not the index in general
(NVIDIA/nvidia-docker issues 376 and 1432; PrincetonUniversity/jobstats issue 34): never read as one.

Fixtures cut from real captures (checked below): ``nvsmi_gpud_h100_r535_tlimit_i3.txt`` is the header (with
``Attached GPUs : 8``) and GPU 3's section (0000:5D:00.0) of ``nvsmi_gpud_h100_r535_tlimit.txt``, i.e. what
``nvidia-smi -q -i 3`` prints there; ``nvsmi_k8sti_gb200_fabric_degraded_i1.xml`` is the header and GPU 1 (0000:0B:00.0,
its fabric unhealthy) of ``nvsmi_k8sti_gb200_fabric_degraded.xml``, i.e. ``nvidia-smi -q -x -i 1``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from breakfix.cli.main import app
from breakfix.collectors.agent_inventory import Gpu, from_nvsmi, merge
from breakfix.collectors.context import NodeContext
from breakfix.collectors.nvsmi import nvsmi_signals, parse_nvsmi
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef
from breakfix.schemas.signal import Signal
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
H100 = (DATA / "nvsmi_gpud_h100_r535_tlimit.txt").read_text()
H100_I3 = (DATA / "nvsmi_gpud_h100_r535_tlimit_i3.txt").read_text()
FABRIC = (DATA / "nvsmi_k8sti_gb200_fabric_degraded.xml").read_text()
FABRIC_I1 = (DATA / "nvsmi_k8sti_gb200_fabric_degraded_i1.xml").read_text()
EIGHT = (DATA / "nvsmi_8gpu_row_remap_pending.txt").read_text()
GPU3 = GpuRef(index=3, uuid="GPU-afe9f2ed-9dd0-572c-3cd8-b42b58b3bc99", pci_bus_id="0000:5d:00.0")
H100_BUSES = ["0000:19:00.0", "0000:3b:00.0", "0000:4c:00.0", "0000:5d:00.0", "0000:9b:00.0", "0000:bb:00.0",
              "0000:cb:00.0", "0000:db:00.0"]


def refs(text: str) -> list[tuple[int | None, str | None]]:
    return [(g.sample.gpu.index, g.sample.gpu.pci_bus_id) for g in parse_nvsmi(text).gpus]


def ctx(catalog: Catalog, *known: GpuRef) -> NodeContext:
    c = NodeContext(cluster="c1", node="n1", catalog=catalog)
    c.register_gpus(list(known))
    return c


def faults(catalog: Catalog, text: str, c: NodeContext | None = None) -> list[Signal]:
    return [s for s in nvsmi_signals(parse_nvsmi(text), c or ctx(catalog), T0) if not s.healthy]


def sections(text: str) -> list[str]:
    """The GPU sections of a one-log text dump."""
    return re.split(r"(?m)^(?=GPU 0000)", text)[1:]


def test_the_cut_fixtures_are_the_header_and_one_section_of_their_real_captures() -> None:
    header = H100[:H100.index("GPU 00000000:19:00.0")]
    assert "Attached GPUs                             : 8\n" in header
    assert header + sections(H100)[3] == H100_I3
    xml_header = FABRIC[:FABRIC.index('\t<gpu id="00000000:0A:00.0">')]
    assert xml_header + FABRIC[FABRIC.index('<gpu id="00000000:0B:00.0">'):] == FABRIC_I1


# --- whole dumps: position is the index ------------------------------------------------------------------------------
@pytest.mark.parametrize(("fixture", "expected"), [
    ("nvsmi_gpud_h100_r535_tlimit.txt", list(enumerate(H100_BUSES))),
    ("nvsmi_k8sti_gb200_fabric_degraded.xml", [(0, "0000:0a:00.0"), (1, "0000:0b:00.0")]),
    ("nvsmi_k8sti_gb200_lost.xml", [(0, "0000:0a:00.0"), (1, "0000:0b:00.0")]),
    ("nvsmi_1gpu_mig.xml", [(0, "0009:01:00.0")]),
    ("nvsmi_1gpu_v100_r470.txt", [(0, "0000:86:00.0")]),
])
def test_a_whole_dump_numbers_each_gpu_by_its_position(fixture: str, expected: list[tuple[int, str]]) -> None:
    assert refs((DATA / fixture).read_text()) == expected


def test_a_whole_one_gpu_dump_is_gpu_0_though_its_minor_number_reads_6() -> None:
    """nvsmi_1gpu_v100_r470.txt: Attached GPUs 1, Minor Number 6 (/dev/nvidia6): the minor is not the index."""
    assert "Minor Number                          : 6" in (DATA / "nvsmi_1gpu_v100_r470.txt").read_text()
    assert refs((DATA / "nvsmi_1gpu_v100_r470.txt").read_text()) == [(0, "0000:86:00.0")]


# --- filtered or incomplete dumps: no index claimed ------------------------------------------------------------------
def test_a_dump_of_one_gpu_out_of_eight_claims_no_index() -> None:
    """``nvidia-smi -q -i 3``: one section under ``Attached GPUs : 8`` is GPU 3, not GPU 0; its Minor Number (3 here)
    is not read as the index either."""
    (g,) = parse_nvsmi(H100_I3).gpus
    assert g.sample.gpu == GpuRef(index=None, uuid=GPU3.uuid, pci_bus_id=GPU3.pci_bus_id)
    assert parse_nvsmi(H100_I3).attached == 8


def test_an_xml_dump_of_one_gpu_out_of_two_claims_no_index() -> None:
    """``nvidia-smi -q -x -i 1``: ``<attached_gpus>2</attached_gpus>`` and one ``<gpu>``."""
    assert refs(FABRIC_I1) == [(None, "0000:0b:00.0")]


@pytest.mark.parametrize(("name", "text"), [
    ("-i 3 indented", "".join("  " + line for line in H100_I3.splitlines(keepends=True))),
    ("-i 3 through Windows", "\ufeff" + H100_I3.replace("\n", "\r\n")),
    ("two GPUs of eight", H100[:H100.index("GPU 00000000:19:00.0")] + "".join(sections(H100)[2:4])),
    ("the first GPU of eight alone", H100[:H100.index("GPU 00000000:3B:00.0")]),
    ("no Attached GPUs line", H100.replace("Attached GPUs                             : 8\n", "")),
    ("banner-less sections", EIGHT[EIGHT.index("GPU 00000000:"):]),
    ("an XML document cut short", FABRIC[:FABRIC.index('<gpu id="00000000:0B:00.0">') + 200][:-1000]),
])
def test_a_log_with_fewer_gpu_sections_than_attached_or_no_count_claims_no_index(name: str, text: str) -> None:
    got = refs(text)
    assert got and all(index is None for index, _ in got), name


def test_a_dump_missing_a_gpu_it_could_not_open_claims_no_index() -> None:
    """GPU 2 off the bus: nvidia-smi prints no section for it, so the sections after it are one position short of
    their index (GPU 3 would read as 2): 7 sections of 8 attached prove no index for any."""
    parts = sections(H100)
    text = ("Unable to determine the device handle for GPU0000:4C:00.0: Unknown Error\n"
            + H100[:H100.index("GPU 00000000:19:00.0")] + "".join(parts[:2] + parts[3:]))
    got = refs(text)
    assert sorted(bus or "" for _, bus in got) == H100_BUSES
    assert {index for index, _ in got} == {None}


# --- -l N captures: each log on its own ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "text", "expected"), [
    ("text, whole logs", H100 + H100, list(enumerate(H100_BUSES))),
    ("text, -i 3 logs", H100_I3 + H100_I3, [(None, "0000:5d:00.0")]),
    ("xml, whole documents", FABRIC + FABRIC, [(0, "0000:0a:00.0"), (1, "0000:0b:00.0")]),
    ("xml, -i 1 documents", FABRIC_I1 + FABRIC_I1, [(None, "0000:0b:00.0")]),
    ("-i 3 log, then a whole one", H100_I3 + H100, list(enumerate(H100_BUSES))),
])
def test_an_l_capture_numbers_a_gpu_only_in_a_log_that_lists_every_attached_gpu(
        name: str, text: str, expected: list[tuple[int | None, str]]) -> None:
    assert sorted(refs(text), key=lambda r: r[1] or "") == expected, name


def test_a_later_log_cut_short_keeps_the_index_the_whole_log_before_it_gave() -> None:
    """``-l 5`` killed in its second interval: GPU 0-2's latest readings come from the cut log, their index from the
    first log, which listed all eight (same UUID and bus id)."""
    cut = re.sub(r"GPU Current Temp( +): \d+ C", r"GPU Current Temp\1: 77 C",
                 H100[:H100.index("GPU 00000000:5D:00.0")])
    read = parse_nvsmi(H100 + cut)
    assert refs(H100 + cut) == list(enumerate(H100_BUSES))
    assert [g.sample.temperature == 77 for g in read.gpus][:4] == [True, True, True, False], "GPU 0-2: the latest"


def test_a_gpu_of_a_later_log_with_another_uuid_in_its_slot_takes_no_index_from_the_earlier_log() -> None:
    swapped = H100_I3.replace(GPU3.uuid or "", "GPU-00000000-1111-2222-3333-444444444444")
    (g3,) = [g for g in parse_nvsmi(H100 + swapped).gpus if g.sample.gpu.pci_bus_id == "0000:5d:00.0"]
    assert (g3.sample.gpu.index, g3.sample.gpu.uuid) == (None, "GPU-00000000-1111-2222-3333-444444444444")


# --- what flows on: signals, the node's GPUs, the agent's inventory -------------------------------------------------
def test_signals_of_a_one_gpu_dump_name_it_by_bus_id_and_keep_the_whole_dumps_ids(catalog: Catalog) -> None:
    """GPU 3's HW slowdown read from ``-i 3``: no index, labelled by its bus id (never ``gpu0``), and the same signal
    id as the whole dump gives it (ids key a GPU by UUID)."""
    one = {s.check: s for s in faults(catalog, H100_I3)}
    whole = {s.check: s for s in faults(catalog, H100) if s.gpu is not None and s.gpu.index == 3}
    assert sorted(one) == sorted(whole) == ["clock.hw_slowdown", "clock.power_brake"]
    for check, s in one.items():
        assert s.gpu == GpuRef(uuid=GPU3.uuid, pci_bus_id=GPU3.pci_bus_id)
        assert "0000:5d:00.0" in s.message and "gpu0" not in s.message
        assert s.id == whole[check].id


def test_an_xml_dump_of_one_unhealthy_gpu_names_it_by_bus_id(catalog: Catalog) -> None:
    (fab,) = [s for s in faults(catalog, FABRIC_I1) if s.check == "fabric.gpu"]
    assert (fab.gpu.index if fab.gpu else -1, fab.gpu.pci_bus_id if fab.gpu else None) == (None, "0000:0b:00.0")
    assert fab.details["fabric_health"] == "summary Unhealthy, route unhealthy"


def test_the_nodes_registered_gpus_give_the_index_the_dump_cannot_and_keep_it(catalog: Catalog) -> None:
    """The nvml source registered GPU 3 (``ctx.register_gpus``): a ``-i 3`` dump's signals carry index 3, and reading
    the dump does not overwrite the node's record of GPU 3 with an index-less one."""
    c = ctx(catalog, GPU3)
    got = faults(catalog, H100_I3, c)
    assert got and {s.gpu for s in got} == {GPU3}
    assert "gpu3" in got[0].message
    assert c.gpus_by_uuid[GPU3.uuid or ""] == c.gpus_by_pci["0000:5d:00.0"] == GPU3


@pytest.mark.parametrize(("name", "known"), [
    ("another card in that slot", GpuRef(index=3, uuid="GPU-00000000-1111-2222-3333-444444444444",
                                         pci_bus_id="0000:5d:00.0")),
    ("that card in another slot", GpuRef(index=5, uuid=GPU3.uuid, pci_bus_id="0000:bb:00.0")),
    ("the node knows no index", GpuRef(uuid=GPU3.uuid, pci_bus_id=GPU3.pci_bus_id)),
])
def test_a_registered_gpu_that_is_not_the_same_card_gives_no_index(catalog: Catalog, name: str, known: GpuRef) -> None:
    got = faults(catalog, H100_I3, ctx(catalog, known))
    assert got and {s.gpu.index if s.gpu else -1 for s in got} == {None}, name


def test_a_gpu_lost_by_bus_id_takes_index_and_uuid_from_the_registered_gpus(catalog: Catalog) -> None:
    """``Unable to determine the device handle for GPU0000:5D:00.0``: nvidia-smi names the GPU by bus id only."""
    text = "Unable to determine the device handle for GPU0000:5D:00.0: GPU is lost\n"
    (lost,) = faults(catalog, text, ctx(catalog, GPU3))
    assert (lost.check, lost.gpu) == ("gpu.lost", GPU3)
    (alone,) = faults(catalog, text)
    assert alone.gpu == GpuRef(pci_bus_id="0000:5d:00.0")


def test_a_whole_dump_keeps_its_own_index(catalog: Catalog) -> None:
    """A dump that proves an index is not overridden by the node's record."""
    c = ctx(catalog, GpuRef(index=6, uuid=GPU3.uuid, pci_bus_id=GPU3.pci_bus_id))
    assert {s.gpu.index for s in faults(catalog, H100, c) if s.gpu and s.gpu.uuid == GPU3.uuid} == {3}


def test_the_cli_prints_a_one_gpu_dumps_signals_without_an_index() -> None:
    res = CliRunner().invoke(app, ["signals", "nvsmi", str(DATA / "nvsmi_gpud_h100_r535_tlimit_i3.txt"), "--node",
                                   "n1"])
    assert res.exit_code == 0, res.output
    got = [json.loads(x) for x in res.stdout.splitlines()]
    assert got and {(r["gpu"]["index"], r["gpu"]["pci_bus_id"]) for r in got} == {(None, "0000:5d:00.0")}


def test_the_agents_inventory_keeps_the_index_it_remembered_after_reading_a_one_gpu_dump() -> None:
    """``agent_inventory.merge`` refreshes a remembered GPU from a reading: an index-less one keeps index 3, where GPU 3
    read as GPU 0 would have been remembered as GPU 0."""
    remembered = (Gpu(GPU3.uuid, 3, GPU3.pci_bus_id),)
    reading = from_nvsmi(parse_nvsmi(H100_I3))
    assert reading.present == (Gpu(GPU3.uuid, None, GPU3.pci_bus_id),)
    assert merge(remembered, reading) == remembered
