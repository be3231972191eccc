"""Collector sources on real formats: dcgm-exporter pages, InfiniBand sysfs, inference endpoints,
the kubelet PodResources gRPC API, and the offline CLI."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from typer.testing import CliRunner

from breakfix.cli.main import app
from breakfix.collectors.context import NodeContext
from breakfix.collectors.dcgm import FIELDS, DcgmRules
from breakfix.collectors.edge import Cycle, EdgeFilter
from breakfix.collectors.endpoint import EndpointRules, EndpointSpec, Slo, probe
from breakfix.collectors.fabric import FabricRules, FabricThresholds, read_ports
from breakfix.collectors.podresources import PodResourcesClient, api_pb2, api_pb2_grpc, gpu_tenants
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = (DATA / "dcgm_exporter_sample.txt").read_text()
DCGM4 = (DATA / "dcgm_exporter_dcgm4_names.txt").read_text()
runner = CliRunner()


def dcgm4_renames() -> dict[str, str]:
    """Exporter field name -> DCGM 4.6 canonical name, from the reference table (label fields left out)."""
    with (DATA / "dcgm_fields.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {r["metric_name"]: r["canonical_field_name_dcgm_4.6"] for r in rows
            if r["canonical_field_name_dcgm_4.6"].startswith("DCGM_FI_") and r["prom_type"] != "label"}


def as_dcgm4(page: str) -> str:
    """The page as an exporter on DCGM 4.x writes it: every field under its canonical name."""
    for old, new in dcgm4_renames().items():
        page = re.sub(rf"\b{old}\b", new, page)
    return page


def health_page(*rows: tuple[str, str, float], gpu: str = "1") -> str:
    labels = f'gpu="{gpu}",UUID="GPU-6043e4b2-feaa-8010-34c7-61d1a01576bb",pci_bus_id="00000000:40:00.0",hostname="n1"'
    return "# TYPE DCGM_EXP_GPU_HEALTH_STATUS gauge\n" + "".join(
        f'DCGM_EXP_GPU_HEALTH_STATUS{{{labels},health_error_code="{code}",health_watch="{watch}"}} {value:g}\n'
        for watch, code, value in rows)


def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


def bad(cycle: Cycle) -> set[tuple[str, str]]:
    return {(s.check, s.gpu.label() if s.gpu else s.component or "") for s in cycle.states if not s.healthy}


class TestDcgm:
    def test_sample_page_dbe_health_fail_and_last_xid(self, catalog: Catalog) -> None:
        cycle = DcgmRules(ctx(catalog)).apply(SAMPLE, T0, 0.0, baseline_xids=False)
        assert bad(cycle) == {("ecc.dbe", "gpu1"), ("dcgm.health", "gpu1")}
        assert {s.code for s in cycle.states if s.check == "dcgm.health" and not s.healthy} == {
            "DCGM_FR_FALLEN_OFF_BUS"}, "the sample's ALL watch FAILs"
        assert [(s.code, s.gpu.uuid if s.gpu else None) for s in cycle.events] == [
            ("79", "GPU-6043e4b2-feaa-8010-34c7-61d1a01576bb")] * 2, "the last-XID gauge and the XID-count family"

    def test_gpus_nvml_does_not_list_on_this_node_are_never_reported_as_its_own(self, catalog: Catalog) -> None:
        """An exporter URL that reaches past this node (a cluster-wide Service) shows other nodes' GPUs."""
        from breakfix.schemas.common import GpuRef

        c = ctx(catalog)
        c.register_gpus([GpuRef(index=0, uuid="GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77")])  # this node's only GPU
        c.nvml_uuids = {"GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77"}  # as NVML enumerated it
        rules = DcgmRules(c)
        cycle = rules.apply(SAMPLE, T0, 0.0, baseline_xids=False)
        assert not cycle.events and not bad(cycle), "the XID and DBE belong to GPU-6043e4b2, another node's"
        assert rules.foreign >= 1

    def test_last_xid_gauge_is_an_event_only_when_it_changes(self, catalog: Catalog) -> None:
        rules = DcgmRules(ctx(catalog))
        assert rules.apply(SAMPLE, T0, 0.0).events == [], "the first scrape is a baseline"
        assert rules.apply(SAMPLE, T0, 30.0).events == [], "the same last XID is not a new one"
        changed = SAMPLE.replace('err_msg="GPU has fallen off the bus"} 79', 'err_msg="x"} 48') \
            if 'err_msg="GPU has fallen off the bus"} 79' in SAMPLE else SAMPLE.replace("} 79\n", "} 48\n")
        assert [s.code for s in rules.apply(changed, T0, 60.0).events] == ["48"]

    @pytest.mark.parametrize(("hostname_label",), [("Hostname",), ("hostname",)], ids=["old-Hostname", "new-hostname"])
    def test_both_hostname_spellings_parse(self, catalog: Catalog, hostname_label: str) -> None:
        page = SAMPLE.replace('Hostname="', f'{hostname_label}="')
        assert ("ecc.dbe", "gpu1") in bad(DcgmRules(ctx(catalog)).apply(page, T0, 0.0))

    def test_counter_rates_and_throttle_bits(self, catalog: Catalog) -> None:
        def page(replay: int, reasons: int) -> str:
            labels = 'gpu="0",UUID="GPU-aa",pci_bus_id="00000000:1A:00.0",device="nvidia0",hostname="n1"'
            return (f"# TYPE DCGM_FI_DEV_PCIE_REPLAY_COUNTER counter\nDCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{labels}}} "
                    f"{replay}\n# TYPE DCGM_FI_DEV_CLOCKS_EVENT_REASONS gauge\n"
                    f"DCGM_FI_DEV_CLOCKS_EVENT_REASONS{{{labels}}} {reasons}\n")
        rules = DcgmRules(ctx(catalog))
        rules.apply(page(0, 0), T0, 0.0)
        assert bad(rules.apply(page(1000, 0x40), T0, 60.0)) == {("pcie.replay", "gpu0"), ("clock.hw_thermal", "gpu0")}

    def test_every_field_read_is_read_under_its_dcgm_4x_canonical_name_too(self) -> None:
        renames = dcgm4_renames()
        read = [names for names in FIELDS if any(n in renames for n in names)]
        assert read, "the table names fields breakfix reads"
        for names in read:
            for old in (n for n in names if n in renames):
                assert renames[old] in names, f"{old} is read, its DCGM 4.x name {renames[old]} is not"
        newer = {n for names in FIELDS for n in names}
        assert {"DCGM_FI_DEV_NVLINK_REPLAY_TOTAL", "DCGM_FI_DEV_NVLINK_RECOVERY_TOTAL"} <= newer

    @pytest.mark.parametrize("rename", [lambda page: page, as_dcgm4], ids=["exporter-names", "dcgm-4x-names"])
    def test_dcgm_4x_canonical_names_give_the_same_faults(self, catalog: Catalog,
                                                          rename: Callable[[str], str]) -> None:
        """Audit finding 5: a page with DCGM 4.x names (ROW_REMAP_FAILED, GPU_TEMP_CELSIUS, PCIE_REPLAY_TOTAL,
        NVLink *_ERROR_TOTAL) read as healthy."""

        def page(replay: int, recovery: int) -> str:
            labels = 'gpu="0",UUID="GPU-aa",pci_bus_id="00000000:1A:00.0",device="nvidia0",hostname="n1"'
            fields = [("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", 1), ("DCGM_FI_DEV_GPU_TEMP", "gauge", 92),
                      ("DCGM_FI_DEV_SLOWDOWN_TEMP", "gauge", 90),
                      ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", replay),
                      ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "counter", recovery),
                      ("DCGM_FI_DEV_XID_ERRORS", "gauge", 0)]
            return rename("".join(f"# TYPE {n} {t}\n{n}{{{labels}}} {v}\n" for n, t, v in fields))

        rules = DcgmRules(ctx(catalog))
        rules.apply(page(0, 0), T0, 0.0)
        assert bad(rules.apply(page(1000, 100), T0, 60.0)) == {
            ("row_remap.failure", "gpu0"), ("temperature.slowdown", "gpu0"), ("pcie.replay", "gpu0"),
            ("nvlink.errors", "gpu0")}
        assert [s.code for s in rules.apply(page(1000, 100).replace("} 0\n", "} 79\n"), T0, 90.0).events] == ["79"]

    def test_dcgm_4_6_nvlink_replay_and_recovery_totals_are_rates_too(self, catalog: Catalog) -> None:
        def page(n: int) -> str:
            labels = 'gpu="0",UUID="GPU-aa",hostname="n1"'
            return "".join(f"# TYPE {f} counter\n{f}{{{labels}}} {n}\n"
                           for f in ("DCGM_FI_DEV_NVLINK_REPLAY_TOTAL", "DCGM_FI_DEV_NVLINK_RECOVERY_TOTAL"))
        rules = DcgmRules(ctx(catalog))
        rules.apply(page(0), T0, 0.0)
        (nv,) = [s for s in rules.apply(page(6), T0, 60.0).states if s.check == "nvlink.errors"]
        assert (nv.healthy, nv.value) == (False, 12.0)

    def test_a_counter_written_under_both_names_is_counted_once(self, catalog: Catalog) -> None:
        def page(n: int) -> str:
            labels = 'gpu="0",UUID="GPU-aa",hostname="n1"'
            return "".join(f"# TYPE {f} counter\n{f}{{{labels}}} {n}\n"
                           for f in ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
                                     "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_TOTAL", "DCGM_FI_DEV_NVLINK_RECOVERY_TOTAL"))
        rules = DcgmRules(ctx(catalog))
        rules.apply(page(0), T0, 0.0)
        (nv,) = [s for s in rules.apply(page(6), T0, 60.0).states if s.check == "nvlink.errors"]
        assert (nv.healthy, nv.value) == (True, 6.0), "6/min, under the 10/min threshold: not 18/min"

    def test_dcgm_health_fail_is_a_fault_per_gpu_and_watch_with_its_dcgm_fr_code(self, catalog: Catalog) -> None:
        """Audit finding 6: DCGM_EXP_GPU_HEALTH_STATUS = 20 (FAIL) was ignored."""
        cycle = DcgmRules(ctx(catalog)).apply(DCGM4, T0, 0.0)
        health = {(s.gpu.pci_bus_id if s.gpu else None, s.component): s for s in cycle.states
                  if s.check == "dcgm.health"}
        assert {k: (s.healthy, s.code, s.value) for k, s in health.items()} == {
            ("0000:1a:00.0", "mem"): (True, None, 0.0), ("0000:1a:00.0", "thermal"): (True, None, 0.0),
            ("0000:40:00.0", "mem"): (False, "DCGM_FR_VOLATILE_DBE_DETECTED", 20.0),
            ("0000:40:00.0", "thermal"): (False, "DCGM_FR_CLOCKS_EVENT_THERMAL", 10.0),
            ("0000:40:00.0", "pcie"): (True, None, 0.0)}
        fail = health[("0000:40:00.0", "mem")]
        assert fail.details == {"health_watch": "MEM", "health_result": "FAIL"}
        assert catalog.classify(check=fail.check, code=fail.code).category == "gpu_reset_required"

    @pytest.mark.parametrize(("code", "category"), [
        ("DCGM_FR_CLOCKS_EVENT_THERMAL", "gpu_monitor"),  # DCGM: can perform workload -> capped to monitoring
        ("DCGM_FR_CORRUPT_INFOROM", "gpu_monitor"),  # NVSentinel COMPONENT_RESET, capped: can perform workload
        ("DCGM_FR_PENDING_PAGE_RETIREMENTS", "gpu_reset_required"),  # the fact NVML reads as retired_pages.pending
        ("DCGM_FR_CONTAINED_ERROR", "application_fault"),  # XID 94, which DCGM reports only as WARN
    ])
    def test_dcgm_health_warn_is_a_fault_the_catalog_judges(self, catalog: Catalog, code: str, category: str) -> None:
        (s,) = DcgmRules(ctx(catalog)).apply(health_page(("MEM", code, 10)), T0, 0.0).states
        assert (s.healthy, s.code, s.details["health_result"]) == (False, code, "WARN")
        assert catalog.classify(check=s.check, code=s.code).category == category

    def test_dcgm_health_watch_back_to_pass_clears_its_fault(self, catalog: Catalog) -> None:
        rules, edge = DcgmRules(ctx(catalog)), EdgeFilter()
        fail = edge.apply(rules.apply(health_page(("MEM", "DCGM_FR_VOLATILE_DBE_DETECTED", 20),
                                                  ("PCIE", "DCGM_FR_OK", 0)), T0, 0.0), T0)
        ok = edge.apply(rules.apply(health_page(("MEM", "DCGM_FR_OK", 0), ("PCIE", "DCGM_FR_OK", 0)), T0, 30.0), T0)
        assert [(s.healthy, s.code, s.component) for s in fail] == [(False, "DCGM_FR_VOLATILE_DBE_DETECTED", "mem")]
        assert [(s.healthy, s.fault_key()) for s in ok] == [(True, fail[0].fault_key())]

    def test_odd_dcgm_health_samples_are_skipped_and_counted(self, catalog: Catalog) -> None:
        page = health_page(("MEM", "DCGM_FR_VOLATILE_DBE_DETECTED", 20), ("PCIE", "DCGM_FR_OK", 5),
                           ("", "DCGM_FR_OK", 0), ("THERMAL", "not a code", 20))
        rules = DcgmRules(ctx(catalog))
        cycle = rules.apply(page, T0, 0.0)
        assert rules.skipped == 2, "a value no health result, a sample without its watch"
        assert {(s.component, s.code) for s in cycle.states} == {("mem", "DCGM_FR_VOLATILE_DBE_DETECTED"),
                                                                 ("thermal", None)}
        assert catalog.classify(check="dcgm.health", code=None).category == "unknown_fault", "FAIL, no code: cautious"

    def test_blank_sentinel_values_are_ignored(self, catalog: Catalog) -> None:
        page = ('# TYPE DCGM_FI_DEV_ECC_DBE_VOL_TOTAL counter\n'
                'DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{gpu="0",UUID="GPU-aa"} 9223372036854775794\n')
        assert DcgmRules(ctx(catalog)).apply(page, T0, 0.0).states == []

    def test_garbage_page_is_a_clear_error(self, catalog: Catalog) -> None:
        with pytest.raises(ValueError, match="not Prometheus text"):
            DcgmRules(ctx(catalog)).apply("this is { not metrics", T0, 0.0)


