"""The audit writer: the remediator's records go to JetStream in pipelined rounds (group commit).

Callers are the service's ``publish`` (every ``ActionRecord`` of every plan, refusal and human verb);
records go to ``breakfix.actions.<cluster>`` through the bus's ``publish_many`` (``publish_start``
pipelining on JetStream, one-by-one with retries as its fallback). A caller still returns only once
JetStream has stored its record, so a step never runs before its record is durable; what changes is
that a burst of plans shares one round trip per batch instead of paying one per record. Records go out
in the order they were written; at most ``max_pending`` wait at once (a writer past it waits its turn).

One flusher task (named ``remediator-audit-writer``) runs while records wait and ends when none do. A
bus that calls subscribers inside ``publish`` (the in-memory bus) may run a handler that writes a record
itself; that record is published directly, as it was before, instead of waiting behind the flusher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from breakfix.bus.protocol import Bus

log = structlog.get_logger("breakfix.remediator")

Item = tuple[str, bytes, str | None, "asyncio.Future[None]"]


class AuditWriter:
    def __init__(self, bus: Bus, *, max_batch: int = 512, max_pending: int = 20_000, timeout_s: float = 120.0) -> None:
        self.bus = bus
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._queue: deque[Item] = deque()
        self._room = asyncio.Semaphore(max_pending)
        self._flusher: asyncio.Task[None] | None = None
        self.rounds = 0  # publish rounds made (records / rounds = the batching achieved)

    async def write(self, subject: str, data: bytes, msg_id: str | None) -> None:
        """Return once the record is stored; raise what publishing it raised (after the bus's own retries)."""
        if self._flusher is not None and asyncio.current_task() is self._flusher:
            await self.bus.publish(subject, data, msg_id=msg_id)  # from inside a publish: not behind ourselves
            return
        async with self._room:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append((subject, data, msg_id, fut))
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush(), name="remediator-audit-writer")
            async with asyncio.timeout(self.timeout_s):
                await fut

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait, at most ``timeout_s``, until every record written so far is stored or has failed."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(flusher), timeout_s)

    async def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self.rounds += 1
            try:
                await self.bus.publish_many([(subject, data, msg_id) for subject, data, msg_id, _ in batch])
            except asyncio.CancelledError:
                for *_, fut in batch:
                    fut.cancel()
                raise
            except Exception as exc:  # one bad record must not fail the others: each on its own, msg-ids dedupe
                log.warning("audit_batch_failed", records=len(batch), error=repr(exc))
                await self._one_by_one(batch)
                continue
            for *_, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def _one_by_one(self, batch: list[Item]) -> None:
        for subject, data, msg_id, fut in batch:
            try:
                await self.bus.publish(subject, data, msg_id=msg_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # that writer hears why (after the bus's own retries)
                log.error("audit_publish_failed", subject=subject, msg_id=msg_id, error=repr(exc))
                if not fut.done():
                    fut.set_exception(exc)
                continue
            if not fut.done():
                fut.set_result(None)
