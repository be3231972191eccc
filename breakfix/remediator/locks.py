"""One plan at a time per node: a lock per key that exists only while someone holds it or waits for it.

The remediator service (``plantask.remediate``) takes ``KeyedLocks.hold(node)`` (or
``fabric:<incident>`` for a fabric incident) around deciding and running a plan. Keys come from
incidents, so a map that kept every lock would grow with the fleet's incident history; here an entry
is dropped when its last holder or waiter leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders and waiters)

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, key: object) -> bool:
        return key in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


__all__ = ["KeyedLocks"]
