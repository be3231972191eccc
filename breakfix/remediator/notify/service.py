"""The notifier inside the remediator daemon: incident changes and records in, notifications out.

The remediator hands it what it already decoded (``remediator.metrics.Observers``: every incident change it
consumes and every record on ``breakfix.actions.>`` its control consumer reads), so notifying costs no second
consumer. At start-up ``run`` reads both streams once from the start so the pure ``NotifyCore`` rebuilds what
was paged; events older than ``replay_send_s`` before the start are only remembered (Alertmanager keeps
re-posting what still fires; nobody is paged twice). The hooks only queue: a slow or failing channel can only
fill its own bounded queue (``notify.sender.Dispatcher``). Only the leader sends (``is_leader``); a follower
keeps the same state and takes over. On-call acks and silences are believed only when the subject's user and
cluster match the record (``schemas.subjects.human_subject_parts``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
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
PULL_BATCH = 1024
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
    """A human verb counts only from its own on-call subject, published by the user it names."""
    if rec.kind not in HUMAN_KINDS:
        return True
    parts = subjects.human_subject_parts(subject)
    return parts is not None and parts[0] == subjects.token(rec.cluster) and parts[2] == subjects.token(rec.actor)


class NotifierService:
    """Fed by the remediator's hooks (``change``, ``record``: objects it already decoded, no second consumer);
    ``run`` delivers, after one replay of the streams that rebuilds what was paged before a restart."""

    def __init__(self, bus: Bus, config: NotifyConfig, clock: Clock, *, actor: str = "remediator",
                 durable: str = "remediator-notify", is_leader: Callable[[], bool] = lambda: True,
                 on_delivery: Callable[[str, bool], None] | None = None, replay_send_s: float = 300.0,
                 senders: dict[str, Sender] | None = None, replay: bool = True) -> None:
        check_secrets(config)
        self.bus = bus
        self.config = config
        self.clock = clock
        self.actor = actor
        self.durable = durable
        self.is_leader = is_leader
        self.replay_send_s = replay_send_s
        self.replay_streams = replay
        self.core = NotifyCore(config)
        self._senders = senders
        self.dispatcher = Dispatcher(config, dict(senders or {}), clock, actor=actor,
                                     publish_record=self._publish_record, on_delivery=on_delivery)
        self.started_at: datetime = clock.now()
        self.ready = asyncio.Event()
        self.notified = 0
        self.refused = 0

    def _emit(self, out: list[Notification]) -> None:
        fresh = self.started_at - timedelta(seconds=self.replay_send_s)
        for n in out:
            if n.at >= fresh and self.is_leader():
                self.notified += 1
                self.dispatcher.submit(n)
            else:
                self.dispatcher.remember(n)

    # -- hooks: cheap, synchronous, never raise into the remediator -------------------------------
    def change(self, change: IncidentChange) -> None:
        """An incident change the remediator consumed."""
        try:
            self._emit(self.core.change(change))
        except Exception as exc:  # a notifier bug must never cost a repair
            log.error("notify_change_failed", incident=change.incident.id, error=repr(exc))

    def record(self, rec: ActionRecord | StepSeen, subject: str) -> None:
        """A record from ``breakfix.actions.>`` (the remediator's own, or a human verb on its on-call subject)."""
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
                self.ready.set()
                log.info("notifier_start", channels=list(self.dispatcher.senders), routes=len(self.config.routes))

    async def replay(self, stop: asyncio.Event) -> None:
        """Read both streams once from the start (what was paged, what still fires), then drop the readers."""
        await self.bus.ensure_streams(subjects.STREAMS)
        for stream, filt, handle in ((subjects.INCIDENTS.name, subjects.INCIDENTS_ALL, self._replay_change),
                                     (subjects.ACTIONS.name, subjects.ACTIONS_ALL, self._replay_record)):
            durable = f"{self.durable}-replay-{stream.lower()}"
            await self.bus.reset_consumer(stream=stream, durable=durable, filter_subject=filt, start_seq=1,
                                          ack_all=True)
            while not stop.is_set():
                try:
                    batch = await self.bus.pull(stream=stream, durable=durable, batch=PULL_BATCH, timeout_s=0.5)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a replay that cannot finish leaves the live hooks working
                    log.warning("notify_replay_failed", stream=stream, error=repr(exc))
                    break
                for msg in batch:
                    handle(msg)
                if batch:
                    with contextlib.suppress(Exception):
                        await batch[-1].ack()
                if len(batch) < PULL_BATCH:
                    break
            drop = getattr(self.bus, "delete_consumer", None)
            if drop is not None:
                with contextlib.suppress(Exception):
                    await drop(stream, durable)

    def _replay_change(self, msg: Delivery) -> None:
        change = decode_change(msg.data)
        if change is not None:
            self.change(change)

    def _replay_record(self, msg: Delivery) -> None:
        rec = decode_record(msg.data)
        if rec is not None:
            self.record(rec, msg.subject)


__all__ = ["NotifierService", "believed", "check_secrets"]
