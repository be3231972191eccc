"""What the console holds in memory, kept live from NATS: incidents and recent audit records.

Incidents come from the incident index (KV ``breakfix-incidents``: one watch, its current values
then every change), so start-up costs the incidents kept, never the stream's history. Audit
records come from ``BREAKFIX_ACTIONS``: the last ``records_days`` at start, then live from a core
subscription. Every change is fanned out to the server-sent-event listeners (at most
``MAX_LISTENERS_PER_USER`` per user, ``MAX_LISTENERS`` in all). While following, the bus is probed
every few seconds: ``bus_up`` says whether NATS answers (``/readyz``, the pages' banner, writes).
All collections are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from pydantic import ValidationError

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.retry import PermissionDenied
from breakfix.console.oncall import BUS_ERRORS, read_records
from breakfix.correlator.index import IncidentIndex
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, Incident

log = structlog.get_logger("breakfix.console")
MAX_RECORDS = 200_000
MAX_PER_INCIDENT = 1000
MAX_TRACKED = 100_000
MAX_CLUSTERS = 10_000
MAX_LISTENERS = 200
MAX_LISTENERS_PER_USER = 8  # so that one viewer cannot take every live stream
PROBE_EVERY_S = 2.0
PROBE_TIMEOUT_S = 2.0
PROBE_CONSUMER = "breakfix-console-probe"  # never created
BUS_FAILURES: tuple[type[BaseException], ...] = (*BUS_ERRORS, PermissionDenied)  # NATS down, or refusing us


class TooManyListeners(RuntimeError):
    """No live stream now: ``per_user`` when this user holds their share, else the console is full."""

    def __init__(self, *, per_user: bool) -> None:
        super().__init__("too many live listeners" + (" for this user" if per_user else ""))
        self.per_user = per_user


@dataclass
class Progress:
    """Plan progress of one incident from its latest step record."""

    rung: str = ""
    step: int = 0
    action: str = ""
    outcome: str = ""


@dataclass
class ConsoleState:
    incidents: dict[str, Incident] = field(default_factory=dict)
    records: deque[ActionRecord] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    by_incident: OrderedDict[str, deque[ActionRecord]] = field(default_factory=OrderedDict)
    progress: dict[str, Progress] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)  # from records, until the incident carries it
    listeners: dict[asyncio.Queue[str], str] = field(default_factory=dict)  # -> the user listening
    seen: set[str] = field(default_factory=set)
    clusters: dict[str, None] = field(default_factory=dict)  # named by an incident or an audit record (capped)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    bus_up: bool = True  # NATS answered the last probe (``watch_bus``)

    # -- updates -----------------------------------------------------------------------------------
    def _cluster(self, cluster: str) -> None:
        if cluster not in self.clusters and len(self.clusters) < MAX_CLUSTERS:
            self.clusters[cluster] = None

    def put_incident(self, inc: Incident) -> None:
        self._cluster(inc.cluster)
        prev = self.incidents.get(inc.id)
        if prev is None or inc.version >= prev.version or inc.waiting != prev.waiting:
            self.incidents[inc.id] = inc
            self.notify(f"incident:{inc.id}")

    def add_record(self, rec: ActionRecord, *, notify: bool = True) -> None:
        if rec.id in self.seen:
            return
        if len(self.seen) > MAX_RECORDS * 2:
            self.seen.clear()
        self.seen.add(rec.id)
        self._cluster(rec.cluster)
        self.records.append(rec)
        q = self.by_incident.get(rec.incident_id)
        if q is None:
            q = self.by_incident[rec.incident_id] = deque(maxlen=MAX_PER_INCIDENT)
            if len(self.by_incident) > MAX_TRACKED:
                self.by_incident.popitem(last=False)
        q.append(rec)
        hint = waiting_hint(rec)
        if hint:
            self.waiting[rec.incident_id] = hint
        elif rec.kind in (ActionKind.STEP, ActionKind.PLAN, ActionKind.APPROVAL):
            self.waiting.pop(rec.incident_id, None)
        if rec.kind in (ActionKind.STEP, ActionKind.REFUSAL) and rec.step_index is not None and rec.step_index < 99:
            self.progress[rec.incident_id] = Progress(rec.details.get("rung", ""), rec.step_index,
                                                      rec.action.value if rec.action else "",
                                                      f"waiting for {hint}" if hint else rec.outcome.value)
        elif rec.kind is ActionKind.PLAN and rec.outcome is ActionOutcome.PLANNED:
            self.progress.pop(rec.incident_id, None)  # a new plan (or attempt) starts from its first step
        elif rec.kind is ActionKind.PLAN and rec.incident_id in self.progress:
            p = self.progress[rec.incident_id]
            self.progress[rec.incident_id] = Progress(p.rung, p.step, p.action,
                                                      f"{p.outcome}; plan {rec.outcome.value}")
        if notify:
            self.notify(f"record:{rec.incident_id}")

    def records_of(self, incident_id: str) -> list[ActionRecord]:
        return list(self.by_incident.get(incident_id, ()))

    # -- server-sent events ------------------------------------------------------------------------
    def listen(self, user: str) -> asyncio.Queue[str]:
        if sum(1 for u in self.listeners.values() if u == user) >= MAX_LISTENERS_PER_USER:
            raise TooManyListeners(per_user=True)
        if len(self.listeners) >= MAX_LISTENERS:
            raise TooManyListeners(per_user=False)
        q: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self.listeners[q] = user
        return q

    def unlisten(self, q: asyncio.Queue[str]) -> None:
        self.listeners.pop(q, None)

    def notify(self, event: str) -> None:
        for q in list(self.listeners):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(event)


_GUARD_WAITS = {"budget": "budget", "topology_budget": "budget", "breaker": "breaker", "cooldown": "cooldown"}


def waiting_hint(rec: ActionRecord) -> str:
    """What a record says the plan now waits on (``ActionRecord.waiting``, or a guard's refusal)."""
    if rec.waiting is not None:
        return rec.waiting.value
    if rec.kind is ActionKind.REFUSAL:
        if rec.reason.startswith("awaiting approval"):
            return "approval"
        return _GUARD_WAITS.get(rec.details.get("guard", ""), "")
    return ""


async def watch_bus(state: ConsoleState, bus: JetStreamBus, *, stop: asyncio.Event,
                    every_s: float = PROBE_EVERY_S, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Set ``state.bus_up`` from a JetStream round trip every ``every_s`` until ``stop``: the info of a
    consumer nobody makes, which a reachable server answers (None) whether or not the stream exists yet.
    (A flush is no probe: nats-py answers it from its buffer while it reconnects.)"""
    while not stop.is_set():
        try:
            async with asyncio.timeout(timeout_s):
                await bus.consumer_state(subjects.ACTIONS.name, PROBE_CONSUMER)
            up = True
        except BUS_FAILURES:
            up = False
        if up and not state.bus_up:
            log.info("console_nats_back")
        elif not up and state.bus_up:
            log.warning("console_nats_unreachable", timeout_s=timeout_s)
        state.bus_up = up
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


async def follow(state: ConsoleState, bus: JetStreamBus, clock: Callable[[], datetime], *, records_days: float,
                 stop: asyncio.Event) -> None:
    """Load and then follow the index and the audit trail until ``stop``."""
    index = IncidentIndex(bus)
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100_000)

    async def on_msg(_subject: str, data: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(data)

    unsubscribe = await bus.subscribe(subjects.ACTIONS_ALL, on_msg)  # live first, so nothing falls between
    for rec in await read_records(bus, since=clock() - timedelta(days=records_days)):
        state.add_record(rec, notify=False)
    for inc in (await index.snapshot()).values():
        state.incidents[inc.id] = inc
    gc.freeze()  # the loaded state is long-lived: keep the collector's passes off it
    state.ready.set()
    log.info("console_loaded", incidents=len(state.incidents), records=len(state.records))

    async def watch_index() -> None:
        async for _key, inc in index.watch():
            if inc is not None:
                state.put_incident(inc)

    async def drain_records() -> None:
        while True:
            data = await queue.get()
            try:
                state.add_record(ActionRecord.model_validate_json(data))
            except ValidationError:
                continue

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(watch_index(), name="console-index-watch"),
                     tg.create_task(drain_records(), name="console-records"),
                     tg.create_task(watch_bus(state, bus, stop=stop), name="console-bus-probe")]
            await stop.wait()
            for t in tasks:
                t.cancel()
    finally:
        with contextlib.suppress(Exception):
            await unsubscribe()
