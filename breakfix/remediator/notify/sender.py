"""Delivering notifications without ever holding up remediation.

``notify.service`` hands each ``Notification`` to ``Dispatcher.submit``, which routes it
(``notify.core.route``) and puts it on a bounded per-channel queue without waiting: a full queue
drops it, counts it as a failure and logs it. One named worker task per channel drains its queue,
so a stalling channel delays only itself. Each delivery retries transient errors with exponential
backoff (tenacity, the clock's sleep), gives up after ``attempts``, and ends in one audit record
(``ActionRecord`` kind NOTIFICATION, outcome succeeded/failed, published through the remediator's
bus) and one count (``on_delivery``, the remediator's metrics). A notification id already
delivered on a channel is not sent again (idempotent re-sends, beside each channel's dedup key); the replay
after a restart marks what its NOTIFICATION records say was delivered (``mark_delivered``). Alertmanager channels
re-post their firing alerts every ``resend_s``; PagerDuty and webhook channels keep a resolve that failed
(transient errors, a full queue) in a bounded set and try it again every ``retry_s``, so the page it ends does
not stay open for ever; after a restart the replay puts back the resolves its NOTIFICATION records show paged there
and never delivered (``keep_undelivered_resolve``). Both run only while this replica leads (``is_leader``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from breakfix.bus.clock import Clock
from breakfix.remediator.notify.channels import Permanent, Sender, Transient, alertmanager_alert
from breakfix.remediator.notify.config import (
    AlertmanagerChannel,
    Channel,
    NotifyConfig,
    PagerDutyChannel,
    WebhookChannel,
)
from breakfix.remediator.notify.core import route
from breakfix.remediator.notify.model import Notification, NotifyAction
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord

log = structlog.get_logger("breakfix.remediator.notify")
SENT_MEMORY = 10_000
RETRY_MEMORY = 1_000  # failed resolves kept per channel for the periodic retry
DROP_LOG_EVERY_S = 10.0

PublishRecord = Callable[[ActionRecord], Awaitable[None]]


def notification_record(n: Notification, channel: str, ok: bool, detail: str, actor: str,
                        at: datetime) -> ActionRecord:
    """The audit line for one delivery: what was sent where, and whether it arrived."""
    return ActionRecord(
        id=f"notify-{channel}-{n.id}-{'ok' if ok else 'failed'}", cluster=n.cluster, incident_id=n.incident,
        kind=ActionKind.NOTIFICATION, outcome=ActionOutcome.SUCCEEDED if ok else ActionOutcome.FAILED, actor=actor,
        reason=f"{n.event.value} via {channel}: {detail}"[:500], node=n.node,
        details={"channel": channel, "event": n.event.value, "action": n.action.value, "dedup_key": n.dedup_key,
                 "notification": n.id}, at=at)


class Dispatcher:
    def __init__(self, config: NotifyConfig, senders: dict[str, Sender], clock: Clock, *, actor: str = "remediator",
                 publish_record: PublishRecord | None = None,
                 on_delivery: Callable[[str, bool], None] | None = None,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.senders = senders
        self.clock = clock
        self.actor = actor
        self.publish_record = publish_record
        self.on_delivery = on_delivery or (lambda _c, _ok: None)
        self.is_leader = is_leader
        self.specs: dict[str, Channel] = {c.name: c for c in config.channels}
        names = [c.name for c in config.channels] + [n for n in senders if n not in self.specs]
        self.queues: dict[str, asyncio.Queue[Notification]] = {
            name: asyncio.Queue(maxsize=config.queue_size) for name in names}
        self.sent: dict[str, OrderedDict[str, None]] = {name: OrderedDict() for name in names}
        self.retry: dict[str, OrderedDict[str, Notification]] = {  # dedup key -> the resolve still to get through
            name: OrderedDict() for name in names
            if isinstance(self.specs.get(name), PagerDutyChannel | WebhookChannel)}
        # the dedup keys whose page a replay read as delivered on the channel (its NOTIFICATION records): a resolve of
        # one that never got through before a restart is kept for the retry (``keep_undelivered_resolve``)
        self.paged: dict[str, OrderedDict[str, None]] = {name: OrderedDict() for name in self.retry}
        self.dropped = 0
        self._drops: dict[str, int] = {}
        self._drop_logged: dict[str, float] = {}
        self.delivered = 0
        self.failed = 0

    # -- never blocks --------------------------------------------------------------------------------
    def submit(self, n: Notification) -> list[str]:
        """Queue ``n`` for each routed channel now; returns the channels it was queued for."""
        queued = []
        for name in route(n, self.config):
            q = self.queues.get(name)
            if q is None:
                continue
            self._supersede(name, n)
            if n.id in self.sent[name]:  # delivered already (by this process, or before a restart or hand-over)
                self._remember_on(name, n)
                continue
            try:
                q.put_nowait(n)
                queued.append(name)
            except asyncio.QueueFull:
                self.dropped += 1
                self.failed += 1
                self.on_delivery(name, False)
                self._log_drop(name, n)
                if n.action is NotifyAction.RESOLVE:  # never leave the page it ends open for ever
                    self._remember_on(name, n)
                    self._keep_resolve(name, n)
        return queued

    def _log_drop(self, name: str, n: Notification) -> None:
        """One line per channel per ``DROP_LOG_EVERY_S`` (a stalled channel drops many; each is counted anyway)."""
        now = self.clock.monotonic()
        self._drops[name] = self._drops.get(name, 0) + 1
        if now - self._drop_logged.get(name, -DROP_LOG_EVERY_S) >= DROP_LOG_EVERY_S:
            self._drop_logged[name] = now
            log.error("notification_dropped", channel=name, incident=n.incident, notice=n.event.value,
                      reason="queue full", dropped_total=self._drops[name])

    def remember(self, n: Notification) -> None:
        """A trigger rebuilt by replay after a restart: Alertmanager channels keep re-posting it, nobody is paged
        again."""
        for name in route(n, self.config):
            self._supersede(name, n)
            self._remember_on(name, n)

    def _remember_on(self, name: str, n: Notification) -> None:
        sender = self.senders.get(name)
        spec = self.specs.get(name)
        firing = getattr(sender, "firing", None)
        if not isinstance(spec, AlertmanagerChannel) or not isinstance(firing, dict):
            return
        if n.action is NotifyAction.TRIGGER:
            firing[n.dedup_key] = alertmanager_alert(n, spec)
        elif n.action is NotifyAction.RESOLVE:
            firing.pop(n.dedup_key, None)

    def mark_delivered(self, channel: str, notification_id: str, *, paged_key: str = "") -> None:
        """A delivery made before this process started or led (its NOTIFICATION record, read by the replay): the
        notification is not sent again. ``paged_key``: the dedup key of a trigger (a page now open there)."""
        sent = self.sent.get(channel)
        if sent is not None:
            _mark(sent, notification_id)
        paged = self.paged.get(channel)
        if paged is not None and paged_key:
            _mark(paged, paged_key)

    def keep_undelivered_resolve(self, n: Notification) -> None:
        """A resolve the replay rebuilt from before ``replay_send_s``: on each PagerDuty or webhook channel where its
        page was delivered and it was not (it failed, or the process stopped first), it joins the periodic retry,
        so a restart does not leave that page open for ever."""
        for name in route(n, self.config):
            paged = self.paged.get(name)
            if paged is not None and n.dedup_key in paged and n.id not in self.sent[name]:
                self._keep_resolve(name, n)

    def forget_firing(self) -> None:
        """What Alertmanager channels re-post is rebuilt by a replay of the streams (a new leadership term)."""
        for sender in self.senders.values():
            firing = getattr(sender, "firing", None)
            if isinstance(firing, dict):
                firing.clear()

    # -- resolves that did not get through (PagerDuty, webhook) ---------------------------------------
    def _keep_resolve(self, name: str, n: Notification) -> None:
        """Keep ``n`` for the channel's periodic retry; past ``RETRY_MEMORY`` the oldest is dropped and counted."""
        keep = self.retry.get(name)
        if keep is None or n.action is not NotifyAction.RESOLVE:
            return
        keep[n.dedup_key] = n
        keep.move_to_end(n.dedup_key)
        while len(keep) > RETRY_MEMORY:
            _key, old = keep.popitem(last=False)
            self.dropped += 1
            self.failed += 1
            self.on_delivery(name, False)
            log.error("resolve_retry_dropped", channel=name, incident=old.incident, reason="retry set full",
                      kept=RETRY_MEMORY)

    def _supersede(self, name: str, n: Notification) -> None:
        """A newer trigger of the same dedup key opens a new page: the older resolve must not end it."""
        keep = self.retry.get(name)
        if keep and n.action is NotifyAction.TRIGGER:
            old = keep.get(n.dedup_key)
            if old is not None and n.at >= old.at:
                del keep[n.dedup_key]

    # -- workers -------------------------------------------------------------------------------------
    async def _deliver(self, name: str, n: Notification) -> tuple[bool, str, bool]:
        """(delivered, what happened, worth trying again later)."""
        spec = self.specs[name]
        sender = self.senders[name]
        tries = 0
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Transient), stop=stop_after_attempt(spec.attempts),
                wait=wait_exponential(multiplier=spec.backoff_s, max=spec.backoff_max_s), sleep=self.clock.sleep,
                reraise=True,
            ):
                with attempt:
                    tries += 1
                    await sender.send(n)
        except (Transient, Permanent) as exc:
            return False, f"{type(exc).__name__.lower()} after {tries} tries: {exc}", isinstance(exc, Transient)
        except Exception as exc:  # a channel bug must not kill the worker
            return False, f"error after {tries} tries: {exc!r}", False
        return True, f"delivered ({tries} {'try' if tries == 1 else 'tries'})", False

    async def _worker(self, name: str, stop: asyncio.Event) -> None:
        q = self.queues[name]
        sent = self.sent[name]
        while not stop.is_set():
            getter = asyncio.ensure_future(q.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            n = getter.result()
            try:
                await self._handle(name, n, sent)
            finally:
                q.task_done()

    async def _handle(self, name: str, n: Notification, sent: OrderedDict[str, None]) -> bool:
        keep = self.retry.get(name)
        if n.id in sent:
            if keep is not None and keep.get(n.dedup_key) == n:
                del keep[n.dedup_key]
            return True
        ok, detail, again = await self._deliver(name, n)
        if ok:
            _mark(sent, n.id)
            if keep is not None and keep.get(n.dedup_key) == n:
                del keep[n.dedup_key]
            self.delivered += 1
            log.info("notified", channel=name, incident=n.incident, notice=n.event.value, action=n.action.value)
        else:
            self.failed += 1
            if again:
                self._keep_resolve(name, n)
            log.error("notification_failed", channel=name, incident=n.incident, notice=n.event.value,
                      detail=detail, retried_later=keep is not None and keep.get(n.dedup_key) is n)
        self.on_delivery(name, ok)
        if self.publish_record is not None:
            try:
                await self.publish_record(notification_record(n, name, ok, detail, self.actor, self.clock.now()))
            except Exception as exc:
                log.warning("notification_record_failed", channel=name, error=repr(exc))
        return ok

    async def _periodic(self, name: str, stop: asyncio.Event) -> None:
        """Alertmanager: re-post what fires every ``resend_s``; PagerDuty, webhook: try the failed resolves again
        every ``retry_s``. Only while this replica leads: a standby's picture is stale, and re-posting it would keep
        firing an alert the leader resolved."""
        spec = self.specs[name]
        every_s = spec.resend_s if isinstance(spec, AlertmanagerChannel) else \
            spec.retry_s if isinstance(spec, PagerDutyChannel | WebhookChannel) else 60.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            if stop.is_set():
                return
            if not self.is_leader():
                continue
            if not isinstance(spec, AlertmanagerChannel):
                await self._retry_resolves(name)
                continue
            try:
                await self.senders[name].repost()
            except Exception as exc:
                self.on_delivery(name, False)
                log.warning("alertmanager_repost_failed", channel=name, error=repr(exc))

    async def _retry_resolves(self, name: str) -> None:
        """One round over the failed resolves, oldest first; a failure ends it (the channel is still down)."""
        keep = self.retry[name]
        for n in list(keep.values()):
            if keep.get(n.dedup_key) is n and not await self._handle(name, n, self.sent[name]):
                return

    async def idle(self) -> None:
        """Wait until every queue is empty (tests, benchmarks, shutdown)."""
        await asyncio.gather(*(q.join() for q in self.queues.values()))

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for name in self.queues:
                if name not in self.senders:
                    log.error("notify_channel_without_sender", channel=name)
                    continue
                tg.create_task(self._guarded(self._worker, name, stop), name=f"notify-{name}")
                if isinstance(self.specs.get(name), AlertmanagerChannel) or name in self.retry:
                    tg.create_task(self._guarded(self._periodic, name, stop), name=f"notify-{name}-periodic")

    async def _guarded(self, fn: Callable[[str, asyncio.Event], Awaitable[None]], name: str,
                       stop: asyncio.Event) -> None:
        """Restart a crashed worker after a pause; never let it take the remediator down."""
        while not stop.is_set():
            try:
                await fn(name, stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("notify_worker_crashed", channel=name, error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)


def _mark(sent: OrderedDict[str, None], notification_id: str) -> None:
    sent[notification_id] = None
    sent.move_to_end(notification_id)
    while len(sent) > SENT_MEMORY:
        sent.popitem(last=False)


__all__ = ["Dispatcher", "notification_record"]
