"""The ``KeyValue`` protocol over JetStream KV buckets (nats-py), used by ``JetStreamBus``.

Buckets are created on first ``ensure_kv`` (file storage); conditional writes map nats-py's
wrong-last-sequence errors to ``KvConflict``. Callers are the remediator's plan store, guard
state and any stage that keeps latest values; none of them sees a nats type.

Conditional writes (``kv_create``, ``kv_update``) go out on the bus's pipelined publisher when it
gives one: a KV write is a publish to ``$KV.<bucket>.<key>`` with ``Nats-Expected-Last-Subject-Sequence``
(the KV wire contract), and its ack comes back without nats-py's per-request timer and inbox. The
caller still waits for the ack; a key the pipeline cannot take (not a plain KV key) and a create that
meets a deleted key's tombstone go through nats-py, which handles both.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE
from nats.js.kv import KeyValue as NatsKv

from breakfix.bus.pipeline import PipelinedPublisher, PublishError
from breakfix.bus.protocol import KvConflict, KvEntry
from breakfix.bus.retry import transient_retry

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST = (10071, 10164)  # JetStream's wrong (constant) last sequence: someone else wrote the key
_PLAIN_KEY = re.compile(r"^[-/_=a-zA-Z0-9][-/_=.a-zA-Z0-9]*(?<!\.)$")  # NATS KV's valid keys


def _conflict(exc: BaseException) -> bool:
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return True
    # the server's "wrong last sequence" (10071) surfaces as a plain APIError on some paths
    return isinstance(exc, nats.js.errors.APIError) and getattr(exc, "err_code", None) == 10071


class JetStreamKv:
    """Key-value buckets of one JetStream context; one handle per bucket, opened once."""

    def __init__(self, js: JetStreamContext, pipeline: Callable[[], PipelinedPublisher] | None = None,
                 timeout_s: float = 10.0) -> None:
        self._js = js
        self._pipeline = pipeline
        self._timeout_s = timeout_s
        self._buckets: dict[str, NatsKv] = {}
        self._opening = asyncio.Lock()  # a burst of first calls opens each bucket once, not once per call

    async def ensure_kv(self, bucket: str, *, history: int = 1, max_age_s: float | None = None) -> None:
        await self._bucket(bucket, history=history, max_age_s=max_age_s)

    async def _bucket(self, bucket: str, *, history: int = 1, max_age_s: float | None = None) -> NatsKv:
        kv = self._buckets.get(bucket)
        if kv is not None:
            return kv
        async with self._opening:
            kv = self._buckets.get(bucket)
            if kv is None:
                kv = await self._open(bucket, history=history, max_age_s=max_age_s)
                self._buckets[bucket] = kv
        return kv

    async def _open(self, bucket: str, *, history: int, max_age_s: float | None) -> NatsKv:
        try:
            kv = await transient_retry(lambda: self._js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            config = api.KeyValueConfig(bucket=bucket, history=history, ttl=max_age_s,
                                        storage=api.StorageType.FILE)
            kv = await transient_retry(lambda: self._js.create_key_value(config))
        return kv

    async def kv_exists(self, bucket: str) -> bool:
        if bucket in self._buckets:
            return True
        try:
            kv = await transient_retry(lambda: self._js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            return False
        self._buckets[bucket] = kv
        return True

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        kv = await self._bucket(bucket)
        try:
            e = await transient_retry(lambda: kv.get(key))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if e.operation in (KV_DEL, KV_PURGE):
            return None
        return KvEntry(key=key, value=bytes(e.value or b""), revision=int(e.revision or 0))

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        kv = await self._bucket(bucket)
        return int(await transient_retry(lambda: kv.put(key, value)))

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        kv = await self._bucket(bucket)
        if self._pipeline is not None and _PLAIN_KEY.match(key):
            try:
                return await self._write_at(bucket, key, value, 0)
            except KvConflict:
                pass  # it exists, or a tombstone of a deleted key is there: nats-py tells them apart
        try:
            return int(await transient_retry(lambda: kv.create(key, value)))
        except nats.js.errors.Error as exc:
            if _conflict(exc):
                raise KvConflict(f"{bucket}/{key}: exists") from None
            raise

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int:
        kv = await self._bucket(bucket)
        if self._pipeline is not None and _PLAIN_KEY.match(key) and revision:
            return await self._write_at(bucket, key, value, revision)
        try:
            return int(await transient_retry(lambda: kv.update(key, value, last=revision)))
        except nats.js.errors.Error as exc:
            if _conflict(exc):
                raise KvConflict(f"{bucket}/{key}: not at revision {revision}") from None
            raise

    async def _write_at(self, bucket: str, key: str, value: bytes, last: int) -> int:
        """Store ``value`` only while ``key`` is at revision ``last`` (0: absent), on the pipelined publisher."""
        assert self._pipeline is not None
        pipeline = self._pipeline()

        async def once() -> int:
            fut = await pipeline.send(f"$KV.{bucket}.{key}", value, {_EXPECTED_LAST: str(last)})
            try:
                return (await asyncio.wait_for(fut, self._timeout_s)).seq
            except PublishError as exc:
                if exc.status == "503":  # as nats-py reports it, so the retry below treats it the same
                    raise nats.errors.NoRespondersError from None
                raise

        try:
            return await transient_retry(once)
        except PublishError as exc:
            if exc.err_code in _WRONG_LAST:
                raise KvConflict(f"{bucket}/{key}: not at revision {last}") from None
            raise

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self._bucket(bucket)
        await transient_retry(lambda: kv.delete(key))

    async def kv_keys(self, bucket: str, prefix: str = "") -> list[str]:
        kv = await self._bucket(bucket)
        try:
            keys = await transient_retry(lambda: kv.keys())
        except nats.js.errors.NoKeysError:
            return []
        return sorted(k for k in keys if k.startswith(prefix))

    async def kv_snapshot(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0,
                          limit: int = 1_000_000) -> list[KvEntry]:
        """One watch of the bucket, filtered on the server by ``prefix``, up to its end-of-values marker."""
        out: list[KvEntry] = []
        async for e in self.kv_scan(bucket, prefix, timeout_s=timeout_s):
            out.append(e)
            if len(out) >= limit:
                break
        return out

    async def kv_scan(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0) -> AsyncIterator[KvEntry]:
        kv = await self._bucket(bucket)
        watcher = await kv.watch(f"{prefix}>", ignore_deletes=True)
        loop = asyncio.get_running_loop()
        n = 0
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                async for e in watcher:
                    if e is None:  # the end of the current values
                        break
                    if e.operation in (KV_DEL, KV_PURGE):
                        continue
                    yield KvEntry(e.key, bytes(e.value or b""), int(e.revision or 0))
                    n += 1
                    if n % 1000 == 0:
                        deadline.reschedule(loop.time() + timeout_s)  # a timeout without progress, not in all
        finally:
            with contextlib.suppress(nats.errors.Error, AttributeError):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def kv_watch(self, bucket: str, prefix: str = "") -> AsyncIterator[KvEntry]:
        kv = await self._bucket(bucket)
        watcher = await kv.watch(">")
        try:
            async for e in watcher:
                if e is None:  # the marker between the current values and live changes
                    continue
                if not e.key.startswith(prefix):
                    continue
                deleted = e.operation in (KV_DEL, KV_PURGE)
                yield KvEntry(key=e.key, value=None if deleted else bytes(e.value or b""),
                              revision=int(e.revision or 0))
        finally:
            with contextlib.suppress(nats.errors.Error, AttributeError):
                await watcher.stop()  # type: ignore[no-untyped-call]
