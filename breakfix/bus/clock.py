"""The one clock type every daemon is given: wall time (UTC, aware) and a monotonic reading.

Composition roots pass ``SystemClock()``; tests and the simulator pass ``ManualClock`` and move
it forward, so nothing waits on real time to see time pass. Decisions never read a clock: they
take ``now`` as an argument from whoever holds the clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall time for records, monotonic time for intervals and deadlines."""

    def now(self) -> datetime:
        """The current UTC time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to. ``sleep`` advances it and yields once to the loop."""

    def __init__(self, start: datetime | None = None, mono: float = 1000.0) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = mono

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def set(self, when: datetime) -> None:
        delta = (when - self._now).total_seconds()
        self.advance(max(0.0, delta))

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()


async def first_of(*waits: Coroutine[Any, Any, Any], name: str = "first-of") -> None:
    """Return when the first of ``waits`` (an event set, a stop, a clock sleep) finishes; the others are cancelled
    and awaited, so no wait outlives the call (the daemons' "work arrived, or stop, or time passed" loops)."""
    tasks = [asyncio.create_task(w, name=f"{name}-{i}") for i, w in enumerate(waits)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
