"""``MemoryKv``: the ``KeyValue`` protocol in memory, with JetStream KV's semantics, for ``MemoryBus``.

Each bucket has one revision counter (as a KV bucket is one stream); a delete leaves a
tombstone that ``kv_create`` may overwrite; watchers get every current value, then each change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field

from breakfix.bus.protocol import KvConflict, KvEntry

WATCH_QUEUE = 10_000  # a watcher that falls this far behind loses the oldest changes (JetStream's are bounded too)


@dataclass
class _Bucket:
    history: int
    revision: int = 0
    entries: dict[str, KvEntry] = field(default_factory=dict)  # value None: deleted
    watchers: list[tuple[str, asyncio.Queue[KvEntry]]] = field(default_factory=list)


class MemoryKv:
    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}

    async def ensure_kv(self, bucket: str, *, history: int = 1, max_age_s: float | None = None) -> None:
        self.buckets.setdefault(bucket, _Bucket(history))

    def _bucket(self, bucket: str) -> _Bucket:
        return self.buckets.setdefault(bucket, _Bucket(1))

    def _write(self, b: _Bucket, key: str, value: bytes | None) -> int:
        b.revision += 1
        entry = KvEntry(key=key, value=None if value is None else bytes(value), revision=b.revision)
        b.entries[key] = entry
        for prefix, queue in b.watchers:
            if key.startswith(prefix):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(entry)
        return b.revision

    async def kv_exists(self, bucket: str) -> bool:
        return bucket in self.buckets

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        e = self._bucket(bucket).entries.get(key)
        return e if e is not None and e.value is not None else None

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        return self._write(self._bucket(bucket), key, value)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        b = self._bucket(bucket)
        cur = b.entries.get(key)
        if cur is not None and cur.value is not None:
            raise KvConflict(f"{bucket}/{key}: exists")
        return self._write(b, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int:
        b = self._bucket(bucket)
        cur = b.entries.get(key)
        if (cur.revision if cur is not None else 0) != revision:
            raise KvConflict(f"{bucket}/{key}: not at revision {revision}")
        return self._write(b, key, value)

    async def kv_delete(self, bucket: str, key: str) -> None:
        b = self._bucket(bucket)
        if key in b.entries:
            self._write(b, key, None)

    async def kv_keys(self, bucket: str, prefix: str = "") -> list[str]:
        entries = self._bucket(bucket).entries
        return sorted(k for k, e in entries.items() if e.value is not None and k.startswith(prefix))

    async def kv_snapshot(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0,
                          limit: int = 1_000_000) -> list[KvEntry]:
        entries = self._bucket(bucket).entries
        current = sorted((e for k, e in entries.items() if k.startswith(prefix) and e.value is not None),
                         key=lambda e: e.revision)
        return current[:limit]

    async def kv_scan(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0) -> AsyncIterator[KvEntry]:
        for e in await self.kv_snapshot(bucket, prefix, timeout_s=timeout_s):
            yield e

    async def kv_put_many(self, bucket: str, values: Mapping[str, bytes]) -> None:
        for key, value in values.items():
            await self.kv_put(bucket, key, value)

    async def kv_put_start(self, bucket: str, values: Mapping[str, bytes]) -> Awaitable[object]:
        await self.kv_put_many(bucket, values)
        return _stored()

    async def kv_watch(self, bucket: str, prefix: str = "") -> AsyncIterator[KvEntry]:
        b = self._bucket(bucket)
        queue: asyncio.Queue[KvEntry] = asyncio.Queue(WATCH_QUEUE)
        current = sorted((e for k, e in b.entries.items() if k.startswith(prefix) and e.value is not None),
                         key=lambda e: e.revision)
        watcher = (prefix, queue)
        b.watchers.append(watcher)
        try:
            for e in current:
                yield e
            while True:
                yield await queue.get()
        finally:
            b.watchers.remove(watcher)


async def _stored() -> None:
    """What ``kv_put_start`` returns here: the puts were made before it returned."""
