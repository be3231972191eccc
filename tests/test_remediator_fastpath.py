"""The remediator's cheap paths write exactly what the full paths wrote: plan records whose incident and plan are
serialised once, decisions answered from memory, and guard checks and guard state answered from indexes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from breakfix.remediator.decide import decide
from breakfix.remediator.decisions import Decisions
from breakfix.remediator.policy import Policy
from breakfix.remediator.records import PlanBook, PlanRecord, Progress, ProgressState
from breakfix.remediator.store import Conflict, MemoryStore, plan_key
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    Domain,
    Incident,
    IncidentScope,
    Plan,
    StepAction,
)
from tests.conftest import T0


def incident(version: int = 1) -> Incident:
    return Incident(id="inc-7", cluster="c1", scope=IncidentScope.GPU, node="n1", nodes=("n1",),
                    gpus=(GpuRef(index=3),), category="gpu_reset_required", severity=Severity.CRITICAL,
                    codes=("xid:48",), first_seen=T0, last_seen=T0, version=version)


def view() -> ClusterView:
    return ClusterView(nodes={"n1": NodeView("n1", {"nvidia.com/gpu.product": "H100"})})


def saving(policy: Policy) -> tuple[MemoryStore, PlanBook, Incident, Plan, Any]:
    """A plan store, its book, one incident, its plan and the book's saver for it (from no revision)."""
    store = MemoryStore()
    book = PlanBook(store)
    inc = incident()
    plan = decide(inc, view(), policy)
    return store, book, inc, plan, book.saver(inc, plan, None)


class TestPlanSaver:
    async def test_saved_entries_equal_the_validated_plan_record_and_follow_revisions(self, policy: Policy) -> None:
        store, book, inc, plan, save = saving(policy)
        prog = Progress(incident=inc.id, attempt=0)
        await save(prog)
        prog.step, prog.state = 2, ProgressState.AWAITING_APPROVAL
        prog.approved.append("0:1")
        await save(prog)
        entry = await store.get(plan_key(inc.id))
        assert entry is not None
        assert entry.value == PlanRecord(incident=inc, plan=plan, progress=prog).model_dump(mode="json", by_alias=True)
        got = await book.get(inc.id)
        assert got is not None and got[0] == PlanRecord(incident=inc, plan=plan, progress=prog)

    async def test_a_saver_loses_to_another_writer_with_a_conflict(self, policy: Policy) -> None:
        _store, book, inc, plan, save = saving(policy)
        await save(Progress(incident=inc.id, attempt=0))
        rev = await book.revision(inc.id)
        await book.put(PlanRecord(incident=inc, plan=plan, progress=Progress(incident=inc.id, attempt=1)), rev)
        with pytest.raises(Conflict):
            await save(Progress(incident=inc.id, attempt=0, step=1))


class TestDecisions:
    def test_the_same_incident_view_and_policy_are_decided_once(self, policy: Policy) -> None:
        d = Decisions()
        inc, v = incident(), view()
        first = d.plan(inc, v, policy)
        assert d.plan(inc, v, policy) is first
        assert first == decide(inc, v, policy)
        assert d.decided == 1

    def test_a_new_incident_version_view_or_policy_decides_again(self, policy: Policy) -> None:
        d = Decisions()
        inc, v = incident(), view()
        d.plan(inc, v, policy)
        d.plan(incident(version=2), v, policy)
        d.plan(incident(version=2), view(), policy)
        dry = policy.model_copy(update={"dry_run": True})
        assert d.plan(incident(version=2), v, dry).dry_run
        assert d.decided == 4

    def test_forgotten_and_oldest_answers_leave_memory(self, policy: Policy) -> None:
        d = Decisions(cap=2)
        v = view()
        incs = [incident().model_copy(update={"id": f"inc-{i}"}) for i in range(3)]
        for inc in incs:
            d.plan(inc, v, policy)
        d.plan(incs[0], v, policy)  # pushed out by the cap: decided again
        assert d.decided == 4
        d.forget(incs[0].id)
        d.plan(incs[0], v, policy)
        assert d.decided == 5
        assert d.plan(incs[0], v, policy).domain is Domain.OPERATOR


