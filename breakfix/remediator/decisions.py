"""``decide`` once per incident version: the service asks for the same plan several times on its way.

The service (``remediator.service``) needs the plan when an incident arrives (does it hold its
node?), when its task starts (is the repair deferred?) and under the node lock (what runs). ``decide``
is pure, so the same incident object, the same ``ClusterView`` object and the same ``Policy`` object
(all immutable) always give the same plan: ``Decisions`` keeps the last answer per incident and
hands it back while all three are the very same objects; a newer incident version, a refreshed view
or a new policy decides again. Entries leave with their incident (``forget``) and the map is capped.
"""

from __future__ import annotations

from breakfix.remediator.decide import decide
from breakfix.remediator.policy import Policy
from breakfix.remediator.view import ClusterView
from breakfix.schemas.incident import Incident, Plan


class Decisions:
    def __init__(self, cap: int = 50_000) -> None:
        self.cap = cap
        self._last: dict[str, tuple[Incident, ClusterView, Policy, Plan]] = {}
        self.decided = 0  # decide() calls made (the rest were answered from memory)

    def plan(self, incident: Incident, view: ClusterView, policy: Policy) -> Plan:
        hit = self._last.get(incident.id)
        if hit is not None and hit[0] is incident and hit[1] is view and hit[2] is policy:
            return hit[3]
        plan = decide(incident, view, policy)
        self.decided += 1
        self._last.pop(incident.id, None)
        while len(self._last) >= self.cap:
            del self._last[next(iter(self._last))]  # the oldest answer goes first
        self._last[incident.id] = (incident, view, policy, plan)
        return plan

    def forget(self, incident_id: str) -> None:
        self._last.pop(incident_id, None)
