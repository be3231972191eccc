"""The correlator daemon: consume signals and action records, publish incident changes.

Reads ``breakfix.signals.>`` (durable ``correlator``) and ``breakfix.actions.>`` (durable
``correlator-actions``), feeds the pure ``Correlator`` core with an injected clock, and
publishes every ``IncidentChange`` on ``breakfix.incidents.<cluster>`` with msg-id
``<incident>:<version>`` so re-publication after a redelivery is dropped by JetStream.
Each message is acked only after its changes are published.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog

from bus.codec import decoder, encode
from bus.consumer import ConsumerSpec, ConsumerStats, run_consumer
from bus.protocol import Bus, Delivery
from correlator.grouping import Correlator
from schemas import subjects
from schemas.incident import ActionRecord, IncidentChange
from schemas.signal import Signal

log = structlog.get_logger("breakfix.correlator")


class CorrelatorService:
    def __init__(self, bus: Bus, core: Correlator, clock: Callable[[], datetime], *,
                 durable: str = "correlator") -> None:
        self.bus = bus
        self.core = core
        self.clock = clock
        self.durable = durable
        self.signal_stats = ConsumerStats()
        self.action_stats = ConsumerStats()

    async def _publish(self, changes: list[IncidentChange]) -> None:
        for ch in changes:
            inc = ch.incident
            await self.bus.publish(subjects.incident_subject(inc.cluster), encode(ch),
                                   msg_id=f"{inc.id}:{inc.version}")
            log.info("incident_" + ch.kind.value, incident=inc.id, node=inc.node, category=inc.category,
                     status=inc.status.value, signals=inc.signal_count)

    async def on_signal(self, signal: Signal, _msg: Delivery) -> None:
        await self._publish(self.core.ingest(signal, self.clock()))

    async def on_action(self, record: ActionRecord, _msg: Delivery) -> None:
        await self._publish(self.core.apply_action(record, self.clock()))

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_streams(subjects.STREAMS)
        sig = ConsumerSpec(subjects.SIGNALS.name, self.durable, subjects.SIGNALS_ALL,
                           decoder(Signal), self.on_signal)
        act = ConsumerSpec(subjects.ACTIONS.name, f"{self.durable}-actions", subjects.ACTIONS_ALL,
                           decoder(ActionRecord), self.on_action)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_consumer(self.bus, sig, stop=stop, stats=self.signal_stats),
                           name="correlator-signals")
            tg.create_task(run_consumer(self.bus, act, stop=stop, stats=self.action_stats),
                           name="correlator-actions")
