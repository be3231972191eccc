"""The remediator service on the in-memory bus: approvals, the breaker reset, shadow mode, soak,
refusals, resume from the store, and the provider hook against a real HTTP server."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from aiohttp import web

from breakfix.bus.clock import ManualClock
from breakfix.bus.codec import encode
from breakfix.bus.memory import MemoryBus
from breakfix.remediator.executor import Executor
from breakfix.remediator.human import human_record
from breakfix.remediator.policy import Policy
from breakfix.remediator.provider import ProviderHook
from breakfix.remediator.records import PlanBook, PlanRecord, Progress, ProgressState
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.remediator.store import MemoryStore, plan_key
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentScope,
    StepAction,
    WaitingOn,
)
from tests.conftest import T0


def incident(node: str = "n1", category: str = "gpu_reset_required", iid: str = "inc-1", **kw: Any) -> Incident:
    kw = {"codes": ("xid:48",), "severity": Severity.CRITICAL, **kw}
    return Incident(id=iid, cluster="c1", scope=IncidentScope.GPU, node=node, nodes=(node,), gpus=(GpuRef(index=2),),
                    category=category, first_seen=T0, last_seen=T0, **kw)


def fast(policy: Policy, **guards: Any) -> Policy:
    return policy.model_copy(update={"settle_s": 0.0, "guards": policy.guards.model_copy(
        update={"soak_s": 0.0, **guards})})


class Harness:
    def __init__(self, policy: Policy, cluster: SimCluster | None = None, store: MemoryStore | None = None,
                 bus: MemoryBus | None = None, clock: ManualClock | None = None, **service: Any) -> None:
        self.bus = bus or MemoryBus()
        self.cluster = cluster or SimCluster({f"n{i}": SimNode(f"n{i}", pods={"ml/p": 2}) for i in range(1, 11)})
        self.store = store or MemoryStore()
        self.clock = clock or ManualClock(T0)
        self.svc = RemediatorService(self.bus, self.cluster, policy, self.clock, cluster="c1", store=self.store,
                                     **{"retry_refused_s": 1.0, **service})
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Harness:
        await self.bus.ensure_streams(subjects.STREAMS)
        self.task = asyncio.create_task(self.svc.run(self.stop), name="test-remediator")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task

    async def open(self, inc: Incident, kind: ChangeKind = ChangeKind.OPENED) -> None:
        ch = IncidentChange(kind=kind, incident=inc, at=T0)
        await self.bus.publish(subjects.incident_subject("c1"), encode(ch), msg_id=f"{inc.id}:{kind}:{inc.version}")

    async def human(self, verb: str, incident: str = "inc-1", *, actor: str = "alice", reason: str = "ok",
                    subject: str | None = None, **kw: Any) -> None:
        subj, rec = human_record(verb=verb, cluster="c1", actor=actor, incident=incident, reason=reason,
                                 at=self.clock.now(), **kw)
        await self.bus.publish(subject or subj, encode(rec), msg_id=rec.id)

    def records(self) -> list[ActionRecord]:
        return [ActionRecord.model_validate_json(m.data) for m in self.bus.messages(subjects.ACTIONS.name)]

    async def until(self, pred: Any, within: float = 5.0) -> None:
        for _ in range(int(within / 0.01)):
            if pred():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached; records: " +
                             str([(r.kind.value, r.action.value if r.action else "", r.outcome.value)
                                  for r in self.records()]))


def reprovision_cluster() -> SimCluster:
    """One node whose GPU reset and validations fail, so the default plan climbs to its reprovision rung."""
    return SimCluster({"n1": SimNode("n1")}, failing_resets={("n1", 2)}, failing_validation={"n1"})


async def awaiting_reprovision(h: Harness) -> None:
    """Open the XID 48 incident and wait until its plan asks for approval to reprovision."""
    await h.open(incident())
    await h.until(lambda: any(r.kind is ActionKind.REFUSAL and r.action is StepAction.REPROVISION
                              for r in h.records()))


async def stopped_awaiting_reprovision(policy: Policy, cluster: SimCluster) -> tuple[MemoryStore, MemoryBus]:
    """A remediator that stopped while its plan waited for approval to reprovision: the store and bus it leaves."""
    store, bus = MemoryStore(), MemoryBus()
    async with Harness(fast(policy, retry_caps={}), cluster, store=store, bus=bus) as h:
        await awaiting_reprovision(h)
    return store, bus


async def approve_late(h: Harness, cluster: SimCluster) -> None:
    """Approve the reprovision (that would now succeed) after the plan waiting for it was ended."""
    cluster.failing_validation.clear()
    await h.human("approve", action=StepAction.REPROVISION, reason="too late")
    await asyncio.sleep(0.2)


def turned_unknown() -> Incident:
    """The XID 48 incident, version 2, after a code the catalog does not know joined it."""
    return incident(category="unknown_fault", codes=("xid:48", "xid:999"), version=2)


def escalated_as_unknown(h: Harness) -> bool:
    return any(r.kind is ActionKind.STEP and r.action is StepAction.ESCALATE and r.rule == "unknown-fault"
               for r in h.records())


def outcome_of_plan(h: Harness) -> list[str]:
    return [r.outcome.value for r in h.records() if r.kind is ActionKind.PLAN]


class Heard:
    """A listener (as the notifier is): what it heard, and whether each of the remediator's records was in the
    actions stream by then."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.records: list[tuple[str, str, bool]] = []  # (record id, subject, stored when heard)

    def change(self, change: IncidentChange) -> None:
        pass

    def record(self, rec: ActionRecord, subject: str) -> None:
        stored = any(m.subject == subject and ActionRecord.model_validate_json(m.data).id == rec.id
                     for m in self.bus.messages(subjects.ACTIONS.name))
        self.records.append((rec.id, subject, stored))


