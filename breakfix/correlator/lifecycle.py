"""Incident lifecycle in the grouping core: healthy signals, remediator records, expiry.

``open -> mitigating -> validating -> resolved | escalated``. Healthy signals (from the
collectors) clear the faults they match and resolve an incident once none is left and no plan
runs; ``ActionRecord``s (from the remediator, on ``breakfix.actions.>``) move it through the
remediation states. A healthy signal older than the fault never clears it. ``expire`` forgets
settled incidents after the flap window plus the retention window, so memory stays bounded.
Wired by ``correlator.grouping.Correlator`` with the shared ``CoreState``. Pure: times come from
the signals, records and the caller.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from breakfix.correlator.model import (
    KIND_FOLDED,
    KIND_RESOLVED,
    KIND_STATUS,
    KIND_UPDATED,
    SCOPE_FABRIC,
    STATUS_ESCALATED,
    STATUS_MITIGATING,
    STATUS_OPEN,
    STATUS_RESOLVED,
    STATUS_STALE,
    STATUS_VALIDATING,
    TERMINAL,
    Change,
    TrackedIncident,
)
from breakfix.correlator.state import CoreState
from breakfix.correlator.topology import settle_parent
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    IncidentChange,
    IncidentStatus,
    StepAction,
)
from breakfix.schemas.signal import Signal

_MITIGATING_EXEMPT = (StepAction.RETURN_TO_SERVICE, StepAction.NOTIFY_TENANT)
ENDPOINT_FAULT = "endpoint."  # an endpoint's checks (endpoint.down, .ttft, ...) and so its fault keys begin so


class Lifecycle:
    """Lifecycle over the shared state: healthy signals, remediator records, stale closing and expiry."""

    def __init__(self, state: CoreState) -> None:
        self.state = state
        self.rules = state.rules

    def clear(self, fk: str, s: Signal, iid: str | None) -> list[Change]:
        """A healthy signal for fault ``fk``, which incident ``iid`` holds open (``CoreState.by_fault``; None when no
        incident is indexed for it: only an endpoint's breach is then looked for, see below).

        The same fault may also be open on incidents the index does not name, and is cleared there too: the
        incident ``iid`` folded into (a parent lists its members' faults) and the members holding the fault their
        parent took (a peer's NVLink fault a GPU off the bus folded), both following their parent's resolution; and
        for an endpoint's breach, every incident it was counted on (its impact moves with its serving nodes), each
        resolving when it was its last fault."""
        inc = self.state.incidents.get(iid) if iid is not None else None
        changes: list[Change] = []
        if inc is not None:
            opened = inc.open_faults.get(fk)
            if opened is None or s.observed_at < opened:
                return []  # a healthy reading older than the fault never clears it
            self.state.by_fault.pop(fk)
            changes = self._drop(inc, fk, s, settle=True)
            if inc.parent is None and not inc.members and not fk.startswith(ENDPOINT_FAULT):
                return changes  # the common case: held nowhere else
        for other, settle in self._copies(inc, fk, s):
            changes.extend(self._drop(other, fk, s, settle=settle))
        return changes

    def _drop(self, inc: TrackedIncident, fk: str, s: Signal, *, settle: bool) -> list[Change]:
        opened = inc.open_faults.get(fk)
        if opened is None or s.observed_at < opened or inc.status in TERMINAL:
            return []
        del inc.open_faults[fk]
        inc.version += 1
        inc.note(s.observed_at, "cleared", fk, self.rules.timeline_limit)
        if settle and not inc.open_faults and inc.status is STATUS_OPEN and inc.plan is None \
                and not inc.overflow.get("open_faults"):  # faults past the cap were never listed, so never cleared
            self._set_status(inc, STATUS_RESOLVED, s.observed_at, "every fault cleared by a healthy signal")
            return [Change(KIND_RESOLVED, inc), *self._settled(inc, s.observed_at)]
        return [Change(KIND_UPDATED, inc)]

    def _copies(self, inc: TrackedIncident | None, fk: str, s: Signal) -> list[tuple[TrackedIncident, bool]]:
        """Other live incidents holding ``fk`` open, each with whether it settles on its own (see ``clear``)."""
        st = self.state
        out: dict[str, tuple[TrackedIncident, bool]] = {}
        up, depth = inc, 0
        while up is not None and up.parent is not None and depth < 4:  # parents settle with their members
            parent = st.live(up.parent)
            if parent is None:
                break
            out[parent.id] = (parent, False)
            up, depth = parent, depth + 1
        for mid in inc.members if inc is not None else ():  # members follow their parent (_settled)
            member = st.live(mid)
            if member is not None:
                out[member.id] = (member, False)
        if fk.startswith(ENDPOINT_FAULT):
            # an endpoint's breach is counted where it stood at the time: as the impact of the hardware incident then
            # standing on a serving node, or on its own; the serving nodes move, so every holder hears it is over (an
            # endpoint recovers rarely: a pass over the live incidents is cheap)
            for other in st.incidents.values():
                if other is not inc and other.id not in out and other.status not in TERMINAL \
                        and fk in other.open_faults:
                    out[other.id] = (other, other.parent is None)
        return [v for v in out.values() if fk in v[0].open_faults]

    def _settled(self, inc: TrackedIncident, at: datetime, depth: int = 0) -> list[Change]:
        """Hooks when an incident resolves or escalates: its parents settle once every member has (``settle_parent``),
        and its members follow it, theirs too (a node's reboot holding a GPU's incident that took NVLink peers)."""
        changes: list[Change] = []
        if inc.parent is not None and depth == 0:
            changes.extend(settle_parent(inc, self.state.incidents, at, self.rules.timeline_limit,
                                         self.state.by_fault.ids))
        if inc.members and depth < 4:
            for mid in inc.members:
                member = self.state.incidents.get(mid)
                if member is not None and member.status not in TERMINAL:
                    self._set_status(member, inc.status, at, f"parent incident {inc.id} settled")
                    member.version += 1
                    changes.append(Change(KIND_STATUS if inc.status is STATUS_ESCALATED
                                          else KIND_RESOLVED, member))
                    changes.extend(self._settled(member, at, depth + 1))
        return changes

    def adopt(self, change: IncidentChange, now: datetime) -> list[Change]:
        """A fabric incident from the fleet stage (partitioned mode): fold the members we own."""
        fab = change.incident
        if fab.scope is not SCOPE_FABRIC or fab.status in TERMINAL:
            return []
        changes: list[Change] = []
        for mid in fab.members:
            inc = self.state.incidents.get(mid)
            if inc is None or inc.parent is not None or inc.status in TERMINAL:
                continue
            inc.parent = fab.id
            inc.version += 1
            inc.note(fab.last_seen, "folded", f"into fabric incident {fab.id}", self.rules.timeline_limit)
            changes.append(Change(KIND_FOLDED, inc))
        return changes

    def apply_action(self, rec: ActionRecord, now: datetime) -> list[Change]:
        """Fold one audit record into the incident lifecycle."""
        inc = self.state.incidents.get(rec.incident_id)
        if inc is None:
            return []
        if rec.dry_run:
            if rec.kind is ActionKind.PLAN and rec.plan is not None and inc.plan is None:
                inc.plan = rec.plan
                inc.version += 1
                inc.note(rec.at, "plan", f"{rec.plan.rule} (dry run)", self.rules.timeline_limit)
                return [Change(KIND_STATUS, inc)]
            return []
        before = (inc.status, inc.plan, inc.waiting)
        if inc.status not in TERMINAL:
            inc.waiting = rec.waiting  # what the plan waits on now (approval, budget, ...); None once it moves
        if rec.kind is ActionKind.PLAN:
            if rec.outcome is ActionOutcome.PLANNED and rec.plan is not None:
                inc.plan = rec.plan
                inc.note(rec.at, "plan", f"{rec.plan.rule}: {' -> '.join(rec.plan.actions())}",
                         self.rules.timeline_limit)
            elif rec.outcome is ActionOutcome.COMPLETED:
                self._set_status(inc, STATUS_RESOLVED, rec.at, rec.reason or "plan completed")
            elif rec.outcome in (ActionOutcome.ESCALATED, ActionOutcome.FAILED):
                self._set_status(inc, STATUS_ESCALATED, rec.at, rec.reason or "plan failed")
        elif rec.kind is ActionKind.STEP and rec.outcome in (ActionOutcome.STARTED, ActionOutcome.SUCCEEDED):
            if rec.action is StepAction.VALIDATE:
                self._set_status(inc, STATUS_VALIDATING, rec.at, "validation started")
            elif rec.action is StepAction.RETURN_TO_SERVICE and rec.outcome is ActionOutcome.SUCCEEDED:
                self._set_status(inc, STATUS_RESOLVED, rec.at, "returned to service")
            elif rec.action is StepAction.ESCALATE:
                self._set_status(inc, STATUS_ESCALATED, rec.at, rec.reason or "escalated")
            elif rec.action not in _MITIGATING_EXEMPT:
                self._set_status(inc, STATUS_MITIGATING, rec.at, f"{rec.action} {rec.outcome}")
        if inc.status in TERMINAL:
            inc.waiting = None
        if (inc.status, inc.plan, inc.waiting) == before:
            return []
        inc.version += 1
        kind = KIND_RESOLVED if inc.status is STATUS_RESOLVED else KIND_STATUS
        changes = [Change(kind, inc)]
        if inc.status in TERMINAL:
            changes.extend(self._settled(inc, rec.at))
        return changes

    def _set_status(self, inc: TrackedIncident, status: IncidentStatus, at: datetime, why: str) -> None:
        if inc.status in TERMINAL or inc.status is status:
            return
        inc.status = status
        inc.note(at, status.value, why, self.rules.timeline_limit)
        if status in TERMINAL:
            if status is STATUS_RESOLVED:
                inc.resolved_at = at
                inc.time_to_repair_s = round((at - inc.first_seen).total_seconds(), 3)
            self._forget_faults(inc)

    def _forget_faults(self, inc: TrackedIncident) -> None:
        """A closed incident holds no fault and no place on its node any more."""
        for fk in inc.open_faults:
            if self.state.by_fault.get(fk) == inc.id:
                self.state.by_fault.pop(fk)
        inc.open_faults.clear()
        if inc.node is not None and inc.node in self.state.on_node:
            self.state.on_node[inc.node].pop(inc.id, None)

    def close_stale(self, now: datetime) -> list[Change]:
        """Open and escalated incidents with no signal for ``max_open_age_s`` close as ``stale``.

        Each gets a timeline entry and a STATUS change, so the remediator sees it and pages on-call about
        any node hold (cordon) that depended on it instead of releasing it silently (issue 12).
        """
        max_age = timedelta(seconds=self.rules.max_open_age_s)
        changes: list[Change] = []
        for inc in list(self.state.incidents.values()):
            if inc.status in (STATUS_RESOLVED, STATUS_STALE) or now - inc.last_seen <= max_age:
                continue
            was = inc.status
            inc.status = STATUS_STALE
            inc.resolved_at = now
            inc.waiting = None
            held = f"; {inc.node} may still be held (cordoned) for it: release by hand" \
                if inc.node and (inc.plan is not None or was is STATUS_ESCALATED) else ""
            inc.note(now, "stale", f"{was.value} with no signal for {(now - inc.last_seen).days} days "
                                   f"(max_open_age_s {self.rules.max_open_age_s:g}){held}", self.rules.timeline_limit)
            self._forget_faults(inc)
            inc.version += 1
            changes.append(Change(KIND_STATUS, inc))
        return changes

    def expire(self, now: datetime) -> list[str]:
        """Forget resolved incidents past flap + retention, and history past its windows.

        Escalated incidents wait for a human and are kept. Returns the forgotten incident ids.
        """
        rules = self.rules
        cutoff = now - timedelta(seconds=rules.flap_s + rules.retention_s)
        gone = {i for i, inc in self.state.incidents.items()
                if inc.status in (STATUS_RESOLVED, STATUS_STALE) and inc.resolved_at is not None
                and inc.resolved_at < cutoff and not any(self.state.live(m) for m in inc.members)}
        for iid in gone:
            inc = self.state.incidents.pop(iid)
            if self.state.by_key.get(inc.key) == iid:
                del self.state.by_key[inc.key]
        for index in (self.state.on_node, self.state.serving):
            for node in list(index):
                for iid in [i for i in index[node] if i in gone or i not in self.state.incidents]:
                    del index[node][iid]
                if not index[node]:
                    del index[node]
        self.state.by_gpu = {k: v for k, v in self.state.by_gpu.items() if self.state.live(v) is not None}
        if self.state.topology is not None:
            self.state.topology.forget(gone)
        self.state.counters.expired += len(gone)
        self._prune(now)
        return sorted(gone)

    def _prune(self, now: datetime) -> None:
        rules, st = self.rules, self.state
        peer_s = rules.peer.window_s if rules.peer else rules.sympathetic_s
        self.state.down = {k: v for k, v in self.state.down.items() if (now - v[2]).total_seconds() <= peer_s}
        if rules.suspect is not None:
            w = rules.suspect.window_s
            self.state.app_hist = {k: kept for k, v in self.state.app_hist.items()
                             if (kept := {n: t for n, t in v.items() if (now - t).total_seconds() <= w})}
        if rules.lemon is not None:
            w = rules.lemon.window_s
            self.state.bursts = {k: kept_t for k, v in self.state.bursts.items()
                           if (kept_t := [t for t in v if (now - t).total_seconds() <= w])}
        longest = max([t.window_s for t in rules.thresholds.values()]
                      + [t.window_s for t in rules.category_thresholds.values()], default=0.0)
        st.pending = {k: v for k, v in st.pending.items() if v and (now - v[-1]).total_seconds() <= longest}
