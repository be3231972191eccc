"""Plans that follow their incident, through the service on the in-memory bus: an unknown fault that joins a plan
in flight stops it at its next step (no reset, reboot or return afterwards) and the cautious plan runs; the step
gate refuses a reset, reboot or reprovision for an incident now unknown; a deferred repair's wait ends when a worse
fault joins; a human release validates what the fault touched, at its level."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from breakfix.bus.codec import encode
from breakfix.bus.memory import MemoryBus
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.model import coalesce
from breakfix.remediator.actuator import StepResult
from breakfix.remediator.app import companion_codes
from breakfix.remediator.decide import decide
from breakfix.remediator.policy import Policy
from breakfix.remediator.records import PlanBook, PlanRecord, Progress
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.remediator.store import MemoryStore
from breakfix.schemas import subjects
from breakfix.schemas.catalog import default_catalog
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ChangeKind,
    Incident,
    IncidentScope,
    IncidentStatus,
    StepAction,
    WaitingOn,
)
from breakfix.schemas.signal import Signal
from tests.conftest import T0, sig
from tests.test_remediator_service import Harness, fast, incident, index


class Held(SimCluster):
    """Ten nodes; the named actions take until the test lets them finish (a step in flight)."""

    def __init__(self, *held: str, **kw: Any) -> None:
        super().__init__({f"n{i}": SimNode(f"n{i}", pods={"ml/p": 2, "ml/q": 1}) for i in range(1, 11)}, **kw)
        self.started = {a: asyncio.Event() for a in held}
        self.finish = {a: asyncio.Event() for a in held}

    async def _hold(self, action: str) -> None:
        if action in self.started:
            self.started[action].set()
            await self.finish[action].wait()

    async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
        await self._hold("drain_gpu")
        return await super().drain_gpu(node, gpu, incident=incident, pods=pods)

    async def _validate(self, node: str, gpu: int | None, level: int, *, incident: str) -> StepResult:
        await self._hold("validate")
        return await super()._validate(node, gpu, level, incident=incident)


def plans(h: Harness, rule: str | None = None) -> list[str]:
    return [r.outcome.value for r in h.records() if r.kind is ActionKind.PLAN and rule in (None, r.rule)]


def steps(c: SimCluster) -> list[str]:
    return [x[0] for x in c.history]


def unknown(first: Incident, version: int = 2) -> Incident:
    """The same incident once an unknown code joined it: the correlator makes it an unknown fault."""
    return first.model_copy(update={"category": "unknown_fault", "codes": (*first.codes, "xid:173"),
                                    "version": version})


async def at_step(h: Harness, c: Held, step: str) -> Incident:
    """Open the XID 48 incident and wait until its plan's ``step`` has started (and is held there)."""
    first = incident()
    await h.open(first)
    await asyncio.wait_for(c.started[step].wait(), 5)
    return first


async def joins(h: Harness, later: Incident) -> None:
    """Publish the incident's update and wait until the service handled it."""
    handled = h.svc.stats.handled
    await h.open(later, ChangeKind.UPDATED)
    await h.until(lambda: h.svc.stats.handled > handled)