class TestObservers:
    async def test_listeners_hear_each_own_record_once_stored_and_the_control_consumer_reads_only_human_verbs(
            self, policy: Policy) -> None:
        async with Harness(fast(policy)) as h:
            heard = Heard(h.bus)
            h.svc.observe.listeners.append(heard)
            await h.open(incident())
            await h.until(lambda: any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.COMPLETED
                                      for r in h.records()))
            await h.human("cancel", incident="inc-none", reason="not ours")
            await h.until(lambda: h.svc.control_stats.handled == 1)
        own = [m for m in h.bus.messages(subjects.ACTIONS.name) if m.subject == subjects.action_subject("c1")]
        assert len(own) >= 5
        assert [(i, s) for i, s, _ in heard.records] == \
            [(ActionRecord.model_validate_json(m.data).id, m.subject) for m in h.bus.messages(subjects.ACTIONS.name)]
        assert all(stored for _, _, stored in heard.records)
        assert h.svc.control_stats.handled == 1  # the cancel; none of the remediator's own records came back


class TestPlanEntries:
    async def test_an_entry_from_an_incompatible_version_is_written_over_and_the_plan_runs(
            self, policy: Policy) -> None:
        store = MemoryStore()
        await store.put(plan_key("inc-1"), {"written_by": "an older release", "progress": 7}, None)
        async with Harness(fast(policy), store=store) as h:
            await h.open(incident())
            await h.until(lambda: any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.COMPLETED
                                      for r in h.records()))
        got = await PlanBook(store).get("inc-1")
        assert got is not None and got[0].progress.state is ProgressState.DONE


