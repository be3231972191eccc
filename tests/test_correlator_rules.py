"""The data-driven correlation rules: suspect GPUs, lemons, peer folds, thresholds, topology, impact."""

from __future__ import annotations

import zlib
from datetime import timedelta
from pathlib import Path

import pytest

from breakfix.correlator.checkpoint import Checkpoint
from breakfix.correlator.grouping import LEMON_LABEL, Correlator
from breakfix.correlator.rules import load_rules
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.datafile import DataFileError
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    Incident,
    IncidentScope,
    IncidentStatus,
    StepAction,
)
from breakfix.schemas.signal import Signal
from tests.conftest import T0, make_rules, sig

HOUR = 3600.0
DATA = Path(__file__).parent / "data"
XID154_DRAIN = ("NVRM: Xid (PCI:0000:18:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 "
                "(Drain and Reset)")


def run(catalog: Catalog, signals: list[Signal], **rules: object) -> Correlator:
    core = Correlator(catalog, make_rules(**rules) if rules else None)
    for s in signals:
        core.ingest(s, s.observed_at)
    return core


def top_level(core: Correlator) -> list[Incident]:
    """What the on-call SRE sees first: incidents not folded into another."""
    return [i.snapshot() for i in core.incidents.values() if i.parent is None]


def ib_down(node: str, switch: str, at: float = 0.0, port: str = "mlx5_0/1") -> Signal:
    return sig(node=node, check="ib.link_down", code=None, gpu_index=None, at=at, component=port,
               labels={"switch": switch, "rack": f"rack-{switch}"})


def endpoint(at: float, serving: str, healthy: bool = False) -> Signal:
    return sig(node="router-0", check="endpoint.ttft", code=None, gpu_index=None, at=at, healthy=healthy,
               tenant=TenantRef(namespace="team-llm", endpoint="chat"), details={"serving_nodes": serving})


# (signals, expected top-level (category, scope, domain) sorted, id)
RULE_CASES = [
    pytest.param([sig(code="13", pod="job-a", at=0), sig(code="31", pod="job-b", at=HOUR)],
                 [("application_fault", "tenant", "tenant"), ("gpu_suspect", "gpu", "operator")],
                 id="app-xids-same-gpu-two-pods-make-gpu-suspect"),
    pytest.param([sig(code="13", pod="job-a", gpu_index=0), sig(code="13", pod="job-a", gpu_index=1, at=5),
                  sig(code="31", pod="job-a", gpu_index=2, at=9)],
                 [("application_fault", "tenant", "tenant")],
                 id="app-xids-different-gpus-one-tenant-stay-tenant"),
    pytest.param([sig(code="13", pod="job-a", at=0), sig(code="13", pod="job-b", at=25 * HOUR)],
                 [("application_fault", "tenant", "tenant"), ("application_fault", "tenant", "tenant")],
                 id="app-xids-two-pods-beyond-24h-are-not-suspect"),
    pytest.param([sig(code="79", gpu_index=0), sig(code="74", gpu_index=1, at=1), sig(code="74", gpu_index=2, at=2)],
                 [("node_reboot_required", "node", "operator")],
                 id="xid74-on-nvlink-peers-folds-into-the-gpu-that-went-down"),
    pytest.param([sig(code="74", gpu_index=1)], [("nvlink_fault", "gpu", "operator")],
                 id="xid74-alone-is-its-own-nvlink-incident"),
    pytest.param([sig(code="48"), sig(code="45", at=1, message="Xid 45, caused by previous Xid")],
                 [("gpu_reset_required", "gpu", "operator")], id="xid45-after-another-xid-folds"),
    pytest.param([sig(code="154", message=XID154_DRAIN)], [("gpu_drain_reset_required", "gpu", "operator")],
                 id="xid154-carries-its-recovery-action"),
    # a DBE, its row remap and the XID saying how it was contained are one memory fault, in any order (Xid catalog:
    # 94/95 investigatory IGNORE (sympathetic); WORKFLOW_XID_48 with 63/64: drain and reset)
    pytest.param([sig(code="48"), sig(code="94", pod="job-a-0", at=1)], [("gpu_reset_required", "gpu", "operator")],
                 id="dbe-then-its-contained-xid94-is-one-incident"),
    pytest.param([sig(code="94", pod="job-a-0"), sig(code="48", at=1)], [("gpu_reset_required", "gpu", "operator")],
                 id="contained-xid94-then-its-dbe-is-one-incident-raised-to-the-reset"),
    pytest.param([sig(code="94", pod="job-a-0"), sig(code="63", at=1), sig(code="48", at=2)],
                 [("gpu_drain_reset_required", "gpu", "operator")],
                 id="xid94-then-row-remap-then-dbe-is-one-drain-and-reset"),
    pytest.param([sig(code="63"), sig(code="94", pod="job-a-0", at=1), sig(code="48", at=2)],
                 [("gpu_drain_reset_required", "gpu", "operator")],
                 id="row-remap-then-xid94-then-dbe-is-one-drain-and-reset"),
    pytest.param([sig(check="ecc.dbe", code=None), sig(code="94", pod="job-a-0", at=1)],
                 [("gpu_reset_required", "gpu", "operator")], id="an-nvml-dbe-and-xid94-are-one-incident"),
    pytest.param([sig(code="94", pod="job-a-0"), sig(check="row_remap.pending", code=None, at=1)],
                 [("gpu_reset_required", "gpu", "operator")], id="xid94-and-the-pending-remap-it-reports-are-one"),
    pytest.param([sig(code="94", pod="job-a-0", gpu_index=1), sig(code="48", at=1)],
                 [("application_fault", "gpu", "tenant"), ("gpu_reset_required", "gpu", "operator")],
                 id="xid94-and-a-dbe-on-another-gpu-stay-two"),
    pytest.param([sig(code="94", pod="job-a-0"), sig(code="94", pod="job-b-0", at=1), sig(code="48", at=2)],
                 [("gpu_reset_required", "gpu", "operator")], id="two-workloads-xid94-on-one-gpu-and-its-dbe-are-one"),
    pytest.param([sig(code="94", pod="job-a-0"), sig(code="95", at=1), sig(code="48", at=2)],
                 [("gpu_reset_required", "gpu", "operator")], id="xid94-xid95-then-the-dbe-are-one"),
    pytest.param([sig(code="13", pod="job-a-0"), sig(code="48", at=1)],
                 [("application_fault", "tenant", "tenant"), ("gpu_reset_required", "gpu", "operator")],
                 id="an-application-xid-and-a-dbe-stay-two"),
    pytest.param([sig(check="pcie.replay", code=None, at=i, n=i) for i in range(2)], [],
                 id="below-count-in-window-threshold-opens-nothing"),
    pytest.param([sig(check="pcie.replay", code=None, at=i, n=i) for i in range(3)],
                 [("hardware_support", "gpu", "operator")], id="threshold-reached-opens-one-incident"),
    pytest.param([sig(check="pcie.replay", code=None, at=i * 400, n=i) for i in range(3)], [],
                 id="threshold-counts-only-inside-its-window"),
]


