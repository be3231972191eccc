"""What to notify: a pure reducer over incident changes and audit records. No I/O, no clock.

``notify.service`` feeds it every ``IncidentChange`` (``breakfix.incidents.>``) and ``ActionRecord``
(``breakfix.actions.>``: the remediator's plans, steps and refusals, and the on-call verbs ack and
silence); it returns ``Notification``s, which ``notify.sender`` delivers. Times come from the
messages themselves.

Rules (issue 14):
- one page per root cause: incidents folded into another (``parent``) or covered by an open fabric
  incident's ``members`` never notify; an incident paged before it folded is resolved there, since
  its parent's page now stands for it;
- notified: an escalation (with the RMA line when the ladder ran out), a step awaiting approval,
  a breaker trip (one notification listing the held incidents), a budget/guard wait past
  ``wait_limit_s``, and the resolution of anything that was paged;
- each event triggers once per incident attempt (``flaps``): the ids are deterministic, so a
  re-send is the same notification and every channel dedupes it by ``dedup_key``;
- an ack suppresses further triggers for that incident, a silence (the console's: cluster plus node, category or
  code, until a time) those of every incident it matches; neither touches remediation; an ack
  of a paged incident is passed on (PagerDuty ``acknowledge``); resolves are always sent;
- a page resolves when its incident resolves, folds into another, or a human releases or cancels it
  (an escalated incident stays escalated until someone does: the correlator never resolves it alone);
  an incident already resolved triggers nothing from a record dated before its resolution (read after it, e.g.
  by a replay), but a plan that escalates after it (the validation before the node's return failed, the node
  stays cordoned) pages, and that page waits for a human's release or cancel.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.model import Notification, NotifyAction, NotifyEvent
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    WaitingOn,
)
from breakfix.schemas.silence import silence_matches

MAX_INCIDENTS = 100_000
MAX_DONE = 20
MAX_HELD = 50
MAX_EARLY = 10_000
MAX_SILENCES = 1_000
EARLY_KINDS = frozenset({ActionKind.PLAN, ActionKind.REFUSAL, ActionKind.STEP, ActionKind.ACK, ActionKind.SILENCE,
                         ActionKind.RELEASE, ActionKind.CANCEL})
WAIT_GUARDS = frozenset({"budget", "topology_budget", "cooldown"})
FOREVER = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StepSeen:
    incident_id: str
    action: str
    outcome: str


@dataclass
class Tracked:
    incident: Incident | None = None
    done: list[str] = field(default_factory=list)
    paged: dict[NotifyEvent, Notification] = field(default_factory=dict)  # triggers sent this attempt
    acked: bool = False
    silenced_until: datetime | None = None
    waiting_since: datetime | None = None
    rma: str = ""


def route(n: Notification, config: NotifyConfig) -> tuple[str, ...]:
    """The channels a notification goes to: the first route that matches, else the default."""
    for r in config.routes:
        if r.severities and n.severity not in {s.value for s in r.severities}:
            continue
        if r.domains and n.domain not in r.domains:
            continue
        if r.categories and n.category not in r.categories:
            continue
        return r.channels
    return config.default


class NotifyCore:
    def __init__(self, config: NotifyConfig) -> None:
        self.config = config
        self.tracked: OrderedDict[str, Tracked] = OrderedDict()
        self.covered: dict[str, str] = {}           # member incident -> open fabric incident
        self.breaker: dict[str, Notification] = {}  # cluster -> the breaker page while tripped
        self.held: dict[str, list[str]] = {}        # cluster -> incidents the breaker holds
        self.early: OrderedDict[str, list[ActionRecord]] = OrderedDict()  # records that beat their incident
        self.silences: OrderedDict[str, tuple[dict[str, str], datetime]] = OrderedDict()  # id -> (matcher, until)

    # -- state -------------------------------------------------------------------------------------
    def _t(self, incident_id: str) -> Tracked:
        t = self.tracked.get(incident_id)
        if t is None:
            if len(self.tracked) >= MAX_INCIDENTS:
                victim = next((k for k, v in self.tracked.items() if not v.paged), next(iter(self.tracked)))
                del self.tracked[victim]
            t = self.tracked[incident_id] = Tracked()
        return t

    def _folded(self, inc: Incident | None, incident_id: str) -> bool:
        return (inc is not None and inc.parent is not None) or incident_id in self.covered

    def firing(self) -> list[Notification]:
        """Every trigger still standing (Alertmanager needs them re-posted before its resolve_timeout)."""
        out = [n for t in self.tracked.values() for n in t.paged.values()]
        return out + list(self.breaker.values())

    # -- building ----------------------------------------------------------------------------------
    def _build(self, t: Tracked, inc: Incident, event: NotifyEvent, action: NotifyAction, at: datetime, *,
               summary: str, next_: str = "") -> Notification:
        cfg = self.config
        tenants = sorted({x.namespace for x in (*inc.tenants, *inc.impact)})
        pods = sorted({f"{x.namespace}/{x.pod}" for x in (*inc.tenants, *inc.impact) if x.pod})[:cfg.max_pods]
        where = inc.node or ", ".join(f"{k}={v}" for k, v in sorted(inc.topology.items())) or inc.cluster
        return Notification(
            id=f"{inc.id}:{inc.flaps}:{event.value}:{action.value}", dedup_key=inc.id, event=event, action=action,
            title=f"[{inc.severity.value}] {inc.category} on {where}: {inc.title or inc.category}"[:250],
            summary=summary[:1000], cluster=inc.cluster, incident=inc.id, node=inc.node,
            nodes=tuple(inc.nodes[:MAX_HELD]) if inc.scope is IncidentScope.FABRIC else (),
            gpus=tuple(f"{g.index}:{g.uuid or '-'}" for g in inc.gpus), category=inc.category,
            severity=inc.severity.value, domain=inc.domain.value, topology=dict(inc.topology), tenants=tuple(tenants),
            pods=tuple(pods), done=tuple(t.done), next=next_, waiting=inc.waiting.value if inc.waiting else None,
            rma=t.rma, runbook_url=f"{cfg.runbook_base}{inc.category}.md",
            console_url=f"{cfg.console_url.rstrip('/')}/incidents/{inc.id}" if cfg.console_url else "", at=at)

    def _trigger(self, t: Tracked, event: NotifyEvent, at: datetime, summary: str, next_: str) -> list[Notification]:
        inc = t.incident
        if inc is None or event in t.paged or self._folded(inc, inc.id) or t.acked:
            return []
        if inc.status is IncidentStatus.RESOLVED and not (
                event is NotifyEvent.ESCALATED and inc.resolved_at is not None and at >= inc.resolved_at):
            return []  # over already (a record from before its resolution, read after it): no page. A plan that
            # escalates after the resolution (the return's validation failed) left its node cordoned: that pages
        if t.silenced_until is not None and at < t.silenced_until:
            return []
        if self._silenced(at, cluster=inc.cluster, category=inc.category, nodes=(inc.node, *inc.nodes),
                          codes=inc.codes):
            return []
        n = self._build(t, inc, event, NotifyAction.TRIGGER, at, summary=summary, next_=next_)
        t.paged[event] = n
        return [n]

    def _resolve(self, t: Tracked, at: datetime, why: str) -> list[Notification]:
        if not t.paged or t.incident is None:
            return []
        n = self._build(t, t.incident, NotifyEvent.RESOLVED, NotifyAction.RESOLVE, at, summary=why)
        t.paged.clear()
        return [n]

    # -- incident changes --------------------------------------------------------------------------
    def change(self, ch: IncidentChange) -> list[Notification]:
        inc = ch.incident
        t = self._t(inc.id)
        if t.incident is not None and inc.version < t.incident.version and ch.kind is not ChangeKind.REOPENED:
            return []
        if t.incident is not None and inc.flaps != t.incident.flaps:  # a new attempt may page again
            # but a page from an escalation after the resolution (the node stayed cordoned) stands until a human
            # releases or cancels, or the new attempt resolves: it is carried over, not dropped unresolved
            carried: dict[NotifyEvent, Notification] = {e: n for e, n in t.paged.items()
                       if e is NotifyEvent.ESCALATED and t.incident.status is IncidentStatus.RESOLVED}
            t.paged.clear()
            t.paged.update(carried)
            t.acked = False
            t.waiting_since = None
            t.done.clear()
        prev = t.incident
        first = prev is None
        was_resolved = prev is not None and prev.status is IncidentStatus.RESOLVED
        t.incident = inc
        for member in inc.members:
            if inc.status.terminal:
                self.covered.pop(member, None)
            elif member in self.covered or len(self.covered) < MAX_INCIDENTS:
                self.covered[member] = inc.id
        if inc.parent is not None or ch.kind is ChangeKind.FOLDED:
            return self._resolve(t, ch.at, f"folded into {inc.parent}: that incident's page stands for it")
        if ch.kind is ChangeKind.RESOLVED or inc.status.value == "resolved":
            if was_resolved and NotifyEvent.ESCALATED in t.paged:
                return []  # paged by an escalation after the resolution: only a release or cancel ends that page
            ttr = f" after {inc.time_to_repair_s:.0f}s" if inc.time_to_repair_s is not None else ""
            return self._resolve(t, ch.at, f"resolved{ttr}: {inc.title or inc.category}")
        if first and inc.id in self.early:  # the two streams are read apart: apply what came first now
            return [n for rec in self.early.pop(inc.id) for n in self.record(rec)]
        return []

    # -- audit records -----------------------------------------------------------------------------
    def record(self, rec: ActionRecord) -> list[Notification]:
        breaker = rec.details.get("guard") == "breaker"
        asks_human = rec.kind is ActionKind.NOTIFICATION and rec.waiting is WaitingOn.HUMAN  # e.g. a stale hold
        if rec.kind is ActionKind.NOTIFICATION and not (breaker or asks_human):
            return []  # our own delivery records (and other notices) never notify again
        if rec.kind is ActionKind.BREAKER or (rec.kind is ActionKind.APPROVAL
                                               and rec.details.get("command") == "breaker-reset"):
            return self._breaker_reset(rec)
        if breaker and rec.kind in (ActionKind.NOTIFICATION, ActionKind.STEP):  # the remediator's breaker page
            return self._breaker(rec)
        if rec.kind is ActionKind.SILENCE and ("matcher" in rec.details or "silence_id" in rec.details):
            self._silence(rec)  # the console's silences match cluster + node / category / code, not one incident
            return []
        unknown = rec.incident_id not in self.tracked or self.tracked[rec.incident_id].incident is None
        if unknown and rec.kind in EARLY_KINDS:
            held = self.early.setdefault(rec.incident_id, [])
            if len(held) < MAX_DONE:
                held.append(rec)
            while len(self.early) > MAX_EARLY:
                self.early.popitem(last=False)
            return []
        t = self._t(rec.incident_id)
        if rec.kind is ActionKind.ACK:
            first = not t.acked
            t.acked = True
            if first and t.paged and t.incident is not None:
                return [self._build(t, t.incident, NotifyEvent.ACKNOWLEDGED, NotifyAction.ACKNOWLEDGE, rec.at,
                                    summary=f"acknowledged by {rec.actor}: {rec.reason}".strip(": "))]
            return []
        if rec.kind in (ActionKind.RELEASE, ActionKind.CANCEL):  # a human took it over: the page is done
            return self._resolve(t, rec.at, f"{rec.kind.value}d by {rec.actor}: {rec.reason}".strip(": "))
        if rec.kind is ActionKind.SILENCE:
            t.silenced_until = None if rec.outcome is ActionOutcome.CANCELLED else _until(rec)
            return []
        if rec.kind is ActionKind.STEP and rec.action is not None and rec.outcome is not ActionOutcome.DRY_RUN:
            self.step(StepSeen(rec.incident_id, rec.action.value, rec.outcome.value))
            return []
        if asks_human:
            return self._trigger(t, NotifyEvent.ESCALATED, rec.at, rec.reason or "a human must act",
                                 f"a human: 'breakfix release {rec.incident_id} --reason ...' once checked")
        if rec.kind is ActionKind.PLAN and rec.outcome in (ActionOutcome.ESCALATED, ActionOutcome.FAILED):
            if "RMA" in rec.reason or "ladder" in rec.reason or "failed" in rec.reason:
                t.rma = rec.reason
            return self._trigger(t, NotifyEvent.ESCALATED, rec.at, f"escalated: {rec.reason or 'a human must act'}",
                                 f"a human: follow the runbook, then 'breakfix release {rec.incident_id} --reason ...'")
        if rec.kind is ActionKind.REFUSAL:
            return self._refusal(t, rec)
        return []

    def _silence(self, rec: ActionRecord) -> None:
        sid = rec.details.get("silence_id") or rec.id
        if rec.outcome is ActionOutcome.CANCELLED:
            self.silences.pop(sid, None)
            return
        try:
            matcher = json.loads(rec.details.get("matcher", "{}"))
        except ValueError:
            return
        if not isinstance(matcher, dict) or "cluster" not in matcher:
            return
        self.silences[sid] = ({str(k): str(v) for k, v in matcher.items()}, _until(rec))
        while len(self.silences) > MAX_SILENCES:
            self.silences.popitem(last=False)

    def _silenced(self, at: datetime, *, cluster: str, category: str, nodes: tuple[str | None, ...],
                  codes: tuple[str, ...]) -> bool:
        """Does an active silence match (``schemas.silence``: the console shows the same rule)?"""
        return any(at < until and silence_matches(matcher, cluster=cluster, category=category, nodes=nodes,
                                                  codes=codes)
                   for matcher, until in self.silences.values())

    def step(self, seen: StepSeen) -> None:
        """A step record, read cheaply (a plan makes two per step; the notifier only keeps what was done)."""
        t = self.tracked.get(seen.incident_id)
        if t is None:
            return
        if seen.outcome == "started":
            t.waiting_since = None
        else:
            t.done = [*t.done, f"{seen.action}: {seen.outcome}"][-MAX_DONE:]

    def _refusal(self, t: Tracked, rec: ActionRecord) -> list[Notification]:
        guard = rec.details.get("guard", "")
        if rec.reason.startswith("awaiting approval") or (rec.waiting is not None and rec.waiting.value == "approval"):
            return self._trigger(t, NotifyEvent.APPROVAL, rec.at, f"a step waits for approval: {rec.reason}",
                                 rec.reason)
        if guard == "breaker":
            held = self.held.setdefault(rec.cluster, [])
            if rec.incident_id not in held and len(held) < MAX_HELD:
                held.append(rec.incident_id)
            return []
        if guard in WAIT_GUARDS:
            since = t.waiting_since = t.waiting_since or rec.at
            if rec.at - since >= timedelta(seconds=self.config.wait_limit_s):
                mins = (rec.at - since).total_seconds() / 60
                return self._trigger(t, NotifyEvent.WAITING, rec.at, f"waiting {mins:.0f} min on {guard}: {rec.reason}",
                                     f"waits on {guard}; it runs when the guard allows")
        return []

    def _breaker(self, rec: ActionRecord) -> list[Notification]:
        if rec.cluster in self.breaker or self._silenced(rec.at, cluster=rec.cluster, category="breaker",
                                                           nodes=(), codes=()):
            return []
        open_ops = [i for i, t in self.tracked.items() if t.incident is not None and not t.incident.status.terminal
                    and t.incident.domain.value == "operator" and not self._folded(t.incident, i)]
        listed = [h for h in rec.details.get("held", "").split(",") if h]  # the remediator names them itself
        held = (listed or self.held.get(rec.cluster) or open_ops)[:MAX_HELD]
        n = Notification(
            id=f"breaker-{rec.cluster}:{rec.id}:breaker:trigger", dedup_key=f"breaker-{rec.cluster}",
            event=NotifyEvent.BREAKER, action=NotifyAction.TRIGGER,
            title=f"[critical] circuit breaker tripped in {rec.cluster}: automated repairs stopped",
            summary=rec.reason[:1000], cluster=rec.cluster, incident=rec.incident_id, category="breaker",
            severity="critical", domain="operator", held=tuple(held),
            next="nothing automatic until 'breakfix breaker reset --cluster C --reason ...'",
            runbook_url=f"{self.config.runbook_base}alerts/breaker_tripped.md", at=rec.at)
        self.breaker[rec.cluster] = n
        return [n]

    def _breaker_reset(self, rec: ActionRecord) -> list[Notification]:
        page = self.breaker.pop(rec.cluster, None)
        self.held.pop(rec.cluster, None)
        if page is None:
            return []
        return [page.model_copy(update={"id": f"{page.dedup_key}:{page.id}:resolve", "event": NotifyEvent.RESOLVED,
                                        "action": NotifyAction.RESOLVE, "at": rec.at,
                                        "summary": f"breaker reset by {rec.actor}: {rec.reason}"})]


def _until(rec: ActionRecord) -> datetime:
    """A silence's end: ``details.until`` (ISO 8601), ``details.duration_s``, or until unsilenced."""
    if "until" in rec.details:
        try:
            return datetime.fromisoformat(rec.details["until"])
        except ValueError:
            pass
    if "duration_s" in rec.details:
        try:
            return rec.at + timedelta(seconds=max(0.0, float(rec.details["duration_s"])))
        except ValueError:
            pass
    return FOREVER


__all__ = ["NotifyCore", "StepSeen", "Tracked", "route"]
