"""Acting only while leading: the loop that asks the elector (``remediator.leader.LeaseElector``, a
Kubernetes Lease) every ``renew_s`` and opens or closes the service's ``leading`` gate. Losing the
lease cancels every plan task at once; the new leader resumes them from the plan store."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog

log = structlog.get_logger("breakfix.remediator")


class Elector(Protocol):
    leader: bool

    async def try_acquire(self) -> bool: ...


async def lead(elector: Elector, leading: asyncio.Event, tasks: dict[str, asyncio.Task[None]], stop: asyncio.Event, *,
               renew_s: float, actor: str) -> None:
    while not stop.is_set():
        try:
            leader = await elector.try_acquire()
        except Exception as exc:
            log.error("lease_failed", error=repr(exc))
            leader = False
        if leader and not leading.is_set():
            log.warning("leader", actor=actor)
            leading.set()
        elif not leader and leading.is_set():
            log.warning("not_leader", actor=actor)
            leading.clear()
            for t in tasks.values():  # stop acting at once; the new leader resumes from the store
                t.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=renew_s)