class TestRules:
    @pytest.mark.parametrize(("signals", "expected"), RULE_CASES)
    def test_rule_table(self, catalog: Catalog, signals: list[Signal], expected: list[tuple[str, str, str]]) -> None:
        core = run(catalog, signals)
        got = sorted((i.category, i.scope.value, i.domain.value) for i in top_level(core))
        assert got == sorted(expected)

    @pytest.mark.parametrize(("first", "then", "category", "published"),
                             [("None", "GPU Reset Required", "gpu_reset_required", [1, 1]),
                              ("None", "Drain and Reset", "gpu_drain_reset_required", [1, 1]),
                              ("GPU Reset Required", "None", "gpu_reset_required", [1, 0])],
                             ids=["none-then-reset", "none-then-drain-reset", "reset-then-none-only-counted"])
    def test_a_repeat_whose_own_line_is_worse_raises_the_incident_inside_the_dedupe_window(
            self, catalog: Catalog, first: str, then: str, category: str, published: list[int]) -> None:
        """XID 154's class is its recovery action, read from its line: a second XID 154 ten seconds after a "None"
        that says the GPU now needs a reset is not a storm repeat (it was counted and dropped before)."""
        def xid154(at: int, verdict: str) -> Signal:
            return sig(code="154", at=at, n=at, message="NVRM: Xid (PCI:0000:18:00): 154, GPU recovery action "
                                                       f"changed from 0x0 (None) to 0x1 ({verdict})")

        core = Correlator(catalog)
        changes = [len(core.ingest(s, s.observed_at)) for s in (xid154(0, first), xid154(10, then))]
        (inc,) = top_level(core)
        assert (inc.category, inc.signal_count) == (category, 2)
        assert changes == published
        suppressed = core.stats.get("suppressed", 0)
        third = xid154(20, then)
        assert core.ingest(third, third.observed_at) == [], "a third, no worse: the storm path again"
        assert core.stats["suppressed"] == suppressed + 1

    def test_repeats_folded_into_a_milder_incident_stay_counted_only(self, catalog: Catalog) -> None:
        """XID 45 (sympathetic) folds into the GPU's XID 154 "None" incident (informational): a fold never sets the
        host's class, so its repeats inside the window are storm repeats, not absorbed one by one."""
        core = Correlator(catalog)
        none = sig(code="154", message="NVRM: Xid (PCI:0000:18:00): 154, GPU recovery action changed from 0x0 "
                                       "(None) to 0x0 (None)")
        core.ingest(none, none.observed_at)
        for i in range(1, 6):
            xid45 = sig(code="45", at=i, n=i, pod="job")
            core.ingest(xid45, xid45.observed_at)
        (inc,) = top_level(core)
        assert inc.category == "informational" and inc.signal_count == 6
        assert (core.stats.get("folded"), core.stats.get("suppressed")) == (1, 4)

    def test_suspect_incident_names_the_workloads(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="13", pod="job-a"), sig(code="31", pod="job-b", at=60)])
        inc = next(i for i in top_level(core) if i.category == "gpu_suspect")
        assert "team-a/job-a" in inc.timeline[0].note and "team-a/job-b" in inc.timeline[0].note
        assert {t.pod for t in inc.tenants} == {"job-b"}

    def test_third_burst_on_one_gpu_in_a_day_is_a_lemon(self, catalog: Catalog) -> None:
        signals = []
        for burst in range(3):
            t = burst * 2 * HOUR
            signals += [sig(check="ecc.dbe", code=None, at=t, n=burst),
                        sig(check="ecc.dbe", code=None, at=t + 60, healthy=True, n=burst)]
        core = run(catalog, signals, windows={"flap_s": 60})
        incs = sorted(top_level(core), key=lambda i: i.first_seen)
        assert len(incs) == 3
        assert incs[-1].category == "hardware_support" and incs[-1].labels[LEMON_LABEL] == "true"
        assert all(LEMON_LABEL not in i.labels for i in incs[:2])
        assert any(e.event == "lemon" for e in incs[-1].timeline)

    @pytest.mark.parametrize("repeat", ["79", "48"])
    def test_a_lemon_stays_on_the_rma_path_when_a_reboot_or_reset_fault_repeats_inside_the_dedupe_window(
            self, catalog: Catalog, repeat: str) -> None:
        """The lemon rule's hardware_support outranks every automatic ladder: a repeat seconds later (XID 79 off the
        bus, the DBE again) must not turn the GPU back onto a reboot or reset that returns it to service."""
        signals = []
        for burst in range(3):
            t = burst * 2 * HOUR
            signals += [sig(code="48", at=t, n=burst), sig(code="48", at=t + 60, healthy=True, n=burst)]
        signals = [*signals[:-1], sig(code=repeat, at=4 * HOUR + 10, n=9)]  # the third burst still open
        core = run(catalog, signals, windows={"flap_s": 60})
        last = max(top_level(core), key=lambda i: i.first_seen)
        assert (last.category, last.labels[LEMON_LABEL]) == ("hardware_support", "true")
        assert any(c.key == f"xid:{repeat}" and c.count == (1 if repeat == "79" else 2) for c in last.counts)

    @pytest.mark.parametrize("xid94_first", [True, False], ids=["xid94-first", "dbe-first"])
    def test_a_dbe_raising_an_xid94_incident_counts_as_a_hardware_burst_for_the_lemon_rule(
            self, catalog: Catalog, xid94_first: bool) -> None:
        signals = []
        for burst in range(3):
            t = burst * 2 * HOUR
            pair = [sig(code="94", pod="job-a-0", at=t, n=burst), sig(code="48", at=t + 1, n=burst)]
            signals += (pair if xid94_first else pair[::-1]) + [
                sig(code="94", pod="job-a-0", at=t + 60, healthy=True, n=burst),
                sig(code="48", at=t + 60, healthy=True, n=burst)]
        core = run(catalog, signals, windows={"flap_s": 60})
        last = max(top_level(core), key=lambda i: i.first_seen)
        assert last.category == "hardware_support" and last.labels[LEMON_LABEL] == "true"

    def test_a_dbe_raising_an_xid94_incident_counts_toward_a_multi_gpu_failure(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="94", pod="job-a-0"), *(sig(code="48", gpu_index=g, at=1 + g) for g in range(4))])
        (node,) = top_level(core)
        assert node.category == "multi_gpu_failure" and len(node.gpus) == 4

    def test_a_rescheduled_pods_xid94_elsewhere_never_reopens_the_repaired_gpus_incident(self,
                                                                                      catalog: Catalog) -> None:
        core = run(catalog, [sig(code="94", pod="job-a-0"), sig(code="48", at=1),
                             sig(code="94", pod="job-a-0", at=60, healthy=True),
                             sig(code="48", at=60, healthy=True),
                             sig(node="n2", code="94", pod="job-a-0", gpu_index=5, at=200)],
                   windows={"flap_s": 600})
        new = next(i for i in top_level(core) if i.status is IncidentStatus.OPEN)
        assert (new.node, [g.index for g in new.gpus], new.flaps) == ("n2", [5], 0)

    def test_folded_peer_is_evidence_not_a_gpu_to_reset(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="79", gpu_index=0), sig(code="74", gpu_index=1, at=1)])
        (inc,) = top_level(core)
        assert {c.key: c.count for c in inc.counts} == {"xid:79": 1, "xid:74": 1}
        assert [g.index for g in inc.gpus] == [0]
        assert [e.event for e in inc.timeline] == ["opened", "folded"]


