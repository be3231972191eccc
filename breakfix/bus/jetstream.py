"""``JetStreamBus``: the ``Bus`` protocol over a real NATS JetStream server (nats-py).

Streams come from ``schemas.subjects.STREAMS``; consumers are durable pull consumers with
explicit ack. Publishing sets ``Nats-Msg-Id`` so the server drops re-sends inside the
stream's duplicate window. Transient failures are retried by ``bus.retry`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from breakfix.bus.connect import ConnectionEvents, connect_client
from breakfix.bus.jskv import JetStreamKv
from breakfix.bus.options import NatsOptions
from breakfix.bus.pipeline import PipelinedPublisher, PublishError
from breakfix.bus.protocol import ConsumerState, Delivery, KvEntry, PublishAck, Unsubscribe
from breakfix.bus.puller import BatchPuller
from breakfix.bus.retry import transient_retry
from breakfix.bus.streamconfig import serves, updated
from breakfix.bus.streamread import DirectGetUnavailable, read_direct, read_ordered
from breakfix.schemas.subjects import HDR_MSG_ID, StreamSpec

log = structlog.get_logger("breakfix.bus")


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

    def __init__(self, nc: Client, js: JetStreamContext, events: ConnectionEvents | None = None, *,
                 user: str | None = None) -> None:
        self.user = user  # the identity's name on a secured bus (from its .creds), None on an open one
        self._direct_refused: set[str] = set()  # streams this identity could not open to direct gets
        self._nc = nc
        self._js = js
        self._events = events
        self._subs: list[Subscription] = []  # core subscriptions (serve, subscribe), closed on close()
        self._pullers: dict[tuple[str, str], BatchPuller] = {}
        self._pipeline: PipelinedPublisher | None = None
        self._stores: dict[str, ObjectStore] = {}
        self._kv = JetStreamKv(js, self._publisher)

    @classmethod
    async def connect(cls, target: str | NatsOptions, *, name: str = "breakfix",
                      stop: asyncio.Event | None = None) -> JetStreamBus:
        """Connect to ``target`` (a URL or full ``NatsOptions``). Without ``stop``: one bounded attempt
        that raises ``BusConnectError`` (CLI). With ``stop``: retry with backoff until connected, or
        raise ``ConnectAborted`` once ``stop`` is set (daemons). See ``bus.connect``."""
        opts = target if isinstance(target, NatsOptions) else NatsOptions(url=target)
        nc, events = await connect_client(opts, name=name, stop=stop)
        return cls(nc, nc.jetstream(timeout=10.0), events, user=events.user)  # read from its .creds to connect

    def _denied(self, subject: str) -> Callable[[], bool]:
        events = self._events
        return lambda: events is not None and events.denied(subject)

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
                allow_direct=True,  # history reads by readers are direct gets (bus.streamread)
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
        merged = updated(config, info.config)  # breakfix's fields only: what an operator tuned stays
        if not serves(config, info.config):
            await transient_retry(lambda: self._js.update_stream(merged))
        elif merged.allow_direct != info.config.allow_direct and name not in self._direct_refused:
            try:  # a stream made before direct gets: only that setting changes, and only where it may
                await asyncio.wait_for(self._js.update_stream(merged), timeout=2.0)
            except Exception:  # an identity that may not update streams (a node needs only STREAM.INFO): a
                self._direct_refused.add(name)  # service will, once, on its start

    async def ensure_consumer(self, *, stream: str, durable: str, filter_subject: str,
                              ack_wait_s: float = 30.0, max_deliver: int = 20) -> None:
        try:
            info = await self._js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            pass
        else:
            if (info.config.filter_subject or ">") != filter_subject:  # the stage now reads other subjects
                config = info.config.evolve(filter_subject=filter_subject, filter_subjects=None)
                await transient_retry(lambda: self._js.add_consumer(stream, config=config))
            return
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
        puller = self._pullers.pop((stream, durable), None)
        if puller is not None:
            await puller.close()
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

    async def ensure_kv(self, bucket: str, *, history: int = 1, max_age_s: float | None = None) -> None:
        await self._kv.ensure_kv(bucket, history=history, max_age_s=max_age_s)

    async def kv_exists(self, bucket: str) -> bool:
        return await self._kv.kv_exists(bucket)

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None:
        return await self._kv.kv_get(bucket, key)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        return await self._kv.kv_put(bucket, key, value)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        return await self._kv.kv_create(bucket, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int:
        return await self._kv.kv_update(bucket, key, value, revision)

    async def kv_delete(self, bucket: str, key: str) -> None:
        await self._kv.kv_delete(bucket, key)

    async def kv_keys(self, bucket: str, prefix: str = "") -> list[str]:
        return await self._kv.kv_keys(bucket, prefix)

    async def kv_snapshot(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0,
                          limit: int = 1_000_000) -> list[KvEntry]:
        return await self._kv.kv_snapshot(bucket, prefix, timeout_s=timeout_s, limit=limit)

    def kv_scan(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0) -> AsyncIterator[KvEntry]:
        return self._kv.kv_scan(bucket, prefix, timeout_s=timeout_s)

    async def kv_put_many(self, bucket: str, values: Mapping[str, bytes]) -> None:
        """On JetStream a KV put is a publish to ``$KV.<bucket>.<key>`` (the KV wire contract): send them
        pipelined, one round trip per batch instead of one per key."""
        if values:
            await (await self.kv_put_start(bucket, values))

    async def kv_put_start(self, bucket: str, values: Mapping[str, bytes]) -> Awaitable[list[PublishAck]]:
        """``kv_put_many`` in two halves: the puts are sent now, in order; await the result for their acks."""
        await self._kv.ensure_kv(bucket)
        return await self.publish_start([(f"$KV.{bucket}.{k}", v, None) for k, v in values.items()])

    def kv_watch(self, bucket: str, prefix: str = "") -> AsyncIterator[KvEntry]:
        return self._kv.kv_watch(bucket, prefix)

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
        ack = await transient_retry(lambda: self._js.publish(subject, data, headers=hdrs or None),
                                    give_up=self._denied(subject))
        return PublishAck(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))

    async def pull(self, *, stream: str, durable: str, batch: int, timeout_s: float) -> list[Delivery]:
        key = (stream, durable)
        puller = self._pullers.get(key)
        if puller is None:
            puller = self._pullers[key] = BatchPuller(self._nc, stream, durable)
        return [_NatsDelivery(m) for m in await puller.pull(batch, timeout_s)]

    async def publish_start(self, items: Sequence[tuple[str, bytes, str | None]]) -> Awaitable[list[PublishAck]]:
        """Send now (framed as one write, ``PipelinedPublisher.send_many``), collect the acks later: the caller keeps
        working meanwhile."""
        done = await self._publisher().send_many(items)

        async def acks() -> list[PublishAck]:
            return list(await asyncio.wait_for(done, timeout=30.0))

        return acks()

    def _publisher(self) -> PipelinedPublisher:
        if self._pipeline is None:
            self._pipeline = PipelinedPublisher(self._nc)
        return self._pipeline

    async def publish_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[PublishAck]:
        """Publish many messages with one round of acks; on any failure fall back to one-by-one
        publishing with retries, which msg-ids make idempotent."""
        try:
            return await (await self.publish_start(items))
        except (nats.errors.Error, PublishError, TimeoutError) as exc:
            log.warning("publish_many_fallback", error=repr(exc), messages=len(items))
            return [await self.publish(subject, data, msg_id=msg_id) for subject, data, msg_id in items]

    async def request(self, subject: str, data: bytes, *, timeout_s: float) -> bytes:
        msg = await self._nc.request(subject, data, timeout=timeout_s)
        return bytes(msg.data)

    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> None:
        """Answer requests on ``subject`` (one exact subject). Only a core request is handled: published on
        that subject, with a reply inbox. nats-server does not check a push consumer's delivery subject against
        its creator's publish permissions, so anyone who may create a consumer can have a stream's messages
        delivered here; such a delivery carries its stored subject and a ``$JS.ACK`` reply (or none), and is
        dropped and logged, never run (a node agent's reboot must come from the remediator's own request)."""
        async def on_request(msg: Msg) -> None:
            if msg.subject != subject or not (msg.reply or "").startswith("_INBOX."):
                log.warning("request_refused", served=subject, subject=msg.subject[:200],
                            reply=(msg.reply or "")[:80], why="not a core request on this subject")
                return
            reply = await handler(msg.data)
            await self._nc.publish(msg.reply, reply)

        self._subs.append(await self._nc.subscribe(subject, cb=on_request))
        await self._nc.flush()  # the server knows the responder before anyone asks

    async def publish_core(self, subject: str, data: bytes) -> None:
        await self._nc.publish(subject, data)

    async def flush(self) -> None:
        await self._nc.flush()

    async def subscribe(self, subject: str, handler: Callable[[str, bytes], Awaitable[None]]) -> Unsubscribe:
        async def on_msg(msg: Msg) -> None:
            await handler(msg.subject, msg.data)

        sub = await self._nc.subscribe(subject, cb=on_msg)
        self._subs.append(sub)
        await self._nc.flush()

        async def unsubscribe() -> None:
            if sub in self._subs:
                self._subs.remove(sub)
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

        return unsubscribe

    async def read_stream(self, stream: str, subject: str, *, since: datetime | None = None, idle_s: float = 1.0,
                          limit: int = 500_000) -> list[bytes]:
        try:
            info = await self._js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            return []
        if not info.state.messages:
            return []
        if self.user:  # a secured bus: readers create no consumer for a history read (bus.streamread)
            try:
                return await read_direct(self._nc, stream, subject, since=since, idle_s=idle_s, limit=limit)
            except DirectGetUnavailable as exc:  # an account or a stream from before direct gets: the old way
                log.warning("direct_get_unavailable", stream=stream, error=str(exc))
        return await read_ordered(self._js, stream, subject, since=since, idle_s=idle_s, limit=limit)

    async def stream_messages(self, stream: str) -> int:
        info = await transient_retry(lambda: self._js.stream_info(stream))
        return int(info.state.messages)

    async def consumer_state(self, stream: str, durable: str) -> ConsumerState | None:
        try:
            info = await transient_retry(lambda: self._js.consumer_info(stream, durable))
        except nats.js.errors.NotFoundError:
            return None
        return ConsumerState(num_pending=int(info.num_pending or 0), num_ack_pending=int(info.num_ack_pending or 0),
                             ack_floor=int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
                             delivered=int(info.delivered.stream_seq or 0) if info.delivered else 0)

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        puller = self._pullers.pop((stream, durable), None)
        if puller is not None:
            await puller.close()
        try:
            await transient_retry(lambda: self._js.delete_consumer(stream, durable))
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def close(self) -> None:
        for puller in self._pullers.values():
            await puller.close()
        self._pullers.clear()
        if self._pipeline is not None:
            await self._pipeline.close()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if not self._nc.is_closed:
            await self._nc.drain()