def ib_tree(tmp_path: Path) -> Path:
    root = tmp_path / "ib"
    shutil.copytree(DATA / "ib_sysfs", root)
    return root


def bump(root: Path, port: str, counter: str, by: int) -> None:
    p = root / port.split("/")[0] / "ports" / port.split("/")[1] / "counters" / counter
    p.write_text(f"{int(p.read_text()) + by}\n")


class TestFabric:
    def test_real_formats_down_port_and_degraded_rate(self, catalog: Catalog) -> None:
        ports = read_ports(DATA / "ib_sysfs")
        assert [(p.port, p.state, p.phys_state, p.rate_gbps) for p in ports] == [
            ("mlx5_0/1", 4, 5, 400.0), ("mlx5_1/1", 1, 2, 400.0), ("mlx5_2/1", 4, 5, 200.0)]
        cycle = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=400)).apply(ports, T0, 0.0)
        assert bad(cycle) == {("ib.rate_degraded", "mlx5_2/1")}, "down since start: not judged (uncabled?)"
        seen = FabricRules(ctx(catalog), FabricThresholds(expected_rate_gbps=400), seen_up={"mlx5_1/1"})
        assert ("ib.link_down", "mlx5_1/1") in bad(seen.apply(ports, T0, 0.0)), "it worked before: a failed link"

    def test_error_rate_and_flapping_from_counter_deltas(self, catalog: Catalog, tmp_path: Path) -> None:
        root = ib_tree(tmp_path)
        rules = FabricRules(ctx(catalog), FabricThresholds(errors_per_min=10, flap_count=2, flap_window_s=600))
        rules.apply(read_ports(root), T0, 0.0)
        bump(root, "mlx5_0/1", "symbol_error", 50)
        bump(root, "mlx5_0/1", "link_downed", 1)
        bump(root, "mlx5_0/1", "link_error_recovery", 1)
        got = bad(rules.apply(read_ports(root), T0, 60.0))
        assert {("ib.errors", "mlx5_0/1"), ("ib.flapping", "mlx5_0/1")} <= got
        later = bad(rules.apply(read_ports(root), T0 + timedelta(seconds=700), 700.0))
        assert ("ib.flapping", "mlx5_0/1") not in later and ("ib.errors", "mlx5_0/1") not in later

    @pytest.mark.parametrize(("state", "phys", "after_s", "down"), [
        ("2: INIT", "5: LinkUp", 0.0, False),  # the SM has not swept yet: normal after a reboot
        ("2: INIT", "5: LinkUp", 119.0, False),
        ("2: INIT", "5: LinkUp", 120.0, True),  # still not configured past the hold: a fault
        ("3: ARMED", "5: LinkUp", 60.0, False),
        ("3: ARMED", "5: LinkUp", 300.0, True),
        ("1: DOWN", "4: PortConfigurationTraining", 60.0, False),  # the link is training
        ("1: DOWN", "6: LinkErrorRecovery", 60.0, False),
        ("1: DOWN", "6: LinkErrorRecovery", 121.0, True),
        ("1: DOWN", "2: Polling", 0.0, True),  # no peer, no cable: judged at once
        ("1: DOWN", "3: Disabled", 0.0, True),
        ("2: INIT", "2: Polling", 0.0, True),  # not a bring-up pair: judged as read
    ])
    def test_a_port_coming_up_is_a_link_down_only_after_its_bringup_hold(
            self, catalog: Catalog, tmp_path: Path, state: str, phys: str, after_s: float, down: bool) -> None:
        root = ib_tree(tmp_path)
        rules = FabricRules(ctx(catalog), FabricThresholds(), seen_up={"mlx5_0/1"})
        (root / "mlx5_0/ports/1/state").write_text(state + "\n")
        (root / "mlx5_0/ports/1/phys_state").write_text(phys + "\n")
        first = rules.apply(read_ports(root), T0, 1000.0)
        later = rules.apply(read_ports(root), T0 + timedelta(seconds=after_s), 1000.0 + after_s)
        assert (("ib.link_down", "mlx5_0/1") in bad(later)) is down
        held = [s for s in first.states if s.check == "ib.link_down" and s.component == "mlx5_0/1"]
        assert (held == []) is (not down or after_s > 0), "in its hold the port says nothing: the edge keeps its state"

    @pytest.mark.parametrize(("uptime", "after_s", "down"), [
        (30.0, 0.0, False),  # the node booted 30 s ago: its links have not left Polling yet
        (30.0, 119.0, False),
        (30.0, 120.0, True),  # still Polling past the hold: no peer, no cable
        (3600.0, 0.0, True),  # long up: a port in Polling is judged at once, as ever
        (None, 0.0, True),  # uptime unknown: judged at once
    ], ids=["just-booted", "just-booted-119s", "just-booted-past-hold", "long-up", "uptime-unknown"])
    def test_a_port_polling_right_after_the_node_booted_is_held_like_one_coming_up(
            self, catalog: Catalog, tmp_path: Path, uptime: float | None, after_s: float, down: bool) -> None:
        """A collector started with the node (systemd, or breakfix's own reboot rung) reads its ports before the links
        train: a port seen up before and still Polling within bringup_hold_s of the boot is not yet a link down."""
        root = ib_tree(tmp_path)
        rules = FabricRules(ctx(catalog), FabricThresholds(), seen_up={"mlx5_0/1"})
        (root / "mlx5_0/ports/1/state").write_text("1: DOWN\n")
        (root / "mlx5_0/ports/1/phys_state").write_text("2: Polling\n")
        rules.apply(read_ports(root), T0, 1000.0, uptime_s=uptime)
        later = rules.apply(read_ports(root), T0 + timedelta(seconds=after_s), 1000.0 + after_s, uptime_s=uptime)
        assert (("ib.link_down", "mlx5_0/1") in bad(later)) is down

    def test_node_uptime_reads_proc_uptime_and_says_none_when_it_cannot(self, tmp_path: Path) -> None:
        from breakfix.collectors.source import node_uptime

        f = tmp_path / "uptime"
        f.write_text("35.27 120.88\n")
        assert node_uptime(f) == 35.27
        f.write_text("garbage")
        assert node_uptime(f) is None and node_uptime(tmp_path / "missing") is None

    def test_a_port_that_came_up_and_went_back_to_init_gets_a_fresh_hold(self, catalog: Catalog,
                                                                       tmp_path: Path) -> None:
        root = ib_tree(tmp_path)
        rules = FabricRules(ctx(catalog), FabricThresholds(bringup_hold_s=60))
        port = root / "mlx5_0/ports/1"
        (port / "state").write_text("2: INIT\n")
        rules.apply(read_ports(root), T0, 0.0)  # never ACTIVE yet: not judged
        (port / "state").write_text("4: ACTIVE\n")
        rules.apply(read_ports(root), T0, 10.0)
        (port / "state").write_text("2: INIT\n")  # an SM failover re-sweeps the port
        assert ("ib.link_down", "mlx5_0/1") not in bad(rules.apply(read_ports(root), T0, 500.0))
        assert ("ib.link_down", "mlx5_0/1") not in bad(rules.apply(read_ports(root), T0, 559.0))
        assert ("ib.link_down", "mlx5_0/1") in bad(rules.apply(read_ports(root), T0, 560.0))
        (port / "state").write_text("4: ACTIVE\n")
        ok = rules.apply(read_ports(root), T0, 570.0)
        assert [s.healthy for s in ok.states if s.check == "ib.link_down" and s.component == "mlx5_0/1"] == [True]
        assert rules.coming_up == {}

    def test_ports_seen_up_are_remembered_across_a_restart(self, catalog: Catalog, tmp_path: Path) -> None:
        """After a restart a failed link is still a failed link, not an 'uncabled' port."""
        from breakfix.collectors.config import FabricConfig
        from breakfix.collectors.source import SourceEnv
        from breakfix.collectors.sources import FabricPlugin

        root = ib_tree(tmp_path / "sys")
        env = SourceEnv(ctx=ctx(catalog), clock=None, http=None, state_dir=tmp_path / "state", nvml=None)  # type: ignore[arg-type]
        first = FabricPlugin(FabricConfig(sysfs=root), env)
        first.apply(read_ports(root), T0, 0.0)  # mlx5_0/1 is up
        (root / "mlx5_0/ports/1/state").write_text("1: DOWN\n")
        (root / "mlx5_0/ports/1/phys_state").write_text("2: Polling\n")
        again = FabricPlugin(FabricConfig(sysfs=root), env)  # the collector restarted meanwhile
        assert ("ib.link_down", "mlx5_0/1") in bad(again.apply(read_ports(root), T0, 0.0))
        (tmp_path / "state" / "fabric-seen-up.json").write_text("not json")  # the seen-up record lost
        lost = FabricPlugin(FabricConfig(sysfs=root), env)
        lost.carried_faults(["ib.link_down@n1/mlx5_0/1", "xid@n1/GPU-1"])  # but its fault was open at the stop
        assert ("ib.link_down", "mlx5_0/1") in bad(lost.apply(read_ports(root), T0, 0.0)), "still a failed link"

    def test_an_sriov_virtual_function_is_not_judged_beside_its_physical_port(self, tmp_path: Path) -> None:
        root = ib_tree(tmp_path)
        before = {p.port for p in read_ports(root)}
        (root / "mlx5_0" / "device" / "physfn").mkdir(parents=True)  # sysfs: a VF links to its physical function
        assert {p.port for p in read_ports(root)} == before - {"mlx5_0/1"}

    def test_counter_reset_is_not_a_burst_of_errors(self, catalog: Catalog, tmp_path: Path) -> None:
        root = ib_tree(tmp_path)
        rules = FabricRules(ctx(catalog))
        rules.apply(read_ports(root), T0, 0.0)
        (root / "mlx5_0/ports/1/counters/port_rcv_errors").write_text("0\n")  # perfquery -R
        assert ("ib.errors", "mlx5_0/1") not in bad(rules.apply(read_ports(root), T0, 60.0))


