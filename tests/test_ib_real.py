"""The fabric source and the ibstat reader on real captures: a whole H100 node's /sys/class/infiniband tree (8 NDR
ports and an Ethernet bond, leptonai/gpud), real ``ibstat`` outputs of H100 / A100 nodes (one cut short by an
``ibpanic`` when an adapter vanished mid-listing, one with RoCE ports Down/Polling and Down/Disabled), and
``ibstat``'s other documented layouts (one port alone, FDR10 and 1X SDR rates; infiniband-diags ``ibstat.c``).
Sources: ``tests/data/SOURCES.md``."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.fabric import FabricRules, FabricThresholds, PortSample, read_ports
from breakfix.collectors.ibstat import looks_like_ibstat, parse_ibstat
from breakfix.collectors.ibstate import PHYS_STATES, PORT_STATES, parse_state
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0

DATA = Path(__file__).parent / "data"
H100 = DATA / "ib_sysfs_gpud_h100"
OFFLINE = FabricThresholds(expected_rate_gbps=400, single_reading=True)


def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


def faults(cycle: Cycle) -> dict[tuple[str, str | None], str]:
    return {(s.check, s.component): s.severity.value for s in cycle.states if not s.healthy}


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ib"
    shutil.copytree(H100, root)
    return root


# --- the real H100 sysfs tree -------------------------------------------------------------------------------------
def test_real_h100_tree_reads_nine_ports_and_judges_the_ethernet_bond_by_its_own_rate(catalog: Catalog) -> None:
    ports = read_ports(H100)
    assert [(p.port, p.rate_gbps, p.link_layer) for p in ports][-1] == ("mlx5_bond_0/1", 200.0, "Ethernet")
    assert len(ports) == 9 and all(p.state == 4 and p.phys_state == 5 for p in ports)
    cycle = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=400)).apply(ports, T0, 0.0)
    assert faults(cycle) == {}, "200 Gb/sec (2X NDR) is the RoCE bond's own rate, not a degraded NDR port"


def test_real_h100_tree_saturated_counters_are_said_to_be_at_least_their_width(catalog: Catalog) -> None:
    """mlx5_1 reads link_downed 255 (8 bit) and every port excessive_buffer_overrun_errors 15 (4 bit): IBA counters
    stop there, so the reading is "at least", and rises are invisible until the counters are reset."""
    cycle = FabricRules(ctx(catalog), OFFLINE).apply(read_ports(H100), T0, 0.0)
    flap = next(s for s in cycle.states if s.check == "ib.flapping" and s.component == "mlx5_1/1")
    assert not flap.healthy and "at least 255" in flap.message
    errors = next(s for s in cycle.states if s.check == "ib.errors" and s.component == "mlx5_0/1")
    assert errors.healthy and "excessive_buffer_overrun_errors=15 (saturated" in errors.message


def test_an_adapter_that_disappears_between_reads_is_a_link_down(catalog: Catalog, tmp_path: Path) -> None:
    root = tree(tmp_path)
    rules = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=400))
    assert faults(rules.apply(read_ports(root), T0, 0.0)) == {}
    shutil.rmtree(root / "mlx5_4")  # the HCA fell off the bus / its driver unbound
    assert faults(rules.apply(read_ports(root), T0, 60.0)) == {}, "gone for less than bringup_hold_s: held"
    gone = rules.apply(read_ports(root), T0, 180.0)
    assert faults(gone) == {("ib.link_down", "mlx5_4/1"): "critical"}
    down = next(s for s in gone.states if s.component == "mlx5_4/1")
    assert down.details["reading"] == "missing" and down.details["link_layer"] == "InfiniBand"
    assert faults(rules.apply(read_ports(root), T0, 240.0)) == {("ib.link_down", "mlx5_4/1"): "critical"}
    shutil.copytree(H100 / "mlx5_4", root / "mlx5_4")  # back, ACTIVE again
    back = rules.apply(read_ports(root), T0, 300.0)
    assert faults(back) == {} and [s.healthy for s in back.states if s.component == "mlx5_4/1"
                                   and s.check == "ib.link_down"] == [True]


def test_bonding_two_roce_ports_into_mlx5_bond_is_a_rename_not_a_lost_adapter(catalog: Catalog,
                                                                              tmp_path: Path) -> None:
    """mlx5 RoCE LAG unregisters the two PF devices and registers mlx5_bond_0 (and the reverse on unbonding)."""
    root = tree(tmp_path)
    bond = root / "mlx5_bond_0"
    for pf in ("mlx5_2", "mlx5_3"):
        shutil.copytree(bond, root / pf)
        (root / pf / "ports/1/rate").write_text("100 Gb/sec (4X EDR)\n")
    shutil.rmtree(bond)
    rules = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=400))
    assert faults(rules.apply(read_ports(root), T0, 0.0)) == {}
    for pf in ("mlx5_2", "mlx5_3"):
        shutil.rmtree(root / pf)
    shutil.copytree(H100 / "mlx5_bond_0", bond)
    bonded = rules.apply(read_ports(root), T0, 60.0)
    assert faults(bonded) == {}
    assert {s.component: s.details["reading"] for s in bonded.states if s.details.get("reading") == "renamed"} == {
        "mlx5_2/1": "renamed", "mlx5_3/1": "renamed"}
    shutil.rmtree(bond)  # unbonded again
    for pf in ("mlx5_2", "mlx5_3"):
        shutil.copytree(H100 / "mlx5_bond_0", root / pf)
    assert faults(rules.apply(read_ports(root), T0, 120.0)) == {}


def test_a_port_seen_up_before_a_restart_and_missing_after_it_is_a_link_down(catalog: Catalog,
                                                                             tmp_path: Path) -> None:
    """Ports never seen up read for the first time (an uncabled storage port) are no sign of a rename."""
    root = tree(tmp_path)
    shutil.rmtree(root / "mlx5_4")
    shutil.copytree(H100 / "mlx5_0", root / "mlx5_10")
    (root / "mlx5_10/ports/1/state").write_text("1: DOWN\n")
    (root / "mlx5_10/ports/1/phys_state").write_text("2: Polling\n")
    seen = {f"mlx5_{i}/1" for i in (0, 1, 4, 5, 6, 7, 8, 9)} | {"mlx5_bond_0/1"}  # kept on disk by the plugin
    rules = FabricRules(ctx(catalog), FabricThresholds(), seen_up=seen)
    assert faults(rules.apply(read_ports(root), T0, 0.0)) == {}, "its device may not be registered yet"
    assert faults(rules.apply(read_ports(root), T0, 120.0)) == {("ib.link_down", "mlx5_4/1"): "critical"}


def test_a_port_unreadable_for_a_moment_is_not_a_lost_adapter(catalog: Catalog, tmp_path: Path) -> None:
    """A state file that fails to read during a firmware reset (EIO) is skipped that cycle, not a vanished HCA."""
    root = tree(tmp_path)
    rules = FabricRules(ctx(catalog), FabricThresholds())
    rules.apply(read_ports(root), T0, 0.0)
    state = root / "mlx5_0/ports/1/state"
    state.unlink()
    state.mkdir()  # reading it fails (IsADirectoryError), as an EIO would
    assert faults(rules.apply(read_ports(root), T0, 30.0)) == {}
    state.rmdir()
    shutil.copy(H100 / "mlx5_0/ports/1/state", state)
    assert faults(rules.apply(read_ports(root), T0, 60.0)) == {} and rules.missing_since == {}


def test_a_bond_that_comes_up_after_being_read_down_still_renames_its_ports(catalog: Catalog, tmp_path: Path) -> None:
    root = tree(tmp_path)
    bond = root / "mlx5_bond_0"
    for pf in ("mlx5_2", "mlx5_3"):
        shutil.copytree(bond, root / pf)
    shutil.rmtree(bond)
    rules = FabricRules(ctx(catalog), FabricThresholds())
    rules.apply(read_ports(root), T0, 0.0)
    for pf in ("mlx5_2", "mlx5_3"):
        shutil.rmtree(root / pf)
    shutil.copytree(H100 / "mlx5_bond_0", bond)
    (bond / "ports/1/state").write_text("1: DOWN\n")  # LAG set up; the bond's link still training
    (bond / "ports/1/phys_state").write_text("4: PortConfigurationTraining\n")
    assert faults(rules.apply(read_ports(root), T0, 10.0)) == {}
    shutil.copy(H100 / "mlx5_bond_0/ports/1/state", bond / "ports/1/state")
    shutil.copy(H100 / "mlx5_bond_0/ports/1/phys_state", bond / "ports/1/phys_state")
    up = rules.apply(read_ports(root), T0, 200.0)
    assert faults(up) == {} and {"mlx5_2/1", "mlx5_3/1"}.isdisjoint(rules.seen_up)
    assert faults(rules.apply(read_ports(root), T0, 400.0)) == {}


def test_an_adapter_back_under_its_own_name_does_not_excuse_another_that_stays_gone(
        catalog: Catalog, tmp_path: Path) -> None:
    root = tree(tmp_path)
    rules = FabricRules(ctx(catalog), FabricThresholds())
    rules.apply(read_ports(root), T0, 0.0)
    shutil.rmtree(root / "mlx5_0")
    shutil.rmtree(root / "mlx5_1")  # a driver reload: both unregistered
    rules.apply(read_ports(root), T0, 10.0)
    shutil.copytree(H100 / "mlx5_1", root / "mlx5_1")  # one comes back; mlx5_0 is dead
    rules.apply(read_ports(root), T0, 20.0)
    assert faults(rules.apply(read_ports(root), T0, 200.0)) == {("ib.link_down", "mlx5_0/1"): "critical"}


def test_a_bond_set_up_across_a_restart_renames_the_ports_remembered_on_disk(catalog: Catalog, tmp_path: Path) -> None:
    """After a restart the gone ports' link layer is unknown (only seen_up is kept): any port up for the first time
    takes their place."""
    root = tree(tmp_path)
    rules = FabricRules(ctx(catalog), FabricThresholds(),
                        seen_up={f"mlx5_{i}/1" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)})
    assert faults(rules.apply(read_ports(root), T0, 0.0)) == {}
    assert faults(rules.apply(read_ports(root), T0, 300.0)) == {}
    assert {"mlx5_2/1", "mlx5_3/1"}.isdisjoint(rules.seen_up) and "mlx5_bond_0/1" in rules.seen_up


def test_a_port_never_seen_up_that_disappears_says_nothing(catalog: Catalog, tmp_path: Path) -> None:
    root = tree(tmp_path)
    (root / "mlx5_9/ports/1/state").write_text("1: DOWN\n")
    (root / "mlx5_9/ports/1/phys_state").write_text("2: Polling\n")
    rules = FabricRules(ctx(catalog), FabricThresholds())
    rules.apply(read_ports(root), T0, 0.0)
    shutil.rmtree(root / "mlx5_9")
    assert [s for s in rules.apply(read_ports(root), T0, 60.0).states if s.component == "mlx5_9/1"] == []


def test_a_missing_ethernet_port_follows_skip_ethernet(catalog: Catalog, tmp_path: Path) -> None:
    root = tree(tmp_path)
    rules = FabricRules(ctx(catalog), FabricThresholds(skip_ethernet=True))
    rules.apply(read_ports(root), T0, 0.0)
    shutil.rmtree(root / "mlx5_bond_0")
    assert faults(rules.apply(read_ports(root), T0, 60.0)) == {}


def test_a_rate_the_kernel_refuses_for_a_down_port_is_no_rate_not_a_skipped_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sysfs.c rate_show returns -EINVAL when the port has no valid width (a port down): not a parse failure."""
    root = tree(tmp_path)
    real_open = Path.open

    def open_(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self.name == "rate" and self.parent.parent.parent.name == "mlx5_5":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", open_)
    skipped: list[str] = []
    ports = {p.port: p for p in read_ports(root, skipped)}
    assert ports["mlx5_5/1"].rate_gbps is None and skipped == []


@pytest.mark.parametrize("text", ["\u00b2\n", "\u0664\n", "\uff11\uff15\n"])  # superscript, Arabic-Indic, fullwidth
def test_a_counter_in_non_ascii_digits_is_skipped_not_a_crash(tmp_path: Path, text: str) -> None:
    root = tree(tmp_path)
    (root / "mlx5_0/ports/1/counters/symbol_error").write_text(text)
    skipped: list[str] = []
    ports = {p.port: p for p in read_ports(root, skipped)}
    assert "symbol_error" not in ports["mlx5_0/1"].counters and len(skipped) == 1


@pytest.mark.parametrize("raw", ["\u00b2: ACTIVE", "\u0664: ACTIVE", "\uff14"])
def test_a_state_in_non_ascii_digits_is_unknown_not_a_crash(raw: str) -> None:
    assert parse_state(raw, PORT_STATES).number is None


# --- real ibstat captures -----------------------------------------------------------------------------------------
def test_real_ibstat_cut_short_by_ibpanic_names_the_vanished_adapter(catalog: Catalog) -> None:
    """ibstat listed mlx5_0..7, then 'stat of IB device mlx5_8 failed: No such file or directory': the HCA was
    gone between umad listing it and ibstat reading it."""
    read = parse_ibstat((DATA / "ib_ibstat_gpud_a100_ibpanic.txt").read_text())
    assert [p.port for p in read.ports if not p.missing] == [f"mlx5_{i}/1" for i in range(8)]
    assert [p.port for p in read.ports if p.missing] == ["mlx5_8"]
    cycle = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=200, single_reading=True)).apply(
        read.ports, T0, 0.0)
    assert faults(cycle) == {("ib.link_down", "mlx5_8"): "critical"}