class TestTopology:
    def test_link_down_under_one_switch_is_one_fabric_incident(self, catalog: Catalog) -> None:
        core = run(catalog, [ib_down(f"n{i}", "leaf-03", at=i) for i in range(12)])
        (fab,) = top_level(core)
        assert fab.scope is IncidentScope.FABRIC and fab.node is None
        assert fab.topology == {"switch": "leaf-03"}
        assert len(fab.members) == 12 and len(fab.nodes) == 12
        assert all(i.parent == fab.id for i in core.incidents.values() if i.id != fab.id)

    def test_two_nodes_are_below_min_nodes(self, catalog: Catalog) -> None:
        core = run(catalog, [ib_down("n1", "leaf-03"), ib_down("n2", "leaf-03", at=1)])
        assert {i.scope for i in top_level(core)} == {IncidentScope.NODE}

    def test_different_switches_do_not_group(self, catalog: Catalog) -> None:
        core = run(catalog, [ib_down(f"n{i}", f"leaf-{i}") for i in range(6)])
        assert len(top_level(core)) == 6

    def test_nodes_outside_the_window_do_not_group(self, catalog: Catalog) -> None:
        core = run(catalog, [ib_down(f"n{i}", "leaf-03", at=i * 200) for i in range(4)])
        assert all(i.scope is IncidentScope.NODE for i in top_level(core))

    def test_fabric_incident_resolves_when_every_link_is_back(self, catalog: Catalog) -> None:
        down = [ib_down(f"n{i}", "leaf-03", at=i) for i in range(3)]
        up = [sig(node=f"n{i}", check="ib.link_down", code=None, gpu_index=None, at=30 + i, component="mlx5_0/1",
                  healthy=True) for i in range(3)]
        core = run(catalog, down + up[:2])
        (fab,) = top_level(core)
        assert fab.status is IncidentStatus.OPEN
        core.ingest(up[2], up[2].observed_at)
        (fab,) = top_level(core)
        assert fab.status is IncidentStatus.RESOLVED


