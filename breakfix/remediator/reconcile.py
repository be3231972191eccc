"""Start-up reconciliation: open incidents that no plan covers yet are taken up again after a restart.

The remediator acks an incident's ``opened`` change once it has started that incident's task, and a
plan record (``remediator.records``) is written only when the plan's first step runs. An incident
that was settling (``policy.settle_s``), waiting out a deferral, or refused for a budget or a cooldown
when the process stopped therefore has an acked change and no record: nothing would redeliver it.

Each time a replica becomes the leader, ``remediator.takeup`` reads the incident index (JetStream KV
``breakfix-incidents``, the latest ``IncidentChange`` of every incident, written by the correlator)
and hands it here one entry at a time. ``OpenIncidents.add`` keeps the entries that are not terminal, and the
terminal ones it is told to watch (bad entries are counted, never raised; ``open_incidents`` does it for a
list); ``unplanned`` picks the ones to take up again. Both are pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from breakfix.bus.protocol import KvEntry
from breakfix.schemas.incident import Incident, IncidentChange, IncidentStatus, WaitingOn

_TERMINAL = frozenset(s.value for s in IncidentStatus if s.terminal)
ATTEMPT_STRIDE = 100  # a plan's attempt number: flaps * 100 + re-decisions (``RemediatorService.spawn``)


@dataclass
class OpenIncidents:
    """What the index held: the open incidents (at most ``limit``), how many entries did not decode, and how
    many open ones were left out past the limit. Fed one entry at a time (``add``), so the terminal incidents
    the index keeps for its retention are never all in memory at once."""

    limit: int = 200_000
    incidents: list[Incident] = field(default_factory=list)
    undecodable: int = 0
    over_limit: int = 0
    watch: Container[str] = frozenset()  # terminal incidents still wanted (a node cordoned by the cooldown for them)
    ended: list[Incident] = field(default_factory=list)  # those among ``watch`` found terminal

    def add(self, entry: KvEntry) -> None:
        """Keep the entry's incident if it is open. The status is read from the plain JSON first, so terminal
        incidents are never validated in full; an entry that does not decode is counted."""
        if entry.value is None:
            return
        try:
            raw = orjson.loads(entry.value)
            status, iid = raw["incident"]["status"], raw["incident"].get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            self.undecodable += 1
            return
        if not isinstance(status, str) or not isinstance(iid, str):  # a list would not even hash: counted, not raised
            self.undecodable += 1
            return
        if status in _TERMINAL:
            if iid in self.watch:
                try:
                    self.ended.append(IncidentChange.model_validate(raw).incident)
                except ValidationError:
                    self.undecodable += 1
            return
        if len(self.incidents) >= self.limit:
            self.over_limit += 1
            return
        try:
            self.incidents.append(IncidentChange.model_validate(raw).incident)
        except ValidationError:
            self.undecodable += 1


def open_incidents(entries: Iterable[KvEntry], *, limit: int = 200_000) -> OpenIncidents:
    """The non-terminal incidents among the index's entries, at most ``limit`` of them."""
    out = OpenIncidents(limit)
    for entry in entries:
        out.add(entry)
    return out


def unplanned(incidents: Iterable[Incident], *, planned: Mapping[str, int], running: Container[str],
              queued: Container[str], covered: Mapping[str, str]) -> list[Incident]:
    """The open incidents to take up again, oldest first.

    Left out: an incident folded into a parent or covered by a fabric incident (the parent's plan acts for
    it); one with a plan in the store for this opening (``planned``: incident -> the attempt its record
    holds, an attempt of ``flaps * 100`` or later belongs to this opening); one whose dry-run or shadow plan
    already ran (such a plan keeps no record: the index shows the plan the correlator folded in); one already
    running here; one queued behind the breaker (``breakfix breaker reset`` re-drives those); one waiting on a
    human (a cancel, a fence). A live plan counts only with its record: the executor publishes the plan before
    its first step saves the record, and a stop in between must not leave the incident without a plan; and
    ``planned`` holds no cancelled records: a plan stopped by a re-decision whose new plan had not saved its
    own record yet must run.
    """
    out = []
    for inc in incidents:
        if inc.status.terminal or inc.parent is not None or inc.id in covered or inc.waiting is WaitingOn.HUMAN:
            continue
        if inc.plan is not None and (inc.plan.dry_run or inc.plan.shadow):
            continue
        if inc.id in running or inc.id in queued:
            continue
        attempt = planned.get(inc.id)
        if attempt is not None and attempt >= inc.flaps * ATTEMPT_STRIDE:
            continue
        out.append(inc)
    out.sort(key=lambda i: (i.first_seen, i.id))
    return out


__all__ = ["ATTEMPT_STRIDE", "OpenIncidents", "open_incidents", "unplanned"]
