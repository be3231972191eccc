"""The executor: steps change the simulated cluster, every step is audited, failures escalate."""

from __future__ import annotations

import pytest

from breakfix.bus.clock import ManualClock
from breakfix.remediator.decide import decide
from breakfix.remediator.executor import Executor
from breakfix.remediator.policy import Policy
from breakfix.remediator.simcluster import SimCluster, SimNode
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
        await h.executor.run(inc, decide(inc, await c.view(), policy))
        assert c.nodes["n1"].cordoned and c.nodes["n1"].cordoned_by == "alice"

    @pytest.mark.parametrize("action", [StepAction.RESET_GPU, StepAction.DRAIN_GPU])
    async def test_gpu_step_without_gpu_fails_cleanly(self, action: StepAction) -> None:
        h = Harness(cluster())
        inc = incident("gpu_reset_required").model_copy(update={"gpus": ()})
        plan = Plan(domain=Domain.OPERATOR, rule="r", reason="why", steps=(Step(action=action, params={"node": "n1"}),))
        assert await h.executor.run(inc, plan) is ActionOutcome.ESCALATED
