"""The correlator daemon: consume signals and action records, publish incident changes, checkpoint.

Reads ``breakfix.signals.>`` (or one partition of it, ``breakfix.signals.*.*.<p>``) and
``breakfix.actions.>``, feeds the pure core (``correlator.grouping``) a batch at a time with
an injected clock, and publishes one ``IncidentChange`` per touched incident per batch on
``breakfix.incidents.<cluster>``, with a deterministic msg-id (``correlator.wire.msg_id``).

Durability: the checkpoint (``correlator.checkpoint``: the core's state plus the last stream
sequence of each consumer) is the truth. Messages are acked (ack-all) only after a checkpoint
that covers them is stored. At start-up the service loads the checkpoint and re-points its
durable consumers just past it, so a process that was killed re-reads exactly what its last
checkpoint did not cover. The core is deterministic in the signals, so the changes it
publishes again carry the same msg-ids and JetStream drops them: no lost signals, no
duplicate incidents, nothing reopened twice. Undecodable messages go to the dead-letter
subject with the reason and are covered by the next ack like any other.

The incident index (``correlator.index``) follows the stream: each incident's latest change is put
there as soon as every consumer has caught up (an empty pull), otherwise once ``index_interval_s``
has passed since the last put (checked after each batch and by a timer, so about the interval plus
the batch in hand), and always before a checkpoint, so a checkpoint never covers a change the index
has not stored. Under load an incident that changes in several batches is put once per interval
instead of once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from breakfix.bus.clock import Clock, SystemClock
from breakfix.bus.codec import decoder
from breakfix.bus.consumer import ConsumerStats, DecodeError, decode_message
from breakfix.bus.protocol import BlobStore, Bus, Delivery, PublishAck
from breakfix.correlator import CORE_BUILD
from breakfix.correlator.checkpoint import Checkpoint, CheckpointStore
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.index import index_for
from breakfix.correlator.metrics import CorrelatorMetrics
from breakfix.correlator.model import Change, coalesce
from breakfix.correlator.publish import Item, settle_publishes
from breakfix.correlator.wire import change_json, msg_id
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionRecord, IncidentChange
from breakfix.schemas.signal import Signal

log = structlog.get_logger("breakfix.correlator")
_INDEX_PENDING_CAP = 4096  # incidents waiting for their index put; past it they go out at once


class StoreBus(Bus, BlobStore, Protocol):
    """A bus that can also keep checkpoints (``JetStreamBus``, ``MemoryBus``)."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    durable: str = "correlator"
    partition: int = 0
    partitions: int = 1
    batch: int = 1024
    fetch_timeout_s: float = 0.05
    checkpoint_interval_s: float = 1.0
    expire_interval_s: float = 60.0
    stuck_after_s: float = 30.0  # no batch, pull or checkpoint completed for this long: not ready
    index_interval_s: float = 0.5  # the longest the incident index trails the stream while batches keep coming

    @property
    def name(self) -> str:
        return self.durable if self.partitions == 1 else f"{self.durable}-p{self.partition}"


class _WallOnly:
    """A bare ``() -> datetime`` as a ``Clock`` (monotonic from the system), for older call sites."""

    def __init__(self, wall: Callable[[], datetime]) -> None:
        self._wall = wall
        self._sys = SystemClock()

    def now(self) -> datetime:
        return self._wall()

    def monotonic(self) -> float:
        return self._sys.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self._sys.sleep(seconds)


