"""The discrete-event engine: one failure trace through the real correlator, ``decide()``, guards
and executor, against the simulated fleet, in simulated time (a heap of events; no sleeps).

Inputs: a ``FailureModel``, the trace drawn from it, and one contender (a policy, or a baseline
expressed as a policy: ``simulate.baselines``). Output: the contender's ``Ledger`` (capacity,
jobs, pages, repair times) and counts. ``simulate.report`` turns several of them into the
side-by-side report.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

from breakfix.correlator.grouping import Correlator
from breakfix.remediator.actuator import StepResult
from breakfix.remediator.decide import decide
from breakfix.remediator.executor import Executor, Progress
from breakfix.remediator.guards import GuardState, check, target_of
from breakfix.remediator.policy import Policy
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentStatus,
    Plan,
    StepAction,
)
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id
from breakfix.simulate.fleet import PlanCursor, SimFleet, node_name
from breakfix.simulate.ledger import Ledger
from breakfix.simulate.model import FailureModel, Fix
from breakfix.simulate.trace import Fault

CLUSTER = "sim"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
RETRY_S = 60.0  # a budget or cooldown refusal is decided again this much later (the service's retry)
MAX_RECURRENCES = 24 * 90  # per fault: an unrepaired fault shows again at most this often


@dataclass
class Contender:
    """A named policy; ``policy`` None means nothing is ever done (the ``none`` baseline)."""

    name: str
    policy: Policy | None
    kind: str = "policy"


@dataclass
class RunResult:
    name: str
    kind: str
    ledger: Ledger
    faults: int
    incidents: int
    plans: int
    refusals: dict[str, int] = field(default_factory=dict)
    rma_opened: int = 0
    rma_unneeded: int = 0


class _SimClock:
    """The executor's clock in simulated time (step and rung timeouts are measured on it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def now(self) -> datetime:
        return self.engine._clock()

    def monotonic(self) -> float:
        return self.engine.fleet.cursor.at

    async def sleep(self, seconds: float) -> None:
        self.engine.fleet.cursor.at += max(0.0, seconds)


