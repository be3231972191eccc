"""Safety guards: pure checks that may refuse a plan, and the state they keep. No I/O, no clock.

The service (``remediator.service``) asks ``check`` before it carries a plan out, passing the
time in, and keeps ``GuardState`` in the plan store (``remediator.store``) so a restart
remembers it. Every refusal carries its reason and is published as an audit record.

- kill switches: a rule or a fault code switched off refuses everything it would do;
- circuit breaker: when more than ``max_percent`` of the pool opened incidents within the
  window (and at least ``min_nodes``), automated operator actions stop until an explicit,
  audited reset (``breakfix breaker reset``);
- budgets: at most ``max(max_nodes, max_percent of the pool)`` nodes in operator remediation at
  once, per cluster and per topology key (rack, switch, ...), so a 3-node pool can still heal
  one node while a 1,000-node pool gets its percentage;
- cooldowns and retry caps: a node that just finished a plan waits ``cooldown_s``; an action
  (reboot, reset, ...) runs at most its cap per node per window, so nothing loops;
- approvals: steps that need one wait for ``breakfix approve INCIDENT STEP``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from breakfix.remediator.view import ClusterView
from breakfix.schemas.incident import Domain, Incident, Plan, StepAction

_STRICT = ConfigDict(frozen=True, extra="forbid")


class BudgetSpec(BaseModel):
    model_config = _STRICT
    max_nodes: int = Field(1, ge=0)
    max_percent: float = Field(5.0, ge=0, le=100)

    def limit(self, pool: int) -> int:
        """The larger of the absolute count and the percentage, so small pools can still heal."""
        return max(self.max_nodes, math.floor(pool * self.max_percent / 100))


class TopologyBudgetSpec(BudgetSpec):
    key: str


class BreakerSpec(BaseModel):
    model_config = _STRICT
    max_percent: float = Field(10.0, gt=0, le=100)
    min_nodes: int = Field(3, ge=1)
    window_s: float = Field(600.0, gt=0)


class KillSwitchSpec(BaseModel):
    model_config = _STRICT
    rules: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()


class GuardsSpec(BaseModel):
    model_config = _STRICT
    budget: BudgetSpec = BudgetSpec(max_nodes=2, max_percent=5.0)
    topology_budgets: tuple[TopologyBudgetSpec, ...] = ()
    breaker: BreakerSpec = BreakerSpec()
    cooldown_s: float = Field(1800.0, ge=0)
    retry_caps: dict[StepAction, int] = Field(default_factory=lambda: {StepAction.REBOOT: 1, StepAction.RESET_GPU: 2,
                                                                       StepAction.REPROVISION: 1})
    retry_window_s: float = Field(86400.0, gt=0)
    kill_switch: KillSwitchSpec = KillSwitchSpec()
    soak_s: float = Field(300.0, ge=0, description="Quiet time with no new fault before capacity returns.")


@dataclass(frozen=True, slots=True)
class Refusal:
    guard: str   # kill_switch | breaker | budget | topology_budget | cooldown | retry_cap
    reason: str
    retry: bool  # True: the same plan may pass later (budget, cooldown); False: needs a human


@dataclass
class GuardState:
    active: dict[str, str] = field(default_factory=dict)            # node -> incident in operator remediation
    actions: list[tuple[str, str, datetime]] = field(default_factory=list)  # (node, action, at)
    opens: list[tuple[str, datetime]] = field(default_factory=list)          # (node, at) incident opens
    finished: dict[str, datetime] = field(default_factory=dict)     # node -> when its last plan ended
    breaker_tripped_at: datetime | None = None
    breaker_reason: str = ""
    approvals: set[tuple[str, str]] = field(default_factory=set)    # (incident, action)

    # -- reducers (pure: the caller passes time in) -----------------------------------------------
    def observe_open(self, node: str | None, at: datetime, spec: BreakerSpec, pool: int) -> bool:
        """Count an incident opening; True when this trips the breaker."""
        if node is None:
            return False
        self.opens.append((node, at))
        cutoff = at - timedelta(seconds=spec.window_s)
        self.opens = [(n, t) for n, t in self.opens if t >= cutoff]
        nodes = {n for n, _ in self.opens}
        if self.breaker_tripped_at is None and len(nodes) >= spec.min_nodes and pool \
                and 100 * len(nodes) / pool > spec.max_percent:
            self.breaker_tripped_at = at
            self.breaker_reason = (f"{len(nodes)} of {pool} nodes ({100 * len(nodes) / pool:.0f}%) opened incidents "
                                   f"within {spec.window_s:g}s (limit {spec.max_percent:g}%)")
            return True
        return False

    def reset_breaker(self) -> None:
        self.breaker_tripped_at = None
        self.breaker_reason = ""
        self.opens.clear()

    def start(self, node: str, incident: str) -> None:
        self.active[node] = incident

    def record_action(self, node: str, action: StepAction, at: datetime) -> None:
        self.actions.append((node, action.value, at))

    def finish(self, node: str, incident: str, at: datetime) -> None:
        if self.active.get(node) == incident:
            del self.active[node]
        self.finished[node] = at

    def prune(self, now: datetime, spec: GuardsSpec) -> None:
        cutoff = now - timedelta(seconds=spec.retry_window_s)
        self.actions = [a for a in self.actions if a[2] >= cutoff]

    # -- store form ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "actions": [[n, a, t.isoformat()] for n, a, t in self.actions],
                "opens": [[n, t.isoformat()] for n, t in self.opens],
                "finished": {n: t.isoformat() for n, t in self.finished.items()},
                "breaker_tripped_at": self.breaker_tripped_at.isoformat() if self.breaker_tripped_at else None,
                "breaker_reason": self.breaker_reason, "approvals": sorted(list(a) for a in self.approvals)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardState:
        dt = datetime.fromisoformat
        return cls(active=dict(d["active"]), actions=[(n, a, dt(t)) for n, a, t in d["actions"]],
                   opens=[(n, dt(t)) for n, t in d["opens"]], finished={n: dt(t) for n, t in d["finished"].items()},
                   breaker_tripped_at=dt(d["breaker_tripped_at"]) if d["breaker_tripped_at"] else None,
                   breaker_reason=d["breaker_reason"], approvals={(i, a) for i, a in d["approvals"]})


def _operator_actions(plan: Plan) -> set[StepAction]:
    return {s.action for r in plan.rungs() for s in r.steps if s.action.disruptive or s.action is StepAction.CORDON}


def check(incident: Incident, plan: Plan, state: GuardState, view: ClusterView, spec: GuardsSpec,
          now: datetime) -> Refusal | None:
    """May this plan run now? None, or the first guard that says no and why."""
    ks = spec.kill_switch
    if plan.rule in ks.rules:
        return Refusal("kill_switch", f"rule {plan.rule} is switched off", retry=False)
    killed = sorted(ks.codes & set(incident.codes))
    if killed:
        return Refusal("kill_switch", f"code {', '.join(killed)} is switched off", retry=False)
    actions = _operator_actions(plan)
    if plan.domain is not Domain.OPERATOR or not actions or incident.node is None:
        return None
    node = incident.node
    if state.breaker_tripped_at is not None:
        return Refusal("breaker", f"circuit breaker open since {state.breaker_tripped_at.isoformat()}: "
                                  f"{state.breaker_reason}; reset with 'breakfix breaker reset'", retry=False)
    done = state.finished.get(node)
    if done is not None and (now - done).total_seconds() < spec.cooldown_s and state.active.get(node) != incident.id:
        return Refusal("cooldown", f"{node} finished a remediation at {done.isoformat()}; cooldown "
                                   f"{spec.cooldown_s:g}s", retry=True)
    window = now - timedelta(seconds=spec.retry_window_s)
    for action in sorted(actions, key=lambda a: a.value):
        cap = spec.retry_caps.get(action)
        if cap is None:
            continue
        used = sum(1 for n, a, t in state.actions if n == node and a == action.value and t >= window)
        if used >= cap:
            return Refusal("retry_cap", f"{action.value} already ran {used}x on {node} within "
                                        f"{spec.retry_window_s:g}s (cap {cap}); a human decides the next step",
                           retry=False)
    others = {n for n in state.active if n != node}
    pool = len(view.nodes) or 1
    limit = spec.budget.limit(pool)
    if len(others) + 1 > limit:
        return Refusal("budget", f"{len(others)} nodes already in remediation; the cluster budget is {limit} of "
                                 f"{pool} (max({spec.budget.max_nodes}, {spec.budget.max_percent:g}%))", retry=True)
    me = view.node(node)
    for tb in spec.topology_budgets:
        value = (me.labels.get(tb.key) if me else None) or incident.labels.get(tb.key)
        if not value:
            continue
        members = [n for n, nv in view.nodes.items() if nv.labels.get(tb.key) == value]
        busy = [n for n in others if n in members]
        tl = tb.limit(len(members) or 1)
        if len(busy) + 1 > tl:
            return Refusal("topology_budget", f"{len(busy)} nodes under {tb.key}={value} already in remediation; "
                                              f"its budget is {tl} of {len(members)}", retry=True)
    return None
