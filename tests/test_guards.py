"""Pure safety guards and ladders: budgets, breaker, cooldowns, retry caps, kill switches, unknown codes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from breakfix.remediator.decide import decide
from breakfix.remediator.guards import (
    BreakerSpec,
    BudgetSpec,
    GuardsSpec,
    GuardState,
    KillSwitchSpec,
    TopologyBudgetSpec,
    check,
    step_check,
)
from breakfix.remediator.policy import Policy
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import Domain, Incident, IncidentScope, Step, StepAction, WaitingOn
from tests.conftest import T0


def inc(node: str = "n1", category: str = "gpu_reset_required", codes: tuple[str, ...] = ("xid:48",),
        iid: str = "inc-1") -> Incident:
    return Incident(id=iid, cluster="c1", scope=IncidentScope.GPU, node=node, nodes=(node,), gpus=(GpuRef(index=0),),
                    category=category, severity=Severity.CRITICAL, codes=codes, first_seen=T0, last_seen=T0)


def group(nodes: tuple[str, ...] = ("n5", "n6", "n7"), iid: str = "fab-1") -> Incident:
    """A group (fabric) incident as the correlator publishes it: no node of its own, its members in ``nodes``."""
    return Incident(id=iid, cluster="c1", scope=IncidentScope.FABRIC, node=None, nodes=nodes, category="fabric_link",
                    severity=Severity.CRITICAL, domain=Domain.OPERATOR, codes=("ib.link_down",),
                    topology={"switch": "leaf-03"}, first_seen=T0, last_seen=T0)


def view(n: int, **labels_by_node: dict[str, str]) -> ClusterView:
    return ClusterView(nodes={f"n{i}": NodeView(f"n{i}", labels_by_node.get(f"n{i}", {})) for i in range(1, n + 1)})


class TestBudgets:
    @pytest.mark.parametrize(("pool", "busy", "spec", "allowed"), [
        (3, 0, BudgetSpec(max_nodes=1, max_percent=20), True),
        (3, 1, BudgetSpec(max_nodes=1, max_percent=20), False),
        (1000, 49, BudgetSpec(max_nodes=1, max_percent=5), True),
        (1000, 50, BudgetSpec(max_nodes=1, max_percent=5), False),
        (10, 1, BudgetSpec(max_nodes=2, max_percent=0), True),
    ], ids=["small-pool-can-heal-one", "small-pool-one-at-a-time", "big-pool-gets-its-percentage",
            "big-pool-percentage-is-a-cap", "absolute-count-when-larger"])
    def test_cluster_budget_is_the_larger_of_count_and_percentage(self, pool: int, busy: int, spec: BudgetSpec,
                                                                  allowed: bool, policy: Policy) -> None:
        state = GuardState(active={f"n{i}": f"inc-{i}" for i in range(2, 2 + busy)})
        i = inc("n1")
        refusal = check(i, decide(i, view(pool), policy), state, view(pool), GuardsSpec(budget=spec), T0)
        assert (refusal is None) is allowed
        if refusal:
            assert refusal.guard == "budget" and refusal.retry

    def test_topology_budget_per_rack(self, policy: Policy) -> None:
        v = view(8, **{f"n{i}": {"rack": "r1" if i <= 4 else "r2"} for i in range(1, 9)})
        spec = GuardsSpec(budget=BudgetSpec(max_nodes=8), topology_budgets=(
            TopologyBudgetSpec(key="rack", max_nodes=1, max_percent=0),))
        state = GuardState(active={"n2": "inc-2"})
        same_rack = check(inc("n1"), decide(inc("n1"), v, policy), state, v, spec, T0)
        other_rack = check(inc("n5"), decide(inc("n5"), v, policy), state, v, spec, T0)
        assert same_rack is not None and same_rack.guard == "topology_budget" and other_rack is None

    def test_small_nodepool_heals_one_node_while_a_big_one_gets_its_percentage(self, policy: Policy) -> None:
        small = {f"n{i}": {"nodepool": "a100-small"} for i in range(1, 4)}
        big = {f"n{i}": {"nodepool": "h100"} for i in range(4, 104)}
        v = view(103, **small, **big)
        spec = policy.guards.model_copy(update={"budget": BudgetSpec(max_nodes=100, max_percent=100)})
        state = GuardState(active={"n2": "inc-2", **{f"n{i}": f"inc-{i}" for i in range(4, 23)}})
        small_pool = check(inc("n1"), decide(inc("n1"), v, policy), state, v, spec, T0)
        assert small_pool is not None and "nodepool=a100-small" in small_pool.reason
        state.active.pop("n2")
        assert check(inc("n1"), decide(inc("n1"), v, policy), state, v, spec, T0) is None, "1 of 3 may heal"
        big_pool = check(inc("n99"), decide(inc("n99"), v, policy), state, v, spec, T0)
        assert big_pool is None, "19 of 100 busy: 20% allows one more"

    def test_tenant_domain_plans_are_not_budgeted(self, policy: Policy) -> None:
        i = inc(category="application_fault").model_copy(update={"domain": "tenant"})
        state = GuardState(active={f"n{k}": "x" for k in range(2, 10)})
        assert check(i, decide(i, view(10), policy), state, view(10), GuardsSpec(), T0) is None


class TestBreaker:
    def test_trips_when_too_many_nodes_open_incidents_and_resets_only_explicitly(self, policy: Policy) -> None:
        state = GuardState()
        spec = BreakerSpec(max_percent=10, min_nodes=3, window_s=600)
        tripped = [state.observe_open(f"n{k}", T0 + timedelta(seconds=k), spec, pool=20) for k in range(1, 4)]
        assert tripped == [False, False, True]
        refusal = check(inc("n9"), decide(inc("n9"), view(20), policy), state, view(20), GuardsSpec(), T0)
        assert refusal is not None and refusal.guard == "breaker" and not refusal.retry
        assert "breakfix breaker reset" in refusal.reason
        later = T0 + timedelta(hours=5)
        plan = decide(inc("n9"), view(20), policy)
        assert check(inc("n9"), plan, state, view(20), GuardsSpec(), later) is not None, "no reset by time alone"
        state.reset_breaker()
        assert check(inc("n9"), decide(inc("n9"), view(20), policy), state, view(20), GuardsSpec(), later) is None

    def test_a_group_incident_is_refused_while_the_breaker_is_open(self, policy: Policy) -> None:
        state = GuardState(breaker_tripped_at=T0, breaker_reason="storm")
        fab = group()
        refusal = check(fab, decide(fab, view(20), policy), state, view(20), policy.guards, T0)
        assert refusal is not None and refusal.guard == "breaker" and not refusal.retry
        state.reset_breaker()
        assert check(fab, decide(fab, view(20), policy), state, view(20), policy.guards, T0) is None

    def test_slow_trickle_does_not_trip(self) -> None:
        state = GuardState()
        spec = BreakerSpec(max_percent=10, min_nodes=3, window_s=600)
        assert not any(state.observe_open(f"n{k}", T0 + timedelta(hours=k), spec, pool=20) for k in range(10))


class TestLoopsAndSwitches:
    def test_no_double_reboot_within_the_window(self, policy: Policy) -> None:
        state = GuardState()
        state.record_action("n1", StepAction.REBOOT, T0)
        i = inc("n1", category="node_reboot_required", codes=("xid:79",), iid="inc-2")
        refusal = check(i, decide(i, view(10), policy), state, view(10), GuardsSpec(cooldown_s=0), T0 +
                        timedelta(hours=2))
        assert refusal is not None and refusal.guard == "retry_cap" and "reboot" in refusal.reason

    def test_cooldown_after_a_finished_plan(self, policy: Policy) -> None:
        state = GuardState()
        state.start("n1", "inc-1")
        state.finish("n1", "inc-1", T0, inc("n1"))
        i = inc("n1", iid="inc-2")
        soon = check(i, decide(i, view(10), policy), state, view(10), GuardsSpec(cooldown_s=1800), T0 +
                     timedelta(minutes=5))
        later = check(i, decide(i, view(10), policy), state, view(10), GuardsSpec(cooldown_s=1800), T0 +
                      timedelta(hours=1))
        assert soon is not None and soon.guard == "cooldown" and soon.retry and later is None

    @pytest.mark.parametrize("switch", [KillSwitchSpec(rules=frozenset({"gpu-reset"})),
                                        KillSwitchSpec(codes=frozenset({"xid:48"}))], ids=["per-rule", "per-code"])
    def test_kill_switch_refuses(self, switch: KillSwitchSpec, policy: Policy) -> None:
        i = inc()
        refusal = check(i, decide(i, view(10), policy), GuardState(), view(10), GuardsSpec(kill_switch=switch), T0)
        assert refusal is not None and refusal.guard == "kill_switch"

    @pytest.mark.parametrize(("rule", "killed_rules", "killed_codes", "action", "stopped"), [
        ("gpu-reset", {"gpu-reset"}, set(), StepAction.REBOOT, True),
        ("gpu-reset", set(), {"xid:48"}, StepAction.DRAIN, True),
        ("gpu-reset", set(), {"xid:48"}, StepAction.RETURN_TO_SERVICE, True),
        ("gpu-reset", {"gpu-reset"}, {"xid:48"}, StepAction.CORDON, False),
        ("gpu-reset", {"gpu-reset"}, {"xid:48"}, StepAction.ESCALATE, False),
        ("gpu-reset", {"node-reboot"}, {"xid:79"}, StepAction.REBOOT, False),
        (None, {"gpu-reset"}, {"xid:48"}, StepAction.DRAIN, False),
    ], ids=["rule-stops-a-later-rung", "code-stops-a-drain", "code-keeps-the-node-out", "a-cordon-still-fences",
            "the-page-still-goes-out", "other-rules-and-codes-run", "plan-start-asks-check-instead"])
    def test_a_kill_switch_switched_on_mid_plan_stops_every_step_but_fencing_and_paging(
            self, rule: str | None, killed_rules: set[str], killed_codes: set[str], action: StepAction,
            stopped: bool) -> None:
        state = GuardState(killed_rules=killed_rules, killed_codes=killed_codes)
        refusal = step_check(inc(), Step(action=action, params={"node": "n1"}), state, GuardsSpec(retry_caps={}), T0,
                             rule=rule)
        assert (refusal is not None) is stopped
        if refusal is not None:
            assert refusal.guard == "kill_switch" and refusal.fence and refusal.waiting is not None

    @pytest.mark.parametrize(("cleared", "key", "refused"), [
        ("inc-1:0:0:2", "inc-1:0:0:2", False),
        ("inc-1:0:0:2", "inc-1:100:0:2", True),
        (None, "inc-1:0:0:2", True),
        ("inc-1:0:0:2", "", True),
    ], ids=["the-step-resumed-after-its-own-start", "a-later-attempt-counts", "never-let-run", "no-key"])
    def test_a_step_already_let_run_is_not_refused_for_its_own_start(self, cleared: str | None, key: str,
                                                                    refused: bool) -> None:
        state = GuardState(cleared={"inc-1": (cleared, T0)} if cleared else {})
        state.record_action("n1", StepAction.REBOOT, T0)  # the reboot started, then the remediator restarted
        refusal = step_check(inc(), Step(action=StepAction.REBOOT, params={"node": "n1"}), state, GuardsSpec(),
                             T0 + timedelta(minutes=5), key=key)
        assert (refusal is not None and refusal.guard == "retry_cap") is refused

    @pytest.mark.parametrize(("category", "action", "refused"), [
        ("unknown_fault", StepAction.RESET_GPU, True),
        ("unknown_fault", StepAction.REBOOT, True),
        ("unknown_fault", StepAction.REPROVISION, True),
        ("unknown_fault", StepAction.CORDON, False),
        ("unknown_fault", StepAction.VALIDATE, False),
        ("unknown_fault", StepAction.ESCALATE, False),
        ("gpu_reset_required", StepAction.RESET_GPU, False),
        ("node_reboot_required", StepAction.REBOOT, False),
    ], ids=["unknown-no-reset", "unknown-no-reboot", "unknown-no-reprovision", "unknown-still-cordons",
            "unknown-may-validate", "unknown-still-pages", "known-reset-runs", "known-reboot-runs"])
    def test_a_running_plan_never_resets_reboots_or_reprovisions_an_incident_now_unknown(
            self, category: str, action: StepAction, refused: bool) -> None:
        now = inc(category=category, codes=("xid:48", "xid:173"))  # the incident as it stands when the step comes
        refusal = step_check(now, Step(action=action, params={"node": "n1", "gpu": 0}), GuardState(),
                             GuardsSpec(retry_caps={}), T0, rule="gpu-reset", key="inc-1:0:1:2")
        assert (refusal is not None) is refused
        if refusal is not None:
            assert refusal.guard == "unknown_fault" and refusal.fence and not refusal.retry
            assert refusal.waiting is WaitingOn.HUMAN and f"{action.value} refused" in refusal.reason

    def test_state_round_trips_through_the_store_form(self) -> None:
        state = GuardState(active={"n1": "i"}, holds={"n1": {"i": "in remediation"}}, queued={"j": T0},
                           cleared={"i": ("i:0:1:2", T0)})
        state.finish("n2", "k", T0, inc("n2"))
        state.record_action("n1", StepAction.REBOOT, T0)
        state.observe_open("n1", T0, BreakerSpec(min_nodes=1, max_percent=1), pool=10)
        again = GuardState.from_dict(state.to_dict())
        assert again == state


class TestLadders:
    def test_xid48_solo_has_reset_then_reboot_then_reprovision(self, policy: Policy) -> None:
        plan = decide(inc(), view(4), policy)
        assert [r.name for r in plan.rungs()] == ["reset", "reboot", "reprovision"]
        assert [s.action.value for s in plan.steps] == ["cordon", "drain_gpu", "reset_gpu", "validate",
                                                        "return_to_service"], "a GPU reset is fenced first"
        assert plan.rungs()[1].steps[3].params["level"] == 3
        assert plan.rungs()[2].steps[0].requires_approval

    @pytest.mark.parametrize("codes", [("xid:173",), ("dcgm:DCGM_FR_SOMETHING_NEW",), ("xid:48", "xid:173")])
    def test_unknown_codes_never_reset_reboot_or_reprovision(self, codes: tuple[str, ...], policy: Policy) -> None:
        i = inc(category="unknown_fault", codes=codes)
        plan = decide(i, view(4), policy)
        every = {s.action for r in plan.rungs() for s in r.steps}
        assert not every & {StepAction.RESET_GPU, StepAction.REBOOT, StepAction.REPROVISION}
        assert StepAction.ESCALATE in every

    def test_shadow_rule_plans_but_is_marked(self, policy: Policy) -> None:
        rules = tuple(r.model_copy(update={"shadow": r.name == "gpu-reset"}) for r in policy.rules)
        plan = decide(inc(), view(4), policy.model_copy(update={"rules": rules}))
        assert plan.shadow and plan.rule == "gpu-reset"


class TestReturnValidation:
    """What a human release and the cooldown return validate (``breaker.return_plan``): the whole node unless the
    incident is one GPU's, and DCGM level 3 (post-mortem: targeted_stress, targeted_power) after a hardware,
    thermal or power, multi-GPU, NVSwitch or reboot-class fault, else level 2 (the epilogue after a failed job)."""

    @pytest.mark.parametrize(("category", "scope", "gpus", "validated"), [
        ("gpu_reset_required", IncidentScope.GPU, (2,), {"node": "n1", "gpu": 2, "scope": "gpu", "level": 2}),
        ("hardware_support", IncidentScope.GPU, (1,), {"node": "n1", "gpu": 1, "scope": "gpu", "level": 3}),
        ("mechanical_inspection", IncidentScope.GPU, (1,), {"node": "n1", "gpu": 1, "scope": "gpu", "level": 3}),
        ("thermal_power", IncidentScope.GPU, (4,), {"node": "n1", "gpu": 4, "scope": "gpu", "level": 3}),
        ("node_reboot_required", IncidentScope.GPU, (3,), {"node": "n1", "gpu": 3, "scope": "gpu", "level": 3}),
        ("multi_gpu_failure", IncidentScope.NODE, (1, 5), {"node": "n1", "scope": "node", "level": 3}),
        ("nvswitch_fatal", IncidentScope.NODE, (0, 1, 2), {"node": "n1", "scope": "node", "level": 3}),
        ("nvswitch_fatal", IncidentScope.NODE, (0,), {"node": "n1", "scope": "node", "level": 3}),
        ("gpu_reset_required", IncidentScope.GPU, (2, 6), {"node": "n1", "scope": "node", "level": 2}),
        ("fabric_link", IncidentScope.NODE, (), {"node": "n1", "scope": "node", "level": 2}),
    ], ids=["one-gpu-reset-r2-on-the-gpu", "rma-r3-on-the-gpu", "mechanics-r3", "thermal-r3", "reboot-class-r3",
            "multi-gpu-r3-on-the-node", "nvswitch-with-folded-gpus-r3-on-the-node",
            "node-scope-with-one-gpu-on-the-node", "two-gpus-on-the-node", "no-gpu-on-the-node"])
    def test_the_return_validates_what_the_fault_touched_at_its_level(
            self, category: str, scope: IncidentScope, gpus: tuple[int, ...], validated: dict[str, object]) -> None:
        from breakfix.remediator.breaker import return_plan

        i = inc(category=category).model_copy(update={"scope": scope, "gpus": tuple(GpuRef(index=g) for g in gpus)})
        plan = return_plan(i, ("n1",), "released by alice: checked", rule="human-release")
        assert [s.action for s in plan.steps] == [StepAction.VALIDATE, StepAction.RETURN_TO_SERVICE]
        assert plan.steps[0].params == validated


def test_a_return_gives_its_validation_the_time_a_deep_diagnostic_takes() -> None:
    """DCGM r3 runs for tens of minutes: the release's validate step has the validate action's timeout and its rung
    the sum of its steps', for every node of a group release, never a default that cuts the diagnostic short."""
    from breakfix.remediator.breaker import return_plan
    from breakfix.remediator.policy import ACTION_TIMEOUT_S

    i = inc(category="hardware_support").model_copy(update={"scope": IncidentScope.NODE})
    plan = return_plan(i, ("n1", "n2", "n3"), "released by alice: checked", rule="human-release")
    validates = [s for s in plan.steps if s.action is StepAction.VALIDATE]
    assert len(validates) == 3 and {s.params["level"] for s in validates} == {3}
    assert all(s.timeout_s == ACTION_TIMEOUT_S[StepAction.VALIDATE] for s in validates)
    (rung,) = plan.rungs()
    assert rung.timeout_s >= 3 * ACTION_TIMEOUT_S[StepAction.VALIDATE]


def test_the_cooldown_cordons_kept_are_bounded_oldest_first() -> None:
    from breakfix.remediator.guards import MAX_COOLED, GuardState
    from breakfix.remediator.policy import load_policy

    state = GuardState(cooled={f"inc-{i}": f"n{i}" for i in range(MAX_COOLED + 5)})
    state.prune(T0, load_policy().guards)
    assert len(state.cooled) == MAX_COOLED and "inc-0" not in state.cooled and f"inc-{MAX_COOLED + 4}" in state.cooled
    assert GuardState.from_dict(state.to_dict()).cooled == state.cooled
