"""The remediator daemon: incident changes in, guarded plans carried out, audit records out.

Reads ``breakfix.incidents.>`` (durable ``remediator``) and the human verbs on
``breakfix.actions.<cluster>.oncall|admin.<user>.<verb>`` (durable ``remediator-control``, handled by
``remediator.human``). For each opened or reopened incident that is not folded into another it waits
``policy.settle_s`` for companion signals, runs the pure ``decide`` and ``guards.check`` and hands
the plan to the ``Executor``. A plan follows its incident: when later signals change the category
before anything disruptive ran, or make the required action more severe, it is re-decided; when they turn it
into an unknown fault (or a category whose plan never resets, reboots or reprovisions), the plan stops at its
next step whatever it ran, and the cautious plan replaces it (``follow.turns_cautious``). A deferred repair
waiting for its GPU to go idle is decided again at once when the incident changes so that another plan fits
(``remediator.deferral``, ``follow.wait_ends``).

Refusals fence and page (retry cap, kill switch, a budget wait past ``budget_wait_s``), wait and retry
(cooldown, budget) or queue until ``breakfix breaker reset`` (breaker); every wait is published as
``ActionRecord.waiting``. Plan progress (``records``) and guard state (``keeper``) live in the
``PlanStore``, so a restart resumes each running plan at its step, and takes up again the open incidents
that had no plan yet (``remediator.reconcile``, from the incident index); with a ``LeaseElector`` only the
lease holder starts or resumes plans.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import structlog

from breakfix.bus.clock import Clock
from breakfix.bus.codec import encode
from breakfix.bus.consumer import ConsumerStats, Redeliver
from breakfix.bus.protocol import Bus, Delivery
from breakfix.remediator import deferral as deferral_wait
from breakfix.remediator import planrun
from breakfix.remediator.actuator import Actuator, StepResult
from breakfix.remediator.audit import AuditWriter
from breakfix.remediator.breaker import page_breaker, page_stale_hold
from breakfix.remediator.decisions import Decisions
from breakfix.remediator.executor import Executor, keyed_digest
from breakfix.remediator.follow import (
    deferral,
    held_nodes,
    recurrence,
    redecision,
    takes_node,
    turns_cautious,
)
from breakfix.remediator.guards import GPU_ACTIONS, GuardState, step_check
from breakfix.remediator.keeper import GuardKeeper
from breakfix.remediator.leading import Elector, lead
from breakfix.remediator.locks import KeyedLocks
from breakfix.remediator.metrics import Observers, RemediatorMetrics
from breakfix.remediator.policy import Policy
from breakfix.remediator.reconcile import ATTEMPT_STRIDE
from breakfix.remediator.records import WAIT_ENDS, PlanBook, PlanRecord, ProgressState
from breakfix.remediator.store import Conflict, MemoryStore, PlanStore
from breakfix.remediator.terms import cancel_until_done, end_plans, serve
from breakfix.remediator.view import ClusterView
from breakfix.schemas import subjects
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    Incident,
    IncidentChange,
    IncidentStatus,
    Plan,
    Step,
    StepAction,
    WaitingOn,
)

log = structlog.get_logger("breakfix.remediator")


class RemediatorService:
    def __init__(self, bus: Bus, actuator: Actuator, policy: Policy, clock: Clock, *, cluster: str,
                 actor: str = "remediator", durable: str = "remediator", store: PlanStore | None = None,
                 elector: Elector | None = None, lease_renew_s: float = 5.0, retry_refused_s: float = 60.0,
                 view_ttl_s: float = 2.0, companion: Callable[[str], bool] = lambda _code: False,
                 max_incidents: int = 50_000, id_key: bytes = b"") -> None:
        from breakfix.remediator.human import HumanVerbs

        self.bus, self.actuator, self.policy, self.clock = bus, actuator, policy, clock
        self.cluster, self.actor, self.durable = cluster, actor, durable
        self.store: PlanStore = store or MemoryStore()
        self.book = PlanBook(self.store)
        self.audit = AuditWriter(bus)  # records out, many plans' in one round trip (remediator.audit)
        self.decisions = Decisions(max_incidents)  # decide() once per incident version (remediator.decisions)
        self.keeper = GuardKeeper(self.store, policy.guards, clock)
        self.elector, self.lease_renew_s, self.retry_refused_s = elector, lease_renew_s, retry_refused_s
        self.companion, self.max_incidents = companion, max_incidents
        self.latest: OrderedDict[str, Incident] = OrderedDict()  # LRU-bounded; finished ones forgotten
        self.covered: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}            # incident -> its one live task
        self.node_locks = KeyedLocks()                            # one plan at a time per node
        self.current: dict[str, tuple[Plan, str, int]] = {}       # incident -> (plan, category, attempt) in flight
        self.acted: set[str] = set()                              # incidents whose plan ran a disruptive step
        self.deferred: set[str] = set()                           # incidents whose deferred repair waited
        self.waits: dict[str, deferral_wait.IdleWait] = {}        # incidents whose deferred repair waits now
        self.redo: dict[str, int] = {}                            # incident -> attempt, once its plan stops at a step
        self.stopped: set[str] = set()                            # incidents whose plan stopped for a re-decision
        self.awaiting: dict[str, tuple[Plan, str, int]] = {}      # incident -> (plan, category, attempt) at approval
        self.taken_up: dict[str, int] = {}                        # incident -> version taken up from the index
        self.helpers: set[asyncio.Task[None]] = set()            # short guarded tasks (resume_after)
        self.stats, self.control_stats = ConsumerStats(), ConsumerStats()
        self._view_cache: tuple[float, ClusterView] | None = None
        self.view_ttl_s, self._swept = view_ttl_s, float("-inf")
        self.id_key = id_key  # record ids are HMACs with it (executor.record_id): no one else can squat them
        self.executor = Executor(actuator, self.publish, clock, actor=actor, soak=self._soak, gate=self._gate,
                                 holders=self._holders, idle_poll_s=policy.guards.idle_poll_s, id_key=id_key)
        self.human = HumanVerbs(self)
        self.observe = Observers(RemediatorMetrics(clock.now))  # metrics (+ notifier): remediator.metrics_serve
        self._leading = asyncio.Event()
        if elector is None:
            self._leading.set()

    @property
    def leading_event(self) -> asyncio.Event:
        """Set while this replica holds the lease (``remediator.leading``; always without an elector)."""
        return self._leading

    @property
    def leading(self) -> bool:
        """True while this replica holds the lease (always without one)."""
        return self._leading.is_set()

    @property
    def guards(self) -> GuardState:
        return self.keeper.state

    async def publish(self, rec: ActionRecord) -> None:
        self.observe.published(rec)
        if rec.kind is ActionKind.STEP and rec.outcome is ActionOutcome.STARTED and rec.node and rec.action \
                and rec.action.disruptive and not rec.dry_run:
            self.acted.add(rec.incident_id)
            gpu = rec.gpu.index if rec.gpu else None
            self.guards.record_action(f"{rec.node}/gpu{gpu}" if rec.action in GPU_ACTIONS else rec.node,
                                      rec.action, rec.at)
            self.keeper.save()
        subject = subjects.action_subject(rec.cluster)
        await self.audit.write(subject, encode(rec), rec.id)
        self.observe.stored(rec, subject)  # the notifier hears it once it is in the stream

    def record(self, inc: Incident, kind: ActionKind, outcome: ActionOutcome, reason: str, *, tag: str,
               waiting: WaitingOn | None = None, rule: str = "", details: dict[str, str] | None = None,
               action: StepAction | None = None) -> ActionRecord:
        now = self.clock.now()
        raw = f"{inc.id}-{inc.flaps}-{int(now.timestamp() * 1000)}"
        rid = f"{tag}-{keyed_digest(self.id_key, raw.encode())[:24]}" if self.id_key else f"{tag}-{raw}"
        return ActionRecord(id=rid, cluster=inc.cluster,
                            incident_id=inc.id, kind=kind, outcome=outcome, actor=self.actor, rule=rule,
                            reason=reason, node=inc.node, domain=Domain.OPERATOR, details=details or {},
                            waiting=waiting, action=action, at=now)

    async def view(self) -> ClusterView:
        """The actuator's cluster view, reused for ``view_ttl_s`` (listing every node per incident is O(nodes))."""
        if self._view_cache is None or self.clock.monotonic() - self._view_cache[0] > self.view_ttl_s:
            self._view_cache = (self.clock.monotonic(), await self.actuator.view())
        return self._view_cache[1]

    # -- incidents ---------------------------------------------------------------------------------
    async def on_change(self, change: IncidentChange, _msg: Delivery) -> None:
        if not self._leading.is_set():
            raise Redeliver  # the lease is gone: the new leader takes this change
        self.observe.change(change)
        inc = change.incident
        prev = self.latest.get(inc.id)
        opening = change.kind in (ChangeKind.OPENED, ChangeKind.REOPENED)
        if prev is not None and inc.version < prev.version:
            if opening:  # an opening counts even when a newer version is already known
                await self.observe_open(inc)
            return
        self.track(inc)
        if inc.status is IncidentStatus.RESOLVED and inc.id in self.guards.cooled:
            self.spawn(inc.id, inc.flaps * ATTEMPT_STRIDE, None, settle=False)  # its task returns the node
        elif inc.status is IncidentStatus.RESOLVED and inc.id not in self.current:
            self.release_resolved(inc)
        elif inc.status is IncidentStatus.STALE and prev is not None and prev.status is not IncidentStatus.STALE:
            await page_stale_hold(self, inc)
        if inc.status in WAIT_ENDS and (prev is None or prev.status not in WAIT_ENDS) and inc.id not in self.current:
            await self.end_approval_wait(inc)
        self._forget_old()
        if inc.parent is not None and (prev is None or prev.parent != inc.parent):
            await planrun.folded(self, inc)
        elif inc.members and (prev is None or prev.members != inc.members):
            await planrun.fold_members(self, inc)  # members whose folding came before this incident's own change
        if change.kind is ChangeKind.UPDATED:
            await self.maybe_redecide(inc)
        if inc.id in self.waits:
            await deferral_wait.end_if_changed(self, inc)
        if not opening:
            return
        await self.observe_open(inc)
        if self.taken_up.get(inc.id, -1) >= inc.version:
            return  # this opening was taken up from the index already (remediator.takeup)
        await self.admit(inc)

    async def observe_open(self, inc: Incident) -> None:
        """An opening or reopening whose plan takes operator actions on its node counts towards the circuit breaker
        (by the plan, not the incident's domain: an XID 94 is a tenant fault with an operator reset); page when it
        trips. A reopening counts when it happened (``last_seen``), not when the incident first opened."""
        if inc.node is None:
            return
        view = await self.view()
        if takes_node(self.decisions.plan(inc, view, self.policy, busy=self.guards.active)) and \
                self.guards.observe_open(inc.node, inc.last_seen if inc.flaps else inc.first_seen,
                                         self.policy.guards.breaker, len(view.nodes)):
            await page_breaker(self, inc)

    async def admit(self, inc: Incident) -> None:
        """Decide now, hold the node (a group incident: the members its plan fences) when the plan needs it, and
        start the incident's task (after the settle)."""
        plan = self.decisions.plan(inc, await self.view(), self.policy, busy=self.guards.active)
        nodes = held_nodes(plan, inc) if inc.parent is None and deferral(plan) is None else ()
        for node in nodes:
            self.guards.hold(node, inc.id, inc.category)  # from now on, no other plan returns this node
        if nodes:
            self.keeper.save()
        self.spawn(inc.id, inc.flaps * ATTEMPT_STRIDE, None)

    def release_resolved(self, inc: Incident) -> None:
        """Fixed (healthy signals, or its plan completed) and no plan of it running: it holds no node."""
        self.guards.unhold(inc.id)
        self.keeper.save()

    async def end_approval_wait(self, inc: Incident, *, why: str = "") -> None:
        """The incident resolved (or went stale, or folded into another whose plan has the node: ``why``) while a step
        of its plan waited for approval: the plan is cancelled, so neither a late approval nor a restart runs the step
        on a node with no open fault of its own."""
        self.awaiting.pop(inc.id, None)
        if await self.cancel_record(inc.id, only=ProgressState.AWAITING_APPROVAL):
            self.guards.stop(inc.id)  # its budget slot is free; a resolved incident's node hold went with it
            self.keeper.save()
            why = f"{why or f'{inc.id} is {inc.status.value}'}: the step waiting for approval will not run"
            log.warning("approval_wait_ended", incident=inc.id, status=inc.status.value, why=why)
            await self.publish(self.record(inc, ActionKind.PLAN, ActionOutcome.CANCELLED, why, tag="cancelled"))

    async def cancel_record(self, incident_id: str, *, only: ProgressState | None = None) -> bool:
        """Mark the incident's stored plan cancelled if it is live (and in state ``only``, when given), so no restart
        or new leader resumes it; True when it was."""
        for _ in range(2):
            try:
                got = await self.book.get(incident_id)
                if got is None or not got[0].progress.state.live or \
                        (only is not None and got[0].progress.state is not only):
                    return False
                got[0].progress.state = ProgressState.CANCELLED
                await self.book.put(got[0], got[1])
                return True
            except Conflict:
                continue  # another save landed in between: read it again
            except Exception as exc:  # the store did not answer: logged; the stop itself stands
                log.error("cancel_record_failed", incident=incident_id, error=repr(exc))
                return False
        log.warning("cancel_record_moved", incident=incident_id)  # another writer keeps moving it
        return False

    def resume_after(self, old: asyncio.Task[None], incident_id: str) -> None:
        """Resume the incident's stored plan once ``old`` (its task, finishing) is done: an approval that came
        while the task was still returning from its approval wait. A guarded task; the consumer does not wait."""
        async def later() -> None:
            try:
                await asyncio.wait({old})
                got = await self.book.get(incident_id)
                if got is not None and got[0].progress.state is ProgressState.RUNNING:
                    self.spawn(incident_id, got[0].progress.attempt, got[0])
            except Exception as exc:
                log.error("approval_resume_failed", incident=incident_id, error=repr(exc))
            finally:
                self.helpers.discard(task)

        task = asyncio.create_task(later(), name=f"resume-after-approval-{incident_id}")
        self.helpers.add(task)

    def track(self, inc: Incident) -> None:
        """Remember an incident's latest version and the members it covers."""
        self.latest[inc.id] = inc
        self.latest.move_to_end(inc.id)
        for member in inc.members:
            if inc.status.terminal:
                self.covered.pop(member, None)
            else:
                self.covered[member] = inc.id

    def _forget_old(self) -> None:
        """Finished incidents leave memory after ``retention_s``; the map is LRU-capped at ``max_incidents``."""
        horizon = self.policy.guards.retention_s
        now = self.clock.now()
        while len(self.latest) > self.max_incidents:
            self._forget(next(iter(self.latest)))
        if self.clock.monotonic() - self._swept < min(60.0, horizon / 10):
            return  # a sweep is O(incidents): at most once a minute
        self._swept = self.clock.monotonic()
        for iid in [i for i, inc in self.latest.items() if inc.status.terminal and i not in self.tasks
                    and (now - inc.last_seen).total_seconds() > horizon
                    and (inc.resolved_at is None or (now - inc.resolved_at).total_seconds() > horizon)]:
            self._forget(iid)

    def _forget(self, iid: str) -> None:
        inc = self.latest.pop(iid, None)
        self.covered = {m: c for m, c in self.covered.items() if c != iid and m != iid}
        self.acted.discard(iid)
        if self.guards.cooled.pop(iid, None) is not None:
            self.keeper.save()
        self.deferred.discard(iid)
        self.redo.pop(iid, None)
        self.stopped.discard(iid)
        self.awaiting.pop(iid, None)
        self.decisions.forget(iid)
        if self.guards.end_waits(iid):
            self.keeper.save()
        self.taken_up.pop(iid, None)
        if inc is not None and inc.status is IncidentStatus.RESOLVED:
            self.guards.forget(iid)  # an escalated incident keeps its hold until a human releases it

    async def maybe_redecide(self, inc: Incident) -> None:
        """A newer version of an incident whose plan is in flight or waits for an approval (a live update, or one the
        index had when a plan was resumed: ``remediator.takeup``): re-decide it (``follow.redecision``)."""
        held = self.current.get(inc.id)
        if held is None:
            if inc.id in self.awaiting:
                await planrun.redecide_awaiting(self, inc)
            return
        plan, category, attempt = held
        now = self.decisions.plan(inc, await self.view(), self.policy, busy=self.guards.active)
        why = redecision(plan, category, now, inc, inc.id in self.acted)
        if why is None:
            return
        log.warning("redecide", incident=inc.id, node=inc.node, old=plan.rule, why=why)
        if self.current.get(inc.id) is not held:
            # the plan ended (or another took over) while the view was read: nothing is left to stop, but the incident
            # as it is now is decided again (a plan that completed meanwhile left an unknown fault unhandled)
            if inc.id not in self.current:
                self.decide_again(inc.id, attempt + 1)
            return
        if turns_cautious(plan, category, now, inc):
            self.stop_at_step(inc.id, attempt, why)
            return
        await self.stop_plan(inc, why, outcome=ActionOutcome.CANCELLED, rule=plan.rule)
        self.spawn(inc.id, attempt + 1, None, settle=False)

    def decide_again(self, incident_id: str, attempt: int) -> None:
        """Run the incident's re-decided plan: in its task when that is still returning (``redo``), else a new one."""
        task = self.tasks.get(incident_id)
        if task is not None and not task.done():
            self.redo[incident_id] = attempt
        else:
            self.spawn(incident_id, attempt, None, settle=False)

    async def stop_plan(self, inc: Incident, why: str, *, outcome: ActionOutcome, rule: str,
                        waiting: WaitingOn | None = None) -> None:
        task = self.tasks.pop(inc.id, None)
        self.current.pop(inc.id, None)
        self.redo.pop(inc.id, None)
        if task is not None and task is not asyncio.current_task():
            await cancel_until_done(task)
        await self.cancel_record(inc.id)
        await self.publish(self.record(inc, ActionKind.PLAN, outcome, why, tag=outcome.value, rule=rule,
                                       waiting=waiting))

    def spawn(self, incident_id: str, attempt: int, resume: PlanRecord | None, *, settle: bool = True) -> None:
        if not self._leading.is_set():
            log.warning("spawn_skipped_not_leading", incident=incident_id)  # the next leader picks it up
            return
        old = self.tasks.get(incident_id)
        if old is not None and not old.done():
            return
        name = f"remediate-{incident_id}-{attempt}"
        self.awaiting.pop(incident_id, None)  # approved, resumed or re-decided: no step of it waits for approval now
        self.tasks[incident_id] = asyncio.create_task(self._guarded(incident_id, attempt, resume, settle), name=name)

    async def _guarded(self, incident_id: str, attempt: int, resume: PlanRecord | None, settle: bool) -> None:
        try:
            await self._leading.wait()
            if resume is None and settle:
                await self.clock.sleep(self.policy.settle_s)
            while True:
                while await self._remediate(incident_id, attempt, resume):
                    await self.clock.sleep(self.retry_refused_s)
                again = self.redo.pop(incident_id, None)  # its plan stopped at a step: the re-decided one runs now
                if again is None:
                    break
                attempt, resume = again, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("remediation_crashed", incident=incident_id, error=repr(exc))
        finally:
            if self.tasks.get(incident_id) is asyncio.current_task():
                del self.tasks[incident_id]
                self.redo.pop(incident_id, None)

    async def _remediate(self, incident_id: str, attempt: int, resume: PlanRecord | None) -> bool:
        """One try; True when a guard said 'not now' and the same incident should be tried again later."""
        if resume is None:
            inc = self.latest.get(incident_id)
            if inc is not None and inc.status is IncidentStatus.RESOLVED and inc.id in self.guards.cooled:
                return await planrun.return_cordoned(self, inc, attempt)
            if inc is not None and inc.id in self.stopped and \
                    (inc.status.terminal or inc.parent or self.covered.get(inc.id)):
                return await planrun.after_stop(self, inc, attempt)
            if inc is None or inc.status.terminal or inc.flaps * ATTEMPT_STRIDE > attempt:
                return False
            if planrun.covered(self, inc):
                return False
            first = self.decisions.plan(inc, await self.view(), self.policy, busy=self.guards.active)
            while inc.id not in self.deferred and (early := deferral(first)) is not None:  # outside the node lock
                if not await deferral_wait.wait_idle(self, inc, first, attempt, early):
                    self.deferred.add(inc.id)
                    break
                inc = self.latest.get(inc.id, inc)  # the incident changed while it waited: decide again
                if inc.status.terminal:
                    return False
                first = self.decisions.plan(inc, await self.view(), self.policy, busy=self.guards.active)
        else:
            inc = resume.incident
        async with self.node_locks.hold(inc.node or f"fabric:{inc.id}"):
            return await planrun.decide_and_run(self, inc, attempt, resume)

    def stop_at_step(self, incident_id: str, attempt: int, why: str) -> None:
        """A plan turned cautious: no further step of it (no reset, reboot or return), the one in flight ends as it
        would; then the same task runs the re-decided plan (``_guarded``, from ``redo``)."""
        self.redo[incident_id] = attempt + 1
        self.executor.stop_at_next_step(incident_id, attempt, why)

    def _gate(self, inc: Incident, plan: Plan, step: Step, key: str) -> str | None:
        """The executor asks before every step: kill switches switched on since the plan started (on the rule, or on
        a code of the incident as it stands now), retry caps. A capped step let run is remembered
        (``GuardState.cleared``), so a plan resumed at it is not refused for it."""
        now = self.clock.now()
        refusal = step_check(self.latest.get(inc.id, inc), step, self.guards, self.policy.guards, now, rule=plan.rule,
                             key=key)
        if refusal is None and inc.node is not None and step.action in self.policy.guards.retry_caps:
            self.guards.cleared[inc.id] = (key, now)
            self.keeper.save()
        return refusal.reason if refusal else None

    def _holders(self, inc: Incident, node: str) -> str | None:
        others = self.guards.holders(node, inc.id)
        return ", ".join(f"{i} ({why})" for i, why in sorted(others.items())) or None

    async def _soak(self, inc: Incident) -> StepResult:
        """Capacity returns only after a quiet period in which the fault did not recur (``follow.recurrence``)."""
        before = self.latest.get(inc.id, inc)
        await self.clock.sleep(self.policy.guards.soak_s)
        what = recurrence(before, self.latest.get(inc.id, inc), self.companion)
        if what is not None:
            return StepResult(False, f"the fault recurred during the {self.policy.guards.soak_s:g}s soak: {what}",
                              {"recurred": what})
        return StepResult(True, f"quiet for {self.policy.guards.soak_s:g}s")

    async def idle(self) -> None:
        """Wait for every running plan (tests and the demo use this)."""
        while pending := [t for t in self.tasks.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_streams(subjects.STREAMS)
        await self.keeper.load()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(serve(self, stop), name="remediator-serve")
                tg.create_task(self.keeper.writer(stop), name="remediator-guards")
                if self.elector is not None:
                    tg.create_task(lead(self.elector, self._leading, self.tasks, stop, renew_s=self.lease_renew_s,
                                        actor=self.actor), name="remediator-lease")
        finally:
            await end_plans(self)
            await self.audit.drain()  # records already written reach the stream before the bus is handed back
