"""The plan store's typed records: one ``PlanRecord`` per incident (the incident, its plan, its progress).

Written by the service (``remediator.service``) and the human-verb handler (``remediator.human``)
through the ``PlanStore`` API (``remediator.store``: get / put with the revision read / keys),
read back on start to resume plans that were running. ``PlanBook`` is the typed door to that
store, so nothing else reads plan entries by string key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from breakfix.remediator.store import PlanStore, plan_key
from breakfix.schemas.incident import Incident, IncidentStatus, Plan

# An incident status that ends a plan's wait for approval (the wait is cancelled, a late approve refused): fixed, or
# no longer reported. An escalated incident does not: a page went out, and the plan may escalate before the step it
# asks approval for.
WAIT_ENDS = frozenset({IncidentStatus.RESOLVED, IncidentStatus.STALE})


class ProgressState(StrEnum):
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    DONE = "done"
    ESCALATED = "escalated"
    CANCELLED = "cancelled"
    DENIED = "denied"

    @property
    def live(self) -> bool:
        """A plan a restart must pick up again (running) or keep waiting (approval)."""
        return self in (ProgressState.RUNNING, ProgressState.AWAITING_APPROVAL)


class Progress(BaseModel):
    """Where a plan stands: rung and step, and the approvals a human gave (``"rung:step"``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    incident: str
    attempt: int
    rung: int = 0
    step: int = 0
    state: ProgressState = ProgressState.RUNNING
    approved: list[str] = []
    deadline: datetime | None = None  # deferred repair: act at this time at the latest

    @property
    def tag(self) -> str:
        return f"{self.rung}:{self.step}"


class PlanRecord(BaseModel):
    """One entry of the plan store (key ``plan.<incident>``)."""

    model_config = ConfigDict(extra="forbid")

    incident: Incident
    plan: Plan
    progress: Progress

    def current_step_action(self) -> str | None:
        rungs = self.plan.rungs()
        p = self.progress
        if p.rung < len(rungs) and p.step < len(rungs[p.rung].steps):
            return rungs[p.rung].steps[p.step].action.value
        return None


class PlanBook:
    """Typed access to the plan store: ``(record, revision)`` in, revisions out, conflicts raised."""

    def __init__(self, store: PlanStore) -> None:
        self.store = store

    async def get(self, incident: str) -> tuple[PlanRecord, int] | None:
        entry = await self.store.get(plan_key(incident))
        if entry is None:
            return None
        try:
            return PlanRecord.model_validate(entry.value), entry.revision
        except ValidationError:
            return None  # an entry from an incompatible version: treated as absent, never crashes a start

    async def revision(self, incident: str) -> int | None:
        entry = await self.store.get(plan_key(incident))
        return entry.revision if entry else None

    async def put(self, record: PlanRecord, revision: int | None) -> int:
        return await self.store.put(plan_key(record.incident.id), record.model_dump(mode="json", by_alias=True),
                                    revision)

    def saver(self, incident: Incident, plan: Plan, revision: int | None) -> Callable[[Progress], Awaitable[None]]:
        """The executor's ``save`` for one run of ``plan``: each call stores ``PlanRecord(incident, plan, progress)``
        at the revision the previous call wrote (``revision`` first; ``Conflict`` when another writer moved it).
        Neither the incident nor the plan changes during a run, so their JSON is made once, not at every step, and
        goes into every write as it is (``orjson.Fragment``: no Python dict of it is built or walked again)."""
        fixed: dict[str, Any] = {"incident": orjson.Fragment(incident.model_dump_json(by_alias=True)),
                                 "plan": orjson.Fragment(plan.model_dump_json(by_alias=True))}
        rev = revision
        key = plan_key(incident.id)

        async def save(progress: Progress) -> None:
            nonlocal rev
            rev = await self.store.put(key, {**fixed, "progress": progress.model_dump(mode="json", by_alias=True)},
                                       rev)

        return save

    async def all(self) -> list[PlanRecord]:
        out = []
        for key in await self.store.keys("plan."):
            got = await self.get(key.removeprefix("plan."))
            if got is not None:
                out.append(got[0])
        return out