def test_real_ibstat_roce_node_with_ports_down(catalog: Catalog) -> None:
    read = parse_ibstat((DATA / "ib_ibstat_gpud_h100_roce_some_down.txt").read_text())
    assert len(read.ports) == 12 and all(p.link_layer == "Ethernet" for p in read.ports)
    cycle = FabricRules(ctx(catalog), OFFLINE).apply(read.ports, T0, 0.0)
    assert faults(cycle) == {("ib.link_down", "mlx5_11/1"): "critical", ("ib.link_down", "mlx5_5/1"): "critical"}
    skip = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=400, single_reading=True,
                                                      skip_ethernet=True)).apply(read.ports, T0, 0.0)
    assert skip.states == []


def test_real_ibstat_with_tab_and_space_indents_reads_every_port(catalog: Catalog) -> None:
    read = parse_ibstat((DATA / "ib_ibstat_gpud_h100_ib_and_bond.txt").read_text())
    assert [(p.port, p.rate_gbps, p.link_layer) for p in read.ports][-1] == ("mlx5_bond_0/1", 200.0, "Ethernet")
    assert len(read.ports) == 9 and read.skipped == []
    assert faults(FabricRules(ctx(catalog), OFFLINE).apply(read.ports, T0, 0.0)) == {}


# --- ibstat's other layouts (infiniband-diags ibstat.c) ---------------------------------------------------------
ONE_PORT = """CA: 'mlx5_1'
Port 1:
State: Down
Physical state: Polling
Rate: 10
Base lid: 65535
LMC: 0
SM lid: 0
Capability mask: 0xa651e848
Port GUID: 0xa088c20300e7b3d8
Link layer: InfiniBand
"""


