"""The remediation lifecycle's pure rules as tables: guards (holds, refusals that fence, per-GPU retry caps,
same-fault cooldowns, waiting states), decide (fenced and scoped GPU repair, MIG, deferred repair), plans that
follow their incident, the soak's recurrence rule and the drain evaluator."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from breakfix.remediator.decide import decide
from breakfix.remediator.drain import DrainPolicy, EvictAction, PodFacts, drain_action
from breakfix.remediator.follow import recurrence, redecision
from breakfix.remediator.guards import BreakerSpec, GuardsSpec, GuardState, check, step_check
from breakfix.remediator.policy import Policy
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import CodeCount, Incident, IncidentScope, Step, StepAction, WaitingOn
from tests.conftest import T0


def inc(node: str = "n1", category: str = "gpu_reset_required", codes: tuple[str, ...] = ("xid:48",),
        iid: str = "inc-1", gpu: int = 0, severity: Severity = Severity.CRITICAL, **kw: Any) -> Incident:
    return Incident(id=iid, cluster="c1", scope=IncidentScope.GPU, node=node, nodes=(node,), gpus=(GpuRef(index=gpu),),
                    category=category, severity=severity, codes=codes, first_seen=T0, last_seen=T0, **kw)


def view(n: int = 10, **labels: dict[str, str]) -> ClusterView:
    return ClusterView(nodes={f"n{i}": NodeView(f"n{i}", labels.get(f"n{i}", {})) for i in range(1, n + 1)})


def actions(plan: Any, rung: int = 0) -> list[str]:
    return [s.action.value for s in plan.rungs()[rung].steps]


class TestRetryCapsCountExecutedActionsPerTarget:
    @pytest.mark.parametrize(("done", "gpu", "refused"), [
        ([("n1/gpu0", "reset_gpu"), ("n1/gpu0", "reset_gpu")], 5, False),
        ([("n1/gpu0", "reset_gpu"), ("n1/gpu0", "reset_gpu")], 0, True),
        ([("n1/gpu0", "reset_gpu")], 0, False),
        ([("n2/gpu0", "reset_gpu"), ("n2/gpu0", "reset_gpu")], 0, False),
    ], ids=["two-resets-on-gpu0-do-not-refuse-gpu5", "third-reset-of-gpu0-is-refused", "one-reset-is-under-the-cap",
            "another-nodes-gpu0-does-not-count"])
    def test_gpu_actions_are_capped_per_gpu(self, policy: Policy, done: list[tuple[str, str]], gpu: int,
                                            refused: bool) -> None:
        state = GuardState(actions=[(t, a, T0) for t, a in done])
        i = inc(gpu=gpu)
        r = check(i, decide(i, view(), policy), state, view(), GuardsSpec(cooldown_s=0), T0 + timedelta(hours=1))
        assert (r is not None) is refused
        if r is not None:
            assert r.guard == "retry_cap" and r.fence and r.waiting is WaitingOn.HUMAN
            assert f"reset_gpu already ran 2x on n1/gpu{gpu} within 24 h" in r.reason

    def test_planned_later_rungs_do_not_count_against_the_cap(self, policy: Policy) -> None:
        state = GuardState(actions=[("n1", "reboot", T0)])  # the reset ladder's reboot rung is only planned
        i = inc()
        assert check(i, decide(i, view(), policy), state, view(), GuardsSpec(cooldown_s=0), T0) is None

    def test_node_reboot_after_a_reboot_fences_and_pages_with_the_reason(self, policy: Policy) -> None:
        state = GuardState(actions=[("n1", "reboot", T0)])
        i = inc(category="node_reboot_required", codes=("xid:79",), severity=Severity.FATAL)
        r = check(i, decide(i, view(), policy), state, view(), GuardsSpec(), T0 + timedelta(minutes=10))
        assert r is not None and r.guard == "retry_cap" and r.fence and not r.retry
        assert "reboot already ran 1x on n1 within 24 h" in r.reason, "the cap outranks the cooldown"

    def test_step_check_guards_a_capped_step_of_a_later_rung(self) -> None:
        state = GuardState(actions=[("n1", "reboot", T0)])
        r = step_check(inc(), Step(action=StepAction.REBOOT, params={"node": "n1"}), state, GuardsSpec(), T0)
        assert r is not None and "reboot already ran 1x" in r.reason


class TestCooldownDampsOnlyTheSameFault:
    @pytest.mark.parametrize(("new", "refused"), [
        (inc(iid="inc-2"), True),
        (inc(iid="inc-2", codes=("xid:48", "xid:94")), False),
        (inc(iid="inc-2", category="node_reboot_required", codes=("xid:79",)), False),
        (inc(iid="inc-2", severity=Severity.FATAL), False),
    ], ids=["same-fault-waits", "new-code-is-not-damped", "different-fault-is-not-damped", "worse-fault-is-not-damped"])
    def test_cooldown(self, policy: Policy, new: Incident, refused: bool) -> None:
        state = GuardState()
        state.start("n1", "inc-1")
        state.finish("n1", "inc-1", T0, inc())
        r = check(new, decide(new, view(), policy), state, view(), GuardsSpec(retry_caps={}), T0 + timedelta(minutes=5))
        assert (r is not None) is refused
        if r is not None:
            assert r.guard == "cooldown" and r.retry and r.waiting is WaitingOn.COOLDOWN


class TestWaitingStates:
    @pytest.mark.parametrize(("state", "spec", "guard", "waiting", "fence"), [
        (GuardState(breaker_tripped_at=T0, breaker_reason="storm"), GuardsSpec(), "breaker", WaitingOn.BREAKER, False),
        (GuardState(active={"n2": "x", "n3": "y"}), GuardsSpec(), "budget", WaitingOn.BUDGET, False),
        (GuardState(killed_rules={"gpu-reset"}), GuardsSpec(), "kill_switch", WaitingOn.HUMAN, True),
        (GuardState(killed_codes={"xid:48"}), GuardsSpec(), "kill_switch", WaitingOn.HUMAN, True),
    ], ids=["breaker-queues", "budget-waits-its-turn", "run-time-rule-kill-switch-fences",
            "run-time-code-kill-switch-fences"])
    def test_each_refusal_says_what_the_incident_waits_on(self, policy: Policy, state: GuardState, spec: GuardsSpec,
                                                          guard: str, waiting: WaitingOn, fence: bool) -> None:
        i = inc()
        r = check(i, decide(i, view(), policy), state, view(), spec, T0)
        assert r is not None and (r.guard, r.waiting, r.fence) == (guard, waiting, fence)


class TestHoldsAndState:
    def test_a_node_is_held_until_its_last_incident_lets_go(self) -> None:
        state = GuardState()
        state.hold("n1", "rma", "hardware-escalation")
        state.start("n1", "reset")
        assert state.holders("n1", besides="reset") == {"rma": "hardware-escalation"}
        state.unhold("rma")
        assert state.holders("n1", besides="reset") == {}
        state.unhold("reset")
        assert state.holds == {}

    def test_breaker_reset_returns_the_queue_oldest_first(self) -> None:
        state = GuardState(queued={"b": T0 + timedelta(seconds=2), "a": T0 + timedelta(seconds=5), "c": T0})
        state.observe_open("n1", T0, BreakerSpec(min_nodes=1, max_percent=1), pool=10)
        assert state.reset_breaker() == ["c", "b", "a"] and state.queued == {} and state.breaker_tripped_at is None

    def test_prune_drops_what_no_guard_can_see_so_the_stored_record_stays_bounded(self) -> None:
        state = GuardState()
        for day in range(200):
            at = T0 + timedelta(days=day)
            state.record_action("n1", StepAction.REBOOT, at)
            state.observe_open(f"n{day}", at, BreakerSpec(), pool=1000)
            state.finish(f"n{day}", "x", at, inc())
            state.budget_since[f"i{day}"] = at  # waits of incidents the remediator never saw end
            state.defer_until[f"i{day}"] = at + timedelta(hours=4)
        state.prune(T0 + timedelta(days=200), GuardsSpec())
        assert len(state.actions) <= 1 and len(state.opens) <= 1 and len(state.finished) <= 1
        assert len(state.budget_since) <= 2 and len(state.defer_until) <= 2

    def test_state_round_trips_through_the_store_form(self) -> None:
        state = GuardState(holds={"n1": {"a": "why"}}, queued={"a": T0}, killed_codes={"xid:48"},
                           budget_since={"a@0": T0, "a@1": T0}, defer_until={"b@2": T0 + timedelta(hours=4)})
        state.finish("n1", "a", T0, inc())
        assert GuardState.from_dict(state.to_dict()) == state
        state.forget("a")
        state.forget("b")
        assert state.budget_since == {} and state.defer_until == {}


class TestFencedScopedRepair:
    def test_a_gpu_reset_is_fenced_drained_and_validated_on_that_gpu_only(self, policy: Policy) -> None:
        plan = decide(inc(gpu=3), view(), policy)
        assert actions(plan) == ["cordon", "drain_gpu", "reset_gpu", "validate", "return_to_service"]
        validate = plan.rungs()[0].steps[3]
        assert validate.params["scope"] == "gpu" and validate.params["gpu"] == 3
        assert plan.rungs()[1].steps[3].params["scope"] == "node", "after a reboot every GPU is validated"

    def test_a_reset_without_a_drain_in_the_policy_gets_one(self, policy: Policy) -> None:
        from breakfix.remediator.policy import Match, Rule, StepSpec

        rule = Rule(name="bare-reset", match=Match(categories=frozenset({"gpu_reset_required"})), domain="operator",
                    reason="r", steps=(StepSpec(action=StepAction.RESET_GPU),))
        plan = decide(inc(), view(), policy.model_copy(update={"rules": (rule,)}))
        assert actions(plan) == ["cordon", "drain_gpu", "reset_gpu"]

    @pytest.mark.parametrize(("labels", "incident_labels", "mig"), [
        ({"nvidia.com/mig.config": "all-1g.10gb"}, {}, True),
        ({"nvidia.com/mig.config": "all-disabled"}, {}, False),
        ({}, {"gpu_i_id": "5"}, True),
        ({}, {}, False),
    ], ids=["mig-node-label", "mig-disabled-label", "incident-names-an-instance", "no-mig"])
    def test_mig_reset_drains_every_instance_and_says_they_must_be_recreated(
            self, policy: Policy, labels: dict[str, str], incident_labels: dict[str, str], mig: bool) -> None:
        plan = decide(inc(labels=incident_labels), view(n1=labels), policy)
        steps = {s.action: s for s in plan.rungs()[0].steps}
        assert (steps[StepAction.DRAIN_GPU].params.get("mig") is True) is mig
        assert (steps[StepAction.RESET_GPU].params.get("mig") is True) is mig
        assert ("must be recreated" in plan.reason) is mig


class TestDeferredRepair:
    @pytest.mark.parametrize(("codes", "category", "severity", "labels", "deferred"), [
        (("row_remap.pending",), "gpu_reset_required", Severity.WARNING, {}, True),
        (("xid:94",), "application_fault", Severity.WARNING, {}, True),
        (("xid:94",), "application_fault", Severity.WARNING, {"nvidia.com/mig.config": "all-1g.10gb"}, True),
        (("xid:94",), "application_fault", Severity.WARNING,
         {"nvidia.com/mig.config": "all-disabled", "nvidia.com/gpu.sharing-strategy": "time-slicing"}, True),
        (("xid:94",), "application_fault", Severity.WARNING,
         {"nvidia.com/mig.capable": "false", "nvidia.com/gpu.replicas": "1"}, False),
        (("row_remap.pending", "xid:48"), "gpu_reset_required", Severity.CRITICAL, {}, False),
        (("xid:48",), "gpu_reset_required", Severity.CRITICAL, {}, False),
    ], ids=["pending-row-remap-waits", "xid94-on-a-gpu-not-known-whole-waits", "xid94-on-mig-waits",
            "xid94-on-a-shared-gpu-waits", "xid94-on-a-whole-unshared-gpu-restarts-its-app-now", "with-a-dbe-acts-now",
            "dbe-acts-now"])
    def test_reset_waits_for_the_gpu_to_go_idle_when_nvidia_says_work_may_continue(
            self, policy: Policy, codes: tuple[str, ...], category: str, severity: Severity, labels: dict[str, str],
            deferred: bool) -> None:
        plan = decide(inc(codes=codes, category=category, severity=severity), view(n1=labels), policy)
        first = next(s for s in plan.rungs()[0].steps if s.action.disruptive or s.action is StepAction.CORDON)
        assert ("defer_s" in first.params) is deferred
        if deferred:
            assert plan.rule == "gpu-reset-when-idle" and first.params["defer_s"] == 14400


def counted(*pairs: tuple[str, int], severity: Severity = Severity.CRITICAL, category: str = "gpu_reset_required",
            ) -> Incident:
    return inc(counts=tuple(CodeCount(key=k, count=c) for k, c in pairs), severity=severity, category=category)


class TestPlansFollowTheirIncident:
    @pytest.mark.parametrize(("old_cat", "new_inc", "acted", "replaced"), [
        ("gpu_reset_required", inc(category="node_reboot_required", codes=("xid:48", "xid:154")), True, True),
        ("gpu_reset_required", inc(category="gpu_drain_reset_required", codes=("xid:48", "xid:63")), False, True),
        ("gpu_reset_required", inc(category="gpu_drain_reset_required", codes=("xid:48", "xid:63")), True, False),
        ("gpu_reset_required", inc(), False, False),
    ], ids=["more-severe-action-always-re-decides", "late-companion-revises-before-anything-ran",
            "late-companion-after-the-reset-keeps-the-plan", "same-rule-keeps-the-plan"])
    def test_redecision(self, policy: Policy, old_cat: str, new_inc: Incident, acted: bool, replaced: bool) -> None:
        old = decide(inc(category=old_cat), view(), policy)
        why = redecision(old, old_cat, decide(new_inc, view(), policy), new_inc, acted)
        assert (why is not None) is replaced

    @pytest.mark.parametrize(("before", "after", "blocks"), [
        (counted(("xid:48", 1)), counted(("xid:48", 2)), True),
        (counted(("xid:48", 1)), counted(("xid:48", 1), ("xid:63", 1), category="gpu_drain_reset_required"), False),
        (counted(("xid:48", 1)), counted(("xid:48", 1)), False),
        (counted(("xid:48", 1)), counted(("xid:48", 1), severity=Severity.FATAL), True),
    ], ids=["same-code-again-blocks", "informational-companion-does-not", "quiet-returns", "worse-severity-blocks"])
    def test_soak_recurrence(self, catalog: Any, before: Incident, after: Incident, blocks: bool) -> None:
        from breakfix.remediator.app import companion_codes

        assert (recurrence(before, after, companion_codes(catalog)) is not None) is blocks


class TestDrainEvaluator:
    @pytest.mark.parametrize(("pod", "policy", "action"), [
        (PodFacts("ml", "p", owner_kinds=("DaemonSet",)), DrainPolicy(), EvictAction.SKIP),
        (PodFacts("ml", "p", annotations=frozenset({"kubernetes.io/config.mirror"})), DrainPolicy(), EvictAction.SKIP),
        (PodFacts("ml", "p", phase="Succeeded"), DrainPolicy(), EvictAction.SKIP),
        (PodFacts("ml", "p"), DrainPolicy(), EvictAction.EVICT),
        (PodFacts("batch", "p"), DrainPolicy(namespaces={"batch": "allow-completion"}),
         EvictAction.WAIT_FOR_COMPLETION),
        (PodFacts("x", "p"), DrainPolicy(default="delete-after-timeout"), EvictAction.EVICT_THEN_DELETE),
    ], ids=["daemonset-stays", "mirror-pod-stays", "finished-pod-skipped", "default-evicts", "namespace-waits",
            "default-delete-after-timeout"])
    def test_drain_action(self, pod: PodFacts, policy: DrainPolicy, action: EvictAction) -> None:
        assert drain_action(pod, policy).action is action
