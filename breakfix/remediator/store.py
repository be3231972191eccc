"""The remediator's durable state: plan progress and guard state, with optimistic concurrency.

``KvStore`` keeps one entry per incident (``plan.<incident>``: the incident, its plan and its
``Progress``) and one for the guards (``guards``) in a JetStream KV bucket; every write names
the revision it read, so two writers (a stale ex-leader and the new one) cannot both win: the
loser gets ``Conflict`` and stops. ``MemoryStore`` is the same behaviour in memory for tests.
The service (``remediator.service``) resumes every plan whose progress says it was running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors
import orjson
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

BUCKET = "breakfix-remediator"


class Conflict(RuntimeError):
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
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str = BUCKET) -> KvStore:
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(api.KeyValueConfig(bucket=bucket, history=5,
                                                              storage=api.StorageType.FILE))
        return cls(kv)

    async def get(self, key: str) -> Entry | None:
        try:
            e = await self.kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if not e.value:
            return None
        return Entry(orjson.loads(e.value), int(e.revision or 0))

    async def put(self, key: str, value: dict[str, Any], revision: int | None) -> int:
        data = orjson.dumps(value)
        try:
            if revision is None:
                return int(await self.kv.create(key, data))
            return int(await self.kv.update(key, data, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"{key}: {exc}") from None

    async def keys(self, prefix: str) -> list[str]:
        try:
            return sorted(k for k in await self.kv.keys() if k.startswith(prefix))
        except nats.js.errors.NoKeysError:
            return []
