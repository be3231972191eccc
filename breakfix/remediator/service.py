"""The remediator daemon: incident changes in, guarded plans carried out, audit records out.

Reads ``breakfix.incidents.>`` (durable ``remediator``) and ``breakfix.actions.>`` (approvals
and the breaker reset, durable ``remediator-control``). For each opened or reopened incident
that is not folded into another (``parent``, or a fabric incident's ``members``) it waits
``policy.settle_s`` for companion signals, runs the pure ``decide`` and the pure ``guards.check``
(budgets, breaker, cooldowns, retry caps, kill switches) and hands the plan to the ``Executor``.
A refusal is an audit record with its reason; budget and cooldown refusals are retried later.

Crash safety: plan progress and guard state live in the ``PlanStore`` (JetStream KV with
optimistic concurrency). On start the service resumes every plan the store says was running,
at the step it was on, with the same idempotency keys. With a ``LeaseElector`` only the lease
holder starts or resumes plans; a follower keeps its queue and takes over when it wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import structlog

from breakfix.bus.codec import decoder, encode
from breakfix.bus.consumer import ConsumerSpec, ConsumerStats, run_consumer
from breakfix.bus.protocol import Bus, Delivery
from breakfix.remediator.actuator import Actuator, StepResult
from breakfix.remediator.decide import decide
from breakfix.remediator.executor import Executor, Progress
from breakfix.remediator.guards import GuardState, check
from breakfix.remediator.metrics import Observers, RemediatorMetrics
from breakfix.remediator.policy import Policy
from breakfix.remediator.store import Conflict, MemoryStore, PlanStore, plan_key
from breakfix.remediator.view import ClusterView
from breakfix.schemas import subjects
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    Plan,
    StepAction,
)

log = structlog.get_logger("breakfix.remediator")
GUARDS_KEY = "guards"
BREAKER_RESET = "breaker-reset"
APPROVE = "approve"


class Elector(Protocol):
    leader: bool

    async def try_acquire(self) -> bool: ...


class RemediatorService:
    def __init__(self, bus: Bus, actuator: Actuator, policy: Policy, clock: Callable[[], datetime], *,
                 actor: str = "remediator", durable: str = "remediator", store: PlanStore | None = None,
                 elector: Elector | None = None, lease_renew_s: float = 5.0, retry_refused_s: float = 60.0,
                 view_ttl_s: float = 2.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.bus = bus
        self.actuator = actuator
        self.policy = policy
        self.clock = clock
        self.actor = actor
        self.durable = durable
        self.store: PlanStore = store or MemoryStore()
        self.elector = elector
        self.lease_renew_s = lease_renew_s
        self.retry_refused_s = retry_refused_s
        self.sleep = sleep
        self.latest: dict[str, Incident] = {}
        self.covered: dict[str, str] = {}
        self.started: set[tuple[str, int]] = set()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.node_locks: dict[str, asyncio.Lock] = {}
        self.stats = ConsumerStats()
        self.control_stats = ConsumerStats()
        self.guards = GuardState()
        self._guards_rev: int | None = None
        self.first_action_at: dict[str, datetime] = {}
        self._guards_lock = asyncio.Lock()
        self._guards_dirty = asyncio.Event()
        self._view_cache: tuple[float, ClusterView] | None = None
        self.view_ttl_s = view_ttl_s
        self.executor = Executor(actuator, self._publish_record, clock, actor=actor, soak=self._soak)
        self.observe = Observers(RemediatorMetrics(clock))  # metrics (+ notifier): remediator.metrics_serve
        self._leading = asyncio.Event()
        if elector is None:
            self._leading.set()

    # -- records and state ---------------------------------------------------------------------------
    async def _publish_record(self, rec: ActionRecord) -> None:
        self.observe.published(rec)
        if rec.kind is ActionKind.STEP and rec.outcome is ActionOutcome.STARTED:
            self.first_action_at.setdefault(rec.incident_id, rec.at)
            if rec.node and rec.action is not None and rec.action.disruptive:
                self.guards.record_action(rec.node, rec.action, rec.at)
                await self._save_guards()
        await self.bus.publish(subjects.action_subject(rec.cluster), encode(rec), msg_id=rec.id)

    async def _save_guards(self) -> None:
        """Ask the writer task to store the guard state soon (write-behind: many plans starting at
        once cost one write, not one each). Plans in flight are also in their own store entries, so
        ``_load`` rebuilds the active set even if the last write was lost in a crash."""
        self._guards_dirty.set()

    async def _guard_writer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waiter = asyncio.create_task(self._guards_dirty.wait(), name="remediator-guards-wait")
            stopper = asyncio.create_task(stop.wait(), name="remediator-guards-stop")
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self._guards_dirty.is_set():
                self._guards_dirty.clear()
                await self._write_guards()
                await asyncio.sleep(0.05)
        if self._guards_dirty.is_set():
            await self._write_guards()

    async def _write_guards(self) -> None:
        async with self._guards_lock:
            for _ in range(3):
                try:
                    self._guards_rev = await self.store.put(GUARDS_KEY, self.guards.to_dict(), self._guards_rev)
                    return
                except Conflict:
                    entry = await self.store.get(GUARDS_KEY)  # an ex-leader wrote last: ours is current, retry
                    self._guards_rev = entry.revision if entry else None
            log.error("guard_state_not_saved")

    async def _view(self) -> ClusterView:
        """The actuator's cluster view, reused for ``view_ttl_s``: listing every node and pod per
        incident would cost O(nodes) per decision in a storm."""
        now = time.monotonic()
        if self._view_cache is None or now - self._view_cache[0] > self.view_ttl_s:
            self._view_cache = (now, await self.actuator.view())
        return self._view_cache[1]

    async def _load(self) -> list[dict[str, Any]]:
        entry = await self.store.get(GUARDS_KEY)
        if entry is not None:
            self.guards, self._guards_rev = GuardState.from_dict(entry.value), entry.revision
        running = []
        for key in await self.store.keys("plan."):
            e = await self.store.get(key)
            if e is not None and e.value["progress"]["state"] in ("running", "awaiting_approval"):
                running.append(e.value)
                inc = e.value["incident"]
                if e.value["plan"]["domain"] == "operator" and inc.get("node"):
                    self.guards.start(inc["node"], inc["id"])  # the budget counts plans in flight
        return running

    def _refusal(self, inc: Incident, plan: Plan, why: str, guard: str) -> ActionRecord:
        return ActionRecord(id=f"refusal-{inc.id}-{inc.flaps}-{guard}-{int(self.clock().timestamp())}",
                            cluster=inc.cluster, incident_id=inc.id, kind=ActionKind.REFUSAL,
                            outcome=ActionOutcome.REFUSED, actor=self.actor, rule=plan.rule, reason=why,
                            node=inc.node, domain=plan.domain, details={"guard": guard}, at=self.clock())

    # -- incidents ---------------------------------------------------------------------------------
    async def on_change(self, change: IncidentChange, _msg: Delivery) -> None:
        self.observe.change(change)
        inc = change.incident
        prev = self.latest.get(inc.id)
        if prev is None or inc.version >= prev.version:
            self.latest[inc.id] = inc
        for member in inc.members:
            if inc.status.terminal:
                self.covered.pop(member, None)
            else:
                self.covered[member] = inc.id
        if change.kind not in (ChangeKind.OPENED, ChangeKind.REOPENED):
            return
        if change.kind is ChangeKind.OPENED and inc.domain.value == "operator" and self.guards.observe_open(
                inc.node, inc.first_seen, self.policy.guards.breaker, len((await self._view()).nodes)):
            log.error("breaker_tripped", reason=self.guards.breaker_reason)
            await self._save_guards()
            why = f"circuit breaker tripped: {self.guards.breaker_reason}"
            await self.actuator.escalate(None, why, incident=inc.id)
            page = ActionRecord(id=f"breaker-{inc.id}", cluster=inc.cluster, incident_id=inc.id, kind=ActionKind.STEP,
                                action=StepAction.ESCALATE, outcome=ActionOutcome.SUCCEEDED, actor=self.actor,
                                reason=f"circuit breaker tripped, automated operator actions stopped: "
                                       f"{self.guards.breaker_reason}; reset with 'breakfix breaker reset'",
                                details={"guard": "breaker"}, at=self.clock())
            await self._publish_record(page)
        attempt = (inc.id, inc.flaps)
        if attempt in self.started:
            return
        self.started.add(attempt)
        self._spawn(inc.id, inc.flaps, None)

    def _spawn(self, incident_id: str, attempt: int, resume: dict[str, Any] | None) -> None:
        name = f"remediate-{incident_id}-{attempt}"
        self.tasks[name] = asyncio.create_task(self._guarded(incident_id, attempt, resume), name=name)

    async def _guarded(self, incident_id: str, attempt: int, resume: dict[str, Any] | None) -> None:
        ilog = log.bind(incident=incident_id)
        try:
            await self._leading.wait()
            if resume is None:
                await self.sleep(self.policy.settle_s)
            while True:
                again = await self._remediate(incident_id, attempt, resume)
                if not again:
                    return
                await self.sleep(self.retry_refused_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ilog.error("remediation_crashed", error=repr(exc))

    async def _remediate(self, incident_id: str, attempt: int, resume: dict[str, Any] | None) -> bool:
        """One try; True when a guard said 'not now' and the same plan should be tried again later."""
        if resume is not None:
            inc = Incident.model_validate(resume["incident"])
            plan = Plan.model_validate(resume["plan"])
            progress = Progress.from_dict(resume["progress"])
        else:
            inc = self.latest[incident_id]
            if inc.status.terminal or inc.flaps != attempt:
                return False
            cover = inc.parent or self.covered.get(inc.id)
            if cover is not None:
                log.info("covered", incident=inc.id, by=cover)
                return False
            progress = None
        lock = self.node_locks.setdefault(inc.node or f"fabric:{inc.id}", asyncio.Lock())
        async with lock:
            view = await self._view()
            if resume is None:
                inc = self.latest.get(incident_id, inc)
                if inc.status.terminal:
                    return False
                plan = decide(inc, view, self.policy)
                refusal = check(inc, plan, self.guards, view, self.policy.guards, self.clock())
                if refusal is not None and not (plan.dry_run or plan.shadow):
                    await self._publish_record(self._refusal(inc, plan, refusal.reason, refusal.guard))
                    log.warning("refused", incident=inc.id, guard=refusal.guard, reason=refusal.reason)
                    return refusal.retry
            key = plan_key(inc.id)
            entry = await self.store.get(key)
            rev = entry.revision if entry else None

            async def save(p: Progress) -> None:
                nonlocal rev
                rev = await self.store.put(key, {"incident": inc.model_dump(mode="json"),
                                                 "plan": plan.model_dump(mode="json"),
                                                 "progress": p.to_dict()}, rev)

            operator = plan.domain.value == "operator" and inc.node is not None and not (plan.dry_run or plan.shadow)
            if operator:
                assert inc.node is not None
                self.guards.start(inc.node, inc.id)
                await self._save_guards()
            log.info("plan", incident=inc.id, node=inc.node, rule=plan.rule, rungs=[r.name for r in plan.rungs()],
                     resume=progress is not None)
            try:
                outcome = await self.executor.run(inc, plan, attempt=attempt, progress=progress, save=save)
            except Conflict:
                log.warning("plan_taken_over", incident=inc.id)  # another remediator owns it now
                return False
            if operator and outcome is not ActionOutcome.REFUSED:
                assert inc.node is not None
                self.guards.finish(inc.node, inc.id, self.clock())
                await self._save_guards()
            log.info("plan_done", incident=inc.id, outcome=outcome.value)
            return False

    async def _soak(self, inc: Incident) -> StepResult:
        """Capacity returns only after a quiet period with no new fault on the node/GPU."""
        before = self.latest.get(inc.id, inc).last_seen
        await self.sleep(self.policy.guards.soak_s)
        now = self.latest.get(inc.id, inc)
        if now.last_seen > before and now.open_faults:
            return StepResult(False, f"new fault during the {self.policy.guards.soak_s:g}s soak: "
                                     f"{', '.join(now.open_faults)}")
        return StepResult(True, f"quiet for {self.policy.guards.soak_s:g}s")

    # -- approvals and the breaker ------------------------------------------------------------------
    async def on_control(self, rec: ActionRecord, msg: Delivery) -> None:
        self.observe.control(rec, msg.subject)
        if rec.kind is not ActionKind.APPROVAL or rec.outcome is not ActionOutcome.APPROVED:
            return
        command = rec.details.get("command", "")
        if command == BREAKER_RESET:
            self.guards.reset_breaker()
            await self._save_guards()
            log.warning("breaker_reset", by=rec.actor, reason=rec.reason)
            return
        if command != APPROVE or rec.action is None:
            return
        entry = await self.store.get(plan_key(rec.incident_id))
        if entry is None or entry.value["progress"]["state"] != "awaiting_approval":
            return
        value = dict(entry.value)
        prog = Progress.from_dict(value["progress"])
        plan = Plan.model_validate(value["plan"])
        rung = plan.rungs()[prog.rung]
        if prog.step >= len(rung.steps) or rung.steps[prog.step].action is not rec.action:
            log.warning("approval_mismatch", incident=rec.incident_id, approved=rec.action.value)
            return
        prog.approved.append(f"{prog.rung}:{prog.step}")
        prog.state = "running"
        value["progress"] = prog.to_dict()
        try:
            await self.store.put(plan_key(rec.incident_id), value, entry.revision)
        except Conflict:
            return
        log.info("approved", incident=rec.incident_id, action=rec.action.value, by=rec.actor)
        resumed = await self.store.get(plan_key(rec.incident_id))
        if resumed is not None:
            self._spawn(rec.incident_id, prog.attempt, resumed.value)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def _lead(self, stop: asyncio.Event) -> None:
        assert self.elector is not None
        while not stop.is_set():
            try:
                leader = await self.elector.try_acquire()
            except Exception as exc:
                log.error("lease_failed", error=repr(exc))
                leader = False
            if leader and not self._leading.is_set():
                log.warning("leader", actor=self.actor)
                self._leading.set()
            elif not leader and self._leading.is_set():
                log.warning("not_leader", actor=self.actor)
                self._leading.clear()
                for t in self.tasks.values():  # stop acting at once; the new leader resumes from the store
                    t.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.lease_renew_s)

    async def idle(self) -> None:
        """Wait for every running plan (tests and the demo use this)."""
        while pending := [t for t in self.tasks.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_streams(subjects.STREAMS)
        for value in await self._load():
            prog = Progress.from_dict(value["progress"])
            if prog.state == "running":
                self.started.add((prog.incident, prog.attempt))
                log.warning("resuming", incident=prog.incident, rung=prog.rung, step=prog.step)
                self._spawn(prog.incident, prog.attempt, value)
        incidents = ConsumerSpec(subjects.INCIDENTS.name, self.durable, subjects.INCIDENTS_ALL,
                                 decoder(IncidentChange), self.on_change)
        control = ConsumerSpec(subjects.ACTIONS.name, f"{self.durable}-control", subjects.ACTIONS_ALL,
                               decoder(ActionRecord), self.on_control)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_consumer(self.bus, incidents, stop=stop, stats=self.stats),
                               name="remediator-incidents")
                tg.create_task(run_consumer(self.bus, control, stop=stop, stats=self.control_stats),
                               name="remediator-control")
                tg.create_task(self._guard_writer(stop), name="remediator-guards")
                if self.elector is not None:
                    tg.create_task(self._lead(stop), name="remediator-lease")
        finally:
            for t in self.tasks.values():
                t.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def approval_record(*, cluster: str, incident: str, action: StepAction | None, actor: str, reason: str,
                    command: str, at: datetime) -> ActionRecord:
    """What ``breakfix approve`` and ``breakfix breaker reset`` publish: an audited human decision."""
    return ActionRecord(id=f"approval-{command}-{incident}-{action.value if action else ''}-{int(at.timestamp())}",
                        cluster=cluster, incident_id=incident, kind=ActionKind.APPROVAL,
                        outcome=ActionOutcome.APPROVED, action=action, actor=actor, reason=reason,
                        details={"command": command}, at=at)


__all__ = ["APPROVE", "BREAKER_RESET", "RemediatorService", "approval_record"]
