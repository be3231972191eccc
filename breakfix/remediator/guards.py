"""Safety guards: pure checks that may refuse a plan or a step, and the state they keep. No I/O, no clock.

The service (``remediator.service``) asks ``check`` before it carries a plan out, passing the
time in; the executor asks ``step_check`` before each disruptive step of a later rung. The guard
keeper (``remediator.keeper``) stores ``GuardState`` in the plan store so a restart remembers it.
Every refusal carries its reason, what the plan now waits on (``WaitingOn``) and whether the node
must be fenced and a human paged; it is published as an audit record.

- an unknown fault (the incident's category as it stands now is ``unknown_fault``) never gets a step in
  ``policy.FORBIDDEN_FOR_UNKNOWN`` (reset, reboot, reprovision): ``step_check`` refuses it, fences and pages,
  even in a plan decided before the fault turned unknown;
- kill switches (policy file, or ``breakfix kill-switch`` at run time): a rule or a fault code
  switched off refuses everything it would do, at the start of a plan and before each later step of
  one already running (only a step that fences or pages still runs); the node is fenced and a human
  decides;
- circuit breaker: when more than ``max_percent`` of the pool opened incidents within the
  window (and at least ``min_nodes``), automated operator actions stop (a group incident's too) and
  the incidents queue until an explicit, audited reset (``breakfix breaker reset``) re-drives them in
  budget order;
- budgets: at most ``max(max_nodes, max_percent of the pool)`` nodes in operator remediation at
  once, per cluster and per topology key (rack, switch, ...); a plan waits its turn, and a wait
  longer than ``budget_wait_s`` goes to a human; a group (fabric) incident's plan fences only the
  members the budgets leave room for (``decide.fenced_members``), each counted as in remediation;
- cooldowns damp recurrences of the *same* fault on a node (same category, no new code, no
  higher severity); a different or worse fault is not blocked;
- retry caps count actions actually executed (recorded when a step starts), per GPU for GPU
  actions and per node for node actions; a cap reached fences the node and pages; a plan resumed
  at a step its cap had already let run is not refused for that step's own start;
- holds: every incident that needs a node holds it; ``return_to_service`` uncordons only when no
  other incident holds the node (open, escalated, awaiting approval, on the RMA path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from breakfix.remediator.guardspec import (
    BreakerSpec,
    BudgetSpec,
    GuardsSpec,
    KillSwitchSpec,
    TopologyBudgetSpec,
)
from breakfix.remediator.policy import FORBIDDEN_FOR_UNKNOWN
from breakfix.remediator.view import ClusterView
from breakfix.schemas.incident import Domain, Incident, Plan, Step, StepAction, WaitingOn

__all__ = ["BreakerSpec", "BudgetSpec", "Fault", "GuardState", "GuardsSpec", "KillSwitchSpec", "Refusal",
           "TopologyBudgetSpec", "check", "kill_switch", "step_check", "target_of"]

GPU_ACTIONS = frozenset({StepAction.RESET_GPU, StepAction.DRAIN_GPU})
FENCING = frozenset({StepAction.CORDON, StepAction.ESCALATE})  # what a kill switch still lets run: it fences and pages

MAX_COOLED = 10_000  # nodes the cooldown cordoned, awaiting their incident's resolution


@dataclass(frozen=True, slots=True)
class Refusal:
    guard: str   # unknown_fault | kill_switch | breaker | budget | topology_budget | cooldown | retry_cap
    reason: str
    retry: bool  # True: the same plan may pass later (budget, cooldown); False: needs a human or a reset
    waiting: WaitingOn | None = None
    fence: bool = False  # cordon + taint the node and page a human (a refusal never leaves a broken node in service)


@dataclass(frozen=True, slots=True)
class Fault:
    """The fault a finished plan repaired: what the cooldown compares a new incident with."""

    at: datetime
    category: str = ""
    codes: frozenset[str] = frozenset()
    severity: int = 0

    def same_or_lesser(self, incident: Incident) -> bool:
        return incident.category == self.category and set(incident.codes) <= self.codes \
            and incident.severity.rank <= self.severity


def target_of(incident: Incident, action: StepAction, gpu: int | None = None) -> str:
    """What a retry cap counts against: ``node/gpuN`` for GPU actions, the node for node actions."""
    node = incident.node or "-"
    if action in GPU_ACTIONS:
        idx = gpu if gpu is not None else (incident.gpus[0].index if incident.gpus else None)
        return f"{node}/gpu{idx if idx is not None else '?'}"
    return node


class _Tail:
    """Follows an append-only list: the rows added since the last look, or all of them again when the list was
    replaced, cut, or cut and refilled to the same length."""

    def __init__(self) -> None:
        self.source: list[Any] | None = None
        self.seen = 0
        self.last: Any = None

    def new_rows(self, rows: list[Any]) -> tuple[bool, list[Any]]:
        """(whether it starts over, the rows not looked at yet)."""
        again = rows is not self.source or self.seen > len(rows) or bool(self.seen and rows[self.seen - 1]
                                                                          is not self.last)
        if again:
            self.source, self.seen = rows, 0
        new = rows[self.seen:]
        self.seen, self.last = len(rows), rows[-1] if rows else None
        return again, new


class _Index(_Tail):
    """Times per key over an append-only list (what a retry cap or the breaker counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[Any, list[datetime]] = {}
        self.oldest: datetime | None = None

    def sync(self, rows: list[Any], key: Callable[[Any], Any],
             at: Callable[[Any], datetime]) -> dict[Any, list[datetime]]:
        again, new = self.new_rows(rows)
        if again:
            self.times, self.oldest = {}, None
        for row in new:
            t = at(row)
            self.times.setdefault(key(row), []).append(t)
            self.oldest = t if self.oldest is None or t < self.oldest else self.oldest
        return self.times


class _Rows(_Tail):
    """The store form of an append-only list, each row made once (the keeper writes the state many times a second)."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[list[Any]] = []

    def sync(self, rows: list[Any], form: Callable[[Any], list[Any]]) -> list[list[Any]]:
        again, new = self.new_rows(rows)
        if again:
            self.out = []
        self.out.extend(form(r) for r in new)
        return list(self.out)


def _fault_row(f: Fault) -> list[Any]:
    return [f.at.isoformat(), f.category, sorted(f.codes), f.severity]


@dataclass
class GuardState:
    active: dict[str, str] = field(default_factory=dict)            # node -> incident in operator remediation
    holds: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {incident: why it holds the node}
    actions: list[tuple[str, str, datetime]] = field(default_factory=list)  # (target, action, at) executed
    opens: list[tuple[str, datetime]] = field(default_factory=list)          # (node, at) incident opens
    finished: dict[str, Fault] = field(default_factory=dict)         # node -> the fault its last plan repaired
    breaker_tripped_at: datetime | None = None
    breaker_reason: str = ""
    queued: dict[str, datetime] = field(default_factory=dict)       # incident -> first_seen, held by the breaker
    killed_rules: set[str] = field(default_factory=set)             # run-time kill switches (audited)
    killed_codes: set[str] = field(default_factory=set)
    # waits that outlive a restart or a change of leader, keyed ``<incident>@<flaps>`` (``wait_key``: a reopened
    # incident waits afresh): when a budget first refused it (budget_wait_s counts from there) and the deadline of
    # its deferred repair; dropped when the remediator forgets the incident, or pruned once no wait can be left
    budget_since: dict[str, datetime] = field(default_factory=dict)
    defer_until: dict[str, datetime] = field(default_factory=dict)
    # incident -> (idempotency key, when) of the capped step its plan was last let run: a plan resumed at that very
    # step after a restart is not refused for the step's own start (the node agent answers the key only once)
    cleared: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    # incident -> node cordoned while the cooldown damps its repair: returned (validated) when the incident resolves,
    # also by the next leader or after a restart (nothing else would uncordon it)
    cooled: dict[str, str] = field(default_factory=dict)
    # derived from the lists above and extended as they grow (a replaced or shortened list is read again): retry
    # caps and the breaker look at one target or count nodes without a pass over every action and open
    _acts: _Index = field(default_factory=_Index, init=False, repr=False, compare=False)
    _opened: _Index = field(default_factory=_Index, init=False, repr=False, compare=False)
    _act_rows: _Rows = field(default_factory=_Rows, init=False, repr=False, compare=False)
    _open_rows: _Rows = field(default_factory=_Rows, init=False, repr=False, compare=False)
    _fault_rows: dict[str, tuple[Fault, list[Any]]] = field(default_factory=dict, init=False, repr=False,
                                                             compare=False)

    def executed(self, target: str, action: str, since: datetime) -> int:
        """How many times ``action`` ran on ``target`` at or after ``since`` (what a retry cap counts)."""
        times = self._acts.sync(self.actions, lambda a: (a[0], a[1]), lambda a: a[2])
        return sum(1 for at in times.get((target, action), ()) if at >= since)

    # -- reducers (pure: the caller passes time in) -----------------------------------------------
    def observe_open(self, node: str | None, at: datetime, spec: BreakerSpec, pool: int) -> bool:
        """Count an incident opening; True when this trips the breaker."""
        if node is None:
            return False
        self.opens.append((node, at))
        cutoff = at - timedelta(seconds=spec.window_s)
        opened = self._opened.sync(self.opens, lambda o: o[0], lambda o: o[1])
        if self._opened.oldest is not None and self._opened.oldest < cutoff:  # some fell out of the window
            self.opens = [(n, t) for n, t in self.opens if t >= cutoff]
            opened = self._opened.sync(self.opens, lambda o: o[0], lambda o: o[1])
        nodes = opened.keys()
        if self.breaker_tripped_at is None and len(nodes) >= spec.min_nodes and pool \
                and 100 * len(nodes) / pool > spec.max_percent:
            self.breaker_tripped_at = at
            self.breaker_reason = (f"{len(nodes)} of {pool} nodes ({100 * len(nodes) / pool:.0f}%) opened incidents "
                                   f"within {spec.window_s:g}s (limit {spec.max_percent:g}%)")
            return True
        return False

    def reset_breaker(self) -> list[str]:
        """Close the breaker; returns the queued incidents, oldest first (the order they are re-driven in)."""
        self.breaker_tripped_at = None
        self.breaker_reason = ""
        self.opens = []
        order = [i for i, _ in sorted(self.queued.items(), key=lambda kv: (kv[1], kv[0]))]
        self.queued.clear()
        return order

    def start(self, node: str, incident: str) -> None:
        self.active[node] = incident
        self.hold(node, incident, "in remediation")

    def hold(self, node: str, incident: str, why: str) -> None:
        self.holds.setdefault(node, {})[incident] = why

    def unhold(self, incident: str) -> None:
        for node in [n for n, h in self.holds.items() if incident in h]:
            del self.holds[node][incident]
            if not self.holds[node]:
                del self.holds[node]

    def holders(self, node: str, besides: str) -> dict[str, str]:
        """The other incidents that still hold ``node``."""
        return {i: why for i, why in self.holds.get(node, {}).items() if i != besides}

    def record_action(self, target: str, action: StepAction, at: datetime) -> None:
        self.actions.append((target, action.value, at))

    def stop(self, incident: str) -> None:
        """The incident's plan ended: the nodes it had in remediation leave the budget (their holds stay)."""
        for node in [n for n, i in self.active.items() if i == incident]:
            del self.active[node]

    def finish(self, node: str, incident: str, at: datetime, fault: Incident | None = None) -> None:
        if self.active.get(node) == incident:
            del self.active[node]
        self.finished[node] = Fault(at, fault.category, frozenset(fault.codes), fault.severity.rank) if fault \
            else Fault(at)

    def end_waits(self, incident: str) -> bool:
        """Drop every wait of ``incident`` (all its flaps); True when there was one."""
        ended = False
        for waits in (self.budget_since, self.defer_until):
            for key in [k for k in waits if k.rpartition("@")[0] == incident]:
                del waits[key]
                ended = True
        return ended

    def forget(self, incident: str) -> None:
        """An incident the remediator no longer tracks: drop its holds, budget slot, queue place and waits."""
        self.end_waits(incident)
        self.unhold(incident)
        self.queued.pop(incident, None)
        self.cleared.pop(incident, None)
        self.cooled.pop(incident, None)
        self.stop(incident)

    def prune(self, now: datetime, spec: GuardsSpec) -> None:
        """Drop what no guard can look at any more; called on every write, so the stored record stays bounded."""
        cutoff = now - timedelta(seconds=spec.retry_window_s)
        if len(acts := [a for a in self.actions if a[2] >= cutoff]) != len(self.actions):
            self.actions = acts  # only when something left, so the indexes above stay as they are otherwise
        opened = now - timedelta(seconds=spec.breaker.window_s)
        if len(opens := [(n, t) for n, t in self.opens if t >= opened]) != len(self.opens):
            self.opens = opens
        if any(t < cutoff for _, t in self.cleared.values()):  # a start the retry caps no longer count
            self.cleared = {i: kt for i, kt in self.cleared.items() if kt[1] >= cutoff}
        while len(self.cooled) > MAX_COOLED:  # oldest first; each is also dropped when its incident is forgotten
            self.cooled.pop(next(iter(self.cooled)))
        cooled = now - timedelta(seconds=spec.cooldown_s)
        self.finished = {n: f for n, f in self.finished.items() if f.at >= cooled}
        # a wait no incident can still be in: a budget wait fences after budget_wait_s, a deadline is then acted on;
        # a day's grace (retention_s) past either covers an incident the remediator forgot while another led
        stale = now - timedelta(seconds=spec.budget_wait_s + spec.retention_s)
        if any(t < stale for t in self.budget_since.values()):
            self.budget_since = {i: t for i, t in self.budget_since.items() if t >= stale}
        over = now - timedelta(seconds=spec.retention_s)
        if any(t < over for t in self.defer_until.values()):
            self.defer_until = {i: t for i, t in self.defer_until.items() if t >= over}

    # -- store form ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        rows = self._fault_rows
        for n, f in self.finished.items():
            if (got := rows.get(n)) is None or got[0] is not f:
                rows[n] = (f, _fault_row(f))
        if len(rows) > len(self.finished):
            self._fault_rows = rows = {n: rows[n] for n in self.finished}
        return {"active": self.active, "holds": self.holds,
                "actions": self._act_rows.sync(self.actions, lambda a: [a[0], a[1], a[2].isoformat()]),
                "opens": self._open_rows.sync(self.opens, lambda o: [o[0], o[1].isoformat()]),
                "finished": {n: rows[n][1] for n in self.finished},
                "breaker_tripped_at": self.breaker_tripped_at.isoformat() if self.breaker_tripped_at else None,
                "breaker_reason": self.breaker_reason, "queued": {i: t.isoformat() for i, t in self.queued.items()},
                "killed_rules": sorted(self.killed_rules), "killed_codes": sorted(self.killed_codes),
                "budget_since": {i: t.isoformat() for i, t in self.budget_since.items()},
                "defer_until": {i: t.isoformat() for i, t in self.defer_until.items()},
                "cleared": {i: [k, t.isoformat()] for i, (k, t) in self.cleared.items()}, "cooled": self.cooled}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardState:
        dt = datetime.fromisoformat
        finished = {}
        for n, f in d.get("finished", {}).items():
            finished[n] = Fault(dt(f), "", frozenset(), 0) if isinstance(f, str) else \
                Fault(dt(f[0]), f[1], frozenset(f[2]), int(f[3]))
        return cls(active=dict(d.get("active", {})), holds={n: dict(h) for n, h in d.get("holds", {}).items()},
                   actions=[(n, a, dt(t)) for n, a, t in d.get("actions", [])],
                   opens=[(n, dt(t)) for n, t in d.get("opens", [])], finished=finished,
                   breaker_tripped_at=dt(d["breaker_tripped_at"]) if d.get("breaker_tripped_at") else None,
                   breaker_reason=d.get("breaker_reason", ""),
                   queued={i: dt(t) for i, t in d.get("queued", {}).items()},
                   killed_rules=set(d.get("killed_rules", [])), killed_codes=set(d.get("killed_codes", [])),
                   budget_since={i: dt(t) for i, t in d.get("budget_since", {}).items()},
                   defer_until={i: dt(t) for i, t in d.get("defer_until", {}).items()},
                   cleared={i: (k, dt(t)) for i, (k, t) in d.get("cleared", {}).items()},
                   cooled={str(i): str(n) for i, n in d.get("cooled", {}).items()})


def wait_key(incident: Incident) -> str:
    """Where an incident's waits are kept: per flap, so a reopened incident never inherits an old deadline."""
    return f"{incident.id}@{incident.flaps}"


def _gpu_of(step: Step) -> int | None:
    g = step.params.get("gpu")
    return g if isinstance(g, int) and not isinstance(g, bool) else None


def kill_switch(incident: Incident, rule: str, state: GuardState, spec: GuardsSpec) -> Refusal | None:
    """A rule or a fault code of the incident switched off (policy file or run time): a human decides."""
    ks = spec.kill_switch
    if rule in ks.rules or rule in state.killed_rules:
        return Refusal("kill_switch", f"rule {rule} is switched off", retry=False, waiting=WaitingOn.HUMAN,
                       fence=True)
    killed = sorted((ks.codes | state.killed_codes) & set(incident.codes))
    if killed:
        return Refusal("kill_switch", f"code {', '.join(killed)} is switched off", retry=False,
                       waiting=WaitingOn.HUMAN, fence=True)
    return None


def step_check(incident: Incident, step: Step, state: GuardState, spec: GuardsSpec, now: datetime, *,
               rule: str | None = None, key: str = "") -> Refusal | None:
    """May this step run now? Never a reset, reboot or reprovision for an unknown fault (``incident``: as it stands
    now, so a plan decided before the fault turned unknown is stopped too). With ``rule`` (a step of a running plan of
    that rule) the kill switches: one switched on since the plan started stops every step but one that fences or
    pages. Then its retry cap (per GPU or per node, executed actions), unless the step ``key`` names was let run
    already (``state.cleared``: a plan resumed at it after a restart; its start is counted already and the node
    agent answers the key only once)."""
    if incident.category == "unknown_fault" and step.action in FORBIDDEN_FOR_UNKNOWN:
        return Refusal("unknown_fault", f"{step.action.value} refused: {incident.id} is an unknown fault now "
                                        f"({', '.join(incident.codes) or 'no code'}), which never gets a reset, "
                                        "reboot or reprovision automatically; a human decides",
                       retry=False, waiting=WaitingOn.HUMAN, fence=True)
    if rule is not None and step.action not in FENCING and \
            (off := kill_switch(incident, rule, state, spec)) is not None:
        return off
    cap = spec.retry_caps.get(step.action)
    if cap is None or incident.node is None:
        return None
    if key and (let := state.cleared.get(incident.id)) is not None and let[0] == key:
        return None
    target = target_of(incident, step.action, _gpu_of(step))
    window = now - timedelta(seconds=spec.retry_window_s)
    used = state.executed(target, step.action.value, window)
    if used >= cap:
        return Refusal("retry_cap", f"{step.action.value} already ran {used}x on {target} within "
                                    f"{spec.retry_window_s / 3600:g} h (cap {cap}); a human decides the next step",
                       retry=False, waiting=WaitingOn.HUMAN, fence=True)
    return None


def check(incident: Incident, plan: Plan, state: GuardState, view: ClusterView, spec: GuardsSpec,
          now: datetime) -> Refusal | None:
    """May this plan start now? None, or the first guard that says no, why, and what happens meanwhile."""
    if (off := kill_switch(incident, plan.rule, state, spec)) is not None:
        return off
    first = plan.rungs()[0].steps if plan.rungs() else ()
    operator = [s for s in first if s.action.disruptive or s.action is StepAction.CORDON]
    if plan.domain is not Domain.OPERATOR or not operator:
        return None
    if state.breaker_tripped_at is not None:
        return Refusal("breaker", f"circuit breaker open since {state.breaker_tripped_at.isoformat()}: "
                                  f"{state.breaker_reason}; reset with 'breakfix breaker reset'", retry=False,
                       waiting=WaitingOn.BREAKER)
    if incident.node is None:
        return None  # a group incident: decide() fenced only the members the budgets leave room for
    node = incident.node
    for step in sorted(operator, key=lambda s: s.action.value):
        capped = step_check(incident, step, state, spec, now)
        if capped is not None:
            return capped
    done = state.finished.get(node)
    if done is not None and (now - done.at).total_seconds() < spec.cooldown_s \
            and state.active.get(node) != incident.id and done.same_or_lesser(incident):
        return Refusal("cooldown", f"{node} finished a remediation of the same fault ({done.category}) at "
                                   f"{done.at.isoformat()}; cooldown {spec.cooldown_s:g}s", retry=True,
                       waiting=WaitingOn.COOLDOWN)
    in_flight = len(state.active) - (node in state.active)  # other nodes in remediation (a count, not a pass)
    pool = len(view.nodes) or 1
    limit = spec.budget.limit(pool)
    if in_flight + 1 > limit:
        return Refusal("budget", f"{in_flight} nodes already in remediation; the cluster budget is {limit} of "
                                 f"{pool} (max({spec.budget.max_nodes}, {spec.budget.max_percent:g}%))", retry=True,
                       waiting=WaitingOn.BUDGET)
    me = view.node(node)
    for tb in spec.topology_budgets:
        value = (me.labels.get(tb.key) if me else None) or incident.labels.get(tb.key)
        if not value:
            continue
        members = view.members(tb.key, value)
        busy = [n for n in state.active if n != node and n in members]
        tl = tb.limit(len(members) or 1)
        if len(busy) + 1 > tl:
            return Refusal("topology_budget", f"{len(busy)} nodes under {tb.key}={value} already in remediation; "
                                              f"its budget is {tl} of {len(members)}", retry=True,
                           waiting=WaitingOn.BUDGET)
    return None
