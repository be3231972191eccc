"""The remediator's Prometheus metrics (``/metrics`` on ``--metrics-port``, default 9473).

Fed from what the remediator already produces: every audit record it publishes or reads
(``record``: plans, steps, refusals, breaker trips, approvals), every incident change it consumes
(``change``: time to repair), the notifier's deliveries (``notification``), and, just before a
scrape, its live guard state and leadership (``guards``, ``leader``). Served by
``bus.observe.ObserveServer``; read by the alert rules (``deploy/prometheus/``) and dashboards
(``deploy/grafana/``).

Labels stay bounded: policy rule names, outcomes, actions, guards, categories, budget scopes and
topology values (racks, nodepools: fleet-sized, never incident ids, nodes or pods), channels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import islice
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from breakfix.bus.observe import LabelCap
from breakfix.remediator.guards import GuardsSpec, GuardState
from breakfix.remediator.view import ClusterView
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, ChangeKind, IncidentChange, WaitingOn

P = "breakfix_remediator"
STEP_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
TTR_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
MAX_TRACKED = 50_000


def awaiting_approval(rec: ActionRecord) -> bool:
    return rec.waiting is WaitingOn.APPROVAL or (
        rec.kind is ActionKind.REFUSAL and rec.reason.startswith("awaiting approval"))


class RemediatorMetrics:
    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        r = self.registry = CollectorRegistry()
        self._rule = LabelCap(256)
        self._category = LabelCap(64)
        self._topo = LabelCap(512)
        self.plans = Counter(f"{P}_plans", "Plan records, by policy rule and outcome (planned, completed, escalated, "
                                           "dry_run, ...)", ["rule", "outcome"], registry=r)
        self.steps = Histogram(f"{P}_step_duration_seconds", "From a step's start to its outcome, by action and "
                                                             "outcome", ["action", "outcome"], buckets=STEP_BUCKETS,
                               registry=r)
        self.ttr = Histogram(f"{P}_time_to_repair_seconds", "First fault to capacity returned, by category",
                             ["category"], buckets=TTR_BUCKETS, registry=r)
        self.refusals = Counter(f"{P}_refusals", "Plans or steps refused, by guard", ["guard"], registry=r)
        self.breaker_open = Gauge(f"{P}_breaker_open", "1 while the circuit breaker stops automated operator actions",
                                  registry=r)
        self.breaker_trips = Counter(f"{P}_breaker_trips", "Times the circuit breaker tripped", registry=r)
        self.budget_in_use = Gauge(f"{P}_budget_in_use", "Nodes in operator remediation, per budget key",
                                   ["scope", "value"], registry=r)
        self.budget_limit = Gauge(f"{P}_budget_limit", "Nodes allowed in operator remediation at once, per budget key",
                                  ["scope", "value"], registry=r)
        self.nodes_held = Gauge(f"{P}_nodes_held", "Nodes breakfix holds (in operator remediation)", registry=r)
        self.approvals_pending = Gauge(f"{P}_approvals_pending", "Steps waiting for 'breakfix approve'", registry=r)
        self.approval_oldest = Gauge(f"{P}_approval_oldest_age_seconds", "Age of the oldest step waiting for an "
                                                                         "approval (0 when none)", registry=r)
        self.leader_gauge = Gauge(f"{P}_leader", "1 while this replica holds the leader lease", registry=r)
        self.deliveries = Counter(f"{P}_notification_deliveries", "Notifications delivered, by channel", ["channel"],
                                  registry=r)
        self.failures = Counter(f"{P}_notification_failures", "Notification deliveries that failed after retries "
                                                              "(or were dropped by a full queue), by channel",
                                ["channel"], registry=r)
        self.refusals.labels("budget")
        self.refusals.labels("breaker")
        self.budget_limit.labels("cluster", "all")
        self._started: dict[tuple[str, int | None, str], datetime] = {}
        self._pending: dict[str, datetime] = {}

    # -- hooks -------------------------------------------------------------------------------------
    def record(self, rec: ActionRecord) -> None:
        """One audit record the remediator published (its own plans, steps, refusals and breaker page)."""
        if rec.details.get("guard") == "breaker" and rec.kind in (ActionKind.STEP, ActionKind.NOTIFICATION):
            self.breaker_trips.inc()
            self.breaker_open.set(1)
        if rec.kind is ActionKind.PLAN:
            self.plans.labels(self._rule(rec.rule or "none"), rec.outcome.value).inc()
            if rec.outcome is not ActionOutcome.PLANNED:
                self._pending.pop(rec.incident_id, None)
        elif rec.kind is ActionKind.STEP and rec.action is not None:
            key = (rec.incident_id, rec.step_index, rec.action.value)
            if rec.outcome is ActionOutcome.STARTED:
                if len(self._started) < MAX_TRACKED:
                    self._started[key] = rec.at
                self._pending.pop(rec.incident_id, None)
            else:
                began = self._started.pop(key, None)
                if began is not None:
                    self.steps.labels(rec.action.value, rec.outcome.value).observe(
                        max(0.0, (rec.at - began).total_seconds()))
        elif rec.kind is ActionKind.REFUSAL:
            guard = "approval" if awaiting_approval(rec) else rec.details.get("guard", "other")
            self.refusals.labels(self._rule(guard)).inc()
        elif rec.kind in (ActionKind.APPROVAL, ActionKind.DENIAL, ActionKind.CANCEL, ActionKind.RELEASE,
                          ActionKind.BREAKER):
            self.control(rec)
        if awaiting_approval(rec) and (rec.incident_id in self._pending or len(self._pending) < MAX_TRACKED):
            self._pending.setdefault(rec.incident_id, rec.at)

    def control(self, rec: ActionRecord) -> None:
        """A human decision read from the actions stream (approve, deny, cancel, release, breaker reset)."""
        if rec.kind in (ActionKind.APPROVAL, ActionKind.DENIAL, ActionKind.CANCEL, ActionKind.RELEASE):
            self._pending.pop(rec.incident_id, None)
        if rec.kind is ActionKind.BREAKER or rec.details.get("command") == "breaker-reset":
            self.breaker_open.set(0)

    def change(self, change: IncidentChange) -> None:
        inc = change.incident
        if change.kind is ChangeKind.RESOLVED and inc.time_to_repair_s is not None:
            self.ttr.labels(self._category(inc.category)).observe(inc.time_to_repair_s)
        if inc.status.terminal:
            self._pending.pop(inc.id, None)

    def notification(self, channel: str, ok: bool) -> None:
        (self.deliveries if ok else self.failures).labels(channel).inc()

    def leader(self, is_leader: bool) -> None:
        self.leader_gauge.set(1 if is_leader else 0)

    def guards(self, state: GuardState, spec: GuardsSpec, view: ClusterView | None, *, leading: bool = True) -> None:
        """Before a scrape: breaker, budgets and held nodes from the live guard state. Only the leader knows them: a
        standby's guard state is what it last loaded and its approvals what it last published, so it exports 0 and
        no budget use (the rules and dashboards take the max over replicas)."""
        if not leading:
            for gauge in (self.breaker_open, self.nodes_held, self.approvals_pending, self.approval_oldest):
                gauge.set(0)
            self.budget_in_use.clear()
            self.budget_limit.clear()
            return
        self.breaker_open.set(1 if state.breaker_tripped_at is not None else 0)
        holds = getattr(state, "holds", {})  # nodes kept cordoned for an incident beside those in remediation
        self.nodes_held.set(len(set(state.active) | set(holds)))
        nodes = view.nodes if view is not None else {}
        self.budget_in_use.clear()  # racks that emptied must not keep their last count
        self.budget_limit.clear()
        self.budget_in_use.labels("cluster", "all").set(len(state.active))
        self.budget_limit.labels("cluster", "all").set(spec.budget.limit(len(nodes) or 1))
        for tb in spec.topology_budgets:
            counts: dict[str, int] = {}
            for node in state.active:
                nv = nodes.get(node)
                value = nv.labels.get(tb.key) if nv else None
                if value:
                    counts[value] = counts.get(value, 0) + 1
            for value, n in counts.items():
                members = sum(1 for nv in nodes.values() if nv.labels.get(tb.key) == value)
                label = self._topo(value)
                self.budget_in_use.labels(tb.key, label).set(n)
                self.budget_limit.labels(tb.key, label).set(tb.limit(members or 1))
        self.refresh()

    def awaiting(self, incidents: Iterable[str]) -> None:
        """When a term starts: the steps the plan store says wait for an approval (the records of those another
        leader published were never seen here: their wait counts from now, a lower bound)."""
        now = self.clock()
        self._pending = {i: self._pending.get(i, now) for i in islice(incidents, MAX_TRACKED)}

    def refresh(self) -> None:
        self.approvals_pending.set(len(self._pending))
        now = self.clock()
        oldest = min(self._pending.values(), default=None)
        self.approval_oldest.set(max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)


class Listener(Protocol):
    def change(self, change: IncidentChange) -> None: ...
    def record(self, rec: ActionRecord, subject: str) -> None: ...


class Observers:
    """What the remediator's hooks call (``on_change``, ``publish``, the control consumer): the metrics
    always, and the notifier (``notify.service.NotifierService``) once ``remediator.metrics_serve`` attaches one.
    Both only count or queue, so a hook never waits."""

    def __init__(self, metrics: RemediatorMetrics) -> None:
        self.metrics = metrics
        self.listeners: list[Listener] = []

    def change(self, change: IncidentChange) -> None:
        self.metrics.change(change)
        for listener in self.listeners:
            listener.change(change)

    def published(self, rec: ActionRecord) -> None:
        """A record the remediator is about to write (``RemediatorService.publish``)."""
        self.metrics.record(rec)

    def stored(self, rec: ActionRecord, subject: str) -> None:
        """A record the remediator wrote, once JetStream has stored it. The control consumer reads only human
        verbs (``subjects.HUMAN_ACTIONS_ALL``), so the listeners hear the remediator's own records here, and
        the remediator does not read back, decode and ack every record it wrote."""
        for listener in self.listeners:
            listener.record(rec, subject)

    def control(self, rec: ActionRecord, subject: str) -> None:
        """Every human verb the control consumer reads: counted, then heard as a stored record is."""
        self.metrics.control(rec)
        self.stored(rec, subject)


__all__ = ["Listener", "Observers", "RemediatorMetrics", "awaiting_approval"]
