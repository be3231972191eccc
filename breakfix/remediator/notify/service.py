"""The notifier inside the remediator daemon: streams in, notifications out, remediation untouched.

Reads ``breakfix.incidents.>`` and ``breakfix.actions.>`` with its own durable consumers
(``<durable>-incidents``, ``<durable>-actions``), re-read from the start at every start-up so the
pure ``NotifyCore`` rebuilds what was paged; events older than ``replay_send_s`` before the start are
only remembered (Alertmanager keeps re-posting what still fires; nobody is paged twice). It shares
nothing with the remediation loop but the bus: a slow or failing channel can only fill its own
bounded queue (``notify.sender.Dispatcher``). Only the leader sends (``is_leader``); a follower
keeps the same state and takes over. On-call acks and silences are believed only when the
subject's user and cluster match the record (``schemas.subjects.human_subject_parts``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import aiohttp
import orjson
import structlog
from pydantic import ValidationError

from breakfix.bus.clock import Clock
from breakfix.bus.codec import encode
from breakfix.bus.protocol import Bus, Delivery
from breakfix.remediator.notify.channels import HttpSender, Sender
from breakfix.remediator.notify.config import NotifyConfig, PagerDutyChannel, SlackChannel, load_secret
from breakfix.remediator.notify.core import NotifyCore, StepSeen
from breakfix.remediator.notify.model import Notification
from breakfix.remediator.notify.sender import Dispatcher
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionKind, ActionRecord, IncidentChange

log = structlog.get_logger("breakfix.remediator.notify")
HUMAN_KINDS = frozenset({ActionKind.ACK, ActionKind.SILENCE, ActionKind.RELEASE, ActionKind.CANCEL,
                         ActionKind.BREAKER})


def check_secrets(config: NotifyConfig) -> None:
    """Fail at start-up, not at the first page, when a credential is missing (raises ``SecretError``)."""
    for c in config.channels:
        if isinstance(c, PagerDutyChannel):
            load_secret(c.routing_key_file, c.routing_key_env, f"channel {c.name}")
        elif isinstance(c, SlackChannel):
            load_secret(c.webhook_url_file, c.webhook_url_env, f"channel {c.name}")


def decode_record(data: bytes) -> ActionRecord | StepSeen | None:
    """Total, and cheap for what the notifier skips: decided on the raw dict, so plan-heavy records are never
    validated and step records become a ``StepSeen``. None for what the notifier ignores or cannot read (the
    stage that owns the stream dead-letters bad messages; the notifier must not do it a second time)."""
    try:
        d = orjson.loads(data)
        if not isinstance(d, dict):
            return None
        kind, outcome = d.get("kind"), d.get("outcome")
        raw = d.get("details")
        details: dict[str, object] = raw if isinstance(raw, dict) else {}
        if kind == "step" and details.get("guard") != "breaker":
            iid, action = d.get("incident_id"), d.get("action")
            if outcome == "dry_run" or not isinstance(iid, str) or not isinstance(action, str):
                return None
            return StepSeen(iid, action, str(outcome))
        wanted = kind in ("ack", "silence", "release", "cancel", "refusal", "step", "breaker") \
            or (kind == "plan" and outcome in ("escalated", "failed")) \
            or (kind == "notification" and details.get("guard") == "breaker") \
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
    """A human verb counts only from its own on-call subject, published by the user it names."""
    if rec.kind not in HUMAN_KINDS:
        return True
    parts = subjects.human_subject_parts(subject)
    return parts is not None and parts[0] == subjects.token(rec.cluster) and parts[2] == subjects.token(rec.actor)


class NotifierService:
    def __init__(self, bus: Bus, config: NotifyConfig, clock: Clock, *, actor: str = "remediator",
                 durable: str = "remediator-notify", is_leader: Callable[[], bool] = lambda: True,
                 on_delivery: Callable[[str, bool], None] | None = None, replay_send_s: float = 300.0,
                 senders: dict[str, Sender] | None = None) -> None:
        check_secrets(config)
        self.bus = bus
        self.config = config
        self.clock = clock
        self.actor = actor
        self.durable = durable
        self.is_leader = is_leader
        self.on_delivery = on_delivery
        self.replay_send_s = replay_send_s
        self.core = NotifyCore(config)
        self._senders = senders
        self.dispatcher: Dispatcher | None = None
        self.started_at: datetime = clock.now()
        self.ready = asyncio.Event()
        self.notified = 0

    def _emit(self, out: list[Notification]) -> None:
        d = self.dispatcher
        if d is None:
            return
        fresh = self.started_at - timedelta(seconds=self.replay_send_s)
        for n in out:
            if n.at >= fresh and self.is_leader():
                self.notified += 1
                d.submit(n)
            else:
                d.remember(n)

    async def on_change(self, change: IncidentChange | None, _msg: Delivery) -> None:
        if change is not None:
            self._emit(self.core.change(change))

    async def on_record(self, rec: ActionRecord | StepSeen | None, msg: Delivery) -> None:
        if rec is None:
            return
        if isinstance(rec, StepSeen):
            self.core.step(rec)
            return
        if not believed(rec, msg.subject):
            log.warning("human_record_refused", subject=msg.subject, actor=rec.actor, kind=rec.kind.value)
            return
        self._emit(self.core.record(rec))

    async def _publish_record(self, rec: ActionRecord) -> None:
        await self.bus.publish(subjects.action_subject(rec.cluster), encode(rec), msg_id=rec.id)

    async def run(self, stop: asyncio.Event) -> None:
        self.started_at = self.clock.now()
        async with aiohttp.ClientSession() as session:
            senders: dict[str, Sender] = dict(self._senders) if self._senders is not None else {
                c.name: HttpSender(c, session) for c in self.config.channels}
            self.dispatcher = Dispatcher(self.config, senders, self.clock, actor=self.actor,
                                         publish_record=self._publish_record, on_delivery=self.on_delivery)
            await self.bus.ensure_streams(subjects.STREAMS)
            streams = ((subjects.INCIDENTS.name, f"{self.durable}-incidents", subjects.INCIDENTS_ALL),
                       (subjects.ACTIONS.name, f"{self.durable}-actions", subjects.ACTIONS_ALL))
            for stream, durable, filt in streams:
                # the state is derived from the streams: re-read them from the start; one ack per batch
                await self.bus.reset_consumer(stream=stream, durable=durable, filter_subject=filt, start_seq=1,
                                              ack_all=True)
            self.ready.set()
            log.info("notifier_start", channels=list(senders), routes=len(self.config.routes))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.dispatcher.run(stop), name="notify-dispatch")
                tg.create_task(self._consume(streams[0][0], streams[0][1], self._changes, stop),
                               name="notify-incidents")
                tg.create_task(self._consume(streams[1][0], streams[1][1], self._records, stop),
                               name="notify-actions")

    async def _changes(self, msg: Delivery) -> None:
        await self.on_change(decode_change(msg.data), msg)

    async def _records(self, msg: Delivery) -> None:
        await self.on_record(decode_record(msg.data), msg)

    async def _consume(self, stream: str, durable: str, handle: Callable[[Delivery], Awaitable[None]],
                       stop: asyncio.Event) -> None:
        """Pull, handle, ack the batch's last message (ack-all): the notifier only reads, so a lost ack costs a
        re-read at most, and one ack per batch keeps it cheap beside the remediator on the same connection."""
        while not stop.is_set():
            try:
                batch = await self.bus.pull(stream=stream, durable=durable, batch=512, timeout_s=0.5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection trouble: back off, keep running
                log.warning("notify_pull_failed", stream=stream, error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                continue
            for msg in batch:
                try:
                    await handle(msg)
                except Exception as exc:  # a core bug must not stop notifications for everything else
                    log.error("notify_handler_failed", subject=msg.subject, error=repr(exc))
            if batch:
                with contextlib.suppress(Exception):
                    await batch[-1].ack()


__all__ = ["NotifierService", "believed", "check_secrets"]
