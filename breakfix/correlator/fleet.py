"""The fleet stage: fabric incidents across partitioned correlators.

When the signal stream is partitioned by node (``breakfix correlator --partitions N``), the
nodes under one leaf switch land in different partitions, so no partition can see the
shared component. This stage consumes every partition's incident changes from
``breakfix.incidents.>``, mirrors the node/GPU incidents of topological categories, and runs
the same ``TopologyGrouper`` as the single-instance core. It publishes only FABRIC incidents
(msg-ids as ``correlator.wire.msg_id``); their ``members`` name the node incidents they cover, which the
remediator then leaves alone. Fabric ids are deterministic, so a restarted stage that
re-reads the stream publishes the same incidents again and JetStream drops the repeats.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog

from breakfix.bus.codec import decoder
from breakfix.bus.consumer import ConsumerSpec, ConsumerStats, run_consumer
from breakfix.bus.protocol import Bus, Delivery
from breakfix.correlator.metrics import CorrelatorMetrics
from breakfix.correlator.model import Change, TrackedIncident, coalesce
from breakfix.correlator.publish import publish_changes
from breakfix.correlator.rules import Rules
from breakfix.correlator.topology import TopologyGrouper, settle_parent
from breakfix.schemas import subjects
from breakfix.schemas.incident import Incident, IncidentChange, IncidentScope

log = structlog.get_logger("breakfix.correlator.fleet")


def mirror_of(inc: Incident) -> TrackedIncident:
    """The fields topology grouping reads, copied from a published incident."""
    return TrackedIncident(
        id=inc.id, key=f"mirror|{inc.id}", cluster=inc.cluster, scope=inc.scope, node=inc.node,
        category=inc.category, severity=inc.severity, domain=inc.domain, title=inc.title,
        first_seen=inc.first_seen, last_seen=inc.last_seen, status=inc.status,
        nodes=dict.fromkeys(inc.nodes), counts={c.key: c.count for c in inc.counts}, labels=dict(inc.labels),
        signal_count=inc.signal_count, evidence=list(inc.evidence[:1]),
        open_faults=dict.fromkeys(inc.open_faults, inc.last_seen), version=inc.version,
    )


class FleetCorrelator:
    """Pure: published node/GPU incidents in, fabric incident changes out."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.incidents: dict[str, TrackedIncident] = {}
        self.by_key: dict[str, str] = {}
        self.grouper = TopologyGrouper(rules)

    def observe(self, inc: Incident) -> list[Change]:
        if inc.scope is IncidentScope.FABRIC or inc.category not in self.rules.topology:
            return []
        mirror = self.incidents.get(inc.id)
        if mirror is not None and inc.version <= mirror.version:
            return []
        if mirror is None:
            mirror = self.incidents[inc.id] = mirror_of(inc)
        else:
            fresh = mirror_of(inc)
            fresh.parent = mirror.parent
            mirror = self.incidents[inc.id] = fresh
        if inc.status.terminal:
            changes = settle_parent(mirror, self.incidents, inc.resolved_at or inc.last_seen, self.rules.timeline_limit)
        else:
            changes = self.grouper.observe(mirror, self.incidents, self.by_key, inc.last_seen)
        return [c for c in changes if c.incident.scope is IncidentScope.FABRIC]


class FleetService:
    def __init__(self, bus: Bus, core: FleetCorrelator, clock: Callable[[], datetime], *,
                 durable: str = "correlator-fleet") -> None:
        self.bus = bus
        self.core = core
        self.clock = clock
        self.durable = durable
        self.stats = ConsumerStats()
        self.metrics = CorrelatorMetrics("breakfix_fleet_stage", clock=clock)  # correlator.metrics_serve

    async def on_change(self, change: IncidentChange, _msg: Delivery) -> None:
        now = self.clock()
        wire = [ch.to_wire(now) for ch in coalesce(self.core.observe(change.incident))]
        await publish_changes(self.bus, wire)
        self.metrics.published(wire)
        for ch in wire:
            log.info("fabric_" + ch.kind.value, incident=ch.incident.id, topology=ch.incident.topology,
                     members=len(ch.incident.members))

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_streams(subjects.STREAMS)
        # the stage's state is derived from the incident stream: re-read it from the start
        await self.bus.reset_consumer(stream=subjects.INCIDENTS.name, durable=self.durable,
                                      filter_subject=subjects.INCIDENTS_ALL, start_seq=1, ack_all=False)
        spec = ConsumerSpec(subjects.INCIDENTS.name, self.durable, subjects.INCIDENTS_ALL,
                            decoder(IncidentChange), self.on_change)
        await run_consumer(self.bus, spec, stop=stop, stats=self.stats)
