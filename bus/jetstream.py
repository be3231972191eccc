"""``JetStreamBus``: the ``Bus`` protocol over a real NATS JetStream server (nats-py).

Streams come from ``schemas.subjects.STREAMS``; consumers are durable pull consumers with
explicit ack. Publishing sets ``Nats-Msg-Id`` so the server drops re-sends inside the
stream's duplicate window. Transient failures are retried by ``bus.retry`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from bus.protocol import Delivery, PublishAck
from bus.retry import transient_retry
from schemas.subjects import HDR_MSG_ID, StreamSpec


class _NatsDelivery:
    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._msg.headers or {}

    @property
    def num_delivered(self) -> int:
        try:
            return int(self._msg.metadata.num_delivered)
        except Exception:  # not a JetStream message
            return 1

    @property
    def stream_seq(self) -> int:
        try:
            return int(self._msg.metadata.sequence.stream)
        except Exception:  # not a JetStream message
            return 0

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        await self._msg.term()


class JetStreamBus:
    """A connected JetStream bus. Create with ``await JetStreamBus.connect(url)``."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self._subs: dict[tuple[str, str], JetStreamContext.PullSubscription] = {}
        self._stores: dict[str, ObjectStore] = {}

    @classmethod
    async def connect(cls, url: str, *, name: str = "breakfix") -> JetStreamBus:
        nc = await nats.connect(
            url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True
        )
        return cls(nc, nc.jetstream(timeout=10.0))

    @property
    def client(self) -> Client:
        return self._nc

    async def ensure_streams(self, specs: Sequence[StreamSpec]) -> None:
        for spec in specs:
            config = api.StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                duplicate_window=spec.duplicate_window_s,
                max_age=spec.max_age_s,
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                subject_transform=api.SubjectTransform(src=spec.transform[0], dest=spec.transform[1])
                if spec.transform else None,
            )
            await self._ensure_stream(config, keep_transform=spec.transform is None)

    async def _ensure_stream(self, config: api.StreamConfig, *, keep_transform: bool) -> None:
        name = config.name or ""
        try:
            info = await transient_retry(lambda: self._js.stream_info(name))
        except nats.js.errors.NotFoundError:
            await transient_retry(lambda: self._js.add_stream(config))
            return
        if keep_transform:  # only the partitioned correlator decides partitioning; others keep it
            config.subject_transform = info.config.subject_transform
        await transient_retry(lambda: self._js.update_stream(config))

    async def ensure_consumer(self, *, stream: str, durable: str, filter_subject: str,
                              ack_wait_s: float = 30.0, max_deliver: int = 20) -> None:
        try:
            await self._js.consumer_info(stream, durable)
            return
        except nats.js.errors.NotFoundError:
            pass
        config = api.ConsumerConfig(
            durable_name=durable,
            name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=filter_subject,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=20_000,
        )
        await transient_retry(lambda: self._js.add_consumer(stream, config=config))

    async def reset_consumer(self, *, stream: str, durable: str, filter_subject: str, start_seq: int,
                             ack_all: bool = True, max_ack_pending: int = 200_000,
                             ack_wait_s: float = 60.0) -> None:
        sub = self._subs.pop((stream, durable), None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await transient_retry(lambda: self._js.delete_consumer(stream, durable))
        config = api.ConsumerConfig(
            durable_name=durable,
            name=durable,
            ack_policy=api.AckPolicy.ALL if ack_all else api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            filter_subject=filter_subject,
            ack_wait=ack_wait_s,
            max_ack_pending=max_ack_pending,
        )
        await transient_retry(lambda: self._js.add_consumer(stream, config=config))

    async def put_blob(self, bucket: str, name: str, data: bytes) -> None:
        store = await self._object_store(bucket)
        await transient_retry(lambda: store.put(name, data))

    async def get_blob(self, bucket: str, name: str) -> bytes | None:
        store = await self._object_store(bucket)
        try:
            result = await transient_retry(lambda: store.get(name))
        except nats.js.errors.ObjectNotFoundError:
            return None
        return bytes(result.data or b"")

    async def _object_store(self, bucket: str) -> ObjectStore:
        store = self._stores.get(bucket)
        if store is None:
            try:
                store = await self._js.object_store(bucket)
            except nats.js.errors.BucketNotFoundError:
                store = await self._js.create_object_store(bucket, config=api.ObjectStoreConfig(
                    bucket=bucket, storage=api.StorageType.FILE))
            self._stores[bucket] = store
        return store

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> PublishAck:
        hdrs = dict(headers or {})
        if msg_id:
            hdrs[HDR_MSG_ID] = msg_id
        ack = await transient_retry(lambda: self._js.publish(subject, data, headers=hdrs or None))
        return PublishAck(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))

    async def pull(self, *, stream: str, durable: str, batch: int, timeout_s: float) -> list[Delivery]:
        key = (stream, durable)
        sub = self._subs.get(key)
        if sub is None:
            sub = await self._js.pull_subscribe_bind(durable=durable, stream=stream)
            self._subs[key] = sub
        try:
            msgs = await sub.fetch(batch=batch, timeout=timeout_s)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        return [_NatsDelivery(m) for m in msgs]

    async def stream_messages(self, stream: str) -> int:
        info = await self._js.stream_info(stream)
        return int(info.state.messages)

    async def close(self) -> None:
        for sub in self._subs.values():
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if not self._nc.is_closed:
            await self._nc.drain()