class TestEndpointImpact:
    def test_breach_on_a_node_with_hardware_incident_is_its_impact(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(node="n7", code="48"), endpoint(5, "n7,n8")])
        (inc,) = top_level(core)
        assert inc.category == "gpu_reset_required"
        assert [t.key() for t in inc.impact] == ["team-llm/chat"]

    def test_breach_first_then_hardware_folds_breach_under_cause(self, catalog: Catalog) -> None:
        core = run(catalog, [endpoint(0, "n7"), sig(node="n7", code="48", at=5)])
        (inc,) = top_level(core)
        assert inc.category == "gpu_reset_required"
        ep = next(i for i in core.incidents.values() if i.parent == inc.id)
        assert ep.category == "endpoint_slo" and ep.domain is Domain.TENANT
        assert [t.key() for t in inc.impact] == ["team-llm/chat"]

    def test_breach_without_hardware_is_a_tenant_incident(self, catalog: Catalog) -> None:
        core = run(catalog, [endpoint(0, "n9")])
        (inc,) = top_level(core)
        assert (inc.category, inc.scope) == ("endpoint_slo", IncidentScope.TENANT)


    def test_a_breach_counted_on_two_hosts_as_its_serving_nodes_moved_clears_on_both(self, catalog: Catalog) -> None:
        """The first host's own fault cleared meanwhile: the breach was its last, so it resolves with the endpoint."""
        core = run(catalog, [ib_down("n1", "leaf-01"), endpoint(10, "n1"),
                             sig(node="n1", check="ib.link_down", code=None, gpu_index=None, at=20, healthy=True,
                                 component="mlx5_0/1"),
                             sig(code="48", node="n2", at=30), endpoint(100, "n2"), endpoint(200, "n1", healthy=True)])
        link = next(i for i in core.incidents.values() if i.category == "fabric_link")
        gpu = next(i for i in core.incidents.values() if i.category == "gpu_reset_required")
        assert link.status is IncidentStatus.RESOLVED and not link.open_faults
        assert gpu.status is IncidentStatus.OPEN and list(gpu.open_faults) == [sig(code="48", node="n2").fault_key()]

    def test_a_members_fault_clearing_leaves_its_fabric_incident_while_the_member_stays_open(
            self, catalog: Catalog) -> None:
        core = run(catalog, [ib_down("n1", "leaf-01"), ib_down("n2", "leaf-01", at=1), ib_down("n3", "leaf-01", at=2),
                             sig(node="n3", check="ib.flapping", code=None, gpu_index=None, at=3,
                                 component="mlx5_0/1", labels={"switch": "leaf-01"}),
                             sig(node="n3", check="ib.link_down", code=None, gpu_index=None, at=10, healthy=True,
                                 component="mlx5_0/1")])
        (fabric,) = (i for i in core.incidents.values() if i.scope is IncidentScope.FABRIC)
        assert sorted(fabric.open_faults) == ["ib.link_down@n1/mlx5_0/1", "ib.link_down@n2/mlx5_0/1"]
        assert not core.incidents[core.state.by_fault["ib.flapping@n3/mlx5_0/1"]].status.terminal

class TestRulesFile:
    def test_shipped_rules_load(self, catalog: Catalog) -> None:
        rules = load_rules(catalog=catalog)
        assert rules.topology["fabric_link"].key == "switch"

    @pytest.mark.parametrize(("text", "message"), [
        ("version: 1\nwindows: {flap_s: -1}\n", "greater than or equal"),
        ("version: 1\nthresholds:\n  - {code: a, count: 2, window_s: 1}\n  - {code: a, count: 3, window_s: 1}\n",
         "listed twice"),
        ("version: 1\ntopology:\n  - {category: nope, key: switch, min_nodes: 2, window_s: 1}\n", "unknown category"),
        ("version: 1\nsurprise: true\n", "Extra inputs"),
    ], ids=["negative-window", "duplicate-threshold", "unknown-category", "unknown-key"])
    def test_bad_rules_fail_fast_with_file_and_reason(self, catalog: Catalog, tmp_path: Path, text: str,
                                                      message: str) -> None:
        p = tmp_path / "rules.yaml"
        p.write_text(text)
        with pytest.raises(DataFileError, match=message) as err:
            load_rules(p, catalog)
        assert str(p) in str(err.value)


RMA_XID = "122"  # NVIDIA Xid catalog: CONTACT_SUPPORT


