"""The notifier inside the remediator daemon: incident changes and records in, notifications out.

The remediator hands it what it already has (``remediator.metrics.Observers``: every incident change it consumes,
every record it wrote once JetStream stored it, and every human verb its control consumer reads), so notifying costs
no second consumer. At start-up ``run`` reads both streams once from the start, merged in time order, so the pure
``NotifyCore`` rebuilds what was paged and resolved; the NOTIFICATION records on the actions stream say what was
delivered already, and is not sent again. Events older than ``replay_send_s`` before the start are only remembered
(Alertmanager keeps re-posting what still fires; nobody is paged twice), except a resolve whose page the records
show delivered on a PagerDuty or webhook channel and the resolve not: it joins that channel's retry. The hooks only
queue: a slow or failing channel can only fill its own bounded queue (``notify.sender.Dispatcher``). Only the leader
sends (``is_leader``); a standby consumes nothing, so when it starts to lead it replays the streams again (what the
last leader paged, delivered and resolved). On-call acks and silences are believed only when the subject's user and
cluster match the record (``schemas.subjects.human_subject_parts``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

import aiohttp
import orjson
import structlog
from pydantic import ValidationError

from breakfix.bus.clock import Clock
from breakfix.bus.codec import action_subject_mismatch, encode
from breakfix.bus.protocol import Bus, Delivery
from breakfix.remediator.notify.channels import HttpSender, Sender
from breakfix.remediator.notify.config import NotifyConfig, PagerDutyChannel, SlackChannel, load_secret
from breakfix.remediator.notify.core import NotifyCore, StepSeen
from breakfix.remediator.notify.model import Notification, NotifyAction
from breakfix.remediator.notify.sender import Dispatcher
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionKind, ActionRecord, IncidentChange

log = structlog.get_logger("breakfix.remediator.notify")
PULL_BATCH = 1024
MAX_HELD_LIVE = 100_000    # live inputs that wait for a replay to end
MAX_REPLAY_FRESH = 10_000  # notifications a replay keeps until it has read what was delivered already
EPOCH = datetime.min.replace(tzinfo=UTC)
Replayed = tuple[datetime | None, Callable[[], None]]  # when it happened (None: unknown), and applying it
Timed = tuple[datetime, Callable[[], None]]
HUMAN_KINDS = frozenset({ActionKind.ACK, ActionKind.SILENCE, ActionKind.RELEASE, ActionKind.CANCEL,
                         ActionKind.BREAKER})


def check_secrets(config: NotifyConfig) -> None:
    """Fail at start-up, not at the first page, when a credential is missing (raises ``SecretError``)."""
    for c in config.channels:
        if isinstance(c, PagerDutyChannel):
            load_secret(c.routing_key_file, c.routing_key_env, f"channel {c.name}")
        elif isinstance(c, SlackChannel):
            load_secret(c.webhook_url_file, c.webhook_url_env, f"channel {c.name}")


@dataclass(frozen=True, slots=True)
class Delivered:
    """A NOTIFICATION record of a delivery that succeeded (``sender.notification_record``)."""

    cluster: str
    channel: str
    notification: str
    paged_key: str = ""  # the dedup key, when the delivery was a trigger (a page opened there)


def decode_record(data: bytes) -> ActionRecord | StepSeen | Delivered | None:
    """Total, and cheap for what the notifier skips: decided on the raw dict, so plan-heavy records are never
    validated, step records become a ``StepSeen`` and successful deliveries a ``Delivered``. None for what the
    notifier ignores or cannot read (the stage that owns the stream dead-letters bad messages; the notifier must
    not do it a second time)."""
    try:
        d = orjson.loads(data)
        if not isinstance(d, dict):
            return None
        kind, outcome = d.get("kind"), d.get("outcome")
        raw = d.get("details")
        details: dict[str, object] = raw if isinstance(raw, dict) else {}
        if kind == "notification" and "notification" in details:
            cluster, channel, nid = d.get("cluster"), details.get("channel"), details.get("notification")
            if outcome != "succeeded" or not isinstance(cluster, str) or not isinstance(channel, str) \
                    or not isinstance(nid, str):
                return None
            key = details.get("dedup_key")
            paged = key if details.get("action") == "trigger" and isinstance(key, str) else ""
            return Delivered(cluster, channel, nid, paged)
        if kind == "step" and details.get("guard") != "breaker":
            iid, action = d.get("incident_id"), d.get("action")
            if outcome == "dry_run" or not isinstance(iid, str) or not isinstance(action, str):
                return None
            return StepSeen(iid, action, str(outcome))
        wanted = kind in ("ack", "silence", "release", "cancel", "refusal", "step", "breaker") \
            or (kind == "plan" and outcome in ("escalated", "failed")) \
            or (kind == "notification" and (details.get("guard") == "breaker" or d.get("waiting") == "human")) \
            or (kind == "approval" and details.get("command") == "breaker-reset")
        return ActionRecord.model_validate(d) if wanted else None
    except (orjson.JSONDecodeError, ValidationError):
        return None


def decode_change(data: bytes) -> IncidentChange | None:
    try:
        return IncidentChange.model_validate_json(data)
    except (ValidationError, ValueError):
        return None


def believed(rec: ActionRecord, subject: str) -> bool:
    """A human verb counts only from its own on-call subject, published by exactly the user it names; any other
    record only from a subject its author may publish on (``bus.codec.action_subject_mismatch``: a plan or step
    record on an operator's subject is a forgery, never a page)."""
    if rec.kind not in HUMAN_KINDS:
        return action_subject_mismatch(rec, subject) is None
    parts = subjects.human_subject_parts(subject)
    return parts is not None and parts[0] == subjects.token(rec.cluster) and parts[2] == rec.actor


class NotifierService:
    """Fed by the remediator's hooks (``change``, ``record``: objects it already decoded, no second consumer);
    ``run`` delivers, after one replay of the streams that rebuilds what was paged before a restart (and another
    each time this replica starts to lead)."""

    def __init__(self, bus: Bus, config: NotifyConfig, clock: Clock, *, actor: str = "remediator",
                 durable: str = "remediator-notify", is_leader: Callable[[], bool] = lambda: True,
                 on_delivery: Callable[[str, bool], None] | None = None, replay_send_s: float = 300.0,
                 senders: dict[str, Sender] | None = None, replay: bool = True, term_poll_s: float = 1.0) -> None:
        check_secrets(config)
        self.bus = bus
        self.config = config
        self.clock = clock
        self.actor = actor
        self.durable = durable
        self.is_leader = is_leader
        self.replay_send_s = replay_send_s
        self.replay_streams = replay
        self.term_poll_s = term_poll_s
        self.core = NotifyCore(config)
        self._senders = senders
        self.dispatcher = Dispatcher(config, dict(senders or {}), clock, actor=actor, is_leader=is_leader,
                                     publish_record=self._publish_record, on_delivery=on_delivery)
        self.started_at: datetime = clock.now()
        self.ready = asyncio.Event()
        self.notified = 0
        self.refused = 0
        self._replaying = False
        self._led = False  # the state was rebuilt in this leadership term (a standby that starts to lead replays)
        self._held: deque[Callable[[], None]] = deque()  # live inputs waiting for the replay
        self._fresh: deque[Notification] = deque()  # what a replay would send, once it knows what was delivered
        self._stale: OrderedDict[str, Notification] = OrderedDict()  # a replay's resolves from before replay_send_s

    def _send(self, n: Notification) -> None:
        if self.is_leader():
            self.notified += 1
            self.dispatcher.submit(n)
        else:
            self.dispatcher.remember(n)

    def _emit(self, out: list[Notification]) -> None:
        fresh = self.started_at - timedelta(seconds=self.replay_send_s)
        for n in out:
            if self._replaying and n.action is NotifyAction.RESOLVE and n.at < fresh:
                self._stale[n.dedup_key] = n  # may never have got through: checked once the replay ends
                self._stale.move_to_end(n.dedup_key)
                if len(self._stale) > MAX_REPLAY_FRESH:
                    self._stale.popitem(last=False)
            elif self._replaying and n.action is NotifyAction.TRIGGER:
                self._stale.pop(n.dedup_key, None)  # a later page under the same key: the old resolve must not end it
            if n.at < fresh:
                self.dispatcher.remember(n)
            elif self._replaying:  # sent at the end of the replay, unless its NOTIFICATION record comes by
                self._fresh.append(n)
                if len(self._fresh) > MAX_REPLAY_FRESH:
                    self._send(self._fresh.popleft())
            else:
                self._send(n)

    # -- hooks: cheap, synchronous, never raise into the remediator -------------------------------
    def _holding(self) -> bool:
        """While a replay rebuilds the state (or is due: this replica leads but has not replayed since it did), a
        live input waits and is applied after it, on the rebuilt state (the replay may have read it too: applied
        twice it changes nothing, and a notification already delivered is not sent again)."""
        return self._replaying or (self.replay_streams and not self._led and self.is_leader())

    def _hold(self, apply: Callable[[], None]) -> None:
        if len(self._held) < MAX_HELD_LIVE:
            self._held.append(apply)
        else:  # applied now rather than lost
            log.warning("notify_live_input_not_held", held=len(self._held))
            apply()

    def change(self, change: IncidentChange) -> None:
        """An incident change the remediator consumed."""
        if self._holding():
            self._hold(partial(self._change, change))
        else:
            self._change(change)

    def _change(self, change: IncidentChange) -> None:
        try:
            self._emit(self.core.change(change))
        except Exception as exc:  # a notifier bug must never cost a repair
            log.error("notify_change_failed", incident=change.incident.id, error=repr(exc))

    def record(self, rec: ActionRecord | StepSeen, subject: str) -> None:
        """A record on ``breakfix.actions.>``: the remediator's own (once stored), or a human verb on its subject."""
        if self._holding():
            self._hold(partial(self._record, rec, subject))
        else:
            self._record(rec, subject)

    def _record(self, rec: ActionRecord | StepSeen, subject: str) -> None:
        try:
            if isinstance(rec, StepSeen):
                self.core.step(rec)
                return
            if not believed(rec, subject):
                self.refused += 1
                log.warning("human_record_refused", subject=subject, actor=rec.actor, kind=rec.kind.value)
                return
            self._emit(self.core.record(rec))
        except Exception as exc:
            log.error("notify_record_failed", subject=subject, error=repr(exc))

    async def _publish_record(self, rec: ActionRecord) -> None:
        await self.bus.publish(subjects.action_subject(rec.cluster), encode(rec), msg_id=rec.id)

    # -- effects -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.started_at = self.clock.now()
        async with aiohttp.ClientSession() as session:
            if self._senders is None:
                self.dispatcher.senders.update({c.name: HttpSender(c, session) for c in self.config.channels})
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.dispatcher.run(stop), name="notify-dispatch")
                if self.replay_streams:
                    await self.replay(stop)
                    tg.create_task(self._follow_terms(stop), name="notify-terms")
                self.ready.set()
                log.info("notifier_start", channels=list(self.dispatcher.senders), routes=len(self.config.routes))

    async def _follow_terms(self, stop: asyncio.Event) -> None:
        """A standby consumes nothing, so its state is as old as its start: when it starts to lead (checked every
        ``term_poll_s``) it replays the streams, to resolve what the last leader paged and send nothing it
        delivered."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.term_poll_s)
            if stop.is_set():
                return
            if not self.is_leader():
                self._led = False
            elif not self._led:
                log.info("notify_term_replay")
                try:
                    await self.replay(stop)
                except Exception as exc:  # tried again at the next poll; live inputs are applied meanwhile
                    self._led = False
                    log.error("notify_term_replay_failed", error=repr(exc))

    async def replay(self, stop: asyncio.Event) -> None:
        """Rebuild the state from both streams, read once from the start and merged in time order (a record meets
        its incident as it was then, not after its later resolution), then drop the readers. What the replay
        would send goes out at its end, less what the NOTIFICATION records say was delivered; live inputs wait."""
        await self.bus.ensure_streams(subjects.STREAMS)
        self._replaying = True
        self.started_at = self.clock.now()
        self.core = NotifyCore(self.config)
        self.dispatcher.forget_firing()
        try:
            changes = self._read(subjects.INCIDENTS.name, subjects.INCIDENTS_ALL, stop, self._replay_change)
            records = self._read(subjects.ACTIONS.name, subjects.ACTIONS_ALL, stop, self._replay_record)
            async with contextlib.aclosing(changes), contextlib.aclosing(records):
                c, r = await anext(changes, None), await anext(records, None)
                while c is not None or r is not None:
                    if c is not None and (r is None or c[0] <= r[0]):
                        c[1]()
                        c = await anext(changes, None)
                    elif r is not None:
                        r[1]()
                        r = await anext(records, None)
        finally:
            self._replaying = False
            self._led = self.is_leader()
            fresh, self._fresh = self._fresh, deque()
            stale, self._stale = self._stale, OrderedDict()
            for n in stale.values():  # resolves its delivery records show paged and never delivered: retried
                self.dispatcher.keep_undelivered_resolve(n)
            for n in fresh:
                self._send(n)
            while self._held:
                self._held.popleft()()

    async def _read(self, stream: str, filt: str, stop: asyncio.Event,
                    decode: Callable[[Delivery], Replayed | None]) -> AsyncGenerator[Timed, None]:
        """``stream`` from its start, each message with when it happened (one without, e.g. a step record, takes
        its predecessor's), through a throwaway consumer."""
        durable = f"{self.durable}-replay-{stream.lower()}"
        await self.bus.reset_consumer(stream=stream, durable=durable, filter_subject=filt, start_seq=1, ack_all=True)
        at = EPOCH
        try:
            while not stop.is_set():
                try:
                    batch = await self.bus.pull(stream=stream, durable=durable, batch=PULL_BATCH, timeout_s=0.5)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a replay that cannot finish leaves the live hooks working
                    log.warning("notify_replay_failed", stream=stream, error=repr(exc))
                    return
                for msg in batch:
                    got = decode(msg)
                    if got is not None:
                        at = got[0] or at
                        yield at, got[1]
                if batch:
                    with contextlib.suppress(Exception):
                        await batch[-1].ack()
                if len(batch) < PULL_BATCH:
                    return
        finally:
            drop = getattr(self.bus, "delete_consumer", None)
            if drop is not None:
                with contextlib.suppress(Exception):
                    await drop(stream, durable)

    def _replay_change(self, msg: Delivery) -> Replayed | None:
        change = decode_change(msg.data)
        return None if change is None else (change.at, partial(self._change, change))

    def _replay_record(self, msg: Delivery) -> Replayed | None:
        rec = decode_record(msg.data)
        if isinstance(rec, Delivered):  # the remediator's own trail only: nobody else can mark a page delivered
            if msg.subject != subjects.action_subject(rec.cluster):
                return None
            return None, partial(self.dispatcher.mark_delivered, rec.channel, rec.notification,
                                 paged_key=rec.paged_key)
        if rec is None:
            return None
        return rec.at if isinstance(rec, ActionRecord) else None, partial(self._record, rec, msg.subject)


__all__ = ["Delivered", "NotifierService", "believed", "check_secrets"]