class CorrelatorService:
    def __init__(self, bus: StoreBus, core: Correlator, clock: Clock | Callable[[], datetime], *,
                 config: ServiceConfig | None = None, checkpoints: CheckpointStore | None = None) -> None:
        self.bus = bus
        self.core = core
        self.clocks: Clock = clock if isinstance(clock, Clock) else _WallOnly(clock)
        self.clock = self.clocks.now
        self.config = config or ServiceConfig()
        self.checkpoints = checkpoints or CheckpointStore(bus, self.config.name)
        self.signal_stats = ConsumerStats()
        self.action_stats = ConsumerStats()
        self.fabric_stats = ConsumerStats()
        self.published = 0
        self.publish_failed = 0
        self.positions: dict[str, int] = {}
        self._unacked: dict[str, Delivery] = {}
        self._inflight: list[tuple[list[Item], Awaitable[list[PublishAck]]]] = []
        self._index_inflight: list[tuple[list[Item], Awaitable[object]]] = []
        self._index_pending: dict[str, Item] = {}  # incident id -> its latest change not yet put in the index
        self._index_sent = self.clocks.monotonic()
        self._behind: set[str] = set()  # consumers whose last pull returned messages
        self._lock = asyncio.Lock()
        self._dirty = False
        self.last_checkpoint_s = 0.0
        self.ready = asyncio.Event()
        self._progress = self.clocks.monotonic()
        self.metrics = CorrelatorMetrics(clock=self.clock)  # served by correlator.metrics_serve

    # -- readiness -------------------------------------------------------------------------------
    def _alive(self) -> None:
        self._progress = self.clocks.monotonic()

    @property
    def stuck(self) -> bool:
        """True when no pull, batch or checkpoint has completed for ``stuck_after_s`` (a wedged publish,
        a store that never answers): readiness should fail so an orchestrator restarts or pages."""
        return self.clocks.monotonic() - self._progress > self.config.stuck_after_s

    def is_ready(self) -> bool:
        """Restored from the checkpoint, consuming, and not stuck (for ``/readyz``)."""
        return self.ready.is_set() and not self.stuck

    # -- one batch -------------------------------------------------------------------------------
    async def _publish(self, changes: list[Change], now: datetime) -> None:
        """Send now; the acks are collected before the next checkpoint (``_settle``)."""
        if not changes:
            return
        items: list[Item] = []
        limit = self.core.rules.caps.max_change_bytes
        blog = log.bind()  # the configured logger, resolved once per batch rather than once per change
        coalesced = coalesce(changes)
        for ch in coalesced:
            inc = ch.incident
            self.metrics.change(ch)
            items.append((subjects.incident_subject(inc.cluster), change_json(ch.kind, inc, now, limit),
                          msg_id(ch.kind, inc.id, inc.version, inc.flaps)))
            blog.info("incident_" + ch.kind.value, incident=inc.id, node=inc.node, category=inc.category,
                      status=inc.status.value, signals=inc.signal_count, parent=inc.parent)
        # the changes go out now, in order; the incident index (KV bucket, latest versions) takes each incident's
        # latest change per ``index_interval_s`` (``_flush_index``); both sets of acks are collected before the
        # next checkpoint (``_settle``), so the batch loop does not wait on them
        self._inflight.append((items, await self.bus.publish_start(items)))
        self.published += len(items)
        pending = self._index_pending
        for ch, item in zip(coalesced, items, strict=True):
            pending[ch.incident.id] = item
        if len(self._inflight) >= 256:
            await self._settle()

    async def _flush_index(self) -> None:
        """Put the pending latest changes in the index now (their acks are awaited in ``_settle``).
        Called with the lock held: two flushes must not interleave, or an older version could land last."""
        self._index_sent = self.clocks.monotonic()
        if not self._index_pending:
            return
        items = list(self._index_pending.values())
        written = await index_for(self.bus).write_items_start(items)
        self._index_pending = {}  # only once the puts are out (and awaited by ``_settle``)
        self._index_inflight.append((items, written))

    def _index_due(self) -> bool:
        pending = self._index_pending
        return bool(pending) and (len(pending) >= _INDEX_PENDING_CAP or
                                  self.clocks.monotonic() - self._index_sent >= self.config.index_interval_s)

    async def _index_timer(self, stop: asyncio.Event) -> None:
        """Bounds how long the index trails when no batch comes to check it (a consumer failing its pulls)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(self.config.index_interval_s, 0.05))
            if self._index_due():
                await self.flush_index()

    @property
    def index_pending(self) -> int:
        """Incidents whose latest change is published but not yet put in the index."""
        return len(self._index_pending)

    async def flush_index(self) -> None:
        """``_flush_index`` under the lock (the consume loop when it has caught up; benchmarks)."""
        async with self._lock:
            await self._flush_index()

    async def _settle(self) -> None:
        """Wait for every publish in flight; on a failure publish again one by one (msg-ids dedupe),
        once. A change that still fails is logged, counted and dead-lettered, never retried forever."""
        await self._flush_index()  # what the next checkpoint covers is in the index too
        indexing, self._index_inflight = self._index_inflight, []
        failed_at: int | None = None
        for n, (items, written) in enumerate(indexing):
            try:
                await written
            except Exception as exc:
                log.warning("index_write_retry", error=repr(exc), changes=len(items))
                failed_at = n if failed_at is None else failed_at
        if failed_at is not None:  # put again, awaited, once, from the first refused batch on and in order (a
            for items, _ in indexing[failed_at:]:  # later batch's newer version of a key must be put last); a
                await index_for(self.bus).write_items(items)  # store that still refuses stops the daemon
        inflight, self._inflight = self._inflight, []
        for items, pending in inflight:
            try:
                acks = await pending
            except Exception as exc:
                log.warning("publish_retry", error=repr(exc), changes=len(items))
                kept: list[Item] = []
                acks = []
                for item in items:
                    try:
                        acks.append(await self.bus.publish(item[0], item[1], msg_id=item[2]))
                        kept.append(item)
                    except Exception as again:
                        await self._publish_failed(item, again)
                items = kept
            await settle_publishes(self.bus, items, acks)
        self._alive()

    async def _publish_failed(self, item: Item, exc: BaseException) -> None:
        subject, data, mid = item
        self.publish_failed += 1
        log.error("publish_failed", subject=subject, msg_id=mid, bytes=len(data), error=repr(exc))
        headers = {subjects.HDR_DLQ_REASON: f"publish failed: {exc!r}"[:1000], subjects.HDR_DLQ_SUBJECT: subject,
                   subjects.HDR_DLQ_CONSUMER: self.config.name}
        body = data if len(data) < 256 * 1024 else data[:1024]  # the head names the incident
        try:
            await self.bus.publish(subjects.dead_letter_subject(subjects.INCIDENTS.name), body, headers=headers)
        except Exception as dlq:  # the bus itself is gone: the log line and the counter are what is left
            log.error("dead_letter_failed", msg_id=mid, error=repr(dlq))

    async def _dead_letter(self, msg: Delivery, stream: str, durable: str, reason: str) -> None:
        log.warning("dead_lettered", subject=msg.subject, reason=reason)
        self.metrics.dead_lettered(reason)
        await self.bus.publish(subjects.dead_letter_subject(stream), msg.data, headers={
            subjects.HDR_DLQ_REASON: reason[:1000], subjects.HDR_DLQ_SUBJECT: msg.subject,
            subjects.HDR_DLQ_CONSUMER: durable})

    async def _batch(self, msgs: list[Delivery], *, stream: str, durable: str, decode: Callable[[bytes], Any],
                     handle: Callable[[Any, datetime], list[Change]], stats: ConsumerStats) -> None:
        async with self._lock:
            now = self.clock()
            began = self.clocks.monotonic()
            changes: list[Change] = []
            consumed = self.metrics.consumed
            for msg in msgs:
                try:
                    item = decode_message(decode, msg)  # signals: the subject must name the body's node
                except DecodeError as exc:
                    stats.dead_lettered += 1
                    await self._dead_letter(msg, stream, durable, str(exc))
                    continue
                consumed(item, stream)
                try:
                    changes.extend(handle(item, now))
                except Exception as exc:  # a poison message must not stall the partition
                    stats.failed += 1
                    log.error("handler_failed", subject=msg.subject, error=repr(exc))
                    await self._dead_letter(msg, stream, durable, f"correlator error: {exc!r}")
                    continue
                stats.handled += 1
            await self._publish(changes, now)
            if self._index_due():  # batches keep coming (a batch without changes too): the interval bounds the lag
                await self._flush_index()
            self.metrics.observe_latency(self.clocks.monotonic() - began)
            self._unacked[durable] = msgs[-1]
            self._dirty = True

    async def _consume(self, stop: asyncio.Event, *, stream: str, durable: str, decode: Callable[[bytes], Any],
                       handle: Callable[[Any, datetime], list[Change]], stats: ConsumerStats) -> None:
        while not stop.is_set():
            try:
                msgs = await self.bus.pull(stream=stream, durable=durable, batch=self.config.batch,
                                           timeout_s=self.config.fetch_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection trouble: back off, keep running
                self._behind.discard(durable)  # not a reason for the index to wait
                log.warning("pull_failed", stream=stream, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if not self._inflight:
                self._alive()  # a pull that returned (even empty) while nothing waits on a publish
            if msgs:
                self._behind.add(durable)
                await self._batch(msgs, stream=stream, durable=durable, decode=decode, handle=handle, stats=stats)
            else:
                self._behind.discard(durable)
                if self._index_pending and not self._behind:  # every consumer caught up: the index need not trail
                    await self.flush_index()

    # -- checkpoints -----------------------------------------------------------------------------
    async def checkpoint(self) -> bool:
        """Store the state and ack what it covers; False when there was nothing new.

        The state is serialised under the lock (a consistent cut); compressing and storing it
        runs while the next batches are processed, and the acks wait for the store.
        """
        started = time.perf_counter()
        async with self._lock:
            if not self._dirty and not self._index_pending:
                return False
            await self._settle()
            for durable, msg in self._unacked.items():
                self.positions[durable] = max(self.positions.get(durable, 0), msg.stream_seq)
            to_ack = list(self._unacked.values())
            self._unacked.clear()
            self._dirty = False
            body = Checkpoint(self.core.to_state(), dict(self.positions)).to_json()
        await self.checkpoints.save_json(body)
        self._alive()
        for msg in to_ack:
            await msg.ack()
        self.last_checkpoint_s = time.perf_counter() - started
        log.debug("checkpoint", positions=self.positions, bytes=self.checkpoints.last_size,
                  ms=round(self.last_checkpoint_s * 1000, 1))
        return True

    async def _checkpointer(self, stop: asyncio.Event) -> None:
        last_expire = time.monotonic()
        while not stop.is_set():
            # a big state checkpoints less often, so checkpoints stay under ~5% of the time
            interval = max(self.config.checkpoint_interval_s, 20 * self.last_checkpoint_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if time.monotonic() - last_expire >= self.config.expire_interval_s:
                async with self._lock:
                    now = self.clock()
                    stale = self.core.close_stale(now)  # published: on-call sees holds that depended on them
                    await self._publish(stale, now)
                    gone = self.core.expire(now)
                    self._dirty |= bool(gone) or bool(stale)
                last_expire = time.monotonic()
            self.metrics.checkpointed(self.clock(), stored=await self.checkpoint())  # stored or nothing new: durable

    async def restore(self) -> None:
        """Load the checkpoint (if any) and point both consumers just past it."""
        cfg = self.config
        await self.bus.ensure_streams(subjects.streams(cfg.partitions) if cfg.partitions > 1 else subjects.STREAMS)
        cp = await self.checkpoints.load()
        if cp is not None:
            self.core.load_state(cp.state)
            self.positions = dict(cp.positions)
            for inc in self.core.incidents.values():  # the open-incident gauge: escalated incidents change no more,
                self.metrics.open.apply(inc)  # so without this a restart would drop them from it (and their alert)
            log.info("checkpoint_loaded", incidents=len(self.core.incidents), positions=self.positions)
        for stream, durable, filt in self._consumers():
            await self.bus.reset_consumer(stream=stream, durable=durable, filter_subject=filt,
                                          start_seq=self.positions.get(durable, 0) + 1)

    def _consumers(self) -> list[tuple[str, str, str]]:
        cfg = self.config
        out = [(subjects.SIGNALS.name, cfg.name, subjects.signal_partition_filter(cfg.partition, cfg.partitions)),
               (subjects.ACTIONS.name, f"{cfg.name}-actions", subjects.ACTIONS_ALL)]
        if cfg.partitions > 1:  # fabric incidents from the fleet stage fold this partition's members
            out.append((subjects.INCIDENTS.name, f"{cfg.name}-fabric", subjects.INCIDENTS_ALL))
        return out

    async def run(self, stop: asyncio.Event) -> None:
        log.info("correlator_starting", core_build=CORE_BUILD)  # compiled (mypyc) or the Python sources
        await self.restore()
        consumers = self._consumers()
        (sig_stream, sig_durable, _), (act_stream, act_durable, _) = consumers[:2]
        self.ready.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._consume(stop, stream=sig_stream, durable=sig_durable, decode=decoder(Signal),
                                         handle=self.core.ingest, stats=self.signal_stats),
                           name=f"{self.config.name}-signals")
            tg.create_task(self._consume(stop, stream=act_stream, durable=act_durable,
                                         decode=decoder(ActionRecord), handle=self.core.apply_action,
                                         stats=self.action_stats), name=f"{self.config.name}-actions")
            if len(consumers) > 2:
                fab_stream, fab_durable, _ = consumers[2]
                tg.create_task(self._consume(stop, stream=fab_stream, durable=fab_durable,
                                             decode=decoder(IncidentChange), handle=self.core.adopt,
                                             stats=self.fabric_stats), name=f"{self.config.name}-fabric")
            tg.create_task(self._checkpointer(stop), name=f"{self.config.name}-checkpoint")
            tg.create_task(self._index_timer(stop), name=f"{self.config.name}-index")
        await self.checkpoint()
