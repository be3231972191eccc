"""Pure fleet derivations for the console and ``breakfix breaker status``: the nodes x GPUs grid,
topology groups, the circuit breaker's state and budget use.

Inputs are the incident index (latest incidents) and audit records (``BREAKFIX_ACTIONS``); there is
no inventory service, so the grid shows every node an incident ever named, with the GPU count
seen (at least 8).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from breakfix.schemas.incident import ActionKind, ActionRecord, Domain, Incident, IncidentStatus

STATES = ("healthy", "cordoned", "remediating", "held", "lemon")  # least to most urgent
_RANK = {s: i for i, s in enumerate(STATES)}
TOPOLOGY_KEYS = ("nvlink_domain", "switch", "rack")
MAX_NODES = 5000
_NODE_ACTIONS = frozenset({"cordon", "drain", "reboot", "reprovision"})


@dataclass(frozen=True, slots=True)
class BreakerState:
    open: bool
    since: datetime | None = None
    reason: str = ""
    reset_by: str = ""

    def describe(self) -> str:
        if self.open:
            return f"OPEN since {self.since.isoformat() if self.since else '?'}: {self.reason}"
        return "closed" + (f" (last reset by {self.reset_by})" if self.reset_by else "")


def breakers(records: Iterable[ActionRecord], clusters: Iterable[str] = ()) -> dict[str, BreakerState]:
    """Each cluster's breaker (every one in ``clusters``, closed when its records say nothing), from
    that cluster's records only: a reset in one cluster closes no other."""
    mine: dict[str, list[ActionRecord]] = {c: [] for c in clusters}
    for r in records:
        mine.setdefault(r.cluster, []).append(r)
    return {c: breaker_state(rs) for c, rs in sorted(mine.items())}


def breaker_state(records: Iterable[ActionRecord]) -> BreakerState:
    """Open when a breaker refusal came after the last reset (the records of one cluster)."""
    state = BreakerState(False)
    for r in sorted(records, key=lambda r: r.at):
        if r.kind is ActionKind.REFUSAL and r.details.get("guard") == "breaker":
            if not state.open:
                state = BreakerState(True, r.at, r.reason)
        elif r.kind is ActionKind.BREAKER or r.details.get("command") == "breaker-reset":
            state = BreakerState(False, reset_by=r.actor)
    return state


def _holds(inc: Incident) -> bool:
    return inc.domain is Domain.OPERATOR and inc.parent is None and inc.status is not IncidentStatus.RESOLVED


def cell_state(inc: Incident) -> str:
    if inc.category == "hardware_support" or inc.labels.get("breakfix.io/lemon") == "true":
        return "lemon"
    if inc.status is IncidentStatus.ESCALATED:
        return "held"
    if inc.status in (IncidentStatus.MITIGATING, IncidentStatus.VALIDATING):
        return "remediating"
    if inc.waiting is not None:
        return "held" if inc.waiting.value in ("human", "approval") else "cordoned"
    return "cordoned" if inc.plan is not None and inc.plan.domain is Domain.OPERATOR else "held"


@dataclass
class NodeRow:
    node: str
    cluster: str
    group: str
    gpus: list[str]  # one state per GPU index
    node_state: str = "healthy"
    incidents: list[str] = field(default_factory=list)


def _worse(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def fleet_grid(incidents: Iterable[Incident], group_by: str = "rack") -> dict[str, list[NodeRow]]:
    """Rows per topology group (``group_by`` one of TOPOLOGY_KEYS), nodes sorted by name."""
    rows: dict[str, NodeRow] = {}
    for inc in incidents:
        for node in (inc.node,) if inc.node else inc.nodes:
            row = rows.get(node)
            if row is None:
                if len(rows) >= MAX_NODES:
                    continue
                group = inc.labels.get(group_by) or inc.topology.get(group_by) or "-"
                row = rows[node] = NodeRow(node, inc.cluster, group, ["healthy"] * 8)
            elif row.group == "-" and inc.labels.get(group_by):
                row.group = inc.labels[group_by]
            need = max((g.index or 0) + 1 for g in inc.gpus) if inc.gpus else 0
            if need > len(row.gpus):
                row.gpus.extend(["healthy"] * (need - len(row.gpus)))
            if not _holds(inc):
                continue
            state = cell_state(inc)
            row.incidents.append(inc.id)
            if inc.gpus and inc.scope.value == "gpu":
                for g in inc.gpus:
                    row.gpus[g.index or 0] = _worse(row.gpus[g.index or 0], state)
                if inc.plan is not None and any(a in _NODE_ACTIONS for a in inc.plan.actions()):
                    row.gpus = [_worse(s, "cordoned") for s in row.gpus]  # the whole node is fenced
            else:
                row.node_state = _worse(row.node_state, state)
                row.gpus = [_worse(s, state) for s in row.gpus]
    groups: dict[str, list[NodeRow]] = defaultdict(list)
    for row in sorted(rows.values(), key=lambda r: r.node):
        groups[row.group].append(row)
    return dict(sorted(groups.items()))


def budget_use(incidents: Iterable[Incident]) -> dict[str, int]:
    """Nodes in operator remediation now, per cluster and per topology key (``rack=r1``): a node counts once,
    however many of its incidents are being remediated (its links' incident beside its reboot, say)."""
    use: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for inc in incidents:
        if inc.status in (IncidentStatus.MITIGATING, IncidentStatus.VALIDATING) and _holds(inc) and inc.node:
            node = (inc.cluster, inc.node)
            use[f"cluster={inc.cluster}"].add(node)
            for key in ("rack", "switch", "nodepool"):
                if inc.labels.get(key):
                    use[f"{key}={inc.labels[key]}"].add(node)
    return {k: len(v) for k, v in sorted(use.items())}


def kill_switches(records: Iterable[ActionRecord]) -> dict[tuple[str, str], tuple[bool, str]]:
    """``(cluster, "rule:<r>" | "code:<c>")`` -> (on, by) from the latest kill-switch record of each:
    a switch holds only in its own cluster."""
    out: dict[tuple[str, str], tuple[bool, str]] = {}
    for r in sorted(records, key=lambda r: r.at):
        if r.kind is ActionKind.KILL_SWITCH:
            key = f"rule:{r.details['rule']}" if r.details.get("rule") else f"code:{r.details.get('code', '?')}"
            out[(r.cluster, key)] = (r.details.get("enabled") == "true", r.actor)
    return dict(sorted(out.items()))
