"""The remediator daemon: consume incident changes, decide, execute, publish the audit trail.

Reads ``breakfix.incidents.>`` (durable ``remediator``). For each newly opened or reopened
incident that is not folded into another (``parent``, or a fabric incident's ``members``)
it waits ``policy.settle_s`` so companion signals can land (XID 63 after 48), then
runs ``decide`` on the latest version and hands the plan to the ``Executor``. Plans on one
node run one at a time. ``ActionRecord``s go to ``breakfix.actions.<cluster>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog

from bus.codec import decoder, encode
from bus.consumer import ConsumerSpec, ConsumerStats, run_consumer
from bus.protocol import Bus, Delivery
from remediator.actuator import Actuator
from remediator.decide import decide
from remediator.executor import Executor
from remediator.policy import Policy
from schemas import subjects
from schemas.incident import ActionRecord, ChangeKind, Incident, IncidentChange

log = structlog.get_logger("breakfix.remediator")


class RemediatorService:
    def __init__(self, bus: Bus, actuator: Actuator, policy: Policy, clock: Callable[[], datetime], *,
                 actor: str = "remediator", durable: str = "remediator",
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.bus = bus
        self.actuator = actuator
        self.policy = policy
        self.durable = durable
        self.sleep = sleep
        self.latest: dict[str, Incident] = {}
        self.covered: dict[str, str] = {}  # member incident -> open fabric incident that covers it
        self.started: set[tuple[str, int]] = set()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.node_locks: dict[str, asyncio.Lock] = {}
        self.stats = ConsumerStats()
        self.executor = Executor(actuator, self._publish_record, clock, actor=actor)

    async def _publish_record(self, rec: ActionRecord) -> None:
        await self.bus.publish(subjects.action_subject(rec.cluster), encode(rec), msg_id=rec.id)

    async def on_change(self, change: IncidentChange, _msg: Delivery) -> None:
        inc = change.incident
        prev = self.latest.get(inc.id)
        if prev is None or inc.version >= prev.version:
            self.latest[inc.id] = inc
        for member in inc.members:
            if inc.status.terminal:
                self.covered.pop(member, None)
            else:
                self.covered[member] = inc.id
        if change.kind not in (ChangeKind.OPENED, ChangeKind.REOPENED):
            return
        attempt = (inc.id, inc.flaps)
        if attempt in self.started:
            return
        self.started.add(attempt)
        task = asyncio.create_task(self._guarded(inc.id, inc.flaps), name=f"remediate-{inc.id}-{inc.flaps}")
        self.tasks[f"{inc.id}:{inc.flaps}"] = task

    async def _guarded(self, incident_id: str, attempt: int) -> None:
        ilog = log.bind(incident=incident_id)
        try:
            await self.sleep(self.policy.settle_s)
            inc = self.latest[incident_id]
            if inc.status.terminal or inc.flaps != attempt:
                return
            cover = inc.parent or self.covered.get(inc.id)
            if cover is not None:  # folded: the fabric (or causing hardware) incident is the one to act on
                ilog.info("covered", by=cover)
                return
            lock = self.node_locks.setdefault(inc.node or f"fabric:{inc.id}", asyncio.Lock())
            async with lock:
                inc = self.latest[incident_id]
                plan = decide(inc, await self.actuator.view(), self.policy)
                ilog.info("plan", node=inc.node, rule=plan.rule, steps=plan.actions(), dry_run=plan.dry_run)
                outcome = await self.executor.run(inc, plan, attempt=attempt)
                ilog.info("plan_done", node=inc.node, outcome=outcome.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ilog.error("remediation_crashed", error=repr(exc))

    async def idle(self) -> None:
        """Wait for every running plan (tests and the demo use this)."""
        while pending := [t for t in self.tasks.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_streams(subjects.STREAMS)
        spec = ConsumerSpec(subjects.INCIDENTS.name, self.durable, subjects.INCIDENTS_ALL,
                            decoder(IncidentChange), self.on_change)
        try:
            await run_consumer(self.bus, spec, stop=stop, stats=self.stats)
        finally:
            for t in self.tasks.values():
                t.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