class TestApprovalsAndBreaker:
    async def test_approval_resumes_the_waiting_step(self, policy: Policy) -> None:
        cluster = reprovision_cluster()
        async with Harness(fast(policy, retry_caps={}), cluster) as h:
            await awaiting_reprovision(h)
            assert cluster.nodes["n1"].reprovisions == 0
            cluster.failing_validation.clear()
            await h.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await h.until(lambda: "completed" in outcome_of_plan(h))
        assert cluster.nodes["n1"].reprovisions == 1

    async def test_a_release_cancels_a_plan_awaiting_approval_so_a_later_approve_runs_nothing(
            self, policy: Policy) -> None:
        cluster = reprovision_cluster()
        async with Harness(fast(policy, retry_caps={}), cluster) as h:
            await awaiting_reprovision(h)
            await h.human("release", reason="repaired by hand", details={"skip_validation": "true"})
            await h.until(lambda: any(r.kind is ActionKind.STEP and r.action is StepAction.RETURN_TO_SERVICE
                                      and r.outcome is ActionOutcome.SUCCEEDED for r in h.records()))
            got = await PlanBook(h.store).get("inc-1")
            assert got is not None and got[0].progress.state is ProgressState.CANCELLED
            await approve_late(h, cluster)
        assert cluster.nodes["n1"].reprovisions == 0

    async def test_an_update_that_turns_the_incident_unknown_ends_the_approval_wait_and_the_cautious_plan_runs(
            self, policy: Policy) -> None:
        """A reprovision waits for approval; the incident turns into an unknown fault meanwhile. The wait ends at
        once (a cancelled plan record says why), the cautious plan pages, and a late approval reprovisions nothing."""
        cluster = reprovision_cluster()
        async with Harness(fast(policy, retry_caps={}), cluster) as h:
            await awaiting_reprovision(h)
            await h.open(turned_unknown(),
                         ChangeKind.UPDATED)
            await h.until(lambda: any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED
                                      and "waiting for approval will not run" in r.reason for r in h.records()))
            await h.until(lambda: escalated_as_unknown(h))
            got = await PlanBook(h.store).get("inc-1")
            assert got is not None and got[0].plan.rule == "unknown-fault"
            await approve_late(h, cluster)
        assert cluster.nodes["n1"].reprovisions == 0

    async def test_a_restarted_remediator_still_ends_an_approval_wait_the_incident_outgrew(
            self, policy: Policy) -> None:
        """The approval wait is known from the plan store after a restart (or a change of leader), so an update
        that comes afterwards re-decides it as well."""
        cluster = reprovision_cluster()
        store, bus = await stopped_awaiting_reprovision(policy, cluster)
        async with Harness(fast(policy, retry_caps={}), cluster, store=store, bus=bus) as again:
            await again.until(lambda: "inc-1" in again.svc.awaiting)
            await again.open(turned_unknown(),
                             ChangeKind.UPDATED)
            await again.until(lambda: escalated_as_unknown(again))
            await approve_late(again, cluster)
        assert cluster.nodes["n1"].reprovisions == 0

    async def test_an_incident_that_outgrew_its_approval_wait_while_the_remediator_was_down_is_re_decided(
            self, policy: Policy) -> None:
        """The index holds a newer version than the plan waiting for approval (it changed during the outage): the
        take-up re-decides it at once, as a live update would be, without waiting for the next change."""
        cluster = reprovision_cluster()
        store, bus = await stopped_awaiting_reprovision(policy, cluster)
        await index(bus, turned_unknown(),
                    ChangeKind.UPDATED)
        async with Harness(fast(policy, retry_caps={}), cluster, store=store, bus=bus) as again:
            await again.until(lambda: escalated_as_unknown(again))
        assert cluster.nodes["n1"].reprovisions == 0

    async def test_after_a_restart_a_late_category_change_keeps_the_approval_wait_of_a_plan_that_acted(
            self, policy: Policy) -> None:
        """The plan reset the GPU and rebooted before it asked to reprovision: a companion that changes the
        category (XID 63 with XID 48: drain-and-reset) does not re-decide it into a second reset, after a restart
        as before one."""
        cluster = reprovision_cluster()
        store, bus = await stopped_awaiting_reprovision(policy, cluster)
        async with Harness(fast(policy, retry_caps={}), cluster, store=store, bus=bus) as again:
            await again.until(lambda: "inc-1" in again.svc.awaiting)
            await again.open(incident(category="gpu_drain_reset_required", codes=("xid:48", "xid:63"), version=2),
                             ChangeKind.UPDATED)
            await asyncio.sleep(0.2)
            assert not any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED
                           for r in again.records())
            cluster.failing_validation.clear()
            await again.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await again.until(lambda: "completed" in outcome_of_plan(again))
        assert cluster.nodes["n1"].reprovisions == 1

    async def test_an_update_that_fits_the_same_plan_keeps_the_approval_wait(self, policy: Policy) -> None:
        cluster = reprovision_cluster()
        async with Harness(fast(policy, retry_caps={}), cluster) as h:
            await awaiting_reprovision(h)
            await h.open(incident(version=2, signal_count=5), ChangeKind.UPDATED)  # more of the same fault
            await asyncio.sleep(0.2)
            assert not any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.CANCELLED for r in h.records())
            cluster.failing_validation.clear()
            await h.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
            await h.until(lambda: "completed" in outcome_of_plan(h))
        assert cluster.nodes["n1"].reprovisions == 1

    async def test_breaker_refuses_until_an_audited_reset(self, policy: Policy) -> None:
        async with Harness(fast(policy)) as h:
            for i in range(1, 5):  # 4 of 10 nodes open operator incidents within the window: > 10%
                await h.open(incident(f"n{i}", iid=f"inc-{i}", category="node_reboot_required"))
            await h.until(lambda: any(r.details.get("guard") == "breaker" and r.kind is ActionKind.REFUSAL
                                      for r in h.records()))
            assert h.svc.guards.breaker_tripped_at is not None
            pages = [r for r in h.records() if r.kind is ActionKind.NOTIFICATION
                     and r.details.get("guard") == "breaker"]
            assert len(pages) == 1 and "breaker reset" in pages[0].reason, "the breaker pages once"
            assert not [r for r in h.records() if r.action is StepAction.ESCALATE], "no incident marked escalated"
            await h.human("breaker_reset", "-", actor="bob", reason="rack power restored")
            await h.until(lambda: h.svc.guards.breaker_tripped_at is None)

    async def test_budget_refusal_is_retried_until_capacity_frees(self, policy: Policy) -> None:
        from breakfix.remediator.guards import BudgetSpec

        async with Harness(fast(policy, budget=BudgetSpec(max_nodes=1, max_percent=0), topology_budgets=(),
                                cooldown_s=0)) as h:
            await h.open(incident("n1", iid="inc-1"))
            await h.open(incident("n2", iid="inc-2"))
            await h.until(lambda: outcome_of_plan(h).count("completed") == 2)
        assert any(r.details.get("guard") == "budget" for r in h.records()), "the second node waited its turn"