VLLM = """# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{le="0.5",model_name="m"}} {a}
vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="m"}} {b}
vllm:time_to_first_token_seconds_bucket{{le="5.0",model_name="m"}} {c}
vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {c}
vllm:time_to_first_token_seconds_count{{model_name="m"}} {c}
vllm:time_to_first_token_seconds_sum{{model_name="m"}} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{model_name="m"}} {kv}
# TYPE vllm:request_success counter
vllm:request_success_total{{model_name="m",finished_reason="stop"}} {ok}
vllm:request_success_total{{model_name="m",finished_reason="abort"}} {abort}
"""


class FakeVllm:
    """A real HTTP server speaking vLLM's health, model list and metric names."""

    def __init__(self) -> None:
        self.healthy = True
        self.metrics = VLLM.format(a=0, b=0, c=0, kv=0.1, ok=0, abort=0)

    def app(self) -> web.Application:
        async def health(_r: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503)

        async def models(_r: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

        async def metrics(_r: web.Request) -> web.Response:
            return web.Response(text=self.metrics)

        a = web.Application()
        a.add_routes([web.get("/health", health), web.get("/v1/models", models), web.get("/metrics", metrics)])
        return a


class TestEndpoint:
    async def test_slo_breaches_from_a_live_vllm_style_server(self, catalog: Catalog) -> None:
        fake = FakeVllm()
        site_runner = web.AppRunner(fake.app())
        await site_runner.setup()
        site = web.TCPSite(site_runner, "127.0.0.1", 0)
        await site.start()
        port = site_runner.addresses[0][1]
        spec = EndpointSpec(name="chat", namespace="team-llm", url=f"http://127.0.0.1:{port}",
                            slo=Slo(ttft_p95_s=2.0, error_rate=0.05, kv_cache=0.9), serving_pods=("chat-0",),
                            serving_nodes=("n7",))
        rules = EndpointRules(ctx(catalog), spec)
        import aiohttp

        async with aiohttp.ClientSession() as http:
            first = rules.apply(await probe(http, spec), T0)
            assert bad(first) == set()
            fake.metrics = VLLM.format(a=10, b=20, c=100, kv=0.97, ok=80, abort=20)  # slow, full, failing
            second = rules.apply(await probe(http, spec), T0)
            assert {c for c, _ in bad(second)} == {"endpoint.ttft", "endpoint.kv_cache", "endpoint.errors"}
            s = next(s for s in second.states if s.check == "endpoint.ttft")  # p95 interpolated in its bucket
            assert s.tenant is not None and s.tenant.key() == "team-llm/chat" and s.value == 4.75
            assert s.details["serving_nodes"] == "n7" and s.details["serving_pods"] == "chat-0"
            fake.healthy = False
            assert "endpoint.down" in {c for c, _ in bad(rules.apply(await probe(http, spec), T0))}
        await site_runner.cleanup()

    async def test_a_probe_that_raises_leaves_its_endpoint_unjudged_and_the_others_judged(
            self, catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bug or an odd reply in one endpoint's probe is logged and counted: that endpoint says nothing this round
        (never a false endpoint.down) and the other endpoints are still judged."""
        import breakfix.collectors.sources as sources_module
        from breakfix.collectors.config import EndpointsConfig
        from breakfix.collectors.endpoint import Probe
        from breakfix.collectors.source import SourceEnv

        async def odd(_http: object, spec: EndpointSpec) -> Probe:
            if spec.name == "odd":
                raise RuntimeError("an odd reply")
            return Probe(health_ok=False, health_detail="health answered HTTP 503", models_ok=None)

        monkeypatch.setattr(sources_module, "probe", odd)
        env = SourceEnv(ctx=ctx(catalog), clock=None, http=None, state_dir=tmp_path, nvml=None)  # type: ignore[arg-type]
        plugin = sources_module.EndpointPlugin(EndpointsConfig.model_validate({"enabled": True, "endpoints": [
            {"name": "odd", "namespace": "t", "url": "http://127.0.0.1:1"},
            {"name": "chat", "namespace": "t", "url": "http://127.0.0.1:2"}]}), env)
        cycle = plugin.apply(await plugin.read(), T0, 0.0)
        assert {(s.check, s.tenant.endpoint if s.tenant else None) for s in cycle.states if not s.healthy} == {
            ("endpoint.down", "chat")}
        assert plugin.skipped == 1

    async def test_unreachable_endpoint_is_down_not_an_exception(self, catalog: Catalog) -> None:
        import aiohttp

        spec = EndpointSpec(name="gone", namespace="t", url="http://127.0.0.1:9", timeout_s=1)
        async with aiohttp.ClientSession() as http:
            cycle = EndpointRules(ctx(catalog), spec).apply(await probe(http, spec), T0)
        assert bad(cycle) == {("endpoint.down", "")}


class _Lister(api_pb2_grpc.PodResourcesListerServicer):
    async def List(self, request, context):  # type: ignore[no-untyped-def]
        return api_pb2.ListPodResourcesResponse(pod_resources=[
            api_pb2.PodResources(name="train-0", namespace="ml", containers=[
                api_pb2.ContainerResources(name="main", devices=[
                    api_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-aaaa", "GPU-bbbb::2"]),
                    api_pb2.ContainerDevices(resource_name="rdma/ib", device_ids=["mlx5_0"])])]),
            api_pb2.PodResources(name="infer-0", namespace="serve", containers=[
                api_pb2.ContainerResources(name="vllm", dynamic_resources=[api_pb2.DynamicResource(
                    claim_name="gpu", claim_namespace="serve", claim_resources=[api_pb2.ClaimResource(
                        driver_name="gpu.nvidia.com", device_name="GPU-cccc",
                        cdi_devices=[api_pb2.CDIDevice(name="nvidia.com/gpu=2")])])])]),
        ])


async def fake_kubelet(lister: api_pb2_grpc.PodResourcesListerServicer, sock: Path) -> grpc.aio.Server:
    """A PodResources server on a real gRPC unix socket, as the kubelet serves it; stop it with ``stop(None)``."""
    server = grpc.aio.server()
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(lister, server)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    return server


class TestPodResources:
    async def test_list_over_a_real_grpc_unix_socket_maps_gpus_to_pods(self, tmp_path: Path) -> None:
        sock = tmp_path / "kubelet.sock"
        server = await fake_kubelet(_Lister(), sock)
        client = PodResourcesClient(sock)
        try:
            tenants = gpu_tenants(await client.list())
        finally:
            await client.close()
            await server.stop(None)
        assert {k: (t.namespace, t.pod, t.container) for k, t in tenants.items()} == {
            "GPU-aaaa": ("ml", "train-0", "main"), "GPU-bbbb": ("ml", "train-0", "main"),
            "GPU-cccc": ("serve", "infer-0", "vllm")}

    async def test_no_kubelet_is_a_grpc_error_the_daemon_can_retry(self, tmp_path: Path) -> None:
        client = PodResourcesClient(tmp_path / "missing.sock", timeout_s=1)
        with pytest.raises(grpc.aio.AioRpcError):
            await client.list()
        await client.close()


class TestOfflineCli:
    def test_signals_dcgm_prints_one_signal_json_per_line(self) -> None:
        res = runner.invoke(app, ["signals", "dcgm", str(DATA / "dcgm_exporter_sample.txt"), "--node", "n1"])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in res.output.splitlines()]
        assert {(r["check"], r.get("code")) for r in rows} == {("ecc.dbe", None), ("xid", "79"),
                                                              ("dcgm.health", "DCGM_FR_FALLEN_OFF_BUS")}
        assert all(r["node"] == "n1" and r["source"] == "dcgm" for r in rows)

    def test_signals_dcgm_reads_a_dcgm_4x_page(self) -> None:
        res = runner.invoke(app, ["signals", "dcgm", str(DATA / "dcgm_exporter_dcgm4_names.txt"), "--node", "n1"])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        assert {(r["check"], r.get("code"), r["gpu"]["pci_bus_id"]) for r in rows} == {
            ("row_remap.failure", None, "0000:1a:00.0"), ("temperature.slowdown", None, "0000:1a:00.0"),
            ("dcgm.health", "DCGM_FR_VOLATILE_DBE_DETECTED", "0000:40:00.0"),
            ("dcgm.health", "DCGM_FR_CLOCKS_EVENT_THERMAL", "0000:40:00.0")}

    def test_signals_ib_reports_down_and_degraded_ports(self) -> None:
        res = runner.invoke(app, ["signals", "ib", str(DATA / "ib_sysfs"), "--node", "n1", "--expected-rate", "400"])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in res.output.splitlines()]
        assert {(r["check"], r["component"]) for r in rows} == {("ib.link_down", "mlx5_1/1"),
                                                               ("ib.rate_degraded", "mlx5_2/1")}

    @pytest.mark.parametrize("cmd", [["signals", "dcgm", "/nope"], ["signals", "ib", "/nope"]],
                             ids=["dcgm-missing-file", "ib-missing-dir"])
    def test_missing_input_is_a_clear_error(self, cmd: list[str]) -> None:
        res = runner.invoke(app, [*cmd, "--node", "n1"])
        assert res.exit_code == 2 and "/nope" in res.output
