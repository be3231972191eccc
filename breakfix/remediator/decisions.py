"""``decide`` once per incident version: the service asks for the same plan several times on its way.

The service (``remediator.service``) needs the plan when an incident arrives (does it hold its
node?), when its task starts (is the repair deferred?) and under the node lock (what runs). ``decide``
is pure, so the same incident object, the same ``ClusterView`` object and the same ``Policy`` object
(all immutable) always give the same plan: ``Decisions`` keeps the last answer per incident and
hands it back while all three are the very same objects; a newer incident version, a refreshed view
or a new policy decides again. Only answers on the latest view are kept (a refreshed view drops the
rest, so no old view stays in memory); an entry leaves once its plan started or its incident was
forgotten (``forget``), and the map is capped. A group (fabric) incident is decided afresh every time:
its plan fences only the members the budgets leave room for now (``busy``).
"""

from __future__ import annotations

from collections.abc import Collection

from breakfix.remediator.decide import decide
from breakfix.remediator.policy import Policy
from breakfix.remediator.view import ClusterView
from breakfix.schemas.incident import Incident, Plan


class Decisions:
    def __init__(self, cap: int = 50_000) -> None:
        self.cap = cap
        self._view: ClusterView | None = None  # the view every kept answer was decided on; only one is kept alive
        self._last: dict[str, tuple[Incident, Policy, Plan]] = {}
        self.decided = 0  # decide() calls made (the rest were answered from memory)

    def plan(self, incident: Incident, view: ClusterView, policy: Policy, *, busy: Collection[str] = ()) -> Plan:
        if incident.node is None:
            self.decided += 1
            return decide(incident, view, policy, busy=busy)
        if view is not self._view:
            self._last.clear()  # answers decided on an older view are stale
            self._view = view
        hit = self._last.get(incident.id)
        if hit is not None and hit[0] is incident and hit[1] is policy:
            return hit[2]
        plan = decide(incident, view, policy)
        self.decided += 1
        self._last.pop(incident.id, None)
        while len(self._last) >= self.cap:
            del self._last[next(iter(self._last))]  # the oldest answer goes first
        self._last[incident.id] = (incident, policy, plan)
        return plan

    def forget(self, incident_id: str) -> None:
        self._last.pop(incident_id, None)
