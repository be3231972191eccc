"""The executor: steps change the simulated cluster, every step is audited, failures escalate."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from breakfix.bus.clock import ManualClock
from breakfix.remediator.actuator import StepResult
from breakfix.remediator.decide import decide
from breakfix.remediator.executor import Executor
from breakfix.remediator.policy import Policy
from breakfix.remediator.simcluster import QUARANTINE_TAINT, SimCluster, SimNode
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    Domain,
    Incident,
    IncidentScope,
    Plan,
    Step,
    StepAction,
    WaitingOn,
)
from tests.conftest import T0


def incident(category: str) -> Incident:
    return Incident(id="inc-9", cluster="c1", scope=IncidentScope.GPU, node="n1", nodes=("n1",),
                    gpus=(GpuRef(index=2),), category=category, severity=Severity.CRITICAL,
                    first_seen=T0, last_seen=T0)


def clock() -> ManualClock:
    return ManualClock(T0)


class Harness:
    def __init__(self, cluster: SimCluster) -> None:
        self.records: list[ActionRecord] = []
        self.cluster = cluster
        self.executor = Executor(cluster, self.publish, clock(), actor="test")

    async def publish(self, rec: ActionRecord) -> None:
        self.records.append(rec)

    def outcomes(self) -> list[str]:
        return [f"{r.action.value if r.action else r.kind.value}:{r.outcome.value}" for r in self.records]


def cluster(**kw) -> SimCluster:  # type: ignore[no-untyped-def]
    return SimCluster({"n1": SimNode("n1", pods={"a/p0": 2, "a/p1": 5})}, **kw)


class TestExecutor:
    async def test_drain_reset_plan_changes_node_and_returns_it(self, policy: Policy) -> None:
        h = Harness(cluster())
        inc = incident("gpu_drain_reset_required")
        outcome = await h.executor.run(inc, decide(inc, await h.cluster.view(), policy))
        assert outcome is ActionOutcome.COMPLETED
        node = h.cluster.nodes["n1"]
        assert node.gpu_resets == {2: 1}
        assert node.pods == {"a/p1": 5}, "only the failing GPU's pod moves"
        assert not node.cordoned and node.taints == []
        assert h.outcomes()[-1] == "plan:completed"

    async def test_every_step_has_started_and_finished_records(self, policy: Policy) -> None:
        h = Harness(cluster())
        inc = incident("gpu_reset_required")
        await h.executor.run(inc, decide(inc, await h.cluster.view(), policy))
        steps = [r for r in h.records if r.kind is ActionKind.STEP]
        assert len(steps) == 10, "cordon, drain_gpu, reset_gpu, validate, return: started + finished"
        assert all(r.rule == "gpu-reset" and r.actor == "test" and r.incident_id == "inc-9" for r in h.records)
        assert len({r.id for r in h.records}) == len(h.records), "record ids are unique"

    async def test_failed_reset_takes_the_reboot_rung(self, policy: Policy) -> None:
        h = Harness(cluster(failing_resets={("n1", 2)}))
        inc = incident("gpu_drain_reset_required")
        outcome = await h.executor.run(inc, decide(inc, await h.cluster.view(), policy))
        assert outcome is ActionOutcome.COMPLETED
        assert "reset_gpu:failed" in h.outcomes() and "reboot:succeeded" in h.outcomes()
        assert h.cluster.nodes["n1"].reboots == 1
        assert [r.details.get("rung") for r in h.records if r.action is StepAction.VALIDATE][-1] == "reboot"

    async def test_exhausted_ladder_escalates_and_keeps_the_node_cordoned(self, policy: Policy) -> None:
        h = Harness(cluster(failing_resets={("n1", 2)}, failing_validation={"n1"}))
        inc = incident("gpu_drain_reset_required")
        outcome = await h.executor.run(inc, decide(inc, await h.cluster.view(), policy))
        assert outcome is ActionOutcome.REFUSED, "the last rung (reprovision) waits for a human's approval"
        assert "return_to_service:succeeded" not in h.outcomes()
        assert h.cluster.nodes["n1"].cordoned, "node stays cordoned for a human"

    async def test_an_escalation_whose_node_marks_fail_still_pages_and_says_so(self, policy: Policy) -> None:
        class Refusing(SimCluster):
            async def escalate(self, node: str | None, summary: str, *, incident: str) -> StepResult:
                raise RuntimeError("HTTP 422: event namespace does not match")

        h = Harness(Refusing({"n1": SimNode("n1", pods={"a/p0": 2})}, failing_validation={"n1"}))
        inc = incident("gpu_suspect")
        assert await h.executor.run(inc, decide(inc, await h.cluster.view(), policy)) is ActionOutcome.ESCALATED
        esc = next(r for r in h.records if r.action is StepAction.ESCALATE)
        assert esc.waiting is WaitingOn.HUMAN and "were not written" in esc.reason and "HTTP 422" in esc.reason
        assert h.records[-1].kind is ActionKind.PLAN and h.records[-1].outcome is ActionOutcome.ESCALATED

    async def test_single_rung_failure_escalates_with_rma_summary(self, policy: Policy) -> None:
        h = Harness(cluster(failing_validation={"n1"}))
        inc = incident("gpu_suspect")
        outcome = await h.executor.run(inc, decide(inc, await h.cluster.view(), policy))
        assert outcome is ActionOutcome.ESCALATED
        assert h.cluster.escalations and "validate failed" in h.cluster.escalations[0][1]
        assert "category=gpu_suspect" in h.cluster.escalations[0][1]

    async def test_failed_validation_never_returns_to_service(self, policy: Policy) -> None:
        h = Harness(cluster(failing_validation={"n1"}))
        inc = incident("node_reboot_required")
        assert await h.executor.run(inc, decide(inc, await h.cluster.view(), policy)) is ActionOutcome.ESCALATED
        assert ("return_to_service", "n1") not in h.cluster.history
        assert h.cluster.nodes["n1"].cordoned

    async def test_dry_run_touches_nothing_and_records_everything(self, policy: Policy) -> None:
        h = Harness(cluster())
        inc = incident("node_reboot_required")
        plan = decide(inc, await h.cluster.view(), policy.model_copy(update={"dry_run": True}))
        outcome = await h.executor.run(inc, plan)
        assert outcome is ActionOutcome.DRY_RUN
        assert h.cluster.history == []
        assert h.outcomes().count("reboot:dry_run") == 1
        assert all(r.dry_run for r in h.records)

    async def test_step_needing_approval_stops_with_a_refusal(self) -> None:
        h = Harness(cluster())
        plan = Plan(domain=Domain.OPERATOR, rule="r", reason="why", steps=(
            Step(action=StepAction.CORDON, params={"node": "n1"}),
            Step(action=StepAction.REPROVISION, params={"node": "n1"}, requires_approval=True)))
        outcome = await h.executor.run(incident("software_update"), plan)
        assert outcome is ActionOutcome.REFUSED
        assert h.cluster.nodes["n1"].reprovisions == 0
        assert "breakfix approve inc-9 reprovision" in h.records[-1].reason

    async def test_never_uncordons_a_node_someone_else_cordoned(self, policy: Policy) -> None:
        c = cluster()
        c.nodes["n1"].cordoned, c.nodes["n1"].cordoned_by = True, "alice"
        h = Harness(c)
        inc = incident("gpu_drain_reset_required")
        taints: list[list[str]] = []
        real = c.drain_gpu

        async def drain_gpu(node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
            taints.append(list(c.nodes[node].taints))  # mid-repair: fenced by the taint whoever cordoned
            return await real(node, gpu, incident=incident, pods=pods)

        c.drain_gpu = drain_gpu  # type: ignore[method-assign]
        await h.executor.run(inc, decide(inc, await c.view(), policy))
        assert c.nodes["n1"].cordoned and c.nodes["n1"].cordoned_by == "alice"
        assert taints and all(QUARANTINE_TAINT in t for t in taints), "tainted too, in case alice uncordons"
        assert c.nodes["n1"].taints == [], "her cordon stays, breakfix's taint goes"

    @pytest.mark.parametrize("action", [StepAction.RESET_GPU, StepAction.DRAIN_GPU])
    async def test_gpu_step_without_gpu_fails_cleanly(self, action: StepAction) -> None:
        h = Harness(cluster())
        inc = incident("gpu_reset_required").model_copy(update={"gpus": ()})
        plan = Plan(domain=Domain.OPERATOR, rule="r", reason="why", steps=(Step(action=action, params={"node": "n1"}),))
        assert await h.executor.run(inc, plan) is ActionOutcome.ESCALATED


def plan_of(*steps: Step, ladder: tuple[tuple[str, tuple[Step, ...]], ...] = ()) -> Plan:
    from breakfix.schemas.incident import Rung

    if ladder:
        rungs = tuple(Rung(name=n, steps=s) for n, s in ladder)
        return Plan(domain=Domain.OPERATOR, rule="r", reason="why", steps=rungs[0].steps, ladder=rungs)
    return Plan(domain=Domain.OPERATOR, rule="r", reason="why", steps=steps)


N1 = {"node": "n1", "gpu": 2}


class TestLifecycleExecution:
    async def test_a_hanging_step_times_out_and_the_next_rung_runs_with_the_reason_audited(self) -> None:
        h = Harness(cluster(hanging={"reset_gpu"}))
        plan = plan_of(ladder=(("reset", (Step(action=StepAction.RESET_GPU, params=N1, timeout_s=0.05),)),
                               ("reboot", (Step(action=StepAction.REBOOT, params=N1),))))
        assert await h.executor.run(incident("gpu_reset_required"), plan) is ActionOutcome.COMPLETED
        failed = next(r for r in h.records if r.action is StepAction.RESET_GPU and r.outcome is ActionOutcome.FAILED)
        assert "timed out after 0.05s (step timeout_s)" in failed.reason
        assert h.cluster.nodes["n1"].reboots == 1, "the ladder took its next rung"

    async def test_a_rung_timeout_bounds_its_steps(self) -> None:
        from breakfix.schemas.incident import Rung

        h = Harness(cluster(hanging={"validate"}))
        rung = Rung(name="only", steps=(Step(action=StepAction.VALIDATE, params=N1, timeout_s=600),), timeout_s=0.05)
        plan = Plan(domain=Domain.OPERATOR, rule="r", reason="why", steps=rung.steps, ladder=(rung,))
        assert await h.executor.run(incident("gpu_suspect"), plan) is ActionOutcome.ESCALATED
        assert any("(rung timeout_s)" in r.reason for r in h.records)

    async def test_a_busy_gpu_is_drained_and_reset_again_not_rebooted(self, policy: Policy) -> None:
        h = Harness(cluster(busy_gpus={("n1", 2)}))
        inc = incident("gpu_reset_required")
        assert await h.executor.run(inc, decide(inc, await h.cluster.view(), policy)) is ActionOutcome.COMPLETED
        reset = next(r for r in h.records if r.action is StepAction.RESET_GPU and r.outcome is ActionOutcome.SUCCEEDED)
        assert reset.reason.startswith("busy:") and reset.details["drained_for_busy"] == "true"
        assert h.cluster.nodes["n1"].reboots == 0 and h.cluster.nodes["n1"].gpu_resets == {2: 1}

    async def test_a_job_that_landed_on_the_gpu_moves_and_the_node_keeps_its_other_work(self, policy: Policy) -> None:
        class Landing(SimCluster):
            """The scheduler puts a new job on the GPU right after its pods were drained."""

            landed = False

            async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
                done = await super().drain_gpu(node, gpu, incident=incident, pods=pods)
                if not self.landed:
                    self.landed = True
                    self.nodes[node].pods["b/late"] = gpu
                return done

            async def reset_gpu(self, node: str, gpu: int, *, incident: str, key: str = "") -> StepResult:
                if any(g == gpu for g in self.nodes[node].pods.values()):
                    return StepResult(False, f"busy: GPU {gpu} on {node} is held by 1 process(es): 77, python3",
                                      {"error": f"busy: GPU {gpu} on {node} is held by 1 process(es)"})
                return await super().reset_gpu(node, gpu, incident=incident, key=key)

        h = Harness(Landing({"n1": SimNode("n1", pods={"a/p0": 2, "a/p1": 5})}))
        inc = incident("gpu_reset_required")
        assert await h.executor.run(inc, decide(inc, await h.cluster.view(), policy)) is ActionOutcome.COMPLETED
        reset = next(r for r in h.records if r.action is StepAction.RESET_GPU and r.outcome is ActionOutcome.SUCCEEDED)
        assert reset.details["drained_gpu_for_busy"] == "true" and "moved the pods holding gpu2" in reset.reason
        assert h.cluster.nodes["n1"].pods == {"a/p1": 5} and ("drain", "n1") not in h.cluster.history

    async def test_return_to_service_keeps_the_node_cordoned_while_another_incident_holds_it(self, policy: Policy
                                                                                              ) -> None:
        c = cluster()
        h = Harness(c)
        h.executor.holders = lambda _inc, _node: "inc-rma (hardware-escalation)"
        inc = incident("gpu_reset_required")
        assert await h.executor.run(inc, decide(inc, await c.view(), policy)) is ActionOutcome.COMPLETED
        assert c.nodes["n1"].cordoned, "the RMA incident still holds the node"
        back = next(r for r in h.records if r.action is StepAction.RETURN_TO_SERVICE and r.outcome.value == "succeeded")
        assert "still held by inc-rma" in back.reason

    async def test_a_capped_step_of_a_later_rung_escalates_with_the_reason(self) -> None:
        h = Harness(cluster(failing_resets={("n1", 2)}))
        h.executor.gate = lambda _i, _p, s, _k: "reboot already ran 1x on n1" if s.action is StepAction.REBOOT else None
        plan = plan_of(ladder=(("reset", (Step(action=StepAction.RESET_GPU, params=N1),)),
                               ("reboot", (Step(action=StepAction.REBOOT, params=N1),))))
        assert await h.executor.run(incident("gpu_reset_required"), plan) is ActionOutcome.ESCALATED
        assert h.cluster.nodes["n1"].reboots == 0
        last = h.records[-1]
        assert "refused: reboot already ran 1x" in last.reason and last.waiting is WaitingOn.HUMAN
        esc = h.records[-2]
        assert esc.action is StepAction.ESCALATE and esc.step_index is None, "no magic index for the closing page"

    async def test_deferred_repair_waits_for_the_gpu_to_go_idle_then_acts(self) -> None:
        c = cluster()
        clk = ManualClock(T0)
        h = Harness(c)
        h.executor.clock, h.executor.idle_poll_s = clk, 60.0
        step = Step(action=StepAction.DRAIN_GPU, params={**N1, "defer_s": 3600})

        async def idle_after_ten_minutes(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            return clk.now() >= T0 + timedelta(minutes=10)  # the job holding the GPU ends then

        c.gpu_idle = idle_after_ten_minutes  # type: ignore[method-assign]
        assert await h.executor.run(incident("gpu_reset_required"), plan_of(step)) is ActionOutcome.COMPLETED
        waiting = [r for r in h.records if r.waiting is WaitingOn.IDLE]
        assert len(waiting) == 1 and "not evicted now" in waiting[0].reason
        assert T0 + timedelta(minutes=10) <= clk.now() < T0 + timedelta(minutes=12), "acted when the job ended"

    async def test_deferred_repair_acts_at_its_deadline(self) -> None:
        clk = ManualClock(T0)
        h = Harness(cluster())
        h.executor.clock = clk
        step = Step(action=StepAction.DRAIN_GPU, params={**N1, "defer_s": 600})
        assert await h.executor.run(incident("gpu_reset_required"), plan_of(step)) is ActionOutcome.COMPLETED
        assert clk.now() == T0 + timedelta(seconds=600) and h.cluster.nodes["n1"].pods == {"a/p1": 5}

    async def test_mig_reset_drains_every_instance_and_audits_that_they_must_be_recreated(self) -> None:
        h = Harness(cluster())
        mig = {**N1, "mig": True}
        plan = plan_of(Step(action=StepAction.DRAIN_GPU, params=mig), Step(action=StepAction.RESET_GPU, params=mig))
        assert await h.executor.run(incident("gpu_reset_required"), plan) is ActionOutcome.COMPLETED
        assert h.cluster.nodes["n1"].pods == {"a/p1": 5}, "every pod on the GPU's instances moved, gpu5's stayed"
        assert all("must be recreated" in r.details["mig"] for r in h.records if r.action is StepAction.RESET_GPU)

    async def test_the_soak_is_published_as_a_waiting_state(self) -> None:
        from breakfix.remediator.actuator import StepResult

        async def quiet(_inc: Incident) -> StepResult:
            return StepResult(True, "quiet")

        h = Harness(cluster())
        h.executor.soak = quiet
        await h.executor.run(incident("gpu_reset_required"), plan_of(Step(action=StepAction.RETURN_TO_SERVICE,
                                                                          params=N1)))
        assert [r.waiting for r in h.records if r.outcome is ActionOutcome.WAITING] == [WaitingOn.SOAK]


class _HeldDrain(SimCluster):
    """A GPU drain that takes until the test lets it finish (a step in flight)."""

    def __init__(self) -> None:
        super().__init__({"n1": SimNode("n1", pods={"a/p0": 2, "a/p1": 5})})
        self.draining, self.finish = asyncio.Event(), asyncio.Event()

    async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
        self.draining.set()
        await self.finish.wait()
        return await super().drain_gpu(node, gpu, incident=incident, pods=pods)


class TestStopsAndInterruptedWaits:
    async def test_a_stop_lets_the_step_in_flight_finish_and_starts_no_further_step(self, policy: Policy) -> None:
        from breakfix.remediator.records import Progress, ProgressState

        c = _HeldDrain()
        h = Harness(c)
        saved: list[Progress] = []

        async def save(p: Progress) -> None:
            saved.append(p.model_copy())

        inc = incident("gpu_reset_required")
        run = asyncio.create_task(h.executor.run(inc, decide(inc, await c.view(), policy), attempt=3, save=save),
                                  name="test-plan")
        await asyncio.wait_for(c.draining.wait(), 5)
        h.executor.stop_at_next_step("inc-9", 2, "another attempt's stop")  # not this plan's
        h.executor.stop_at_next_step("inc-9", 3, "re-decided: unknown-fault never resets")
        await asyncio.sleep(0.05)
        assert not run.done(), "the drain in flight is not cut off"
        c.finish.set()
        assert await asyncio.wait_for(run, 5) is ActionOutcome.CANCELLED
        assert [x[0] for x in c.history] == ["cordon", "drain_gpu"] and c.nodes["n1"].gpu_resets == {}
        assert h.outcomes()[-2:] == ["drain_gpu:succeeded", "plan:cancelled"], "the drain's end is recorded"
        assert h.records[-1].reason == "re-decided: unknown-fault never resets"
        assert saved[-1].state is ProgressState.CANCELLED and (saved[-1].rung, saved[-1].step) == (0, 2)
        assert h.executor._stops == {("inc-9", 2): "another attempt's stop"}

    async def test_a_stop_during_the_last_step_lets_the_plan_end_and_is_forgotten(self) -> None:
        c = _HeldDrain()
        h = Harness(c)
        plan = plan_of(Step(action=StepAction.DRAIN_GPU, params=N1))
        run = asyncio.create_task(h.executor.run(incident("gpu_reset_required"), plan), name="test-plan")
        await asyncio.wait_for(c.draining.wait(), 5)
        h.executor.stop_at_next_step("inc-9", 0, "too late: no step is left")
        c.finish.set()
        assert await asyncio.wait_for(run, 5) is ActionOutcome.COMPLETED
        assert h.executor._stops == {}, "a later run of the same attempt is not stopped by it"

    async def test_a_deferred_wait_ends_at_once_when_the_incident_changes(self) -> None:
        c = cluster()
        clk = ManualClock(T0)
        h = Harness(c)
        h.executor.clock = clk
        polled, job_runs = asyncio.Event(), asyncio.Event()

        async def busy(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            if polled.is_set():
                await job_runs.wait()  # the job on the GPU runs on
            polled.set()
            return False

        c.gpu_idle = busy  # type: ignore[method-assign]
        step = Step(action=StepAction.DRAIN_GPU, params={**N1, "defer_s": 14400})
        changed = asyncio.Event()
        wait = asyncio.create_task(h.executor.wait_idle(incident("gpu_reset_required"), plan_of(step), 0, step,
                                                        T0 + timedelta(hours=4), changed=changed), name="test-wait")
        await asyncio.wait_for(polled.wait(), 5)
        await asyncio.sleep(0.05)
        assert not wait.done()
        changed.set()
        assert await asyncio.wait_for(wait, 5) is True
        assert clk.now() < T0 + timedelta(hours=4) and c.history == [], "nothing acted, the deadline did not pass"
        assert [r.waiting for r in h.records] == [WaitingOn.IDLE]
        unchanged = asyncio.Event()
        assert await h.executor.wait_idle(incident("gpu_reset_required"), plan_of(step), 0, step, T0, changed=unchanged
                                          ) is False, "at its deadline the wait ends as before"

    @pytest.mark.parametrize("with_changed", [True, False], ids=["service-wait", "executor-wait"])
    async def test_an_api_error_polling_the_gpu_does_not_end_the_deferred_wait(self, with_changed: bool) -> None:
        c = cluster()
        clk = ManualClock(T0)
        h = Harness(c)
        h.executor.clock, h.executor.idle_poll_s = clk, 60.0
        polls: list[int] = []

        async def blip(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            polls.append(gpu)
            if len(polls) > 1:
                raise ConnectionError("apiserver: connection reset")  # every poll after the first fails
            return False

        c.gpu_idle = blip  # type: ignore[method-assign]
        step = Step(action=StepAction.DRAIN_GPU, params={**N1, "defer_s": 3600})
        deadline = T0 + timedelta(hours=1)
        changed = asyncio.Event() if with_changed else None
        ended = await asyncio.wait_for(h.executor.wait_idle(incident("gpu_reset_required"), plan_of(step), 0, step,
                                                            deadline, changed=changed), 5)
        assert ended is False and clk.now() >= deadline, "the wait went on polling until its deadline"
        assert len(polls) > 2 and c.history == []