class TestModesAndSoak:
    async def test_shadow_rule_records_but_never_acts(self, policy: Policy) -> None:
        rules = tuple(r.model_copy(update={"shadow": r.name == "gpu-reset"}) for r in policy.rules)
        cluster = SimCluster({"n1": SimNode("n1")})
        records: list[ActionRecord] = []

        async def publish(r: ActionRecord) -> None:
            records.append(r)

        from breakfix.remediator.decide import decide
        plan = decide(incident(), await cluster.view(), policy.model_copy(update={"rules": rules}))
        out = await Executor(cluster, publish, ManualClock(T0), actor="t").run(incident(), plan)
        assert out is ActionOutcome.DRY_RUN and cluster.history == [] and all(r.dry_run for r in records)

    async def test_new_fault_during_soak_keeps_capacity_out(self, policy: Policy) -> None:
        cluster = SimCluster({"n1": SimNode("n1")})
        async with Harness(fast(policy), cluster) as h:
            async def soak(inc: Incident) -> Any:
                from breakfix.remediator.actuator import StepResult
                return StepResult(False, "new fault during the soak: xid@n1/gpu2")

            h.svc.executor.soak = soak
            await h.open(incident())
            await h.until(lambda: any(r.kind is ActionKind.REFUSAL for r in h.records()))
        fails = [r for r in h.records() if r.action is StepAction.RETURN_TO_SERVICE and r.outcome.value == "failed"]
        assert fails and "new fault during the soak" in fails[0].reason
        assert ("return_to_service", "n1") not in cluster.history


class TestResume:
    async def test_running_plan_in_the_store_resumes_at_its_step(self, policy: Policy) -> None:
        cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})})
        store = MemoryStore()
        from breakfix.remediator.decide import decide
        inc = incident()
        plan = decide(inc, await cluster.view(), fast(policy))
        await PlanBook(store).put(PlanRecord(incident=inc, plan=plan,
                                             progress=Progress(incident=inc.id, attempt=0, rung=0, step=3)), None)
        async with Harness(fast(policy), cluster, store) as h:
            await h.until(lambda: "completed" in outcome_of_plan(h))
        assert [h[0] for h in cluster.history] == ["validate", "return_to_service"], "no drain or reset again"


async def index(bus: MemoryBus, inc: Incident, kind: ChangeKind = ChangeKind.OPENED) -> None:
    """What the correlator puts in the index: an incident's latest IncidentChange under ``<cluster>.<incident>``."""
    await bus.kv_put(subjects.INCIDENT_INDEX_BUCKET, f"{inc.cluster}.{inc.id}",
                     encode(IncidentChange(kind=kind, incident=inc, at=T0)))


