"""Metric families per stage: what each hook counts, with bounded labels (no incident ids, nodes or pods)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from breakfix.bus.clock import ManualClock
from breakfix.collectors.metrics import AgentMetrics, FleetCollectorMetrics, counted
from breakfix.correlator.metrics import CorrelatorMetrics, reason_class
from breakfix.remediator.guards import GuardsSpec, GuardState, TopologyBudgetSpec
from breakfix.remediator.metrics import RemediatorMetrics
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.agent import AgentAction, AgentReply
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ChangeKind,
    IncidentStatus,
    StepAction,
    WaitingOn,
)
from tests.conftest import T0, sig
from tests.test_notify_core import change, inc, rec


def test_correlator_counts_signals_dead_letters_changes_and_open_incidents_by_state() -> None:
    clock = ManualClock(T0)
    m = CorrelatorMetrics(clock=clock.now)
    m.consumed(sig(check="xid"), "BREAKFIX_SIGNALS")
    m.consumed(sig(check="ecc.dbe", n=1), "BREAKFIX_SIGNALS")
    m.dead_lettered("undecodable Signal: Expecting value")
    m.dead_lettered("1 validation error for Signal")
    m.published([change(inc("a")), change(inc("b", waiting=WaitingOn.APPROVAL)),
                 change(inc("c", parent="fab"), ChangeKind.FOLDED)])
    m.published([change(inc("a", status=IncidentStatus.ESCALATED, version=2), ChangeKind.STATUS)])
    get = m.registry.get_sample_value
    assert get("breakfix_correlator_signals_consumed_total", {"source": "sim", "check": "xid"}) == 1
    assert get("breakfix_correlator_dead_letters_total", {"reason": "invalid_json"}) == 1
    assert get("breakfix_correlator_dead_letters_total", {"reason": "schema"}) == 1
    assert get("breakfix_correlator_incident_changes_total", {"kind": "opened"}) == 2
    base = {"category": "gpu_reset_required", "severity": "critical", "domain": "operator"}
    assert get("breakfix_correlator_open_incidents", {**base, "status": "escalated", "waiting": "none"}) == 1
    assert get("breakfix_correlator_open_incidents", {**base, "status": "open", "waiting": "approval"}) == 1
    assert get("breakfix_correlator_open_incidents", {**base, "status": "open", "waiting": "none"}) is None
    m.published([change(inc("b", status=IncidentStatus.RESOLVED, version=3), ChangeKind.RESOLVED)])
    assert get("breakfix_correlator_open_incidents", {**base, "status": "open", "waiting": "approval"}) is None
    clock.advance(30)
    m.refresh()
    assert get("breakfix_correlator_checkpoint_age_seconds") == 30
    m.checkpointed(clock.now())
    clock.advance(5)
    m.refresh()
    assert get("breakfix_correlator_checkpoint_age_seconds") == 5
    m.lag("correlator", 42)
    assert get("breakfix_correlator_consumer_lag", {"consumer": "correlator"}) == 42
    labels = [v for f in m.registry.collect() for s in f.samples for v in s.labels.values()]
    assert labels and not any(v in ("a", "b", "c", "n1") for v in labels)  # no incident ids or nodes as labels


@pytest.mark.parametrize(("reason", "cls"), [
    ("correlator error: KeyError('x')", "handler_error"), ("undecodable Signal: EOF while parsing", "invalid_json"),
    ("invalid Signal: id: Field required (+5 more)", "schema"), ("2 validation errors for Signal", "schema"),
    ("something new", "other")])
def test_dead_letter_reasons_collapse_into_few_classes(reason: str, cls: str) -> None:
    assert reason_class(reason) == cls


def test_remediator_counts_plans_steps_refusals_breaker_approvals_and_repair_time() -> None:
    clock = ManualClock(T0)
    m = RemediatorMetrics(clock.now)
    m.record(rec(ActionKind.PLAN, ActionOutcome.PLANNED, rule="gpu-reset", at=0))
    m.record(rec(ActionKind.STEP, ActionOutcome.STARTED, action=StepAction.REBOOT, step_index=2, at=0))
    m.record(rec(ActionKind.STEP, ActionOutcome.SUCCEEDED, action=StepAction.REBOOT, step_index=2, at=90))
    m.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED, iid="b", details={"guard": "budget"}, at=1))
    m.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED, iid="c", reason="awaiting approval: approve c x", at=0))
    m.record(rec(ActionKind.STEP, ActionOutcome.SUCCEEDED, iid="d", action=StepAction.ESCALATE,
                 details={"guard": "breaker"}, at=2))
    m.change(change(inc("a", status=IncidentStatus.RESOLVED, time_to_repair_s=400.0), ChangeKind.RESOLVED))
    clock.advance(1800)
    spec = GuardsSpec(topology_budgets=(TopologyBudgetSpec(key="rack", max_nodes=1, max_percent=0),))
    state = GuardState(active={"n1": "a", "n2": "b"})
    view = ClusterView(nodes={f"n{i}": NodeView(name=f"n{i}", labels={"rack": "r1" if i < 4 else "r2"})
                              for i in range(40)})
    m.guards(state, spec, view)
    get = m.registry.get_sample_value
    assert get("breakfix_remediator_plans_total", {"rule": "gpu-reset", "outcome": "planned"}) == 1
    assert get("breakfix_remediator_step_duration_seconds_sum", {"action": "reboot", "outcome": "succeeded"}) == 90
    assert get("breakfix_remediator_refusals_total", {"guard": "budget"}) == 1
    assert get("breakfix_remediator_refusals_total", {"guard": "approval"}) == 1
    assert get("breakfix_remediator_breaker_trips_total") == 1
    assert get("breakfix_remediator_breaker_open") == 0  # the live guard state says closed
    assert get("breakfix_remediator_time_to_repair_seconds_count", {"category": "gpu_reset_required"}) == 1
    assert get("breakfix_remediator_approvals_pending") == 1
    assert get("breakfix_remediator_approval_oldest_age_seconds") == 1800
    assert get("breakfix_remediator_nodes_held") == 2
    assert get("breakfix_remediator_budget_limit", {"scope": "cluster", "value": "all"}) == 2
    assert get("breakfix_remediator_budget_in_use", {"scope": "rack", "value": "r1"}) == 2
    assert get("breakfix_remediator_budget_limit", {"scope": "rack", "value": "r1"}) == 1
    m.record(rec(ActionKind.APPROVAL, ActionOutcome.APPROVED, iid="c", actor="alice", at=1900))
    m.refresh()
    assert get("breakfix_remediator_approvals_pending") == 0
    m.notification("pd", True)
    m.notification("pd", False)
    assert get("breakfix_remediator_notification_failures_total", {"channel": "pd"}) == 1
    m.leader(True)
    assert get("breakfix_remediator_leader") == 1
    assert clock.now() == T0 + timedelta(seconds=1800)


async def test_node_agent_replies_are_counted_by_action_and_outcome() -> None:
    m = AgentMetrics()
    replies = iter([AgentReply(id="k1", node="n1", action=AgentAction.RESET_GPU, ok=True, detail="", at=T0),
                    AgentReply(id="k1", node="n1", action=AgentAction.RESET_GPU, ok=True, detail="", replayed=True,
                               at=T0)])

    async def handle(_data: bytes) -> bytes:
        r = next(replies, None)
        return r.model_dump_json().encode() if r else b'{"error": "bad command"}'

    wrapped = counted(handle, m, lambda: 0.0)
    for _ in range(3):
        await wrapped(b"{}")
    get = m.registry.get_sample_value
    assert get("breakfix_agent_actions_total", {"action": "reset_gpu", "outcome": "succeeded"}) == 1
    assert get("breakfix_agent_actions_total", {"action": "reset_gpu", "outcome": "replayed"}) == 1
    assert get("breakfix_agent_actions_total", {"action": "unknown", "outcome": "rejected"}) == 1


def test_fleet_collector_counts_cycles_and_failures() -> None:
    m = FleetCollectorMetrics()
    m.cycle_ok(T0, 3)
    m.cycle_failed()
    get = m.registry.get_sample_value
    assert get("breakfix_collector_source_last_success_timestamp_seconds", {"source": "prometheus"}) == T0.timestamp()
    assert get("breakfix_collector_signals_total", {"source": "prometheus"}) == 3
    assert get("breakfix_collector_source_errors_total", {"source": "prometheus"}) == 1


def test_the_correlators_own_changes_feed_the_open_incident_gauge(catalog: object) -> None:
    from breakfix.correlator.grouping import Correlator

    core = Correlator(catalog)  # type: ignore[arg-type]
    m = CorrelatorMetrics()
    s = sig(code="79")
    m.published(core.ingest(s, s.observed_at))
    get = m.registry.get_sample_value
    assert get("breakfix_correlator_incident_changes_total", {"kind": "opened"}) == 1
    assert sum(v for f in m.registry.collect() if f.name == "breakfix_correlator_open_incidents"
               for v in (x.value for x in f.samples)) == 1
