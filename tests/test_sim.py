"""The sim source: scenario files, the simulated fleet, and the timeline they make."""

from __future__ import annotations

from pathlib import Path

import pytest

from breakfix.collectors.fleet import build_fleet
from breakfix.collectors.sim import SCENARIO_DIR, kernel_line, load_scenario, timeline
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.datafile import DataFileError
from tests.conftest import T0


class TestFleet:
    def test_fleet_is_deterministic_with_topology_and_tenants(self) -> None:
        a, b = build_fleet(16), build_fleet(16)
        assert a == b
        n9 = a.node(9)
        assert n9.labels == {"rack": "rack-02", "switch": "leaf-01", "nvlink_domain": "nvl-gpu-node-009",
                             "nodepool": "h100-sxm"}
        assert len(n9.gpus) == 8 and n9.gpus[3].ref.pci_bus_id == "0000:5d:00.0"
        assert all(g.tenant is not None for g in n9.gpus)


class TestScenarios:
    @pytest.mark.parametrize("path", sorted(SCENARIO_DIR.glob("*.yaml")), ids=lambda p: p.stem)
    def test_bundled_scenarios_load(self, path: Path) -> None:
        assert load_scenario(path).events

    def test_timeline_is_deterministic_and_ordered(self, catalog: Catalog) -> None:
        s = load_scenario("mixed")
        fleet = build_fleet(s.nodes)
        t1, t2 = timeline(s, fleet, T0, catalog), timeline(s, fleet, T0, catalog)
        assert [x.id for _, x in t1] == [x.id for _, x in t2]
        assert [o for o, _ in t1] == sorted(o for o, _ in t1)

    def test_duplicate_event_resends_identical_signal(self, catalog: Catalog) -> None:
        s = load_scenario("mixed")
        ids = [x.id for _, x in timeline(s, build_fleet(s.nodes), T0, catalog)]
        assert len(ids) - len(set(ids)) == 1

    def test_xid_signal_carries_kernel_line_and_pod(self, catalog: Catalog) -> None:
        s = load_scenario("app-fault")
        _, first = timeline(s, build_fleet(s.nodes), T0, catalog)[0]
        assert first.message.startswith("NVRM: Xid (PCI:0000:3a:00): 13, pid=4242, name=python3,")
        assert first.tenant is not None and first.tenant.namespace == "research"

    def test_kernel_line_matches_driver_grammar(self) -> None:
        assert kernel_line("79", "0000:2b:00.0") == (
            "NVRM: Xid (PCI:0000:2b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.")

    @pytest.mark.parametrize(
        ("text", "line", "needle"),
        [("name: x\nnodes: 2\nevents:\n  - {at: 1, node: 5, code: '48'}\n", None, "outside the scenario"),
         ("name: x\nevents:\n  - {at: 1, node: 0, colour: red}\n", 3, "colour"),
         ("name: x\nevents: [\n", 3, "invalid YAML"),
         ("name: x\nevents: []\n", 2, "events")],
        ids=["node-out-of-range", "unknown-key", "yaml-syntax", "no-events"],
    )
    def test_bad_scenario_is_a_clear_error(self, tmp_path: Path, text: str, line: int | None, needle: str) -> None:
        p = tmp_path / "s.yaml"
        p.write_text(text)
        with pytest.raises(DataFileError) as exc:
            load_scenario(p)
        assert needle in str(exc.value)
        if line is not None:
            assert exc.value.line == line


class TestSimCollector:
    async def test_scenario_time_passes_on_the_injected_clock(self, catalog: Catalog) -> None:
        from breakfix.bus.clock import ManualClock
        from breakfix.bus.memory import MemoryBus
        from breakfix.collectors.app import build_sim_collector
        from breakfix.schemas import subjects

        s = load_scenario("mixed")
        clock = ManualClock(T0)
        bus = MemoryBus()
        await bus.ensure_streams(subjects.STREAMS)
        sim = build_sim_collector(s, build_fleet(s.nodes), bus=bus, clock=clock, catalog=catalog, speed=2.0)
        sent = await sim.run()
        assert sent == len(sim.timed) and sim.publisher.duplicates == 1, "the scenario's one re-send is a duplicate"
        offset, first = sim.timed[0]
        assert (first.observed_at - T0).total_seconds() == offset, "the timeline starts at the clock's now"
        assert (clock.now() - T0).total_seconds() == s.duration_s / 2, "half the scenario's time at speed 2"