class StalledClock(ManualClock):
    """A manual clock on which a sleep of an hour or more never ends: the process stops during it."""

    async def sleep(self, seconds: float) -> None:
        if seconds >= 3600:
            await asyncio.Event().wait()
        await super().sleep(seconds)


class TestRestartTakesUpUnplannedIncidents:
    """An incident acked while it settled or waited on a guard has no plan record; a restart finds it in the index."""

    async def test_incident_settling_at_a_crash_is_planned_after_the_restart(self, policy: Policy) -> None:
        bus, store = MemoryBus(), MemoryStore()
        cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})})
        slow = fast(policy).model_copy(update={"settle_s": 3600.0})  # the manual clock never gets there
        inc = incident()
        await index(bus, inc)
        async with Harness(slow, cluster, store, bus=bus, clock=StalledClock(T0)) as h:
            await h.open(inc)
            await h.until(lambda: h.svc.stats.handled == 1 and "inc-1" in h.svc.tasks)
        assert outcome_of_plan(h) == [] and await PlanBook(store).get("inc-1") is None, "stopped while settling"
        async with Harness(fast(policy), cluster, store, bus=bus) as again:
            await again.until(lambda: "completed" in outcome_of_plan(again))
        assert again.svc.stats.handled == 0, "the opened change was acked before: nothing delivered it again"
        assert cluster.history[-1][0] == "return_to_service"

    async def test_budget_wait_at_a_crash_is_taken_up_again(self, policy: Policy) -> None:
        from breakfix.remediator.guards import BudgetSpec

        bus, store = MemoryBus(), MemoryStore()
        tight = fast(policy, budget=BudgetSpec(max_nodes=0, max_percent=0), topology_budgets=(), cooldown_s=0,
                     budget_wait_s=1e9)
        inc = incident()
        await index(bus, inc)
        async with Harness(tight, store=store, bus=bus) as h:
            await h.open(inc)
            await h.until(lambda: any(r.details.get("guard") == "budget" for r in h.records()))
        async with Harness(fast(policy, cooldown_s=0), store=store, bus=bus) as again:
            await again.until(lambda: "completed" in outcome_of_plan(again))

    async def test_a_budget_wait_counts_from_its_first_refusal_across_a_restart(self, policy: Policy) -> None:
        from breakfix.remediator.guards import BudgetSpec

        bus, store = MemoryBus(), MemoryStore()
        full = {"budget": BudgetSpec(max_nodes=0, max_percent=0), "topology_budgets": (), "cooldown_s": 0}
        inc = incident()
        await index(bus, inc)
        async with Harness(fast(policy, **full, budget_wait_s=100.0), store=store, bus=bus,
                           clock=StalledClock(T0), retry_refused_s=3600.0) as h:  # stops while it waits
            await h.open(inc)
            await h.until(lambda: any(r.details.get("guard") == "budget" for r in h.records()))
        before = len(h.records())
        later = ManualClock(T0 + timedelta(seconds=150))  # restarted past the limit of the wait begun at T0
        async with Harness(fast(policy, **full, budget_wait_s=100.0), store=store, bus=bus, clock=later) as again:
            await again.until(lambda: any("waited" in r.reason for r in again.records()))
        after = again.records()[before:]
        assert "waited 150s for remediation budget (limit 100s)" in after[0].reason, \
            "the first refusal after the restart goes to a human: the wait did not start over"

    async def test_a_reopened_incident_waits_for_budget_afresh(self, policy: Policy) -> None:
        from breakfix.remediator.guards import BudgetSpec
        from breakfix.schemas.incident import IncidentStatus

        full = {"budget": BudgetSpec(max_nodes=0, max_percent=0), "topology_budgets": (), "cooldown_s": 0}
        clock = ManualClock(T0)
        async with Harness(fast(policy, **full, budget_wait_s=10000.0), clock=clock) as h:
            inc = incident()
            await h.open(inc)
            await h.until(lambda: any(r.details.get("guard") == "budget" for r in h.records()))
            await h.open(inc.model_copy(update={"status": IncidentStatus.RESOLVED, "version": 2,
                                                "resolved_at": clock.now()}), ChangeKind.RESOLVED)
            await h.until(lambda: "inc-1" not in h.svc.tasks)
            clock.advance(20000)
            n = len(h.records())
            await h.open(inc.model_copy(update={"version": 3, "flaps": 1, "last_seen": clock.now()}),
                         ChangeKind.REOPENED)
            await h.until(lambda: any(r.details.get("guard") == "budget" for r in h.records()[n:]))
            first = next(r for r in h.records()[n:] if r.details.get("guard") == "budget")
        assert first.waiting is WaitingOn.BUDGET and "waited" not in first.reason, \
            "the flap before ended its wait; this one starts its own"

    async def test_a_deferred_repair_keeps_its_deadline_across_a_restart(self, policy: Policy) -> None:
        async def busy(node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
            return False  # the job on the GPU never ends: only the deadline lets the repair run

        cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})})
        cluster.gpu_idle = busy  # type: ignore[method-assign]
        bus, store = MemoryBus(), MemoryStore()
        remap = incident(iid="inc-remap", codes=("row_remap.pending",), severity=Severity.WARNING)
        await index(bus, remap)
        async with Harness(fast(policy, cooldown_s=0, idle_poll_s=3600), cluster, store, bus=bus,
                           clock=StalledClock(T0)) as h:  # stops while it waits for the job
            await h.open(remap)
            await h.until(lambda: any(r.waiting is WaitingOn.IDLE for r in h.records()))
        waiting = next(r for r in h.records() if r.waiting is WaitingOn.IDLE)
        deadline = T0 + timedelta(seconds=14400)
        assert deadline.isoformat() in waiting.reason and outcome_of_plan(h) == []
        restarted = deadline + timedelta(seconds=1)  # after the deadline set before the restart
        later = ManualClock(restarted)
        async with Harness(fast(policy, cooldown_s=0), cluster, store, bus=bus, clock=later) as again:
            await again.until(lambda: "completed" in outcome_of_plan(again))
        planned = next(r for r in again.records() if r.kind is ActionKind.PLAN and r.outcome.value == "planned")
        assert planned.at == restarted, "acted at once: the deadline set before the restart had passed"
        assert cluster.nodes["n1"].gpu_resets == {2: 1}

    async def test_planned_terminal_and_folded_incidents_are_left_alone(self, policy: Policy) -> None:
        from breakfix.remediator.decide import decide
        from breakfix.schemas.incident import IncidentStatus

        bus, store = MemoryBus(), MemoryStore()
        cluster = SimCluster({f"n{i}": SimNode(f"n{i}") for i in range(1, 101)})  # 3 openings stay under the breaker
        plan = decide(incident(), await cluster.view(), fast(policy))
        dry = plan.model_copy(update={"dry_run": True})
        await index(bus, incident("n1", iid="inc-dry-run", plan=dry))
        await index(bus, incident("n2", iid="inc-resolved", status=IncidentStatus.RESOLVED), ChangeKind.RESOLVED)
        await index(bus, incident("n3", iid="inc-folded", parent="fab-1"))
        await index(bus, incident("n4", iid="inc-other-cluster").model_copy(update={"cluster": "c2"}))
        recorded = incident("n5", iid="inc-recorded", plan=plan)
        await PlanBook(store).put(PlanRecord(incident=recorded, plan=plan, progress=Progress(
            incident=recorded.id, attempt=0, state=ProgressState.DONE)), None)
        await index(bus, recorded)
        await bus.kv_put(subjects.INCIDENT_INDEX_BUCKET, "c1.garbage", b"{not json")
        async with Harness(fast(policy), cluster, store, bus=bus) as h:
            await asyncio.sleep(0.2)
        assert h.records() == [] and cluster.history == [] and h.svc.tasks == {}

    async def test_openings_found_after_a_restart_still_trip_the_breaker(self, policy: Policy) -> None:
        """A rack lost power while the remediator was down: its openings (newer versions in the index than the
        opened changes waiting in the stream) count towards the breaker before any plan is admitted."""
        bus = MemoryBus()
        await bus.ensure_streams(subjects.STREAMS)
        for i in range(1, 5):  # 4 of 10 nodes within the window: over the breaker's 10 %
            inc = incident(f"n{i}", iid=f"inc-{i}", category="node_reboot_required")
            await bus.publish(subjects.incident_subject("c1"), encode(IncidentChange(
                kind=ChangeKind.OPENED, incident=inc, at=T0)), msg_id=f"{inc.id}:opened:0")
            await index(bus, inc.model_copy(update={"version": 2}), ChangeKind.UPDATED)
        async with Harness(fast(policy), bus=bus) as h:
            await h.until(lambda: h.svc.guards.breaker_tripped_at is not None)
            await h.until(lambda: len(h.svc.guards.queued) == 4)
        assert "completed" not in outcome_of_plan(h) and [a for a, *_ in h.cluster.history] == ["escalate"]
        assert len([r for r in h.records() if r.kind is ActionKind.NOTIFICATION]) == 1, "the breaker pages once"

    async def test_an_opened_change_delivered_after_its_take_up_does_not_run_the_plan_again(
            self, policy: Policy) -> None:
        bus, cluster = MemoryBus(), SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})})
        inc = incident()
        await index(bus, inc)
        async with Harness(fast(policy), cluster, bus=bus) as h:
            await h.until(lambda: "completed" in outcome_of_plan(h))
            await h.open(inc)  # the change that was never acked arrives after the take-up finished the plan
            await h.until(lambda: h.svc.stats.handled == 1)
            await asyncio.sleep(0.1)
        assert outcome_of_plan(h).count("planned") == 1
        assert [a for a, *_ in cluster.history].count("reset_gpu") == 1

    async def test_a_standby_takes_up_nothing_until_it_leads(self, policy: Policy) -> None:
        bus, lease = MemoryBus(), Lease()
        await index(bus, incident())
        async with Harness(fast(policy), bus=bus, elector=lease, lease_renew_s=0.05) as h:
            await asyncio.sleep(0.2)
            assert h.svc.tasks == {} and h.records() == [], "a standby neither admits nor acts"
            lease.leader = True
            await h.until(lambda: "completed" in outcome_of_plan(h))