class Engine:
    def __init__(self, model: FailureModel, catalog: Catalog, trace: list[Fault], *, nodes: int, days: float,
                 contender: Contender) -> None:
        self.model = model
        self.trace = trace
        self.contender = contender
        self.horizon = days * 86400.0
        self.ledger = Ledger(model.fleet.gpus_per_node, model.fleet.utilization, self.horizon)
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.fleet = SimFleet(model, nodes, self.ledger, self._schedule)
        self.fleet.on_human_fix = self._human_fix
        self.core = Correlator(catalog)
        self.guards = GuardState()
        self.running: set[str] = set()
        self.pending: set[str] = set()
        self.plans = 0
        self.refusals: dict[str, int] = {}
        self._records: list[ActionRecord] = []
        pol = contender.policy
        self.executor = Executor(self.fleet, self._publish, _SimClock(self), actor="simulate",
                                 soak=self._soak) if pol is not None else None

    # -- plumbing ------------------------------------------------------------------------------
    def _schedule(self, at: float, _what: str, fn: Callable[[], object]) -> None:
        if at <= self.horizon:
            heapq.heappush(self._heap, (at, next(self._seq), fn))

    def _clock(self) -> datetime:
        return EPOCH + timedelta(seconds=self.fleet.cursor.at)

    def _dt(self, t: float) -> datetime:
        return EPOCH + timedelta(seconds=t)

    async def _soak(self, incident: Incident) -> StepResult:
        """The policy's soak: quiet time before capacity returns (a recurrence shows up later, as a reopen)."""
        pol = self.contender.policy
        self.fleet.cursor.at += pol.guards.soak_s if pol is not None else 0.0
        return StepResult(True, "soak quiet")

    async def _publish(self, rec: ActionRecord) -> None:
        self._records.append(rec)

    # -- faults and signals ----------------------------------------------------------------------
    def _signals(self, f: Fault, at: float, *, healthy: bool = False, seq: int = 0) -> list[tuple[float, Signal]]:
        out: list[tuple[float, Signal]] = []
        gpn = self.model.fleet.gpus_per_node
        for spec in f.process.signals:
            gpus: list[int | None]
            if spec.on == "peers" and f.gpu is not None:
                gpus = [g for g in range(gpn) if g != f.gpu]
            elif spec.on == "node" or f.gpu is None:
                gpus = [None]
            else:
                gpus = [f.gpu]
            when = at + (0.0 if healthy else spec.delay_s)
            for n in f.nodes:
                for g in gpus:
                    gpu = GpuRef(index=g) if g is not None else None
                    tenant = TenantRef(namespace="team-a", pod=f"job{f.id}-worker-{g or 0}") \
                        if f.process.tenant else None
                    node = node_name(n)
                    sid = make_signal_id(cluster=CLUSTER, node=node, source="kmsg", check=spec.check, code=spec.code,
                                         healthy=healthy, observed_at=self._dt(when), gpu=gpu,
                                         component=spec.component, discriminator=f"{f.id}:{seq}")
                    out.append((when, Signal(
                        id=sid, cluster=CLUSTER, node=node, source=SignalSource.KMSG, check=spec.check,
                        code=spec.code, healthy=healthy, severity=Severity.INFO if healthy else spec.severity,
                        gpu=gpu, component=spec.component, tenant=tenant, message=spec.message,
                        labels=self.fleet.labels[node], observed_at=self._dt(when))))
        return out

    def _start_fault(self, f: Fault) -> None:
        self.fleet.add_fault(f, self.now)
        for when, sig in self._signals(f, self.now):
            self._schedule(when, "signal", partial(self._ingest, sig))
        fix = f.process.fix
        if fix is Fix.SELF:
            self._schedule(self.now + f.process.duration_s, "self-clear", lambda: self._self_clear(f))
        elif fix is Fix.APP_RESTART:  # tenants restart their own jobs, whatever the operator does
            self._schedule(self.now + self.model.durations.app_restart_s, "app-restart",
                           lambda: self.fleet.cure(f, self.now))
        elif f.process.signals:
            self._schedule(self.now + self.model.durations.recurrence_s, "recur", lambda: self._recur(f, 1))

    def _self_clear(self, f: Fault) -> None:
        self.fleet.cure(f, self.now)
        for when, sig in self._signals(f, self.now, healthy=True):
            self._schedule(when, "signal", partial(self._ingest, sig))

    def _recur(self, f: Fault, n: int) -> None:
        """A fault still there shows again while its node is in service (the soak's blind spot, if any)."""
        if f not in self.fleet.faults.get(f.nodes[0], []) or n > MAX_RECURRENCES:
            return
        if f.nodes[0] not in self.fleet.cordoned:
            for when, sig in self._signals(f, self.now, seq=n):
                self._schedule(when, "signal", partial(self._ingest, sig))
        self._schedule(self.now + self.model.durations.recurrence_s, "recur", lambda: self._recur(f, n + 1))

    def _ingest(self, sig: Signal) -> None:
        for ch in self.core.ingest(sig, self.now_dt):
            inc = ch.incident
            fresh = ch.kind in (ChangeKind.OPENED, ChangeKind.REOPENED)
            if fresh and inc.parent is None and inc.id not in self.pending:
                self.pending.add(inc.id)
                settle = self.contender.policy.settle_s if self.contender.policy else 0.0
                self._schedule(self.now + settle, "decide", partial(self._decide, inc.id))

    @property
    def now_dt(self) -> datetime:
        return self._dt(self.now)

    # -- decisions -------------------------------------------------------------------------------
    def _decide(self, iid: str) -> object:
        return self._decide_async(iid)

    async def _decide_async(self, iid: str) -> None:
        self.pending.discard(iid)
        pol = self.contender.policy
        tracked = self.core.incidents.get(iid)
        if pol is None or self.executor is None or tracked is None or iid in self.running:
            return
        inc = tracked.snapshot()
        if inc.status.terminal or inc.parent is not None:
            return
        view = await self.fleet.view()
        if inc.node is not None and inc.status is IncidentStatus.OPEN:
            self.guards.observe_open(inc.node, self.now_dt, pol.guards.breaker, len(view.nodes))
        plan = decide(inc, view, pol)
        refusal = check(inc, plan, self.guards, view, pol.guards, self.now_dt)
        self.fleet.cursor = PlanCursor(self.now, iid)
        if refusal is not None:
            self.refusals[refusal.guard] = self.refusals.get(refusal.guard, 0) + 1
            if refusal.retry:
                self.pending.add(iid)
                self._schedule(self.now + RETRY_S, "decide", lambda: self._decide(iid))
            else:
                await self.fleet.escalate(inc.node, refusal.reason, incident=iid)
            return
        self.plans += 1
        if inc.node is not None:
            self.guards.start(inc.node, iid)
        self.running.add(iid)
        await self._run(inc.id, plan, Progress(incident=iid, attempt=0))

    async def _run(self, iid: str, plan: Plan, prog: Progress) -> None:
        assert self.executor is not None
        tracked = self.core.incidents.get(iid)
        if tracked is None:
            return
        inc = tracked.snapshot()
        self._records = []
        outcome = await self.executor.run(inc, plan, progress=prog)
        end = self.fleet.cursor.at
        for rec in self._records:
            if rec.kind is ActionKind.STEP and rec.outcome is ActionOutcome.SUCCEEDED and rec.action is not None \
                    and rec.action.disruptive and inc.node:
                self.guards.record_action(target_of(inc, rec.action), rec.action, rec.at)
            self._schedule(max(self.now, (rec.at - EPOCH).total_seconds()), "record",
                           partial(self._apply_record, rec))
        if outcome is ActionOutcome.REFUSED and prog.state == "awaiting_approval":  # a human approves later
            if iid not in self.fleet.pages:
                self.fleet.pages.add(iid)
                self.ledger.pages += 1
            tag = f"{prog.rung}:{prog.step}"
            self._schedule(end + self.model.durations.human_response_s, "approve",
                           lambda: self._approve(iid, plan, prog, tag))
            return
        self._schedule(end, "finish", lambda: self._finish(iid, inc.node))

    def _apply_record(self, rec: ActionRecord) -> None:
        self.core.apply_action(rec, self.now_dt)

    def _approve(self, iid: str, plan: Plan, prog: Progress, tag: str) -> object:
        prog.approved.append(tag)
        self.fleet.cursor = PlanCursor(self.now, iid)
        return self._run(iid, plan, prog)

    def _finish(self, iid: str, node: str | None) -> None:
        self.running.discard(iid)
        if node is not None and iid not in self.fleet.escalated:
            self.guards.finish(node, iid, self.now_dt)

    def _human_fix(self, iid: str, node: int, took: float) -> None:
        """Schedule the human's repair: ``took`` seconds from now the node's faults are gone and it returns."""
        def done() -> None:
            for f in list(self.fleet.faults.get(node, [])):
                if f.process.fix is not Fix.SELF:
                    self.fleet.cure(f, self.now)
            self.fleet.uncordon(node, self.now)
            self.running.discard(iid)
            name = node_name(node)
            self.guards.finish(name, iid, self.now_dt)
            rec = ActionRecord(id=f"human-{iid}-{self.now:.0f}", cluster=CLUSTER, incident_id=iid,
                               kind=ActionKind.STEP, action=StepAction.RETURN_TO_SERVICE, step_index=0,
                               outcome=ActionOutcome.SUCCEEDED, actor="human", reason="repaired by hand",
                               node=name, at=self.now_dt)
            self.core.apply_action(rec, self.now_dt)
        self._schedule(self.now + took, "human-fix", done)

    # -- the loop ----------------------------------------------------------------------------------
    async def run(self, on_day: Callable[[int], None] | None = None) -> RunResult:
        for f in self.trace:
            self._schedule(f.start_s, "fault", partial(self._start_fault, f))
        day = 0
        while self._heap:
            at, _, fn = heapq.heappop(self._heap)
            self.now = at
            if on_day is not None and int(at // 86400) > day:
                day = int(at // 86400)
                on_day(day)
            res = fn()
            if inspect.isawaitable(res):
                await res
        self.now = self.horizon
        return RunResult(self.contender.name, self.contender.kind, self.ledger, len(self.trace),
                         len(self.core.incidents), self.plans, dict(self.refusals),
                         self.fleet.rma_opened, self.fleet.rma_unneeded)
