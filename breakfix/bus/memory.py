"""``MemoryBus``: an in-process fake of the ``Bus`` protocol for pure tests and replay.

It keeps JetStream's semantics that breakfix relies on: streams bound to subject filters,
msg-id duplicate detection, durable pull consumers that remember their position, explicit
ack, and redelivery of nak'ed or un-acked messages (on ``redeliver_unacked``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from breakfix.bus.memkv import MemoryKv
from breakfix.bus.protocol import ConsumerState, Delivery, KvEntry, PublishAck, Unsubscribe, subject_matches
from breakfix.schemas.subjects import StreamSpec


@dataclass
class _Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass
class _Consumer:
    filter_subject: str
    next_index: int = 0
    ack_all: bool = False
    pending: dict[int, int] = field(default_factory=dict)  # seq -> deliveries
    redeliver: list[int] = field(default_factory=list)


@dataclass
class _Stream:
    spec: StreamSpec
    messages: list[_Stored] = field(default_factory=list)
    msg_ids: set[str] = field(default_factory=set)
    consumers: dict[str, _Consumer] = field(default_factory=dict)


class _MemDelivery:
    def __init__(self, bus: MemoryBus, stream: _Stream, consumer: _Consumer, stored: _Stored, n: int) -> None:
        self._bus, self._stream, self._consumer, self._stored, self._n = bus, stream, consumer, stored, n

    @property
    def subject(self) -> str:
        return self._stored.subject

    @property
    def data(self) -> bytes:
        return self._stored.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._stored.headers

    @property
    def num_delivered(self) -> int:
        return self._n

    @property
    def stream_seq(self) -> int:
        return self._stored.seq

    async def ack(self) -> None:
        if self._consumer.ack_all:
            for seq in [q for q in self._consumer.pending if q <= self._stored.seq]:
                del self._consumer.pending[seq]
        self._consumer.pending.pop(self._stored.seq, None)

    async def term(self) -> None:
        self._consumer.pending.pop(self._stored.seq, None)

    async def nak(self, delay: float | None = None) -> None:
        if self._stored.seq in self._consumer.pending:
            self._consumer.redeliver.append(self._stored.seq)
            self._bus._wake()


class MemoryBus:
    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.responders: dict[str, Callable[[bytes], Awaitable[bytes]]] = {}
        self._cond = asyncio.Condition()
        self.closed = False
        self.kv = MemoryKv()
        self.subscribers: list[tuple[str, Callable[[str, bytes], Awaitable[None]]]] = []

    def _wake(self) -> None:
        async def _notify() -> None:
            async with self._cond:
                self._cond.notify_all()

        asyncio.get_running_loop().create_task(_notify(), name="memorybus-wake")

    async def ensure_streams(self, specs: Sequence[StreamSpec]) -> None:
        for spec in specs:
            if spec.transform is not None:
                raise NotImplementedError("MemoryBus does not apply subject transforms; use a real nats-server")
            existing = self.streams.get(spec.name)
            if existing is None:
                self.streams[spec.name] = _Stream(spec)
            else:
                existing.spec = spec

    async def ensure_consumer(self, *, stream: str, durable: str, filter_subject: str,
                              ack_wait_s: float = 30.0, max_deliver: int = 20) -> None:
        st = self.streams[stream]
        consumer = st.consumers.setdefault(durable, _Consumer(filter_subject))
        consumer.filter_subject = filter_subject  # a new filter replaces the old, as JetStream updates it

    async def reset_consumer(self, *, stream: str, durable: str, filter_subject: str, start_seq: int,
                             ack_all: bool = True, max_ack_pending: int = 200_000,
                             ack_wait_s: float = 60.0) -> None:
        st = self.streams[stream]
        st.consumers[durable] = _Consumer(filter_subject, next_index=max(start_seq, 1) - 1, ack_all=ack_all)

    async def request(self, subject: str, data: bytes, *, timeout_s: float) -> bytes:
        handler = self.responders.get(subject)
        if handler is None:
            raise TimeoutError(f"no responder on {subject}")
        return await asyncio.wait_for(handler(data), timeout=timeout_s)

    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> None:
        self.responders[subject] = handler

    async def ensure_kv(self, bucket: str, *, history: int = 1, max_age_s: float | None = None) -> None:
        await self.kv.ensure_kv(bucket, history=history, max_age_s=max_age_s)

    async def kv_exists(self, bucket: str) -> bool:
        return await self.kv.kv_exists(bucket)

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        return await self.kv.kv_get(bucket, key)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        return await self.kv.kv_put(bucket, key, value)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        return await self.kv.kv_create(bucket, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int:
        return await self.kv.kv_update(bucket, key, value, revision)

    async def kv_delete(self, bucket: str, key: str) -> None:
        await self.kv.kv_delete(bucket, key)

    async def kv_keys(self, bucket: str, prefix: str = "") -> list[str]:
        return await self.kv.kv_keys(bucket, prefix)

    async def kv_snapshot(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0,
                          limit: int = 1_000_000) -> list[KvEntry]:
        return await self.kv.kv_snapshot(bucket, prefix, timeout_s=timeout_s, limit=limit)

    def kv_scan(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0) -> AsyncIterator[KvEntry]:
        return self.kv.kv_scan(bucket, prefix, timeout_s=timeout_s)

    async def kv_put_many(self, bucket: str, values: Mapping[str, bytes]) -> None:
        await self.kv.kv_put_many(bucket, values)

    async def kv_put_start(self, bucket: str, values: Mapping[str, bytes]) -> Awaitable[object]:
        return await self.kv.kv_put_start(bucket, values)

    def kv_watch(self, bucket: str, prefix: str = "") -> AsyncIterator[KvEntry]:
        return self.kv.kv_watch(bucket, prefix)

    async def put_blob(self, bucket: str, name: str, data: bytes) -> None:
        self.blobs[(bucket, name)] = bytes(data)

    async def get_blob(self, bucket: str, name: str) -> bytes | None:
        return self.blobs.get((bucket, name))

    def _stream_for(self, subject: str) -> _Stream:
        for st in self.streams.values():
            if any(subject_matches(p, subject) for p in st.spec.subjects):
                return st
        raise LookupError(f"no stream for subject {subject!r}")

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> PublishAck:
        st = self._stream_for(subject)
        for pattern, handler in list(self.subscribers):
            if subject_matches(pattern, subject):
                await handler(subject, data)
        return await self._store(st, subject, data, msg_id, headers)

    async def _store(self, st: _Stream, subject: str, data: bytes, msg_id: str | None,
                     headers: Mapping[str, str] | None) -> PublishAck:
        if msg_id and msg_id in st.msg_ids:
            return PublishAck(st.spec.name, len(st.messages), duplicate=True)
        if msg_id:
            st.msg_ids.add(msg_id)
        seq = len(st.messages) + 1
        st.messages.append(_Stored(seq, subject, data, dict(headers or {})))
        async with self._cond:
            self._cond.notify_all()
        return PublishAck(st.spec.name, seq, duplicate=False)

    async def publish_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[PublishAck]:
        return [await self.publish(subject, data, msg_id=msg_id) for subject, data, msg_id in items]

    async def publish_start(self, items: Sequence[tuple[str, bytes, str | None]]) -> Awaitable[list[PublishAck]]:
        fut: asyncio.Future[list[PublishAck]] = asyncio.get_running_loop().create_future()
        fut.set_result(await self.publish_many(items))
        return fut

    def _take(self, st: _Stream, c: _Consumer, batch: int) -> list[Delivery]:
        out: list[Delivery] = []
        while c.redeliver and len(out) < batch:
            seq = c.redeliver.pop(0)
            c.pending[seq] = c.pending.get(seq, 1) + 1
            out.append(_MemDelivery(self, st, c, st.messages[seq - 1], c.pending[seq]))
        while c.next_index < len(st.messages) and len(out) < batch:
            stored = st.messages[c.next_index]
            c.next_index += 1
            if subject_matches(c.filter_subject, stored.subject):
                c.pending[stored.seq] = 1
                out.append(_MemDelivery(self, st, c, stored, 1))
        return out

    async def pull(self, *, stream: str, durable: str, batch: int, timeout_s: float) -> list[Delivery]:
        st = self.streams[stream]
        c = st.consumers[durable]
        got = self._take(st, c, batch)
        if got:
            return got
        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait(), timeout=timeout_s)
        except TimeoutError:
            return []
        return self._take(st, c, batch)

    async def publish_core(self, subject: str, data: bytes) -> None:
        for pattern, handler in list(self.subscribers):
            if subject_matches(pattern, subject):
                await handler(subject, data)
        for st in self.streams.values():  # a stream captures core publishes on its subjects, as JetStream does
            if any(subject_matches(p, subject) for p in st.spec.subjects):
                await self._store(st, subject, data, None, {})
                return

    async def flush(self) -> None:
        return None

    async def subscribe(self, subject: str, handler: Callable[[str, bytes], Awaitable[None]]) -> Unsubscribe:
        entry = (subject, handler)
        self.subscribers.append(entry)

        async def unsubscribe() -> None:
            if entry in self.subscribers:
                self.subscribers.remove(entry)

        return unsubscribe

    async def stream_messages(self, stream: str) -> int:
        return len(self.streams[stream].messages)

    async def consumer_state(self, stream: str, durable: str) -> ConsumerState | None:
        st = self.streams[stream]
        c = st.consumers.get(durable)
        if c is None:
            return None
        pending = sum(1 for m in st.messages[c.next_index:] if subject_matches(c.filter_subject, m.subject))
        delivered = st.messages[c.next_index - 1].seq if c.next_index else 0
        floor = min(c.pending, default=delivered + 1) - 1
        return ConsumerState(num_pending=pending, num_ack_pending=len(c.pending), ack_floor=max(floor, 0),
                             delivered=delivered)

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        return self.streams[stream].consumers.pop(durable, None) is not None

    def redeliver_unacked(self) -> None:
        """Simulate ack-wait expiry: every pending message is delivered again."""
        for st in self.streams.values():
            for c in st.consumers.values():
                c.redeliver.extend(sorted(set(c.pending) - set(c.redeliver)))

    def messages(self, stream: str) -> list[_Stored]:
        return list(self.streams[stream].messages)

    async def close(self) -> None:
        self.closed = True