class TestAnUnknownFaultStopsThePlanInFlight:
    async def test_an_unknown_fault_after_the_drain_started_stops_the_reset_and_the_node_is_fenced_and_paged(
            self, policy: Policy) -> None:
        c = Held("drain_gpu")
        async with Harness(fast(policy), c) as h:
            first = await at_step(h, c, "drain_gpu")
            await joins(h, unknown(first))
            await asyncio.sleep(0.05)
            assert not any(r.action is StepAction.DRAIN_GPU and r.outcome is ActionOutcome.SUCCEEDED
                           for r in h.records()), "the drain in flight is not cut off"
            c.finish["drain_gpu"].set()
            await h.until(lambda: "escalated" in plans(h, "unknown-fault"))
        assert c.nodes["n1"].gpu_resets == {} and c.nodes["n1"].reboots == 0 and "return_to_service" not in steps(c)
        assert c.nodes["n1"].cordoned and c.escalations, "fenced, and a human is paged"
        assert any(r.action is StepAction.DRAIN_GPU and r.outcome is ActionOutcome.SUCCEEDED for r in h.records())
        stopped = next(r for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED)
        assert stopped.rule == "gpu-reset" and "unknown-fault never resets, reboots or reprovisions" in stopped.reason
        assert list(h.svc.guards.holders("n1", besides="-")) == ["inc-1"], "the node stays held for a human"

    @pytest.mark.parametrize(("validation_fails", "never"), [
        (False, ("return_to_service",)),
        (True, ("drain", "reboot")),
    ], ids=["a-passed-validation-does-not-return-the-node", "a-failed-validation-does-not-climb-to-a-reboot"])
    async def test_an_unknown_fault_during_validation_stops_the_ladder_whatever_ran(
            self, policy: Policy, validation_fails: bool, never: tuple[str, ...]) -> None:
        c = Held("validate", failing_validation={"n1"} if validation_fails else set())
        async with Harness(fast(policy, retry_caps={}), c) as h:
            first = await at_step(h, c, "validate")
            await joins(h, unknown(first))
            c.finish["validate"].set()
            await h.until(lambda: "escalated" in plans(h, "unknown-fault"))
        assert c.nodes["n1"].gpu_resets == {2: 1}, "the reset had run already"
        assert not set(never) & set(steps(c)) and c.nodes["n1"].reboots == 0 and c.nodes["n1"].cordoned
        assert plans(h, "gpu-reset") == ["planned", "cancelled"]

    async def test_an_approved_reprovision_is_refused_once_the_incident_is_unknown(self, policy: Policy) -> None:
        c = SimCluster({"n1": SimNode("n1")}, failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            first = incident()
            await h.open(first)
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            await joins(h, unknown(first, version=5))
            await h.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await h.until(lambda: "escalated" in plans(h, "unknown-fault"))
        assert c.nodes["n1"].reprovisions == 0 and c.nodes["n1"].cordoned and c.escalations
        # resumed by the approval with an incident that turned unknown meanwhile: re-decided before any step
        # (planrun.behind); the step gate would refuse the reprovision too (guards.step_check)
        stopped = next(r for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED)
        assert stopped.rule == "gpu-reset" and "unknown-fault never resets, reboots or reprovisions" in stopped.reason


class TestADeferredRepairFollowsItsIncident:
    @pytest.mark.parametrize(("category", "code", "severity", "rule", "done"), [
        ("node_reboot_required", "xid:154", Severity.FATAL, "node-reboot", "completed"),
        ("gpu_reset_required", "xid:48", Severity.CRITICAL, "gpu-reset", "completed"),
        ("hardware_support", "row_remap.failure", Severity.CRITICAL, "hardware-escalation", "escalated"),
    ], ids=["xid154-reboots-now", "xid48-resets-now", "failed-remap-fences-and-pages-now"])
    async def test_a_worse_fault_ends_the_wait_for_an_idle_gpu_and_the_new_plan_runs_at_once(
            self, policy: Policy, category: str, code: str, severity: Severity, rule: str, done: str) -> None:
        c = SimCluster({f"n{i}": SimNode(f"n{i}", pods={"ml/p": 2}) for i in range(1, 11)})
        job_runs = asyncio.Event()
        polls: list[int] = []

        async def busy(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            polls.append(gpu)
            if len(polls) > 1:
                await job_runs.wait()  # the job on the GPU runs on: never idle in this test
            return False

        c.gpu_idle = busy  # type: ignore[method-assign]
        async with Harness(fast(policy, cooldown_s=0), c, companion=companion_codes(default_catalog())) as h:
            remap = incident(codes=("row_remap.pending",), severity=Severity.WARNING)
            await h.open(remap)
            await h.until(lambda: any(r.waiting is WaitingOn.IDLE for r in h.records()))
            deadline = h.svc.guards.defer_until["inc-1@0"]
            await joins(h, remap.model_copy(update={"category": category, "codes": ("row_remap.pending", code),
                                                    "severity": severity, "version": 2}))
            await h.until(lambda: done in plans(h, rule))
            assert h.svc.guards.defer_until["inc-1@0"] == deadline, "the stored deadline is kept"
        ended = next(r for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED)
        assert ended.rule == "gpu-reset-when-idle" and ended.details == {"wait_ended": "incident_changed"}
        assert ended.reason.startswith("the wait for the GPU to go idle ended because the incident changed: "
                                       f"re-decided: {rule}")
        assert "cordon" in steps(c) and plans(h, "gpu-reset-when-idle") == ["cancelled"]

    @pytest.mark.parametrize(("category", "first", "joined"), [
        ("application_fault", "xid:94", "xid:45"),
        ("gpu_reset_required", "row_remap.pending", "xid:63"),
        ("gpu_reset_required", "row_remap.pending", "xid:92"),
        ("gpu_reset_required", "row_remap.pending", "ecc.sbe"),
    ], ids=["xid45-joins-xid94", "xid63-joins-a-pending-remap", "xid92-joins-a-pending-remap",
            "a-corrected-ecc-error-joins-a-pending-remap"])
    async def test_a_sympathetic_companion_keeps_the_wait(self, policy: Policy, category: str, first: str,
                                                          joined: str) -> None:
        c = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})})
        idle = asyncio.Event()
        polls: list[int] = []

        async def until_idle(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            polls.append(gpu)
            if len(polls) == 1:
                return False  # busy when the wait starts: it polls on (and an update may end it)
            await idle.wait()
            return True

        c.gpu_idle = until_idle  # type: ignore[method-assign]
        async with Harness(fast(policy, cooldown_s=0), c, companion=companion_codes(default_catalog())) as h:
            deferred = incident(category=category, codes=(first,), severity=Severity.WARNING)
            await h.open(deferred)
            await h.until(lambda: "inc-1" in h.svc.waits and len(polls) > 1)
            await joins(h, deferred.model_copy(update={"codes": (first, joined), "version": 2}))
            await asyncio.sleep(0.05)
            assert c.history == [] and plans(h) == [], "still waiting for the GPU's job"
            idle.set()
            await h.until(lambda: "completed" in plans(h))
        assert c.nodes["n1"].gpu_resets == {2: 1}


class TestReleaseValidation:
    async def test_a_release_of_an_rma_fault_on_two_gpus_validates_the_whole_node_at_level_3(
            self, policy: Policy) -> None:
        c = SimCluster({f"n{i}": SimNode(f"n{i}") for i in range(1, 11)})
        async with Harness(fast(policy), c) as h:
            rma = incident(category="hardware_support").model_copy(update={"gpus": (GpuRef(index=1),
                                                                                    GpuRef(index=5))})
            await h.open(rma)
            await h.until(lambda: "escalated" in plans(h))
            await h.human("release", reason="baseboard replaced")
            await h.until(lambda: "completed" in plans(h, "human-release"))
        assert [x for x in c.history if x[0] == "validate"] == [("validate", "n1", "3")]
        assert not c.nodes["n1"].cordoned


class SlowView(Held):
    """``view`` waits while ``block`` is set: the cluster listing is slow (the service's cache expired)."""

    def __init__(self, *held: str, **kw: Any) -> None:
        super().__init__(*held, **kw)
        self.block = False
        self.listing = asyncio.Event()
        self.listed = asyncio.Event()

    async def view(self) -> Any:
        if self.block:
            self.listing.set()
            await self.listed.wait()
        return await super().view()


class TestTheRaceWithTheLastStep:
    async def test_a_plan_that_completes_while_the_update_is_decided_is_followed_by_the_cautious_plan(
            self, policy: Policy) -> None:
        c = SlowView("validate")
        async with Harness(fast(policy), c) as h:
            first = await at_step(h, c, "validate")
            c.block, h.svc._view_cache = True, None  # the next listing is slow: the update waits for it
            await h.open(unknown(first), ChangeKind.UPDATED)
            await asyncio.wait_for(c.listing.wait(), 5)
            c.finish["validate"].set()  # the plan's last steps complete while the update waits for the view
            await h.until(lambda: "completed" in plans(h, "gpu-reset"))
            c.block = False
            c.listed.set()
            await h.until(lambda: "escalated" in plans(h, "unknown-fault"))
        assert c.nodes["n1"].cordoned and c.escalations, "the unknown fault fences the node again and pages"
        assert h.svc.executor._stops == {} and "inc-1" not in h.svc.redo


class TestAResumedPlanFollowsItsIncident:
    async def test_a_plan_resumed_after_its_incident_turned_unknown_stops_and_the_node_is_fenced_and_paged(
            self, policy: Policy) -> None:
        c = Held("validate")
        bus, store = MemoryBus(), MemoryStore()
        first = incident()
        plan = decide(first, await c.view(), fast(policy))
        await PlanBook(store).put(PlanRecord(incident=first, plan=plan,  # stopped (or lost its lease) at validate
                                             progress=Progress(incident=first.id, attempt=0, rung=0, step=3)), None)
        await index(bus, unknown(first), ChangeKind.UPDATED)  # the incident turned unknown while no replica led
        c.finish["validate"].set()
        async with Harness(fast(policy), c, store, bus) as h:
            await h.until(lambda: "escalated" in plans(h, "unknown-fault"))
        assert "validate" not in steps(c) and "return_to_service" not in steps(c), "the stale plan ran no further step"
        assert c.nodes["n1"].cordoned and c.escalations, "fenced, and a human is paged"
        assert plans(h, "gpu-reset") == ["cancelled"]
        assert list(h.svc.guards.holders("n1", besides="-")) == ["inc-1"], "the node stays held for a human"


class TestAStoppedPlanWhoseReplacementHasNothingToDo:
    async def test_an_incident_resolved_after_its_plan_stopped_returns_the_node_validated(
            self, policy: Policy) -> None:
        c = Held("validate")
        async with Harness(fast(policy), c) as h:
            first = await at_step(h, c, "validate")
            await joins(h, unknown(first))
            handled = h.svc.stats.handled
            await h.open(first.model_copy(update={"status": IncidentStatus.RESOLVED, "version": 3,
                                                  "resolved_at": T0}), ChangeKind.RESOLVED)
            await h.until(lambda: h.svc.stats.handled > handled)
            c.finish["validate"].set()
            await h.until(lambda: "completed" in plans(h, "stopped-return"))
            await h.svc.idle()
        assert plans(h, "gpu-reset") == ["planned", "cancelled"] and plans(h, "unknown-fault") == []
        assert steps(c)[-2:] == ["validate", "return_to_service"] and not c.nodes["n1"].cordoned
        assert h.svc.guards.holders("n1", besides="-") == {} and h.svc.guards.active == {}, "held nor counted"


class TestAnIncidentFoldedIntoItsNodesIncident:
    """Three GPUs failing together become one node incident (multi-GPU rule): the GPU incidents opened before it fold
    in, and the node incident's plan has the node."""

    @pytest.mark.parametrize("members_first", [False, True], ids=["node-incident-first", "members-first"])
    async def test_the_gpu_plans_let_the_node_go_and_the_node_incidents_plan_returns_it(
            self, policy: Policy, members_first: bool) -> None:
        """``members_first``: one correlator batch touches GPU 1's incident, whose plan is in flight (an XID 63 joins
        its XID 48), before the third GPU opens the node incident, so GPU 1's folding is published before the node
        incident itself."""
        c = Held("drain_gpu")
        core = Correlator(default_catalog())
        async with Harness(fast(policy), c) as h:
            async def batch(*signals: Signal) -> list[str]:
                handled = h.svc.stats.handled
                changes = coalesce([ch for s in signals for ch in core.ingest(s, s.observed_at)])
                for ch in changes:
                    await h.bus.publish(subjects.incident_subject("c1"), encode(ch.to_wire(signals[-1].observed_at)),
                                        msg_id=f"{ch.incident.id}:{ch.incident.version}")
                await h.until(lambda: h.svc.stats.handled >= handled + len(changes))
                return [f"{ch.kind.value} {ch.incident.scope.value}" for ch in changes]

            await batch(sig(code="48", gpu_index=1))  # GPU 1's reset plan starts and drains
            await asyncio.wait_for(c.started["drain_gpu"].wait(), 5)
            await batch(sig(code="48", gpu_index=0, at=1))  # GPU 0's: admitted, holds the node, waits for the lock
            third = sig(code="48", gpu_index=2, at=2)  # one multi-GPU node incident takes all three
            order = await batch(sig(code="63", gpu_index=1, at=1.5), third) if members_first else await batch(third)
            assert (order[0] == "folded gpu") is members_first, order
            (node,) = [i for i in core.incidents.values() if i.parent is None]
            c.finish["drain_gpu"].set()
            await h.until(lambda: "completed" in plans(h, "multi-gpu-node"))
            await h.svc.idle()
        assert plans(h, "gpu-reset") == ["planned", "cancelled"], "the GPU plan in flight stopped at its next step"
        assert "reset_gpu" not in steps(c) and steps(c)[-1] == "return_to_service"
        assert not c.nodes["n1"].cordoned, "no folded GPU incident holds the node back from its return"
        assert set(h.svc.guards.holders("n1", besides="-")) <= {node.id}, "no folded incident holds the node"

    async def test_a_plan_resumed_after_its_incident_folded_while_no_replica_led_runs_no_further_step(
            self, policy: Policy) -> None:
        """The GPU plan stopped (a restart) before its reset; meanwhile the incident folded into a multi-GPU node
        incident. The next leader stops the resumed plan before its next step and the node incident has the node."""
        c = Held()
        bus, store = MemoryBus(), MemoryStore()
        first = incident()
        plan = decide(first, await c.view(), fast(policy))
        await PlanBook(store).put(PlanRecord(incident=first, plan=plan,  # at its reset_gpu step
                                             progress=Progress(incident=first.id, attempt=0, rung=0, step=3)), None)
        node = incident(iid="inc-node", category="multi_gpu_failure", members=(first.id,)).model_copy(
            update={"scope": IncidentScope.NODE, "gpus": ()})
        await index(bus, node)
        await index(bus, first.model_copy(update={"parent": node.id, "version": 2}), ChangeKind.FOLDED)
        async with Harness(fast(policy), c, store, bus) as h:
            await h.until(lambda: "cancelled" in plans(h, "gpu-reset"))
            await h.until(lambda: "completed" in plans(h, "multi-gpu-node"))
            await h.svc.idle()
        assert plans(h, "gpu-reset") == ["cancelled"], "the resumed GPU plan started no step"
        assert "reset_gpu" not in steps(c) and "reboot" in steps(c) and not c.nodes["n1"].cordoned
        assert set(h.svc.guards.holders("n1", besides="-")) <= {node.id}

    async def test_a_step_waiting_for_approval_is_cancelled_when_its_incident_folds(self, policy: Policy) -> None:
        """The GPU plan waits for approval of its reprovision rung; folded into a node incident, the wait ends and a
        late approval reprovisions nothing (the node incident's plan has the node)."""
        c = SimCluster({"n1": SimNode("n1")}, failing_resets={("n1", 2)}, failing_validation={"n1"})
        async with Harness(fast(policy, retry_caps={}), c) as h:
            first = incident()
            await h.open(first)
            await h.until(lambda: any(r.waiting is WaitingOn.APPROVAL for r in h.records()))
            node = incident(iid="inc-node", category="multi_gpu_failure", members=(first.id,)).model_copy(
                update={"scope": IncidentScope.NODE, "gpus": (), "status": IncidentStatus.ESCALATED})
            await h.open(node)
            await joins(h, first.model_copy(update={"parent": node.id, "version": 5}))
            await h.until(lambda: first.id not in h.svc.awaiting)
            await h.human("approve", incident=first.id, action=StepAction.REPROVISION, reason="RMA agreed")
            await asyncio.sleep(0.2)
            await h.svc.idle()
        assert c.nodes["n1"].reprovisions == 0
        cancelled = [r for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED]
        assert len(cancelled) == 1 and "folded into inc-node" in (cancelled[0].reason or "")
        assert first.id not in h.svc.guards.holders("n1", besides="-")
