"""The incident index (KV ``breakfix-incidents``): the correlator writes the latest version of every
incident (once its consumers catch up, per interval under load, before every checkpoint); readers take a
snapshot and follow changes without replaying the stream."""

from __future__ import annotations

import asyncio
import contextlib

from breakfix.bus.clock import ManualClock
from breakfix.bus.codec import encode
from breakfix.bus.memory import MemoryBus
from breakfix.bus.protocol import Delivery
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.index import BUCKET, IncidentIndex, index_for, index_key
from breakfix.correlator.service import CorrelatorService, ServiceConfig
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import IncidentStatus
from tests.conftest import T0, sig, wait_until
from tests.console_fixtures import incident


async def test_snapshot_holds_the_latest_version_of_each_incident_per_cluster() -> None:
    bus = MemoryBus()
    idx = IncidentIndex(bus)
    await idx.write([incident("inc-a"), incident("inc-b", cluster="c2")])
    await idx.write([incident("inc-a", status=IncidentStatus.RESOLVED, version=2),
                     incident("inc-a", version=1)])  # an older version in the same batch never wins
    every = await idx.snapshot()
    assert {i: (v.cluster, v.version) for i, v in every.items()} == {"inc-a": ("c1", 2), "inc-b": ("c2", 1)}
    assert list(await idx.snapshot("c2")) == ["inc-b"]
    assert (await idx.find("inc-b")) is not None and (await idx.get("c1", "inc-b")) is None
    assert await bus.kv_keys(BUCKET) == [index_key("c1", "inc-a"), index_key("c2", "inc-b")]


async def test_watch_yields_current_entries_then_changes() -> None:
    bus = MemoryBus()
    idx = IncidentIndex(bus)
    await idx.write([incident("inc-a")])
    seen: list[tuple[str, int]] = []

    async def follow() -> None:
        async for _key, inc in idx.watch():
            assert inc is not None
            seen.append((inc.id, inc.version))
            if len(seen) == 2:
                return

    task = asyncio.create_task(follow(), name="test-index-watch")
    await asyncio.sleep(0.05)
    await idx.write([incident("inc-a", version=2)])
    await asyncio.wait_for(task, 5)
    assert seen == [("inc-a", 1), ("inc-a", 2)]


async def test_correlator_indexes_every_change_it_publishes(catalog: Catalog) -> None:
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    for s in (sig(node="n1", code="79"), sig(node="n2", code="48", gpu_index=3)):
        await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
    svc = CorrelatorService(bus, Correlator(catalog), lambda: T0)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop), name="test-correlator")
    while svc.signal_stats.handled < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    stop.set()
    await task
    indexed = await IncidentIndex(bus).snapshot("c1")
    assert {i.node for i in indexed.values()} == {"n1", "n2"}
    assert indexed == {i.id: i.snapshot() for i in svc.core.incidents.values()}


class _SteppingClock(ManualClock):
    """A monotonic clock that moves a second on every read: each batch finds the index interval gone."""

    def monotonic(self) -> float:
        self.advance(1.0)
        return super().monotonic()


async def _index_puts(catalog: Catalog, clock: ManualClock) -> tuple[CorrelatorService, MemoryBus, int]:
    """Four signals on one GPU, one batch each (each changes its incident), through a service on ``clock``;
    returns the service, the bus and how many index puts the service made."""
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    for n, code in enumerate(("48", "63", "64", "94")):
        s = sig(node="n1", code=code, gpu_index=0, at=n)
        await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
    config = ServiceConfig(batch=1, index_interval_s=0.5, checkpoint_interval_s=60)  # no checkpoint while it runs
    svc = CorrelatorService(bus, Correlator(catalog), clock, config=config)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop), name="test-correlator")
    await wait_until(lambda: _true(svc.signal_stats.handled == 4 and not svc.index_pending), 5, "caught up")
    writer = index_for(bus)
    assert isinstance(writer, IncidentIndex)
    written = writer.written
    stop.set()
    await task
    assert svc.published == 4, "each signal changed the incident in its own batch"
    assert len(svc.core.incidents) == 1
    return svc, bus, written


