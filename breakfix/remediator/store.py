"""The remediator's durable state: plan progress and guard state, with optimistic concurrency.

``KvStore`` keeps one entry per incident (``plan.<incident>``: the incident, its plan and its
``Progress``) and one for the guards (``guards``) in a KV bucket behind the bus's ``KeyValue``
protocol (JetStream KV on a real bus, ``MemoryKv`` on the fake); every write names
the revision it read, so two writers (a stale ex-leader and the new one) cannot both win: the
loser gets ``Conflict`` and stops. ``MemoryStore`` is the same behaviour in memory for tests.
The service (``remediator.service``) resumes every plan whose progress says it was running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from breakfix.bus.protocol import KeyValue, KvConflict

BUCKET = "breakfix-remediator"
HISTORY = 5


class Conflict(KvConflict):
    """Someone else wrote this entry since we read it."""


@dataclass(frozen=True, slots=True)
class Entry:
    value: dict[str, Any]
    revision: int


class PlanStore(Protocol):
    async def get(self, key: str) -> Entry | None: ...
    async def put(self, key: str, value: dict[str, Any], revision: int | None) -> int:
        """Create (revision None) or update at ``revision``; raise ``Conflict`` otherwise."""
    async def keys(self, prefix: str) -> list[str]: ...


def plan_key(incident: str) -> str:
    return f"plan.{incident}"


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self._rev = 0

    async def get(self, key: str) -> Entry | None:
        return self.data.get(key)

    async def put(self, key: str, value: dict[str, Any], revision: int | None) -> int:
        cur = self.data.get(key)
        if (cur.revision if cur else None) != revision:
            raise Conflict(f"{key}: expected revision {revision}, found {cur.revision if cur else None}")
        self._rev += 1
        self.data[key] = Entry(orjson.loads(orjson.dumps(value)), self._rev)
        return self._rev

    async def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


class KvStore:
    def __init__(self, kv: KeyValue, bucket: str = BUCKET) -> None:
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, kv: KeyValue, bucket: str = BUCKET) -> KvStore:
        await kv.ensure_kv(bucket, history=HISTORY)
        return cls(kv, bucket)

    async def get(self, key: str) -> Entry | None:
        e = await self.kv.kv_get(self.bucket, key)
        if e is None or not e.value:
            return None
        return Entry(orjson.loads(e.value), e.revision)

    async def put(self, key: str, value: dict[str, Any], revision: int | None) -> int:
        data = orjson.dumps(value)
        try:
            if revision is None:
                return await self.kv.kv_create(self.bucket, key, data)
            return await self.kv.kv_update(self.bucket, key, data, revision)
        except KvConflict as exc:
            raise Conflict(f"{key}: {exc}") from None

    async def keys(self, prefix: str) -> list[str]:
        return await self.kv.kv_keys(self.bucket, prefix)