def test_ibstat_of_one_port_is_read_like_the_full_listing(catalog: Catalog) -> None:
    """`ibstat mlx5_1 1` prints "CA: '<dev>'" and the port block without indentation (port_dump(alone=1))."""
    assert looks_like_ibstat(ONE_PORT)
    (p,) = parse_ibstat(ONE_PORT).ports
    assert (p.port, p.state, p.phys_state, p.rate_gbps) == ("mlx5_1/1", 1, 2, 10.0)
    assert faults(FabricRules(ctx(catalog), OFFLINE).apply([p], T0, 0.0)) == {("ib.link_down", "mlx5_1/1"): "critical"}


@pytest.mark.parametrize(("rate", "gbps"), [("40 (FDR10)", 40.0), ("2.5", 2.5), ("400", 400.0)])
def test_ibstat_fdr10_and_1x_sdr_rates_are_read(rate: str, gbps: float) -> None:
    text = f"CA 'mlx4_0'\n\tPort 1:\n\t\tState: Active\n\t\tPhysical state: LinkUp\n\t\tRate: {rate}\n" \
           "\t\tLink layer: InfiniBand\n"
    (p,) = parse_ibstat(text).ports
    assert p.rate_gbps == gbps


def test_ibstat_that_could_not_list_devices_is_reported_not_silent() -> None:
    read = parse_ibstat("ibpanic: [1234] main: can't list IB device names: No such file or directory\n")
    assert read.ports == [] and len(read.skipped) == 1 and "can't list IB device names" in read.skipped[0]


def test_ibstatus_fatal_error_for_a_device_without_sys_files_is_a_vanished_adapter(catalog: Catalog) -> None:
    text = "Infiniband device 'mlx5_0' port 1 status:\n\tstate:\t\t 4: ACTIVE\n\tphys state:\t 5: LinkUp\n" \
           "\trate:\t\t 400 Gb/sec (4X NDR)\n\tlink_layer:\t InfiniBand\n\n" \
           "Fatal error:  device 'mlx5_1': sys files not found (/sys/class/infiniband/mlx5_1/ports)\n"
    read = parse_ibstat(text)
    assert [(p.port, p.missing) for p in read.ports] == [("mlx5_0/1", False), ("mlx5_1", True)]


def test_a_missing_reading_from_text_is_never_judged_without_a_single_reading(catalog: Catalog) -> None:
    """A daemon never reads ibstat; were a missing sample handed to it, a port never seen up says nothing."""
    gone = PortSample("mlx5_3", None, "", None, "", None, "", "", {}, missing=True)
    assert FabricRules(ctx(catalog)).apply([gone], T0, 0.0).states == []
    assert parse_state("4: ACTIVE", PORT_STATES).number == 4 and parse_state("LinkUp", PHYS_STATES).number == 5