async def _true(value: bool) -> bool:
    return value


async def test_an_incident_changed_in_several_batches_is_put_in_the_index_once_when_the_consumer_catches_up(
        catalog: Catalog) -> None:
    svc, bus, written = await _index_puts(catalog, ManualClock())
    assert written == 1, "one put for the incident's latest version, not one per batch"
    assert await IncidentIndex(bus).snapshot("c1") == {i.id: i.snapshot() for i in svc.core.incidents.values()}


async def test_the_index_trails_a_busy_consumer_by_at_most_its_interval(catalog: Catalog) -> None:
    svc, bus, written = await _index_puts(catalog, _SteppingClock())
    assert written == 4, "the interval passed before every batch: each batch's change was put in the index"
    assert await IncidentIndex(bus).snapshot("c1") == {i.id: i.snapshot() for i in svc.core.incidents.values()}


class _NeverCaughtUpBus(MemoryBus):
    """Once the signal stream is drained its pulls hang until released (a consumer that never catches up), and
    every stored checkpoint records what the index held at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.index_at_checkpoint: list[dict[str, object]] = []

    async def pull(self, *, stream: str, durable: str, batch: int, timeout_s: float) -> list[Delivery]:
        msgs = await super().pull(stream=stream, durable=durable, batch=batch, timeout_s=timeout_s)
        if not msgs and stream == subjects.SIGNALS.name:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 10)
        return msgs

    async def put_blob(self, bucket: str, name: str, data: bytes) -> None:
        self.index_at_checkpoint.append(dict(await IncidentIndex(self).snapshot("c1")))
        await super().put_blob(bucket, name, data)


async def test_a_checkpoint_is_stored_only_once_the_index_holds_every_change_it_covers(catalog: Catalog) -> None:
    bus = _NeverCaughtUpBus()
    await bus.ensure_streams(subjects.STREAMS)
    for s in (sig(node="n1", code="79"), sig(node="n2", code="48", gpu_index=3)):
        await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
    # the index's interval never passes (a clock that does not move), the consumer never catches up: only the
    # checkpoint puts the changes in the index
    config = ServiceConfig(index_interval_s=0.5, checkpoint_interval_s=0.05)
    svc = CorrelatorService(bus, Correlator(catalog), ManualClock(), config=config)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop), name="test-correlator")
    try:
        await wait_until(lambda: _true(svc.signal_stats.handled == 2 and bool(bus.index_at_checkpoint)), 5,
                         "a checkpoint after the batch")
        assert bus.index_at_checkpoint[-1] == {i.id: i.snapshot() for i in svc.core.incidents.values()}
    finally:
        stop.set()
        bus.release.set()
        await task


async def test_an_index_writer_does_not_keep_its_bus_alive() -> None:
    import gc
    import weakref

    from breakfix.correlator import index as index_module

    bus = MemoryBus()
    before = len(index_module._INDEXES)
    await index_for(bus).write([incident("inc-a")])
    assert index_for(bus) is index_for(bus), "one writer per bus"
    assert len(index_module._INDEXES) == before + 1
    gone = weakref.ref(bus)
    del bus
    gc.collect()
    assert gone() is None
    assert len(index_module._INDEXES) <= before


async def test_a_bus_without_key_value_support_writes_no_index() -> None:
    await index_for(object()).write([incident("inc-a")])  # no error, nothing to write to


async def test_an_incident_is_found_when_the_key_listing_comes_back_short() -> None:
    """nats.py's key listing can end early on a busy server; a verb must not be told the incident does not exist."""
    bus = MemoryBus()
    idx = IncidentIndex(bus)
    await idx.write([incident("inc-open"), incident("inc-far", cluster="c2")])

    async def short(_bucket: str, _prefix: str = "") -> list[str]:
        return []

    bus.kv_keys = short  # type: ignore[method-assign]
    found = await idx.find("inc-far")
    assert found is not None and found.cluster == "c2"
    assert await idx.find("inc-nope") is None
