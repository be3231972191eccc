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

Collaborators that take the service: an incident's task and the executor's step hooks (``remediator.plantask``),
re-deciding, cancelling and resuming a plan (``remediator.stops``), what is remembered of incidents and for how
long (``remediator.retention``).
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
from breakfix.remediator import planrun, plantask, retention, stops
from breakfix.remediator.actuator import Actuator
from breakfix.remediator.audit import AuditWriter
from breakfix.remediator.breaker import page_breaker, page_stale_hold
from breakfix.remediator.decisions import Decisions
from breakfix.remediator.executor import Executor
from breakfix.remediator.follow import (
    deferral,
    held_nodes,
    takes_node,
)
from breakfix.remediator.guards import GPU_ACTIONS, GuardState
from breakfix.remediator.ids import keyed_digest
from breakfix.remediator.keeper import GuardKeeper
from breakfix.remediator.leading import Elector, lead
from breakfix.remediator.locks import KeyedLocks
from breakfix.remediator.metrics import Observers, RemediatorMetrics
from breakfix.remediator.policy import Policy
from breakfix.remediator.reconcile import ATTEMPT_STRIDE
from breakfix.remediator.records import WAIT_ENDS, PlanBook, PlanRecord, ProgressState
from breakfix.remediator.store import MemoryStore, PlanStore
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
        self.id_key = id_key  # record ids are HMACs with it (ids.record_id): no one else can squat them
        hooks = plantask.StepHooks(self)  # what the executor asks before and during steps (remediator.plantask)
        self.executor = Executor(actuator, self.publish, clock, actor=actor, soak=hooks.soak, gate=hooks.gate,
                                 holders=hooks.holders, idle_poll_s=policy.guards.idle_poll_s, id_key=id_key)
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
        retention.forget_old(self)
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
        """Cancel the plan whose step waits for approval (``stops.end_approval_wait``)."""
        await stops.end_approval_wait(self, inc, why=why)

    async def cancel_record(self, incident_id: str, *, only: ProgressState | None = None) -> bool:
        """Mark the stored plan cancelled so no restart resumes it (``stops.cancel_record``)."""
        return await stops.cancel_record(self, incident_id, only=only)

    def resume_after(self, old: asyncio.Task[None], incident_id: str) -> None:
        """Resume the stored plan once ``old`` is done (``stops.resume_after``)."""
        stops.resume_after(self, old, incident_id)

    def track(self, inc: Incident) -> None:
        """Remember an incident's latest version and the members it covers (``retention.track``)."""
        retention.track(self, inc)

    async def maybe_redecide(self, inc: Incident) -> None:
        """Re-decide a plan its incident's newer version no longer fits (``stops.maybe_redecide``)."""
        await stops.maybe_redecide(self, inc)

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
        self.tasks[incident_id] = asyncio.create_task(plantask.guarded(self, incident_id, attempt, resume, settle),
                                                      name=name)

    def stop_at_step(self, incident_id: str, attempt: int, why: str) -> None:
        """A plan turned cautious: no further step of it (no reset, reboot or return), the one in flight ends as it
        would; then the same task runs the re-decided plan (``plantask.guarded``, from ``redo``)."""
        self.redo[incident_id] = attempt + 1
        self.executor.stop_at_next_step(incident_id, attempt, why)

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