class TestMultiGpu:
    def test_three_gpus_failing_together_become_one_node_incident(self, catalog: Catalog) -> None:
        later = sig(check="ecc.dbe", code=None, gpu_index=5, at=10)
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(3)] + [later])
        (node,) = top_level(core)
        assert (node.scope, node.category) == (IncidentScope.NODE, "multi_gpu_failure")
        assert len(node.members) == 4 and sorted(g.index for g in node.gpus) == [0, 1, 2, 5]
        assert all(i.parent == node.id for i in core.incidents.values() if i.id != node.id)

    def test_a_member_gpu_needing_rma_keeps_the_node_on_the_human_path(self, catalog: Catalog) -> None:
        """Three GPUs failing together point at the host (reboot and return), but a member NVIDIA sends to
        support (CONTACT_SUPPORT) must not come back on a reboot and a passing diagnostic."""
        rma = sig(code=RMA_XID, gpu_index=2, at=2)
        assert catalog.classify(check="xid", code=RMA_XID).category == "hardware_support"
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(2)] + [rma])
        (node,) = top_level(core)
        assert (node.scope, node.category) == (IncidentScope.NODE, "hardware_support")
        assert len(node.members) == 3 and "CONTACT_SUPPORT" in node.source
        assert any(e.event == "category" and "hardware_support" in e.note for e in node.timeline)
        later = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(3)] + [
            sig(code=RMA_XID, gpu_index=6, at=10)])
        (node,) = top_level(later)
        assert node.category == "hardware_support", "an RMA member folding into an existing node incident too"

    def test_a_node_sent_to_a_human_keeps_taking_its_failing_gpus(self, catalog: Catalog) -> None:
        """Once a multi-GPU incident needs RMA, a later GPU fault on that node joins it: a node awaiting a technician
        never gets a GPU reset ladder (whose next rung reboots it) of its own."""
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(2)] + [
            sig(code=RMA_XID, gpu_index=2, at=2), sig(code="48", gpu_index=5, at=10)])
        (node,) = top_level(core)
        assert node.category == "hardware_support" and sorted(g.index for g in node.gpus) == [0, 1, 2, 5]

    def test_a_gpu_off_the_bus_keeps_its_node_incident_open_when_a_gpu_incident_folded_into_it_clears(
            self, catalog: Catalog) -> None:
        """XID 79 opens a node incident that takes the node's later GPU faults; the folded DBE clearing must not
        resolve it (and stop its reboot) while the GPU that fell off the bus is still gone."""
        lost = sig(code="79", gpu_index=3)
        core = run(catalog, [lost, sig(check="ecc.dbe", code=None, gpu_index=0, at=1),
                             sig(check="ecc.dbe", code=None, gpu_index=0, at=30, healthy=True)])
        (node,) = top_level(core)
        member = core.incidents[next(iter(node.members))]
        assert member.status is IncidentStatus.RESOLVED
        assert node.status is IncidentStatus.OPEN and list(node.open_faults) == [lost.fault_key()]
        back = sig(code="79", gpu_index=3, at=60, healthy=True)
        core.ingest(back, back.observed_at)
        assert core.incidents[node.id].status is IncidentStatus.RESOLVED

    def test_a_restored_core_clears_a_node_incidents_faults_where_the_uninterrupted_one_does(
            self, catalog: Catalog) -> None:
        core = run(catalog, [sig(check="ecc.dbe", code=None, gpu_index=g, at=0) for g in range(3)])
        restored = Correlator(catalog)
        restored.load_state(Checkpoint.decode(Checkpoint(core.to_state()).encode()).state)
        assert restored.state.by_fault == core.state.by_fault

    def test_two_gpus_stay_gpu_incidents(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(2)])
        assert {i.scope for i in top_level(core)} == {IncidentScope.GPU}

    def test_gpus_failing_hours_apart_are_not_grouped(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", gpu_index=g, at=g * HOUR) for g in range(3)])
        assert len(top_level(core)) == 3

    def test_node_incident_resolves_when_every_gpu_is_healthy(self, catalog: Catalog) -> None:
        faults = [sig(check="ecc.dbe", code=None, gpu_index=g, at=g) for g in range(3)]
        heals = [sig(check="ecc.dbe", code=None, gpu_index=g, at=30 + g, healthy=True) for g in range(3)]
        core = run(catalog, faults + heals)
        (node,) = top_level(core)
        assert node.status is IncidentStatus.RESOLVED and node.time_to_repair_s is not None


GPU_RESET_154 = "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)"


def reboot_154(gpu: int, at: float, node: str = "n1") -> Signal:
    return sig(code="154", gpu_index=gpu, at=at, node=node,
               message="GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)")


def standing(core: Correlator) -> list[Incident]:
    return [i for i in top_level(core) if not i.status.terminal]


def validating(core: Correlator, inc: Incident, at: float) -> None:
    """The remediator's record that the incident's plan started validating (its repair ran)."""
    when = T0 + timedelta(seconds=at)
    core.apply_action(ActionRecord(id=f"v-{inc.id}", cluster="c1", incident_id=inc.id, kind=ActionKind.STEP,
                                   outcome=ActionOutcome.STARTED, actor="remediator/test", rule="node-reboot",
                                   reason="validate", action=StepAction.VALIDATE, at=when), when)
    assert core.incidents[inc.id].status is IncidentStatus.VALIDATING


def completed(core: Correlator, inc: Incident, at: float) -> None:
    """The remediator's record that the incident's plan completed (a reboot, validated, returned)."""
    when = T0 + timedelta(seconds=at)
    core.apply_action(ActionRecord(id=f"done-{inc.id}", cluster="c1", incident_id=inc.id, kind=ActionKind.PLAN,
                                   outcome=ActionOutcome.COMPLETED, actor="remediator/test", rule="node-reboot",
                                   reason="rebooted", at=when), when)


class TestOneRebootPerNode:
    """NVIDIA RESTART_BM repairs the whole node: the incidents on a node that need a reboot are one incident, one
    plan, however each came to need it."""

    def test_two_gpu_incidents_raised_to_a_node_reboot_fold_into_one_node_incident(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(2)]
                   + [reboot_154(g, 10 + g) for g in range(2)])
        (node,) = standing(core)
        assert (node.scope, node.category) == (IncidentScope.NODE, "node_reboot_required")
        assert sorted(g.index for g in node.gpus) == [0, 1] and len(node.members) == 2
        assert node.title.startswith("Node reboot for 2 incidents on n1")

    def test_a_gpu_off_the_bus_takes_the_gpu_incident_already_needing_the_reboot(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48"), reboot_154(0, 1), sig(code="79", gpu_index=3, at=2)])
        (node,) = standing(core)
        assert node.scope is IncidentScope.NODE and sorted(g.index for g in node.gpus) == [0, 3]
        assert node.title.startswith("XID 79"), "a node reboot keeps the title of what needs it"

    def test_the_nodes_own_incident_raised_to_a_reboot_takes_the_gpu_incident_needing_one(
            self, catalog: Catalog) -> None:
        nvswitch = sig(check="sxid", code="24007", gpu_index=None, component="nvswitch0:0000:c3:00.0",
                       message="nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Fatal, Link 10",
                       details={"fatal": "Fatal"})
        core = run(catalog, [nvswitch, sig(code="48", at=1), reboot_154(0, 2), sig(code="79", gpu_index=3, at=3)])
        (node,) = standing(core)
        assert (node.scope, node.category) == (IncidentScope.NODE, "node_reboot_required")
        assert sorted(g.index for g in node.gpus) == [0, 3] and "sxid:24007" in {c.key for c in node.counts}

    @pytest.mark.parametrize(("host", "category"), [
        (sig(check="sxid", code="24007", gpu_index=None, component="nvswitch0:0000:c3:00.0", details={"fatal": "Fatal"},
             message="nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 24007, Fatal, Link 10"), "node_reboot_required"),
        (sig(check="clock.hw_slowdown", code=None, gpu_index=None), "node_reboot_required"),
        (sig(check="gpu.count_mismatch", code=None, gpu_index=None), "hardware_support")],
        ids=["fatal-sxid-reboots-the-node-already", "gpu-less-slowdown-is-raised", "count-mismatch-keeps-the-human"])
    def test_the_nodes_own_incident_of_another_kind_takes_the_gpu_incidents_needing_a_reboot(
            self, catalog: Catalog, host: Signal, category: str) -> None:
        """One reboot plan per node whatever holds the node's key; a human's repair covers the reboot."""
        core = run(catalog, [host, *(sig(code="48", gpu_index=g, at=1 + g) for g in range(2)),
                             reboot_154(0, 3), reboot_154(1, 4)])
        (node,) = standing(core)
        assert (node.scope, node.category, sorted(g.index for g in node.gpus)) == (IncidentScope.NODE, category,
                                                                                   [0, 1])
        assert len(node.members) == 2

    def test_three_gpus_failing_beside_a_gpu_less_node_fault_make_that_incident_the_multi_gpu_one(
            self, catalog: Catalog) -> None:
        core = run(catalog, [sig(check="clock.hw_slowdown", code=None, gpu_index=None),
                             *(sig(code="48", gpu_index=g, at=1 + g) for g in range(3))])
        (node,) = standing(core)
        assert (node.category, sorted(g.index for g in node.gpus)) == ("multi_gpu_failure", [0, 1, 2])
        assert "clock.hw_slowdown" in {c.key for c in node.counts}

    def test_a_node_reboot_flapping_back_takes_the_gpu_incident_that_needed_one_meanwhile(
            self, catalog: Catalog) -> None:
        lost = sig(check="gpu.lost", code=None, gpu_index=2)
        core = run(catalog, [lost])
        (node,) = standing(core)
        completed(core, node, 10)
        for s in (sig(code="48", gpu_index=1, at=20), reboot_154(1, 30), sig(check="gpu.lost", code=None,
                                                                               gpu_index=2, at=40, n=1)):
            core.ingest(s, s.observed_at)
        (again,) = standing(core)
        assert again.id == node.id and sorted(g.index for g in again.gpus) == [1, 2]

    def test_gpu_incidents_needing_a_reboot_while_the_nodes_reboot_validates_get_one_node_incident(
            self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="79", gpu_index=0)])
        (first,) = standing(core)
        validating(core, first, 10)
        for s in (sig(code="48", gpu_index=1, at=20), sig(code="48", gpu_index=2, at=21), reboot_154(1, 30),
                  reboot_154(2, 31)):
            core.ingest(s, s.observed_at)
        second = next(i for i in standing(core) if i.status is not IncidentStatus.VALIDATING)
        assert (second.scope, second.category, sorted(g.index for g in second.gpus)) == (
            IncidentScope.NODE, "node_reboot_required", [1, 2])
        assert core.incidents[first.id].status is IncidentStatus.VALIDATING
        healthy = sig(code="79", gpu_index=0, at=40, healthy=True)
        core.ingest(healthy, healthy.observed_at)
        assert not core.incidents[first.id].open_faults, "its own faults still clear on it"

    def test_a_gpu_less_fault_back_on_a_validating_node_is_its_recurrence_after_another_took_the_node_key(
            self, catalog: Catalog) -> None:
        wedge = sig(check="nvlink.driver_wedge", code=None, gpu_index=None,
                    message="knvlinkDiscoverPostRxDetLinks_GH100: postRxDetLinkMask failed!")
        core = run(catalog, [wedge])
        (first,) = standing(core)
        assert first.category == "node_reboot_required"
        validating(core, first, 10)
        for s in (sig(code="48", gpu_index=1, at=20), sig(code="48", gpu_index=2, at=21), reboot_154(1, 30),
                  reboot_154(2, 31), wedge.model_copy(update={"id": wedge.id + "-again",
                                                              "observed_at": T0 + timedelta(seconds=100)})):
            core.ingest(s, s.observed_at)
        assert core.incidents[first.id].counts["nvlink.driver_wedge"] == 2, "the soak sees its fault come back"
        (second,) = (i for i in standing(core) if i.id != first.id)
        assert "nvlink.driver_wedge" not in {c.key for c in second.counts}

    def test_a_multi_gpu_failure_takes_the_gpu_incident_already_needing_a_reboot(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", gpu_index=3), reboot_154(3, 1),
                             *(sig(code="48", gpu_index=g, at=HOUR + g) for g in range(3))])
        (node,) = standing(core)
        assert (node.category, sorted(g.index for g in node.gpus)) == ("multi_gpu_failure", [0, 1, 2, 3])

    def test_a_nodes_infiniband_link_stays_its_own_incident_beside_its_reboot(self, catalog: Catalog) -> None:
        """The link's repair is its cable, transceiver or switch: a reboot neither carries it nor waits on it."""
        core = run(catalog, [ib_down("n1", "leaf-01"), sig(code="48", at=1), reboot_154(0, 2),
                             sig(code="79", gpu_index=3, at=3)])
        link, node = sorted(standing(core), key=lambda i: i.category)
        assert (link.category, core.incidents[link.id].key, link.gpus) == ("fabric_link", "link|c1|n1", ())
        assert (node.scope, node.category, core.incidents[node.id].key) == (IncidentScope.NODE,
                                                                            "node_reboot_required", "node|c1|n1")
        assert sorted(g.index for g in node.gpus) == [0, 3] and "ib.link_down" not in {c.key for c in node.counts}

    def test_a_link_incident_from_an_older_checkpoint_moves_to_the_links_key(self, catalog: Catalog) -> None:
        """Checkpoints written before links had their own key hold the link incident under the node's key."""
        old = Checkpoint(run(catalog, [ib_down("n1", "leaf-01")]).to_state()).to_json().replace(b"link|", b"node|")
        core = Correlator(catalog)
        core.load_state(Checkpoint.decode(zlib.compress(old)).state)
        (link,) = core.incidents.values()
        assert (link.key, core.state.by_key) == ("link|c1|n1", {"link|c1|n1": link.id})
        reboot = sig(code="79", at=5)
        assert [c.kind for c in core.ingest(reboot, reboot.observed_at)] == [ChangeKind.OPENED]
        assert link.category == "fabric_link" and "xid:79" not in link.counts

    @pytest.mark.parametrize(("fixture", "host"), [
        ("link_and_slowdown", sig(check="clock.hw_slowdown", code=None, gpu_index=None, at=100)),
        ("link_and_xid79", sig(code="79", at=100))])
    def test_an_older_checkpoints_node_incident_holding_a_link_beside_a_host_fault_still_clears_it(
            self, catalog: Catalog, fixture: str, host: Signal) -> None:
        """Written before links had their own key: the link's fault stays where it is open, and repeats and clears
        there (a second incident for it would hold the node and never clear)."""
        core = Correlator(catalog)
        core.load_state(Checkpoint.decode(zlib.compress(
            (DATA / f"correlator_checkpoint_v1_{fixture}.json").read_bytes())).state)
        (legacy,) = core.incidents.values()
        for s in (ib_down("n1", "leaf-01", at=50), host,
                  sig(node="n1", check="ib.link_down", code=None, gpu_index=None, at=150, healthy=True,
                      component="mlx5_0/1"),
                  host.model_copy(update={"id": host.id + "-ok", "healthy": True, "observed_at": T0 + timedelta(
                      seconds=200)})):
            core.ingest(s, s.observed_at)
        assert list(core.incidents) == [legacy.id]
        assert not legacy.open_faults and legacy.status is IncidentStatus.RESOLVED

    def test_a_switch_under_a_node_already_rebooting_is_still_one_fabric_incident(self, catalog: Catalog) -> None:
        """A node's reboot incident does not hide its link from the leaf switch's grouping (rules ``topology``)."""
        core = run(catalog, [sig(code="79", at=0), ib_down("n1", "leaf-01", at=10), ib_down("n2", "leaf-01", at=11),
                             ib_down("n3", "leaf-01", at=12)])
        fabric, reboot = sorted(standing(core), key=lambda i: i.scope.value)
        assert (fabric.scope, fabric.category, sorted(fabric.nodes)) == (IncidentScope.FABRIC, "fabric_link",
                                                                          ["n1", "n2", "n3"])
        assert (reboot.category, reboot.node, reboot.open_faults) == ("node_reboot_required", "n1",
                                                                       ("xid@n1/" + reboot.gpus[0].key(),))

    def test_reboots_on_different_nodes_stay_apart(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", node="n1"), sig(code="48", node="n2", at=1),
                             reboot_154(0, 10), reboot_154(0, 11, node="n2")])
        assert sorted(i.node or "" for i in standing(core)) == ["n1", "n2"]

    def test_the_node_incident_stays_open_until_every_member_clears(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(check="ecc.dbe", code=None, gpu_index=g, at=g) for g in range(2)]
                   + [reboot_154(g, 10 + g) for g in range(2)])
        (node,) = standing(core)
        for g, check in [(1, "ecc.dbe"), (1, "xid")]:
            s = sig(check=check, code=None if check == "ecc.dbe" else "154", gpu_index=g, at=60, healthy=True)
            core.ingest(s, s.observed_at)
        assert core.incidents[node.id].status is IncidentStatus.OPEN, "GPU 0 still needs the reboot"
        for check in ("ecc.dbe", "xid"):
            s = sig(check=check, code=None if check == "ecc.dbe" else "154", gpu_index=0, at=70, healthy=True)
            core.ingest(s, s.observed_at)
        assert core.incidents[node.id].status is IncidentStatus.RESOLVED

    def test_application_faults_on_four_gpus_raised_to_a_reboot_are_one_node_incident(
            self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="13", pod=f"job{g}-0", gpu_index=g, at=g) for g in range(4)]
                   + [reboot_154(g, 10 + g) for g in range(4)])
        (node,) = standing(core)
        assert (node.scope, node.category) == (IncidentScope.NODE, "node_reboot_required")
        assert sorted(g.index for g in node.gpus) == [0, 1, 2, 3]
        assert all(core.incidents[m].parent == node.id for m in node.members)

    def test_a_node_validating_after_its_reboot_takes_no_new_reboot_fault(self, catalog: Catalog) -> None:
        """Its reboot already ran: a GPU that needs one now gets a reboot of its own, not a return with the node."""
        core = run(catalog, [sig(code="48"), reboot_154(0, 1), sig(code="79", gpu_index=3, at=2)])
        (node,) = standing(core)
        validating(core, node, 100)
        for s in [sig(code="48", gpu_index=5, at=110), reboot_154(5, 111)]:
            core.ingest(s, s.observed_at)
        assert sorted((i.scope.value, sorted(g.index for g in i.gpus)) for i in standing(core)) == [
            ("gpu", [5]), ("node", [0, 3])]

    def test_a_reboot_holding_a_gpu_that_took_its_nvlink_peers_hears_of_them_and_settles_them_all(
            self, catalog: Catalog) -> None:
        """GPU 2's DBE took GPU 0's XID 74 incident (its NVLink peer) before both it and GPU 5 needed a reboot: three
        levels. GPU 0's XID 74 again while the node validates is a recurrence on the node incident (its soak sees
        it), and the node incident's completed plan settles every level."""
        core = run(catalog, [sig(code="74", gpu_index=0), sig(code="48", gpu_index=2, at=1), reboot_154(2, 2),
                             sig(code="48", gpu_index=5, at=3), reboot_154(5, 4)])
        (node,) = standing(core)
        peer = next(i for i in core.incidents.values() if i.parent not in (None, node.id))
        assert core.incidents[peer.parent or ""].parent == node.id, "GPU 0's incident sits under GPU 2's"
        validating(core, node, 200)
        before = core.incidents[node.id].counts["xid:74"]
        late = sig(code="74", gpu_index=0, at=300)
        assert node.id in [c.incident.id for c in core.ingest(late, late.observed_at)]
        assert core.incidents[node.id].counts["xid:74"] == before + 1
        completed(core, node, 400)
        assert not [i.id for i in core.incidents.values() if not i.status.terminal], "every level settled"

    def test_a_member_that_faulted_again_still_clears_and_its_node_incident_resolves(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(2)]
                   + [reboot_154(g, 10 + g) for g in range(2)] + [sig(code="48", gpu_index=0, at=200)])
        assert len(standing(core)) == 1
        for g in range(2):
            s = sig(code="48", gpu_index=g, at=300, healthy=True)
            core.ingest(s, s.observed_at)
        assert [i.status for i in core.incidents.values()] == [IncidentStatus.RESOLVED] * 3

    def test_a_member_flapping_back_is_a_recurrence_for_its_validating_node_incident_or_its_own_once_that_settled(
            self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="48", gpu_index=g, at=g) for g in range(2)]
                   + [reboot_154(g, 10 + g) for g in range(2)], windows={"flap_s": 3600})
        (node,) = standing(core)
        gpu0 = next(core.incidents[m] for m in node.members if "xid:48" in core.incidents[m].counts
                    and next(iter(core.incidents[m].gpus.values())).index == 0)
        healed = sig(code="48", gpu_index=0, at=100, healthy=True)
        core.ingest(healed, healed.observed_at)
        assert gpu0.status is IncidentStatus.RESOLVED
        validating(core, node, 150)
        back = sig(code="48", gpu_index=0, at=200)
        kinds = {(c.kind, c.incident.id) for c in core.ingest(back, back.observed_at)}
        assert {(ChangeKind.REOPENED, gpu0.id), (ChangeKind.UPDATED, node.id)} <= kinds
        completed(core, node, 300)
        again = sig(code="48", gpu_index=0, at=400)
        core.ingest(sig(code="48", gpu_index=0, at=350, healthy=True), T0 + timedelta(seconds=350))
        core.ingest(again, again.observed_at)
        assert gpu0.status is IncidentStatus.OPEN and gpu0.parent is None, "its node incident settled: on its own"