class TestStoppedPlans:
    async def test_a_re_decided_plan_is_not_resumed_by_the_next_remediator(self, policy: Policy) -> None:
        """The plan a worse fault stopped is marked cancelled in the store at once: a restart before the new plan
        saves its own record must not resume the old, weaker one."""
        cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})}, hanging={"reset_gpu"})
        store = MemoryStore()
        first = incident()
        async with Harness(fast(policy), cluster, store) as h:
            await h.open(first)
            await h.until(lambda: any(x[0] == "reset_gpu" for x in cluster.history))
            await h.svc.stop_plan(first, "re-decided: node-reboot needs more than gpu-reset",
                                  outcome=ActionOutcome.CANCELLED, rule="gpu-reset")
            got = await PlanBook(store).get("inc-1")
            assert got is not None and got[0].progress.state is ProgressState.CANCELLED
        resets = [x[0] for x in cluster.history].count("reset_gpu")
        async with Harness(fast(policy), cluster, store, bus=h.bus) as again:
            await asyncio.sleep(0.2)
        assert [x[0] for x in cluster.history].count("reset_gpu") == resets and again.svc.tasks == {}


class Lease:
    """An elector whose answer the test sets."""

    def __init__(self, leader: bool = False) -> None:
        self.leader = leader

    async def try_acquire(self) -> bool:
        return self.leader


