"""The guard keeper: the remediator's ``GuardState`` and its write-behind to the plan store.

The service and the executor change the state in memory (budgets, holds, executed actions,
the breaker) and call ``save()``; one writer task stores it soon after under the ``guards`` key
of the plan store (``remediator.store``, optimistic concurrency), so many plans starting at
once cost one write, not one each. Every write prunes what no guard can look at any more
(``GuardState.prune``), so the stored record stays bounded over months of uptime. On start
``load()`` reads it back.
"""

from __future__ import annotations

import asyncio

import structlog

from breakfix.bus.clock import Clock, first_of
from breakfix.remediator.guards import GuardState
from breakfix.remediator.guardspec import GuardsSpec
from breakfix.remediator.store import Conflict, PlanStore

log = structlog.get_logger("breakfix.remediator")
GUARDS_KEY = "guards"


class GuardKeeper:
    def __init__(self, store: PlanStore, spec: GuardsSpec, clock: Clock) -> None:
        self.store = store
        self.spec = spec
        self.clock = clock
        self.state = GuardState()
        self.revision: int | None = None
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self.writes = 0

    async def load(self) -> None:
        entry = await self.store.get(GUARDS_KEY)
        if entry is not None:
            try:
                self.state = GuardState.from_dict(entry.value)
            except (KeyError, TypeError, ValueError, IndexError) as exc:  # never a crash loop on start
                log.error("guard_state_unreadable", error=repr(exc))
            self.revision = entry.revision

    def save(self) -> None:
        """Ask the writer task to store the state soon."""
        self._dirty.set()

    async def writer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await first_of(self._dirty.wait(), stop.wait(), name="remediator-guards-wait")
            if self._dirty.is_set():
                self._dirty.clear()
                await self.write()
                await asyncio.sleep(0.05)
        if self._dirty.is_set():
            await self.write()

    async def write(self) -> None:
        async with self._lock:
            self.state.prune(self.clock.now(), self.spec)
            for _ in range(3):
                try:
                    self.revision = await self.store.put(GUARDS_KEY, self.state.to_dict(), self.revision)
                    self.writes += 1
                    return
                except Conflict:
                    entry = await self.store.get(GUARDS_KEY)  # an ex-leader wrote last: ours is current, retry
                    self.revision = entry.revision if entry else None
            log.error("guard_state_not_saved")
