"""Pure topology grouping: the same failure under one switch, NVLink domain or rack is one incident.

The grouping core (``correlator.grouping``) hands every node/GPU incident of a topological
category (per ``correlator.rules`` ``topology``) to ``TopologyGrouper.observe``. When
``min_nodes`` different nodes under one label value (``switch=leaf-03``) open such incidents
within ``window_s``, the grouper opens one FABRIC incident that names the shared component,
folds the member incidents into it (``parent``), and returns the changes. Later members join
the open fabric incident. The fleet stage (``correlator.fleet``) runs the same grouper over
incidents published by partitioned correlators. No I/O, no clock reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from breakfix.correlator.model import (
    DOMAIN_OPERATOR,
    KIND_FOLDED,
    KIND_OPENED,
    KIND_RESOLVED,
    KIND_UPDATED,
    SCOPE_FABRIC,
    STATUS_RESOLVED,
    TERMINAL,
    Change,
    TrackedIncident,
    incident_id,
    worse,
)
from breakfix.correlator.rules import Rules, TopologyRule


@dataclass
class _Candidates:
    """Members seen under one (cluster, category, label value), oldest first."""

    members: dict[str, tuple[str, datetime]] = field(default_factory=dict)  # incident id -> (node, first_seen)
    fabric: str | None = None


def settle_parent(inc: TrackedIncident, incidents: dict[str, TrackedIncident], at: datetime,
                  limit: int, by_fault: Mapping[str, str] | None = None, depth: int = 0) -> list[Change]:
    """A member resolved or escalated: resolve its parent (fabric or node group) once every member has and none of
    the parent's own faults is open. A parent's own faults are those ``by_fault`` names it for: a node incident a
    GPU off the bus opened keeps that fault when a GPU incident folded into it clears (a group parent has none)."""
    parent = incidents.get(inc.parent) if inc.parent else None
    if parent is None or parent.status in TERMINAL:
        return []
    live = [incidents[m] for m in parent.members if m in incidents and incidents[m].status not in TERMINAL]
    own = {fk: t for fk, t in parent.open_faults.items() if by_fault.get(fk) == parent.id} if by_fault else {}
    parent.open_faults = {**own, **{fk: t for m in live for fk, t in m.open_faults.items()}}
    if not live and not own:
        parent.status = STATUS_RESOLVED
        parent.resolved_at = at
        parent.time_to_repair_s = round((at - parent.first_seen).total_seconds(), 3)
        parent.open_faults.clear()
        parent.version += 1
        parent.note(at, "resolved", "every member incident settled", limit)
        # a parent that is itself a member (a GPU's reboot incident under its node's) settles its own parent in turn
        above = settle_parent(parent, incidents, at, limit, by_fault, depth + 1) if depth < 4 else []
        return [Change(KIND_RESOLVED, parent), *above]
    return []


def fabric_key(cluster: str, rule: TopologyRule, value: str) -> str:
    return f"fabric|{cluster}|{rule.category}|{rule.key}={value}"


class TopologyGrouper:
    """Candidate members per topology key, and which fabric incident each key has open."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.groups: dict[str, _Candidates] = {}

    def observe(self, inc: TrackedIncident, incidents: dict[str, TrackedIncident],
                by_key: dict[str, str], at: datetime) -> list[Change]:
        """Consider one node/GPU incident; open or grow a fabric incident when the rule says so."""
        rule = self.rules.topology.get(inc.category)
        if rule is None or inc.parent is not None or inc.scope is SCOPE_FABRIC or inc.node is None:
            return []
        value = inc.labels.get(rule.key)
        if not value:
            return []
        key = fabric_key(inc.cluster, rule, value)
        group = self.groups.setdefault(key, _Candidates())
        fab = incidents.get(group.fabric) if group.fabric else None
        if fab is not None and fab.status not in TERMINAL:
            return self._join(fab, inc, at)
        window = timedelta(seconds=rule.window_s)
        group.members[inc.id] = (inc.node, inc.first_seen)
        for mid, (_node, seen) in list(group.members.items()):
            member = incidents.get(mid)
            if inc.first_seen - seen > window or member is None or member.status in TERMINAL or (
                    member is not inc and member.parent is not None):  # folded since: its parent stands for it
                del group.members[mid]
        nodes = {node for node, _ in group.members.values()}
        if len(nodes) < rule.min_nodes:
            return []
        first = min(group.members.items(), key=lambda kv: kv[1][1])
        fab = TrackedIncident(
            id=incident_id(key, first[0]), key=key, cluster=inc.cluster, scope=SCOPE_FABRIC, node=None,
            category=inc.category, severity=inc.severity, domain=DOMAIN_OPERATOR,
            title=f"{inc.category} on {len(nodes)} nodes under {rule.key} {value}",
            first_seen=first[1][1], last_seen=inc.last_seen, topology={rule.key: value},
        )
        fab.labels[rule.key] = value
        fab.note(at, "opened", f"{len(nodes)} nodes under {rule.key}={value} within {rule.window_s:g}s",
                 self.rules.timeline_limit)
        incidents[fab.id] = fab
        by_key[key] = fab.id
        group.fabric = fab.id
        changes = [Change(KIND_OPENED, fab)]
        for mid in list(group.members):
            changes.extend(self._join(fab, incidents[mid], at, opening=True))
        group.members.clear()
        return changes

    def _join(self, fab: TrackedIncident, inc: TrackedIncident, at: datetime, opening: bool = False) -> list[Change]:
        inc.parent = fab.id
        inc.version += 1
        inc.note(at, "folded", f"into fabric incident {fab.id}", self.rules.timeline_limit)
        fab.members[inc.id] = None
        if inc.node is not None:
            fab.nodes[inc.node] = None
        for k, v in inc.counts.items():
            fab.counts[k] = fab.counts.get(k, 0) + v
        fab.signal_count += inc.signal_count
        fab.severity = worse(fab.severity, inc.severity)
        fab.first_seen = min(fab.first_seen, inc.first_seen)
        fab.last_seen = max(fab.last_seen, inc.last_seen)
        for fk in inc.open_faults:
            fab.open_faults[fk] = inc.open_faults[fk]
        if len(fab.evidence) < self.rules.evidence_messages and inc.evidence:
            fab.evidence.append(f"{inc.node}: {inc.evidence[0]}")
        value = next(iter(fab.topology.values()), "")
        fab.title = f"{fab.category} on {len(fab.nodes)} nodes under {next(iter(fab.topology), '')} {value}"
        changes = [Change(KIND_FOLDED, inc)]
        if not opening:
            fab.version += 1
            changes.append(Change(KIND_UPDATED, fab))
        return changes

    def forget(self, incident_ids: set[str]) -> None:
        for key in list(self.groups):
            g = self.groups[key]
            for mid in incident_ids & g.members.keys():
                del g.members[mid]
            if g.fabric in incident_ids:
                g.fabric = None
            if not g.members and g.fabric is None:
                del self.groups[key]