class TestResumeOnLeading:
    async def test_a_standby_resumes_the_stores_plans_only_once_it_leads(self, policy: Policy) -> None:
        from breakfix.remediator.decide import decide

        cluster, store = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})}), MemoryStore()
        inc = incident()
        plan = decide(inc, await cluster.view(), fast(policy))
        await PlanBook(store).put(PlanRecord(incident=inc, plan=plan,
                                             progress=Progress(incident=inc.id, attempt=0, rung=0, step=3)), None)
        lease = Lease()
        async with Harness(fast(policy), cluster, store, elector=lease, lease_renew_s=0.05) as h:
            await asyncio.sleep(0.2)
            assert cluster.history == [] and h.svc.tasks == {}, "a standby resumes nothing"
            lease.leader = True
            await h.until(lambda: "completed" in outcome_of_plan(h))
        assert [a for a, *_ in cluster.history] == ["validate", "return_to_service"]

    async def test_a_standby_consumes_nothing_and_the_leader_gets_the_change(self, policy: Policy) -> None:
        lease, store = Lease(), MemoryStore()
        async with Harness(fast(policy), store=store, elector=lease, lease_renew_s=0.05) as h:
            await h.open(incident())
            await asyncio.sleep(0.3)
            assert h.svc.stats.handled == 0 and h.records() == [], "a standby leaves the change to the leader"
            assert await store.get("guards") is None, "and saves no guard state of its own"
            lease.leader = True
            await h.until(lambda: "completed" in outcome_of_plan(h))

    async def test_a_change_after_the_lease_is_lost_waits_for_the_next_leader(self, policy: Policy) -> None:
        lease = Lease(leader=True)
        async with Harness(fast(policy), elector=lease, lease_renew_s=0.05) as h:
            await asyncio.sleep(0.1)
            lease.leader = False
            await asyncio.sleep(0.2)
            await h.open(incident())
            await asyncio.sleep(0.3)
            assert h.svc.stats.handled == 0 and h.svc.tasks == {} and h.records() == []
            lease.leader = True
            await h.until(lambda: "completed" in outcome_of_plan(h))

    async def test_a_plan_cancelled_by_a_lost_lease_is_resumed_when_the_lease_comes_back(self, policy: Policy) -> None:
        cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})}, hanging={"reset_gpu"})
        lease = Lease(leader=True)
        async with Harness(fast(policy), cluster, elector=lease, lease_renew_s=0.05) as h:
            await h.open(incident())
            await h.until(lambda: any(x[0] == "reset_gpu" for x in cluster.history))
            lease.leader = False
            await h.until(lambda: h.svc.tasks == {})  # losing the lease cancels the plan
            cluster.hanging.clear()
            lease.leader = True
            await h.until(lambda: "completed" in outcome_of_plan(h))


