"""The pure grouping core: which signals become which incidents, and how they end."""

from __future__ import annotations

from datetime import timedelta

import pytest

from breakfix.correlator.checkpoint import Checkpoint
from breakfix.correlator.grouping import Correlator
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    IncidentScope,
    IncidentStatus,
    Plan,
    StepAction,
    WaitingOn,
)
from breakfix.schemas.signal import Signal
from tests.conftest import T0, make_rules, sig


def feed(core: Correlator, signals: list[Signal]) -> list[str]:
    kinds: list[str] = []
    for s in signals:
        kinds += [c.kind.value for c in core.ingest(s, s.observed_at)]
    return kinds


def only(core: Correlator):  # type: ignore[no-untyped-def]
    assert len(core.incidents) == 1, [i.snapshot().category for i in core.incidents.values()]
    return next(iter(core.incidents.values())).snapshot()


GROUPING_CASES = [
    pytest.param([sig(code="48"), sig(code="63", at=0.1)], 1, "gpu_drain_reset_required", IncidentScope.GPU,
                 id="xid48-with-63-is-drain-and-reset"),
    pytest.param([sig(code="48"), sig(code="64", at=0.1)], 1, "gpu_drain_reset_required", IncidentScope.GPU,
                 id="xid48-with-64-is-drain-and-reset"),
    pytest.param([sig(code="48")], 1, "gpu_reset_required", IncidentScope.GPU, id="xid48-solo-is-reset"),
    pytest.param([sig(code="48"), sig(code="45", at=1, pod="p1")], 1, "gpu_reset_required", IncidentScope.GPU,
                 id="xid45-after-48-folds-in"),
    pytest.param([sig(code="45", pod="p1")], 1, "sympathetic", IncidentScope.GPU, id="xid45-solo-stays-minor"),
    pytest.param([sig(code="13", pod="p1"), sig(code="31", at=1, pod="p1", gpu_index=3)], 1, "application_fault",
                 IncidentScope.TENANT, id="app-xids-of-one-pod-group-by-tenant"),
    pytest.param([sig(code="79", gpu_index=2)], 1, "node_reboot_required", IncidentScope.NODE,
                 id="off-the-bus-is-node-scope"),
    pytest.param([sig(code="48", gpu_index=0), sig(code="48", gpu_index=1, at=0.1)], 2, "gpu_reset_required",
                 IncidentScope.GPU, id="two-gpus-two-incidents"),
    pytest.param([sig(code="48", node="n1"), sig(code="48", node="n2")], 2, "gpu_reset_required",
                 IncidentScope.GPU, id="two-nodes-two-incidents"),
    pytest.param([sig(code="173")], 1, "unknown_fault", IncidentScope.GPU, id="unknown-xid-is-unknown-fault"),
    pytest.param([sig(code="63"), sig(code="173", at=1)], 1, "unknown_fault", IncidentScope.GPU,
                 id="unknown-code-raises-category-to-most-cautious"),
    # a fabric left unhealthy by its configuration: the GPU's one incident is a human's, never the reset ladder's
    pytest.param([sig(check="fabric.gpu", code=None), sig(check="fabric.config", code=None, at=1)], 1,
                 "fabric_config", IncidentScope.GPU, id="fabric-configuration-outranks-the-fabric-fault-it-explains"),
    pytest.param([sig(check="fabric.config", code=None), sig(code="48", at=1)], 1, "fabric_config",
                 IncidentScope.GPU, id="a-dbe-on-a-misconfigured-gpu-goes-to-the-human-a-reset-could-not-return-it"),
    pytest.param([sig(code="48"), sig(check="fabric.config", code=None, at=1)], 1, "fabric_config",
                 IncidentScope.GPU, id="a-configuration-fault-after-a-dbe-stops-the-reset-returning-the-node"),
]


