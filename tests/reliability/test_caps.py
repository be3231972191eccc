"""Bounded incidents (issue 12 item 2): caps with counts past them, changes under NATS's 1 MB, failed publishes
dead-lettered once, and readiness that reflects a stuck correlator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from datetime import timedelta

import orjson
import pytest
import structlog

from breakfix.bus.clock import ManualClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.memory import MemoryBus
from breakfix.bus.protocol import PublishAck
from breakfix.bus.server import EmbeddedNats
from breakfix.correlator.app import CorrelatorConfig, build_core, build_correlator
from breakfix.correlator.service import ServiceConfig
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.signal import Signal
from tests.conftest import T0, sig, wait_until

NATS_MAX_PAYLOAD = 1024 * 1024


def flood(n: int) -> list[Signal]:
    """One tenant workload's XID 13 on ``n`` nodes, each with its own pod, component and a long message, plus
    ``n`` distinct unknown XIDs on one GPU: every per-incident list would grow with ``n``."""
    out = [sig(node=f"node-{i:05d}", code="13", at=i * 0.001, component=f"link{i}", message="x" * 5000,
               tenant=TenantRef(namespace="team", pod=f"train-{i}")) for i in range(n)]
    out += [sig(node="big", code=str(200 + i), at=i * 0.001, component=f"c{i}", message="y" * 5000)
            for i in range(n)]
    return out


def test_core_past_caps_keeps_counts_and_says_so(catalog: Catalog) -> None:
    core = build_core(CorrelatorConfig(catalog=catalog))
    for s in flood(1500):
        core.ingest(s, s.observed_at)
    caps = core.rules.caps
    incs = sorted(core.incidents.values(), key=lambda i: -i.signal_count)
    tenant, gpu = incs[0], incs[1]
    assert len(tenant.nodes) == caps.components and tenant.overflow["components"] >= 1500 - caps.components
    assert len(gpu.counts) == caps.codes and gpu.overflow["codes"] == 1500 - caps.codes
    assert len(gpu.open_faults) == caps.open_faults and gpu.overflow["open_faults"] == 1500 - caps.open_faults
    assert any(e == "capped" for _, e, _ in gpu.timeline)
    assert all(len(e) <= core.rules.message_chars for e in gpu.evidence)
    assert tenant.signal_count == 1500, "signals past a cap are still counted"


@pytest.mark.nats
async def test_incident_past_its_caps_is_published_under_1mb_and_processing_continues(
        catalog: Catalog, nats_server: EmbeddedNats) -> None:
    bus = await JetStreamBus.connect(nats_server.url)
    try:
        await bus.ensure_streams(subjects.STREAMS)
        for s in flood(3000):
            await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=s.id)
        after = sig(node="later", code="79", at=100)
        await bus.publish(subjects.signal_subject(after.cluster, after.node), encode(after), msg_id=after.id)
        svc = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
        stop = asyncio.Event()
        task = asyncio.create_task(svc.run(stop), name="caps-correlator")

        async def done() -> bool:
            return svc.signal_stats.handled >= 6001

        await wait_until(done, 60, "every signal handled")
        await svc.checkpoint()
        stop.set()
        await task
        await bus.ensure_consumer(stream=subjects.INCIDENTS.name, durable="caps-check",
                                  filter_subject=subjects.INCIDENTS_ALL)
        sizes: list[int] = []
        latest: dict[str, dict] = {}  # type: ignore[type-arg]
        while batch := await bus.pull(stream=subjects.INCIDENTS.name, durable="caps-check", batch=512, timeout_s=1):
            for m in batch:
                sizes.append(len(m.data))
                inc = orjson.loads(m.data)["incident"]
                latest[inc["id"]] = inc
        assert sizes and max(sizes) < NATS_MAX_PAYLOAD // 2, max(sizes)
        assert svc.publish_failed == 0
        assert any(i["overflow"] for i in latest.values()), "the capped incidents say so"
        assert any(i["category"] == "node_reboot_required" and i["node"] == "later" for i in latest.values()), \
            "the signal after the flood was processed"
    finally:
        await bus.close()


class RefusingBus(MemoryBus):
    """A bus whose server refuses every incident change (as NATS refuses a payload over max_payload)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> PublishAck:  # type: ignore[override]
        if subject.startswith("breakfix.incidents."):
            self.attempts += 1
            raise RuntimeError("maximum payload exceeded")
        return await super().publish(subject, data, msg_id=msg_id, headers=headers)

    async def publish_start(self, items: Sequence[tuple[str, bytes, str | None]]) -> Awaitable[list[PublishAck]]:
        fut: asyncio.Future[list[PublishAck]] = asyncio.get_running_loop().create_future()
        fut.set_exception(RuntimeError("maximum payload exceeded"))
        return fut


async def test_change_that_cannot_be_published_is_logged_counted_and_dead_lettered_once(catalog: Catalog) -> None:
    bus = RefusingBus()
    await bus.ensure_streams(subjects.STREAMS)
    signals = [sig(node=f"n{i}", code="79", at=i) for i in range(3)]
    for s in signals:
        await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
    svc = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(svc.run(stop), name="refused-correlator")

        async def handled() -> bool:
            return svc.signal_stats.handled == 3

        await wait_until(handled, 10, "signals handled")
        await svc.checkpoint()
        stop.set()
        await task
    assert svc.publish_failed == 3 and bus.attempts == 3, "one retry each, never forever"
    dead = bus.messages(subjects.DEAD_LETTERS.name)
    assert len(dead) == 3 and all(m.headers[subjects.HDR_DLQ_REASON].startswith("publish failed") for m in dead)
    assert sum(1 for e in logs if e["event"] == "publish_failed") == 3


async def test_readiness_fails_while_the_correlator_is_stuck(catalog: Catalog) -> None:
    clock = ManualClock(T0)
    svc = build_correlator(CorrelatorConfig(catalog=catalog, service=ServiceConfig(stuck_after_s=30)),
                           bus=MemoryBus(), clock=clock)
    svc.ready.set()
    assert svc.is_ready() and not svc.stuck
    clock.advance(31)  # no pull, batch or checkpoint completed since
    assert svc.stuck and not svc.is_ready()
    svc._alive()
    assert svc.is_ready()


def test_stale_incident_closes_with_a_timeline_entry_and_names_the_held_node(catalog: Catalog) -> None:
    core = build_core(CorrelatorConfig(catalog=catalog))
    s = sig(code="173")
    core.ingest(s, s.observed_at)
    inc = next(iter(core.incidents.values()))
    from breakfix.schemas.incident import (
        ActionKind,
        ActionOutcome,
        ActionRecord,
        Domain,
        IncidentStatus,
        Plan,
        Step,
        StepAction,
    )
    plan = Plan(domain=Domain.OPERATOR, rule="unknown-fault", reason="r", steps=(Step(action=StepAction.CORDON),))
    core.apply_action(ActionRecord(id="a1", cluster="c1", incident_id=inc.id, kind=ActionKind.PLAN,
                                   outcome=ActionOutcome.ESCALATED, actor="t", plan=plan, at=T0), T0)
    assert inc.status is IncidentStatus.ESCALATED
    assert core.close_stale(T0 + timedelta(days=29)) == []
    changes = core.close_stale(T0 + timedelta(days=31))
    assert [c.incident.id for c in changes] == [inc.id]
    assert inc.status is IncidentStatus.STALE
    assert inc.timeline[-1][1] == "stale" and "n1 may still be held" in inc.timeline[-1][2]
    assert core.expire(T0 + timedelta(days=32)) == [inc.id]