class TestTakeUpAfterReDecision:
    async def test_a_re_decided_incident_whose_new_plan_had_not_started_is_planned_after_a_restart(
            self, policy: Policy) -> None:
        """The old plan's record says cancelled (a re-decision) and the new plan never saved one: a restart plans
        the incident again, as it now stands."""
        from breakfix.remediator.decide import decide

        bus, store = MemoryBus(), MemoryStore()
        cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})})
        old = incident()
        await PlanBook(store).put(PlanRecord(incident=old, plan=decide(old, await cluster.view(), fast(policy)),
                                             progress=Progress(incident=old.id, attempt=0,
                                                               state=ProgressState.CANCELLED)), None)
        worse = old.model_copy(update={"category": "node_reboot_required", "codes": ("xid:48", "xid:154"),
                                       "severity": Severity.FATAL, "version": 3})
        await index(bus, worse, ChangeKind.UPDATED)
        async with Harness(fast(policy), cluster, store, bus=bus) as h:
            await h.until(lambda: "completed" in outcome_of_plan(h))
        assert [r.rule for r in h.records() if r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.PLANNED] \
            == ["node-reboot"] and cluster.nodes["n1"].reboots == 1


class TestProvider:
    async def test_webhook_post_then_poll_until_done(self) -> None:
        polls = {"n": 0}

        async def create(req: web.Request) -> web.Response:
            body = await req.json()
            assert body == {"node": "n1", "reason": "breakfix inc-1", "incident": "inc-1"}
            return web.json_response({"id": "job-7"}, status=202)

        async def status(req: web.Request) -> web.Response:
            polls["n"] += 1
            return web.json_response({"state": "done" if polls["n"] >= 3 else "running"})

        app = web.Application()
        app.add_routes([web.post("/reprovision", create), web.get("/reprovision/{id}", status)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            hook = ProviderHook(f"http://127.0.0.1:{port}/reprovision", poll_s=1.0, clock=ManualClock(T0))
            result = await hook.reprovision("n1", reason="breakfix inc-1", incident="inc-1")
            down = await ProviderHook("http://127.0.0.1:9/x", timeout_s=1).reprovision("n1", reason="r", incident="i")
        finally:
            await runner.cleanup()
        assert result.ok and result.evidence["provider_job"] == "job-7" and polls["n"] == 3
        assert not down.ok and "unreachable" in down.detail


def test_human_record_names_its_user_in_the_subject() -> None:
    subject, rec = human_record(verb="approve", cluster="c1", incident="inc-1", action=StepAction.REPROVISION,
                                actor="alice", reason="ok", at=T0 + timedelta(seconds=1))
    assert subject == "breakfix.actions.c1.oncall.alice.approve"
    assert rec.kind is ActionKind.APPROVAL and rec.outcome is ActionOutcome.APPROVED and rec.actor == "alice"