class TestTenantIncidentTurnedHardware:
    """XID_154_EVAL joins the workload's one-GPU incident to the GPU's XID 154; from then on it is the GPU's."""

    def test_an_application_fault_a_gpu_reset_joins_becomes_that_gpus_hardware_incident(
            self, catalog: Catalog) -> None:
        """Lemon, multi-GPU and endpoint impact see it (on_node), and the workload's next fault on another GPU opens
        its own incident."""
        core = run(catalog, [sig(code="13", pod="job-a-0"), sig(code="154", at=1, message=GPU_RESET_154),
                             sig(code="13", pod="job-a-0", gpu_index=1, at=2)])
        hw, app = sorted(top_level(core), key=lambda i: i.first_seen)
        gpu0 = sig().gpu
        assert gpu0 is not None and core.incidents[hw.id].key == f"gpu|c1|n1|{gpu0.key()}"
        assert (hw.scope, hw.category) == (IncidentScope.GPU, "gpu_reset_required")
        assert any(e.event == "scope" for e in hw.timeline) and hw.id in core.state.on_node["n1"]
        assert (app.scope, app.category) == (IncidentScope.TENANT, "application_fault")
        assert [g.index for g in app.gpus] == [1]

    def test_application_faults_on_three_gpus_raised_to_resets_are_a_multi_gpu_failure(
            self, catalog: Catalog) -> None:
        core = run(catalog, [sig(code="13", pod=f"job{g}-0", gpu_index=g, at=g) for g in range(3)]
                   + [sig(code="154", gpu_index=g, at=10 + g, message=GPU_RESET_154) for g in range(3)])
        (node,) = top_level(core)
        assert (node.scope, node.category) == (IncidentScope.NODE, "multi_gpu_failure")
        assert sorted(g.index for g in node.gpus) == [0, 1, 2] and len(node.members) == 3

    @pytest.mark.parametrize("older_settled", ["tenant", "gpu"])
    def test_a_restored_core_continues_like_the_uninterrupted_one_after_a_rekey(
            self, catalog: Catalog, older_settled: str) -> None:
        """An older settled incident under the workload's key (or the GPU's key) must not come back from a checkpoint:
        the workload's next fault opens a new incident in both cores, and the indexes are equal."""
        first: list[Signal] = [sig(code="13", pod="job-a-0")] if older_settled == "tenant" else [
            sig(code="13", pod="job-a-0"), sig(check="ecc.dbe", code=None, at=5)]
        core = run(catalog, first)
        settled = next(i for i in core.incidents.values() if i.scope is (
            IncidentScope.TENANT if older_settled == "tenant" else IncidentScope.GPU))
        core.apply_action(ActionRecord(id="r1", cluster="c1", incident_id=settled.id, kind=ActionKind.PLAN,
                                       outcome=ActionOutcome.COMPLETED, actor="remediator/test", rule="x",
                                       reason="done", at=T0 + timedelta(seconds=10)), T0 + timedelta(seconds=10))
        assert core.incidents[settled.id].status.terminal
        for s in [sig(code="31", pod="job-a-0", at=20), sig(code="154", at=30, message=GPU_RESET_154)]:
            core.ingest(s, s.observed_at)
        assert any(event == "scope" for i in core.incidents.values() for _, event, _ in i.timeline)
        restored = Correlator(catalog)
        restored.load_state(Checkpoint.decode(Checkpoint(core.to_state()).encode()).state)
        assert (restored.state.by_key, restored.state.by_fault) == (core.state.by_key, core.state.by_fault)
        nxt = sig(code="13", pod="job-a-0", gpu_index=1, at=40)
        assert [(c.kind, c.incident.id) for c in restored.ingest(nxt, nxt.observed_at)] == [
            (c.kind, c.incident.id) for c in core.ingest(nxt, nxt.observed_at)]
        assert next(c for c in core.incidents.values() if c.last_seen == nxt.observed_at).status.value == "open"


class TestTenantWorkload:
    @pytest.mark.parametrize(("pod", "workload"), [
        ("train-worker-3", "train-worker"), ("api-7d9f8c6b5-x2k4p", "api"), ("batch-x7k2q", "batch"),
        ("standalone", "standalone")], ids=["indexed", "deployment", "job", "bare-pod"])
    def test_workload_from_pod_name(self, pod: str, workload: str) -> None:
        assert TenantRef(namespace="ml", pod=pod).workload() == workload

    def test_one_workload_across_pods_gpus_and_nodes_is_one_tenant_incident(self, catalog: Catalog) -> None:
        core = run(catalog, [sig(node=f"n{i}", code="13", gpu_index=i, pod=f"train-worker-{i}", at=i)
                             for i in range(4)])
        (inc,) = top_level(core)
        assert inc.scope is IncidentScope.TENANT and len(inc.nodes) == 4 and len(inc.tenants) == 4
