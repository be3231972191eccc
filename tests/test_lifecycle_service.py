"""The remediation lifecycle through the service on the in-memory bus: holds and human releases, refusals that
fence and page, budget waits with a limit, the breaker's page and re-drive, the human verbs and their checks,
plans re-decided when their incident gets worse, and finished incidents forgotten."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from breakfix.remediator.actuator import StepResult
from breakfix.remediator.decide import decide
from breakfix.remediator.guards import BudgetSpec, Fault
from breakfix.remediator.policy import Policy
from breakfix.remediator.records import PlanBook, PlanRecord, Progress, ProgressState
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.remediator.store import MemoryStore
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    StepAction,
    WaitingOn,
)
from tests.conftest import T0
from tests.test_remediator_service import Harness, fast, incident, index


def one_node(**kw: Any) -> SimCluster:
    return SimCluster({f"n{i}": SimNode(f"n{i}", pods={"ml/p": 2, "ml/q": 1}) for i in range(1, 11)}, **kw)


def plans(h: Harness, iid: str) -> list[str]:
    return [r.outcome.value for r in h.records() if r.kind is ActionKind.PLAN and r.incident_id == iid]


def started(h: Harness, action: StepAction, iid: str = "inc-1") -> bool:
    return any(r.action is action and r.outcome is ActionOutcome.STARTED and r.incident_id == iid
               for r in h.records())


class Gated(SimCluster):
    """Ten nodes whose named actions wait until the test opens their gate (a reset, a diag, a reprovision or a
    page in progress)."""

    def __init__(self, *gated: str, **kw: Any) -> None:
        super().__init__({f"n{i}": SimNode(f"n{i}", pods={"ml/p": 2, "ml/q": 1}) for i in range(1, 11)}, **kw)
        self.gates = {a: asyncio.Event() for a in gated}

    async def _wait(self, action: str) -> None:
        if action in self.gates:
            await self.gates[action].wait()

    async def _reset_gpu(self, node: str, gpu: int, *, incident: str) -> StepResult:
        await self._wait("reset_gpu")
        return await super()._reset_gpu(node, gpu, incident=incident)

    async def _validate(self, node: str, gpu: int | None, level: int, *, incident: str) -> StepResult:
        await self._wait("validate")
        return await super()._validate(node, gpu, level, incident=incident)

    async def _reprovision(self, node: str, *, incident: str) -> StepResult:
        await self._wait("reprovision")
        return await super()._reprovision(node, incident=incident)

    async def escalate(self, node: str | None, summary: str, *, incident: str) -> StepResult:
        await self._wait("escalate")
        return await super().escalate(node, summary, incident=incident)


def fabric(*nodes: str, iid: str = "fab-1") -> Incident:
    """A group incident as the correlator publishes it: no node of its own, its members, the shared switch."""
    return Incident(id=iid, cluster="c1", scope=IncidentScope.FABRIC, node=None, nodes=nodes or ("n5", "n6", "n7"),
                    category="fabric_link", severity=Severity.CRITICAL, codes=("ib.link_down",),
                    topology={"switch": "leaf-03"}, first_seen=T0, last_seen=T0)


class TestHolds:
    async def test_a_node_returns_only_when_its_last_incident_lets_go_and_a_human_releases_the_rma(
            self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy), c) as h:
            rma = incident(iid="inc-rma", category="hardware_support").model_copy(update={"gpus": (GpuRef(index=1),)})
            await h.open(rma)
            await h.until(lambda: "escalated" in plans(h, "inc-rma"))
            await h.open(incident(iid="inc-95", codes=("xid:95",)))
            await h.until(lambda: "completed" in plans(h, "inc-95"))
            assert c.nodes["n1"].cordoned, "the RMA incident still holds the node"
            back = [r for r in h.records() if r.incident_id == "inc-95" and r.action is StepAction.RETURN_TO_SERVICE
                    and r.outcome is ActionOutcome.SUCCEEDED]
            assert "still held by inc-rma" in back[0].reason
            await h.human("release", "inc-rma", reason="GPU 1 replaced, RMA closed")
            await h.until(lambda: "completed" in plans(h, "inc-rma"))
        assert not c.nodes["n1"].cordoned, "nothing holds it any more"
        assert ("validate", "n1", "3", "gpu1") in c.history, "the release validated first"

    async def test_a_release_may_skip_validation_with_a_reason(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy), c) as h:
            await h.open(incident(category="hardware_support"))
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
            await h.human("release", reason="vendor swapped the board", details={"skip_validation": "true"})
            await h.until(lambda: "completed" in plans(h, "inc-1"))
        assert not c.nodes["n1"].cordoned and not [x for x in c.history if x[0] == "validate"]

    async def test_cancel_stops_the_plan_in_flight_and_leaves_the_node_fenced(self, policy: Policy) -> None:
        c = one_node(hanging={"validate"})
        async with Harness(fast(policy), c) as h:
            await h.open(incident())
            await h.until(lambda: any(x[0] == "validate" for x in c.history))
            await h.human("cancel", reason="investigating by hand")
            await h.until(lambda: "cancelled" in plans(h, "inc-1"))
            assert "inc-1" not in h.svc.tasks
        cancel = next(r for r in h.records() if r.outcome is ActionOutcome.CANCELLED)
        assert "cancelled by alice: investigating by hand" in cancel.reason and cancel.waiting is WaitingOn.HUMAN
        assert c.nodes["n1"].cordoned


class TestRefusalsFenceAndPage:
    async def test_retry_cap_fences_the_node_and_escalates_with_the_reason(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy), c) as h:
            h.svc.guards.record_action("n1", StepAction.REBOOT, T0 - timedelta(hours=1))
            await h.open(incident(category="node_reboot_required", codes=("xid:79",), severity=Severity.FATAL))
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
        refusal = next(r for r in h.records() if r.kind is ActionKind.REFUSAL)
        assert refusal.waiting is WaitingOn.HUMAN and "reboot already ran 1x on n1 within 24 h" in refusal.reason
        assert c.nodes["n1"].cordoned and c.nodes["n1"].reboots == 0
        assert c.escalations and "reboot already ran 1x" in c.escalations[0][1]

    async def test_a_budget_wait_past_its_limit_goes_to_a_human(self, policy: Policy) -> None:
        c = one_node()
        pol = fast(policy, budget=BudgetSpec(max_nodes=1, max_percent=0), topology_budgets=(), budget_wait_s=5.0)
        async with Harness(pol, c) as h:
            h.svc.guards.start("n2", "inc-other")  # holds the only budget slot
            await h.open(incident())
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
        waits = [r for r in h.records() if r.kind is ActionKind.REFUSAL]
        assert waits[0].waiting is WaitingOn.BUDGET and waits[-1].waiting is WaitingOn.HUMAN
        assert "waited" in waits[-1].reason and c.nodes["n1"].cordoned

    async def test_breaker_pages_once_and_a_reset_redrives_the_queue_oldest_first(self, policy: Policy) -> None:
        c = one_node()
        pol = fast(policy, budget=BudgetSpec(max_nodes=10, max_percent=100), topology_budgets=())
        async with Harness(pol, c) as h:
            for i in (3, 1, 4, 2):
                inc = incident(f"n{i}", iid=f"inc-{i}", category="node_reboot_required", codes=("xid:79",))
                await h.open(inc.model_copy(update={"first_seen": T0 + timedelta(seconds=i)}))
            await h.until(lambda: len(h.svc.guards.queued) >= 3)
            pages = [r for r in h.records() if r.kind is ActionKind.NOTIFICATION]
            assert len(pages) == 1 and pages[0].waiting is WaitingOn.BREAKER
            assert all(f"inc-{i}" in pages[0].reason for i in (1, 3, 4))
            assert all(r.waiting is WaitingOn.BREAKER for r in h.records() if r.kind is ActionKind.REFUSAL)
            queued = sorted(h.svc.guards.queued, key=lambda i: h.svc.guards.queued[i])
            await h.human("breaker_reset", "-", actor="bob", reason="storm over")
            await h.until(lambda: all("completed" in plans(h, i) for i in queued))
        started = [r.incident_id for r in h.records() if r.kind is ActionKind.PLAN and r.outcome.value == "planned"]
        assert started == queued, "re-driven in budget order, oldest first"


class TestHumanVerbChecks:
    async def test_records_that_fail_the_subject_checks_are_ignored_and_logged(self, policy: Policy) -> None:
        async with Harness(fast(policy, retry_caps={}), one_node(failing_resets={("n1", 2)},
                                                                  failing_validation={"n1"})) as h:
            await h.open(incident())
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            with capture_logs() as logs:
                await h.human("approve", action=StepAction.REPROVISION, reason="as mallory",
                              subject=subjects.oncall_subject("c1", "mallory", "approve"))
                await h.human("approve", action=StepAction.REPROVISION, reason="other cluster",
                              subject=subjects.oncall_subject("c2", "alice", "approve"))
                await h.human("approve", action=StepAction.REBOOT, reason="wrong step")
                await h.human("approve", "inc-nope", action=StepAction.REPROVISION, reason="no incident")
                await h.until(lambda: len([x for x in logs if x["event"] == "human_record_ignored"]) == 2
                              and len([x for x in logs if x["event"] == "dead_lettered"]) == 2)
            # a record its subject's user could not have written is a forgery: dead-lettered by the decoder
            forged = [x["reason"] for x in logs if x["event"] == "dead_lettered"]
            assert forged[0].startswith("forged ActionRecord: actor 'alice' on the subject of user 'mallory'")
            assert "record for cluster 'c1' on 'breakfix.actions.c2" in forged[1]
            reasons = [x["reason"] for x in logs if x["event"] == "human_record_ignored"]
            assert "is not the waiting step" in reasons[0]
            assert reasons[1] == "no such incident"
            assert h.svc.cluster == "c1" and h.cluster.nodes["n1"].reprovisions == 0

    async def test_deny_stops_the_plan_at_the_waiting_step_and_hands_it_to_a_human(self, policy: Policy) -> None:
        c = one_node(failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            await h.open(incident())
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            await h.human("deny", action=StepAction.REPROVISION, reason="send it to the vendor")
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
        denied = [r for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.ESCALATED]
        assert "denied by alice: send it to the vendor" in denied[-1].reason and c.nodes["n1"].reprovisions == 0

    async def test_a_run_time_kill_switch_refuses_and_fences(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy), c) as h:
            await h.human("kill_switch", "-", actor="root", reason="bad driver", details={"code": "xid:48",
                                                                                      "enabled": "true"})
            await h.until(lambda: "xid:48" in h.svc.guards.killed_codes)
            await h.open(incident())
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
        assert any(r.details.get("guard") == "kill_switch" for r in h.records()) and c.nodes["n1"].gpu_resets == {}


class TestPlansFollowAndMemory:
    async def test_a_plan_in_flight_is_re_decided_when_its_incident_needs_a_reboot(self, policy: Policy) -> None:
        c = one_node(hanging={"reset_gpu"})
        async with Harness(fast(policy), c) as h:
            first = incident()
            await h.open(first)
            await h.until(lambda: any(x[0] == "reset_gpu" for x in c.history))
            c.hanging.clear()
            worse = first.model_copy(update={"category": "node_reboot_required", "codes": ("xid:48", "xid:154"),
                                             "severity": Severity.FATAL, "version": 2})
            await h.open(worse, ChangeKind.UPDATED)
            await h.until(lambda: "completed" in plans(h, "inc-1"))
        cancelled = next(r for r in h.records() if r.outcome is ActionOutcome.CANCELLED)
        assert "re-decided: node-reboot needs more than gpu-reset" in cancelled.reason
        assert c.nodes["n1"].reboots == 1

    async def test_finished_incidents_are_forgotten_after_the_retention_window(self, policy: Policy) -> None:
        async with Harness(fast(policy, retention_s=3600.0), one_node()) as h:
            done = incident(category="informational").model_copy(update={
                "status": IncidentStatus.RESOLVED, "resolved_at": T0, "domain": Domain.NONE})
            await h.open(done, ChangeKind.RESOLVED)
            await h.until(lambda: "inc-1" in h.svc.latest)
            h.clock.advance(7200)
            await h.open(incident(iid="inc-2", category="informational"))
            await h.until(lambda: "inc-2" in h.svc.latest)
            assert "inc-1" not in h.svc.latest

    async def test_a_stale_incident_keeps_its_hold_and_on_call_is_told(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy), c) as h:
            await h.open(incident(category="hardware_support"))
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
            stale = incident(category="hardware_support").model_copy(update={
                "status": IncidentStatus.STALE, "version": 5, "resolved_at": T0})
            await h.open(stale, ChangeKind.STATUS)
            await h.until(lambda: any(r.kind is ActionKind.NOTIFICATION for r in h.records()))
        page = next(r for r in h.records() if r.kind is ActionKind.NOTIFICATION)
        assert "stays cordoned" in page.reason and "breakfix release inc-1" in page.reason
        assert c.nodes["n1"].cordoned and list(h.svc.guards.holders("n1", besides="-")) == ["inc-1"]

    async def test_a_deferred_repair_waits_for_the_job_without_holding_up_another_repair(self, policy: Policy
                                                                                         ) -> None:
        import asyncio

        c = one_node()
        job_ended = asyncio.Event()
        polls = []

        async def idle(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            polls.append(gpu)
            if len(polls) > 1:
                await job_ended.wait()  # the job on the GPU runs until the test ends it
            return job_ended.is_set()

        c.gpu_idle = idle  # type: ignore[method-assign]
        async with Harness(fast(policy, cooldown_s=0), c) as h:
            remap = incident(iid="inc-remap", codes=("row_remap.pending",), severity=Severity.WARNING)
            await h.open(remap)
            await h.until(lambda: any(r.waiting is WaitingOn.IDLE for r in h.records()))
            assert c.nodes["n1"].pods == {"ml/p": 2, "ml/q": 1}, "the running job is not evicted"
            other = incident(iid="inc-79", category="node_reboot_required", codes=("xid:79",),
                             severity=Severity.FATAL).model_copy(update={"gpus": (GpuRef(index=5),)})
            await h.open(other)
            await h.until(lambda: "completed" in plans(h, "inc-79"))
            assert plans(h, "inc-remap") == [], "still waiting for its GPU's job"
            assert not c.nodes["n1"].cordoned, "a deferred repair does not hold the node while work continues"
            job_ended.set()
            await h.until(lambda: "completed" in plans(h, "inc-remap"))
        assert c.nodes["n1"].gpu_resets == {2: 1} and c.nodes["n1"].reboots == 1


class _NoAgentAnswer(SimCluster):
    async def gpu_pods(self, node: str, gpu: int, *, incident: str) -> StepResult:
        return StepResult(False, "node agent on n1 did not answer gpu_pods: TimeoutError")


class _NoMigDevicesSeen(SimCluster):
    async def gpu_pods(self, node: str, gpu: int, *, incident: str) -> StepResult:
        return StepResult(True, "0 pod(s) hold GPU 2", {"pods": "", "mig_devices": "0"})


class TestMigGpuReset:
    """A MIG GPU's reset destroys every instance on it: the pods on all of them move, the node's other GPUs keep
    their work. Only when the node agent cannot say which pods those are does the whole node drain."""

    def mig_node(self, cluster_type: type[SimCluster] = SimCluster) -> SimCluster:
        pods = {"serve/a": 2, "serve/b": 2, "serve/c": 2, "ml/other-gpu": 5}
        return cluster_type({"n1": SimNode("n1", labels={"nvidia.com/mig.config": "all-1g.10gb"}, pods=pods),
                             **{f"n{i}": SimNode(f"n{i}") for i in range(2, 11)}})

    async def test_only_the_pods_on_the_gpus_mig_instances_move(self, policy: Policy) -> None:
        c = self.mig_node()
        async with Harness(fast(policy, cooldown_s=0), c) as h:
            await h.open(incident())  # XID 48 on gpu2: reset the GPU
            await h.until(lambda: "completed" in plans(h, "inc-1"))
        assert c.nodes["n1"].pods == {"ml/other-gpu": 5} and ("drain", "n1") not in c.history
        assert c.nodes["n1"].gpu_resets == {2: 1}
        drained = next(r for r in h.records() if r.action is StepAction.DRAIN_GPU
                       and r.outcome is ActionOutcome.SUCCEEDED)
        assert "every pod on its MIG instances: 3" in drained.reason

    @pytest.mark.parametrize("cluster_type", [_NoAgentAnswer, _NoMigDevicesSeen], ids=["no-answer", "no-mig-devices"])
    async def test_the_node_drains_when_the_agent_cannot_name_the_pods(self, policy: Policy,
                                                                       cluster_type: type[SimCluster]) -> None:
        c = self.mig_node(cluster_type)
        async with Harness(fast(policy, cooldown_s=0), c) as h:
            await h.open(incident())
            await h.until(lambda: "completed" in plans(h, "inc-1"))
        assert ("drain", "n1") in c.history and c.nodes["n1"].pods == {}
        drained = next(r for r in h.records() if r.action is StepAction.DRAIN_GPU
                       and r.outcome is ActionOutcome.SUCCEEDED)
        assert "MIG instances are not known" in drained.reason
        why = "did not answer gpu_pods" if cluster_type is _NoAgentAnswer else "lists no MIG device"
        assert why in drained.reason


class TestFabricIncidentsGoThroughTheGuards:
    async def test_a_fabric_incident_is_refused_while_the_breaker_is_open(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy, topology_budgets=()), c) as h:
            h.svc.guards.breaker_tripped_at, h.svc.guards.breaker_reason = T0, "storm"
            await h.open(fabric())
            await h.until(lambda: "fab-1" in h.svc.guards.queued)
        refusal = next(r for r in h.records() if r.kind is ActionKind.REFUSAL)
        assert refusal.details["guard"] == "breaker" and refusal.waiting is WaitingOn.BREAKER
        assert not any(n.cordoned for n in c.nodes.values()) and plans(h, "fab-1") == []

    async def test_a_fabric_plan_fences_what_the_budget_has_left_and_counts_every_member_it_fenced(
            self, policy: Policy) -> None:
        c = Gated("escalate")
        async with Harness(fast(policy, budget=BudgetSpec(max_nodes=3, max_percent=0), topology_budgets=()), c) as h:
            h.svc.guards.start("n1", "inc-other")  # one of the three budget slots is taken
            await h.open(fabric("n5", "n6", "n7", "n8"))
            await h.until(lambda: started(h, StepAction.ESCALATE, "fab-1"))
            assert h.svc.guards.active == {"n1": "inc-other", "n5": "fab-1", "n6": "fab-1"}
            c.gates["escalate"].set()
            await h.until(lambda: "escalated" in plans(h, "fab-1"))
            assert h.svc.guards.active == {"n1": "inc-other"}, "the members leave the budget when the plan ends"
        assert sorted(n for n, x in c.nodes.items() if x.cordoned) == ["n5", "n6"]

    async def test_a_node_a_fabric_plan_fenced_stays_cordoned_when_another_incident_on_it_completes(
            self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy, topology_budgets=()), c) as h:
            member = incident("n5", iid="inc-ib-n5", category="fabric_link", codes=("ib.link_down",)).model_copy(
                update={"parent": "fab-1", "scope": IncidentScope.NODE, "gpus": ()})
            await h.open(member)  # published OPENED with its parent already set (the correlator coalesces)
            await h.open(fabric())
            await h.until(lambda: "escalated" in plans(h, "fab-1"))
            await h.open(incident("n5", iid="inc-48"))  # an unrelated XID 48 on the member node
            await h.until(lambda: "completed" in plans(h, "inc-48"))
            back = next(r for r in h.records() if r.incident_id == "inc-48"
                        and r.action is StepAction.RETURN_TO_SERVICE and r.outcome is ActionOutcome.SUCCEEDED)
            assert "still held by fab-1" in back.reason and c.nodes["n5"].cordoned
            await h.human("release", "fab-1", reason="leaf-03 PSU replaced, links up")
            await h.until(lambda: "completed" in plans(h, "fab-1"))
        assert not c.nodes["n5"].cordoned and not c.nodes["n6"].cordoned, "the release returns every fenced member"
        assert {("validate", "n5", "2"), ("validate", "n6", "2")} <= set(c.history) and h.svc.guards.holds == {}


class TestRunTimeKillSwitch:
    async def test_a_kill_switch_stops_the_next_rung_of_a_running_plan(self, policy: Policy) -> None:
        c = Gated("reset_gpu", failing_resets={("n1", 2)})
        async with Harness(fast(policy), c) as h:
            await h.open(incident())  # XID 48: the gpu-reset ladder
            await h.until(lambda: started(h, StepAction.RESET_GPU))
            await h.human("kill_switch", "-", actor="root", reason="bad reset firmware", details={
                "rule": "gpu-reset", "enabled": "true"})
            await h.until(lambda: "gpu-reset" in h.svc.guards.killed_rules)
            c.gates["reset_gpu"].set()  # the reset fails: the ladder would climb to a reboot
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
        assert c.nodes["n1"].reboots == 0 and ("drain", "n1") not in c.history
        assert c.nodes["n1"].cordoned, "the node stays fenced"
        assert c.escalations and "rule gpu-reset is switched off" in c.escalations[-1][1], "a human is paged"

    async def test_a_kill_switch_stops_an_approved_step_of_a_plan_that_waited(self, policy: Policy) -> None:
        c = one_node(failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            await h.open(incident())
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            await h.human("kill_switch", "-", actor="root", reason="bad driver", details={"code": "xid:48",
                                                                                      "enabled": "true"})
            await h.until(lambda: "xid:48" in h.svc.guards.killed_codes)
            await h.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await h.until(lambda: "escalated" in plans(h, "inc-1"))
        assert c.nodes["n1"].reprovisions == 0 and c.nodes["n1"].cordoned
        assert "code xid:48 is switched off" in c.escalations[-1][1]


class TestApprovalsFollowTheIncident:
    async def test_an_escalated_incident_keeps_its_plans_approval_wait(self, policy: Policy) -> None:
        """An incident marked escalated (a page went out) still waits for the approval the human was paged for."""
        c = one_node(failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            inc = incident()
            await h.open(inc)
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            paged = inc.model_copy(update={"status": IncidentStatus.ESCALATED, "version": 2})
            await h.open(paged, ChangeKind.STATUS)
            await asyncio.sleep(0.1)
            assert "cancelled" not in plans(h, "inc-1") and "inc-1" in h.svc.awaiting
            c.failing_validation.clear()
            await h.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await h.until(lambda: c.nodes["n1"].reprovisions == 1)

    async def test_an_incident_resolved_while_its_plan_reaches_the_approval_wait_cancels_the_wait(
            self, policy: Policy) -> None:
        """The resolved change is handled while the plan's task still runs (it is publishing the awaiting-approval
        record): the wait is ended when the task returns, not left for a late approve to run."""
        c = one_node(failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            inc = incident()
            done = inc.model_copy(update={"status": IncidentStatus.RESOLVED, "resolved_at": T0, "version": 2})
            publish = h.svc.executor.publish

            async def resolved_meanwhile(rec: ActionRecord) -> None:
                await publish(rec)
                if rec.waiting is WaitingOn.APPROVAL:
                    await h.svc.on_change(IncidentChange(kind=ChangeKind.RESOLVED, incident=done, at=T0),
                                          None)  # type: ignore[arg-type]

            h.svc.executor.publish = resolved_meanwhile
            await h.open(inc)
            await h.until(lambda: "cancelled" in plans(h, "inc-1"))
            got = await PlanBook(h.store).get("inc-1")
            assert got is not None and got[0].progress.state is ProgressState.CANCELLED
            assert "inc-1" not in h.svc.awaiting
            await h.until(lambda: h.svc.guards.holds == {} and "inc-1" not in h.svc.guards.active.values())

    async def test_an_approve_after_the_incident_resolved_is_refused_and_the_waiting_plan_is_cancelled(
            self, policy: Policy) -> None:
        c = one_node(failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            inc = incident()
            await h.open(inc)
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            done = inc.model_copy(update={"status": IncidentStatus.RESOLVED, "resolved_at": T0, "version": 2})
            await h.open(done, ChangeKind.RESOLVED)  # healthy signals: the correlator resolves it
            await h.until(lambda: "cancelled" in plans(h, "inc-1"))
            got = await PlanBook(h.store).get("inc-1")
            assert got is not None and got[0].progress.state is ProgressState.CANCELLED
            c.failing_validation.clear()
            with capture_logs() as logs:
                await h.human("approve", action=StepAction.REPROVISION, reason="an old page")
                await h.until(lambda: any(x["event"] == "human_record_ignored" for x in logs))
            await asyncio.sleep(0.1)
        assert "the incident is resolved" in next(x["reason"] for x in logs if x["event"] == "human_record_ignored")
        assert c.nodes["n1"].reprovisions == 0
        cancelled = next(r for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED)
        assert "inc-1 is resolved" in cancelled.reason


class TestBreakerCountsWhatActs:
    async def test_the_breaker_counts_openings_by_their_plan_not_the_incidents_domain(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy, budget=BudgetSpec(max_nodes=10, max_percent=100), topology_budgets=()),
                           c) as h:
            for i in range(1, 5):  # 4 of 10 nodes: XID 94 as the correlator publishes it, a tenant application fault
                xid94 = incident(f"n{i}", iid=f"inc-{i}", category="application_fault", codes=("xid:94",),
                                 severity=Severity.WARNING, domain=Domain.TENANT,
                                 tenants=(TenantRef(namespace="ml", pod=f"job{i}"),))
                await h.open(xid94.model_copy(update={"scope": IncidentScope.TENANT}))
            await h.until(lambda: h.svc.guards.breaker_tripped_at is not None)
        page = next(r for r in h.records() if r.kind is ActionKind.NOTIFICATION)
        assert all(f"inc-{i}" in page.reason for i in range(1, 4)), "the page lists the incidents it holds"
        assert all(r.rule == "gpu-reset-when-idle" for r in h.records() if r.kind is ActionKind.REFUSAL)

    async def test_reopenings_count_towards_the_breaker_when_they_happen(self, policy: Policy) -> None:
        c = one_node()
        async with Harness(fast(policy, budget=BudgetSpec(max_nodes=10, max_percent=100), topology_budgets=(),
                                cooldown_s=0.0), c) as h:
            h.clock.advance(7200)  # opened 2 h ago, out of the window, and resolved since; now they come back
            for i in range(1, 5):
                again = incident(f"n{i}", iid=f"inc-{i}", category="node_reboot_required", codes=("xid:79",),
                                 severity=Severity.FATAL).model_copy(update={"flaps": 1, "version": 3,
                                                                            "last_seen": h.clock.now()})
                await h.open(again, ChangeKind.REOPENED)
            await h.until(lambda: h.svc.guards.breaker_tripped_at is not None)
        assert sum(n.reboots for n in c.nodes.values()) < 4, "the breaker stopped the reboot storm"


class TestResumedPlans:
    async def test_a_resumed_plan_whose_reset_ran_is_not_re_decided_by_a_late_companion(self, policy: Policy) -> None:
        c, store = Gated("validate"), MemoryStore()
        inc = incident()
        plan = decide(inc, await c.view(), fast(policy))
        # restarted after cordon, drain_gpu and reset_gpu ran: the store says step 3, validate
        await PlanBook(store).put(PlanRecord(incident=inc, plan=plan, progress=Progress(incident=inc.id, attempt=0,
                                                                                       step=3)), None)
        c.nodes["n1"].gpu_resets[2] = 1
        async with Harness(fast(policy), c, store) as h:
            await h.until(lambda: started(h, StepAction.VALIDATE))
            late = inc.model_copy(update={"category": "gpu_drain_reset_required", "codes": ("xid:48", "xid:63"),
                                          "version": 2})  # XID 63 (remap event, IGNORE) joins after the reset
            await h.open(late, ChangeKind.UPDATED)
            await h.until(lambda: h.svc.stats.handled == 1)
            c.gates["validate"].set()
            await h.until(lambda: "completed" in plans(h, "inc-1"))
        assert c.nodes["n1"].gpu_resets == {2: 1} and "cancelled" not in plans(h, "inc-1")

    async def test_a_plan_resumed_mid_reboot_finishes_instead_of_hitting_its_own_retry_cap(
            self, policy: Policy) -> None:
        c, store = one_node(hanging={"reboot"}), MemoryStore()
        async with Harness(fast(policy), c, store) as h:  # the remediator stops while the node reboots (45 min)
            await h.open(incident(category="node_reboot_required", codes=("xid:79",), severity=Severity.FATAL))
            await h.until(lambda: started(h, StepAction.REBOOT))
        c.hanging.clear()
        async with Harness(fast(policy), c, store, bus=h.bus) as again:
            await again.until(lambda: plans(again, "inc-1")[-1:] in (["completed"], ["escalated"]))
        assert plans(again, "inc-1")[-1] == "completed" and c.nodes["n1"].reboots == 1
        assert not any(r.kind is ActionKind.REFUSAL for r in again.records())

    async def test_a_plan_resumed_mid_reprovision_after_its_approval_finishes(self, policy: Policy) -> None:
        c, store = Gated("reprovision", failing_resets={("n1", 2)}, failing_validation={"n1"}), MemoryStore()
        async with Harness(fast(policy), c, store) as h:
            await h.open(incident())
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            c.failing_validation.clear()
            await h.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await h.until(lambda: started(h, StepAction.REPROVISION))  # then the remediator stops (a 4 h step)
        c.gates["reprovision"].set()
        async with Harness(fast(policy), c, store, bus=h.bus) as again:
            await again.until(lambda: plans(again, "inc-1")[-1:] in (["completed"], ["escalated"]))
        assert plans(again, "inc-1")[-1] == "completed" and c.nodes["n1"].reprovisions == 1


async def cordoned_by_the_cooldown(policy: Policy, c: SimCluster, store: MemoryStore) -> tuple[Harness, Incident]:
    """A remediator that cordoned n1 for inc-1 while the cooldown damps its repair, then stopped."""
    async with Harness(fast(policy, cooldown_s=1e6), c, store) as h:
        h.svc.guards.finished["n1"] = Fault(T0, "gpu_reset_required", frozenset({"xid:48"}), Severity.CRITICAL.rank)
        inc = incident()
        await h.open(inc)
        await h.until(lambda: "inc-1" in h.svc.guards.cooled and any(
            r.action is StepAction.CORDON and r.waiting is WaitingOn.COOLDOWN for r in h.records()))
    assert c.nodes["n1"].cordoned
    return h, inc


class TestCooldowns:
    async def test_the_cooldown_remembers_the_fault_as_it_was_when_the_plan_finished(self, policy: Policy) -> None:
        c = Gated("validate")
        async with Harness(fast(policy), c) as h:
            inc = incident()
            await h.open(inc)
            await h.until(lambda: started(h, StepAction.VALIDATE))
            late = inc.model_copy(update={"category": "gpu_drain_reset_required", "codes": ("xid:48", "xid:63"),
                                          "version": 2})  # a companion joins after the reset
            await h.open(late, ChangeKind.UPDATED)
            await h.until(lambda: h.svc.latest["inc-1"].version == 2)
            c.gates["validate"].set()
            await h.until(lambda: "completed" in plans(h, "inc-1"))
            done = h.svc.guards.finished["n1"]
            assert (done.category, done.codes) == ("gpu_drain_reset_required", frozenset({"xid:48", "xid:63"}))
            await h.open(late.model_copy(update={"status": IncidentStatus.RESOLVED, "resolved_at": T0, "version": 3}),
                         ChangeKind.RESOLVED)
            h.clock.advance(600)  # the same fault flaps back 10 minutes later, inside the 30-minute cooldown
            n = len(h.records())
            await h.open(late.model_copy(update={"flaps": 1, "version": 4}), ChangeKind.REOPENED)
            await h.until(lambda: any(r.kind is ActionKind.REFUSAL for r in h.records()[n:]))
            first = next(r for r in h.records()[n:] if r.kind is ActionKind.REFUSAL)
        assert first.details["guard"] == "cooldown"

    @pytest.mark.parametrize("healthy", [True, False], ids=["validated-and-returned", "failed-validation-pages"])
    async def test_a_node_cordoned_by_the_cooldown_is_returned_or_paged_when_its_incident_resolves(
            self, policy: Policy, healthy: bool) -> None:
        c = one_node(failing_validation=set() if healthy else {"n1"})
        async with Harness(fast(policy, cooldown_s=1e6), c) as h:
            h.svc.guards.finished["n1"] = Fault(T0, "gpu_reset_required", frozenset({"xid:48"}),
                                                Severity.CRITICAL.rank)  # the same fault was repaired just now
            inc = incident()
            await h.open(inc)
            await h.until(lambda: any(r.action is StepAction.CORDON and r.waiting is WaitingOn.COOLDOWN
                                      for r in h.records()))
            await h.open(inc.model_copy(update={"status": IncidentStatus.RESOLVED, "resolved_at": T0, "version": 2}),
                         ChangeKind.RESOLVED)
            await h.until(lambda: plans(h, "inc-1")[-1:] in (["completed"], ["escalated"]))
            await h.until(lambda: "inc-1" not in h.svc.tasks)
        assert c.nodes["n1"].gpu_resets == {}, "the damped repair never ran"
        if healthy:
            assert not c.nodes["n1"].cordoned and h.svc.guards.holds == {}
        else:
            assert c.nodes["n1"].cordoned and list(h.svc.guards.holders("n1", besides="-")) == ["inc-1"]
            assert c.escalations and "DCGM diag r2 failed" in c.escalations[-1][1]

    @pytest.mark.parametrize("seen", ["on-the-stream", "in-the-index-only"])
    async def test_a_cooldown_cordon_whose_incident_resolved_while_the_remediator_was_down_is_returned_on_restart(
            self, policy: Policy, seen: str) -> None:
        """The cordon is kept in the guard state: after a restart (or a change of leader) the node is returned when
        the resolve arrives, or when the index shows it resolved (its change acked by a replica that then stopped)."""
        c, store = one_node(), MemoryStore()
        h, inc = await cordoned_by_the_cooldown(policy, c, store)
        resolved = inc.model_copy(update={"status": IncidentStatus.RESOLVED, "resolved_at": T0, "version": 2})
        if seen == "on-the-stream":
            await h.open(resolved, ChangeKind.RESOLVED)
        else:
            await index(h.bus, resolved, ChangeKind.RESOLVED)
        async with Harness(fast(policy, cooldown_s=1e6), c, store, bus=h.bus) as again:
            await again.until(lambda: plans(again, "inc-1")[-1:] in (["completed"], ["escalated"]))
            await again.until(lambda: "inc-1" not in again.svc.tasks)
        assert not c.nodes["n1"].cordoned and c.nodes["n1"].gpu_resets == {}
        assert again.svc.guards.cooled == {} and again.svc.guards.holds == {}

    async def test_a_cooldown_cordon_whose_incident_went_stale_meanwhile_is_left_to_a_human_and_forgotten(
            self, policy: Policy) -> None:
        """Found stale (or escalated) at take-up: nothing returns the node automatically, and the guard state
        forgets the entry rather than carrying it for ever."""
        c, store = one_node(), MemoryStore()
        h, inc = await cordoned_by_the_cooldown(policy, c, store)
        await index(h.bus, inc.model_copy(update={"status": IncidentStatus.STALE, "version": 2}), ChangeKind.STATUS)
        async with Harness(fast(policy, cooldown_s=1e6), c, store, bus=h.bus) as again:
            await asyncio.sleep(0.5)  # the guard state loaded and the index read (take-up)
            assert again.svc.guards.cooled == {}
        assert c.nodes["n1"].cordoned, "a human decides"