class TestGuardIndexes:
    """The retry-cap count and the breaker's node count come from indexes; they answer as a full pass would."""

    def test_retry_cap_counts_equal_a_full_pass_through_records_and_prunes(self) -> None:
        import random

        from breakfix.remediator.guards import GuardState
        from breakfix.remediator.guardspec import GuardsSpec

        rnd = random.Random(7)
        state, spec = GuardState(), GuardsSpec(retry_window_s=600)
        for i in range(600):
            at = T0 + timedelta(seconds=rnd.randint(0, 3000))
            state.record_action(f"n{rnd.randint(0, 9)}", rnd.choice([StepAction.RESET_GPU, StepAction.REBOOT]), at)
            if i % 97 == 0:
                state.prune(T0 + timedelta(seconds=i * 5), spec)
            if i % 211 == 0:
                state = type(state).from_dict(state.to_dict())
            target, action = f"n{rnd.randint(0, 9)}", rnd.choice(["reset_gpu", "reboot"])
            since = T0 + timedelta(seconds=rnd.randint(0, 3000))
            assert state.executed(target, action, since) == sum(
                1 for t, a, when in state.actions if t == target and a == action and when >= since)

    def test_the_breaker_trips_when_a_full_pass_would(self) -> None:
        import random

        from breakfix.remediator.guards import GuardState
        from breakfix.remediator.guardspec import BreakerSpec

        rnd = random.Random(11)
        spec = BreakerSpec(window_s=60, min_nodes=3, max_percent=20)
        for _ in range(30):
            state, opens, tripped = GuardState(), [], None
            for _ in range(80):
                node, at = f"n{rnd.randint(0, 40)}", T0 + timedelta(seconds=rnd.randint(0, 400))
                opens.append((node, at))
                opens = [(n, t) for n, t in opens if t >= at - timedelta(seconds=60)]
                nodes = {n for n, _ in opens}
                want = tripped is None and len(nodes) >= 3 and 100 * len(nodes) / 50 > 20
                got = state.observe_open(node, at, spec, 50)
                assert got == want
                assert sorted(state.opens) == sorted(opens)
                if got:
                    tripped = at
                    assert state.breaker_reason.startswith(f"{len(nodes)} of 50 nodes")
                if rnd.random() < 0.05:
                    state.reset_breaker()
                    opens, tripped = [], None

    def test_the_stored_form_equals_a_full_conversion_as_the_state_changes(self) -> None:
        import random

        from breakfix.remediator.guards import GuardState
        from breakfix.remediator.guardspec import BreakerSpec, GuardsSpec

        def full(s: GuardState) -> dict[str, Any]:
            return {"actions": [[n, a, t.isoformat()] for n, a, t in s.actions],
                    "opens": [[n, t.isoformat()] for n, t in s.opens],
                    "finished": {n: [f.at.isoformat(), f.category, sorted(f.codes), f.severity]
                                 for n, f in s.finished.items()}}

        rnd = random.Random(3)
        state = GuardState()
        spec = GuardsSpec(retry_window_s=900, cooldown_s=300, breaker=BreakerSpec(window_s=120))
        for i in range(400):
            at = T0 + timedelta(seconds=i * 3 + rnd.randint(-30, 30))
            node = f"n{rnd.randint(0, 20)}"
            match rnd.randint(0, 5):
                case 0 | 1:
                    state.record_action(node, StepAction.REBOOT, at)
                case 2:
                    state.observe_open(node, at, spec.breaker, 100)
                case 3:
                    state.finish(node, "inc", at, incident().model_copy(update={"node": node}))
                case 4:
                    state.prune(at, spec)
                case _:
                    state.reset_breaker()
            stored = state.to_dict()
            assert {k: stored[k] for k in ("actions", "opens", "finished")} == full(state)
            assert GuardState.from_dict(stored) == state