class TestGrouping:
    @pytest.mark.parametrize(("signals", "count", "category", "scope"), GROUPING_CASES)
    def test_signals_group_into_incidents(self, catalog: Catalog, signals: list[Signal], count: int,
                                          category: str, scope: IncidentScope) -> None:
        core = Correlator(catalog)
        feed(core, signals)
        assert len(core.incidents) == count
        last = list(core.incidents.values())[-1].snapshot()
        assert last.category == category
        assert last.scope == scope

    def test_tenant_incident_keeps_tenant_domain_and_pod(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        feed(core, [sig(code="13", pod="train-0")])
        inc = only(core)
        assert inc.domain == Domain.TENANT
        assert [t.pod for t in inc.tenants] == ["train-0"]

    def test_evidence_keeps_first_raw_lines_and_counts_per_code(self, catalog: Catalog) -> None:
        core = Correlator(catalog, make_rules(evidence={'messages': 3}))
        feed(core, [sig(code="48", at=i * 61, n=i, message=f"line {i}") for i in range(10)])
        inc = only(core)
        assert inc.evidence == ("line 0", "line 1", "line 2")
        assert {c.key: c.count for c in inc.counts} == {"xid:48": 10}
        assert inc.signal_count == 10


class TestDedupe:
    def test_same_signal_id_is_counted_once(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        s = sig(code="48")
        assert feed(core, [s, s, s]) == ["opened"]
        inc = only(core)
        assert inc.signal_count == 1
        assert core.incidents[inc.id].duplicate_count == 2

    def test_repeats_within_window_publish_nothing_new(self, catalog: Catalog) -> None:
        core = Correlator(catalog, make_rules(windows={'dedupe_s': 60}))
        kinds = feed(core, [sig(code="48", at=i * 0.1, n=i) for i in range(1000)])
        assert kinds == ["opened"]
        inc = only(core)
        assert inc.signal_count == 1000
        assert len(inc.signal_ids) == 1 and len(inc.evidence) == 1, "repeats are counted, not stored again"

    def test_storm_memory_is_bounded(self, catalog: Catalog) -> None:
        core = Correlator(catalog, make_rules(evidence={"seen_ids": 1000, "messages": 5, "signal_ids": 5}))
        feed(core, [sig(check="clock.hw_slowdown", code=None, at=i * 61, n=i) for i in range(5000)])
        inc = only(core)
        assert len(core.seen) <= 1000
        assert inc.signal_count == 5000 and len(inc.open_faults) == 1
        assert len(inc.signal_ids) == 5 and len(inc.evidence) == 5
        assert len(inc.timeline) <= core.rules.timeline_limit

    def test_the_oldest_signal_ids_are_forgotten_first_and_a_restore_keeps_the_order(self, catalog: Catalog) -> None:
        """Duplicates are found among the latest ``seen_ids`` ids; past that the first seen goes first, as before a
        checkpoint and after it."""
        rules = make_rules(evidence={"seen_ids": 1000})
        signals = [sig(check="clock.hw_slowdown", code=None, at=i * 61, n=i) for i in range(1200)]
        core = Correlator(catalog, rules)
        feed(core, signals[:1100])
        restored = Correlator(catalog, rules)
        restored.load_state(Checkpoint.decode(Checkpoint(core.to_state()).encode()).state)
        for c in (core, restored):
            feed(c, signals[1100:])
            assert list(c.seen) == [s.id for s in signals[200:]]
            dup = c.stats["duplicates"]
            feed(c, [signals[200], signals[199]])  # still remembered, then forgotten
            assert c.stats["duplicates"] == dup + 1


class TestHealthy:
    def test_healthy_signal_clears_and_resolves(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        kinds = feed(core, [sig(check="clock.hw_slowdown", code=None), sig(check="clock.hw_slowdown", code=None,
                                                                             healthy=True, at=5)])
        assert kinds == ["opened", "resolved"]
        assert only(core).status == IncidentStatus.RESOLVED

    def test_healthy_older_than_fault_never_clears(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        feed(core, [sig(check="ecc.dbe", code=None, at=10), sig(check="ecc.dbe", code=None, healthy=True, at=5)])
        assert only(core).status == IncidentStatus.OPEN

    def test_healthy_for_other_gpu_does_not_clear(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        feed(core, [sig(check="ecc.dbe", code=None), sig(check="ecc.dbe", code=None, healthy=True, gpu_index=5,
                                                          at=1)])
        assert only(core).status == IncidentStatus.OPEN

    def test_recurrence_within_flap_window_reopens_same_incident(self, catalog: Catalog) -> None:
        core = Correlator(catalog, make_rules(windows={'flap_s': 600}))
        kinds = feed(core, [
            sig(check="clock.hw_slowdown", code=None), sig(check="clock.hw_slowdown", code=None, healthy=True, at=1),
            sig(check="clock.hw_slowdown", code=None, at=60),
        ])
        assert kinds == ["opened", "resolved", "reopened"]
        inc = only(core)
        assert inc.flaps == 1 and inc.status == IncidentStatus.OPEN

    def test_recurrence_after_flap_window_opens_new_incident(self, catalog: Catalog) -> None:
        core = Correlator(catalog, make_rules(windows={'flap_s': 60}))
        feed(core, [sig(check="clock.hw_slowdown", code=None), sig(check="clock.hw_slowdown", code=None, healthy=True,
                                                                    at=1),
                    sig(check="clock.hw_slowdown", code=None, at=3600)])
        assert len(core.incidents) == 2


def rec(incident: str, kind: ActionKind, outcome: ActionOutcome, action: StepAction | None = None,
        plan: Plan | None = None, dry_run: bool = False) -> ActionRecord:
    return ActionRecord(id=f"a-{kind}-{outcome}-{action}", cluster="c1", incident_id=incident, kind=kind,
                        action=action, outcome=outcome, actor="test", plan=plan, dry_run=dry_run,
                        at=T0 + timedelta(seconds=30))


class TestLifecycle:
    @pytest.mark.parametrize(
        ("records", "status"),
        [
            ([(ActionKind.STEP, ActionOutcome.STARTED, StepAction.CORDON)], IncidentStatus.MITIGATING),
            ([(ActionKind.STEP, ActionOutcome.STARTED, StepAction.RESET_GPU),
              (ActionKind.STEP, ActionOutcome.STARTED, StepAction.VALIDATE)], IncidentStatus.VALIDATING),
            ([(ActionKind.STEP, ActionOutcome.SUCCEEDED, StepAction.RETURN_TO_SERVICE)], IncidentStatus.RESOLVED),
            ([(ActionKind.STEP, ActionOutcome.SUCCEEDED, StepAction.ESCALATE)], IncidentStatus.ESCALATED),
            ([(ActionKind.PLAN, ActionOutcome.ESCALATED, None)], IncidentStatus.ESCALATED),
            ([(ActionKind.PLAN, ActionOutcome.COMPLETED, None)], IncidentStatus.RESOLVED),
            ([(ActionKind.STEP, ActionOutcome.FAILED, StepAction.RESET_GPU)], IncidentStatus.OPEN),
        ],
        ids=["cordon-mitigates", "validate-validates", "rts-resolves", "escalate-escalates", "plan-escalated",
             "plan-completed", "failed-step-leaves-open"],
    )
    def test_action_records_drive_status(self, catalog: Catalog, records: list, status: IncidentStatus) -> None:
        core = Correlator(catalog)
        feed(core, [sig(code="48")])
        iid = only(core).id
        for kind, outcome, action in records:
            core.apply_action(rec(iid, kind, outcome, action), T0)
        assert only(core).status == status

    def test_plan_record_attaches_plan(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        feed(core, [sig(code="48")])
        iid = only(core).id
        plan = Plan(domain=Domain.OPERATOR, rule="gpu-reset", reason="r")
        changes = core.apply_action(rec(iid, ActionKind.PLAN, ActionOutcome.PLANNED, plan=plan), T0)
        assert [c.kind for c in changes] == [ChangeKind.STATUS]
        assert only(core).plan == plan

    def test_dry_run_records_never_change_status(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        feed(core, [sig(code="48")])
        iid = only(core).id
        core.apply_action(rec(iid, ActionKind.STEP, ActionOutcome.DRY_RUN, StepAction.REBOOT, dry_run=True), T0)
        assert only(core).status == IncidentStatus.OPEN

    def test_resolved_incident_is_not_reopened_by_late_step_records(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        feed(core, [sig(code="48")])
        iid = only(core).id
        core.apply_action(rec(iid, ActionKind.PLAN, ActionOutcome.COMPLETED), T0)
        core.apply_action(rec(iid, ActionKind.STEP, ActionOutcome.STARTED, StepAction.CORDON), T0)
        assert only(core).status == IncidentStatus.RESOLVED

    @pytest.mark.parametrize("waiting", list(WaitingOn), ids=lambda w: str(w.value))
    def test_remediator_records_waiting_is_copied_onto_the_incident_and_cleared_when_it_moves(
            self, catalog: Catalog, waiting: WaitingOn) -> None:
        core = Correlator(catalog)
        feed(core, [sig(code="48")])
        iid = only(core).id
        r = rec(iid, ActionKind.STEP, ActionOutcome.WAITING, StepAction.RESET_GPU).model_copy(
            update={"waiting": waiting})
        assert [c.kind for c in core.apply_action(r, T0)] == [ChangeKind.STATUS]
        assert only(core).waiting is waiting
        core.apply_action(rec(iid, ActionKind.STEP, ActionOutcome.STARTED, StepAction.RESET_GPU), T0)
        assert only(core).waiting is None
