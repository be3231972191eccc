"""The correlator service: checkpoints, a killed process that resumes, partitions, storms.

The restart and partition tests run against a real nats-server; the kill test SIGKILLs a
real ``breakfix correlator`` process, not a polite stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import zstandard

from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.memory import MemoryBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.fleet import build_fleet
from breakfix.collectors.storm import switch_storm
from breakfix.correlator import checkpoint as checkpoint_mod
from breakfix.correlator.app import CorrelatorConfig, build_correlator, build_fleet_stage
from breakfix.correlator.checkpoint import ZSTD_MAGIC, Checkpoint, CheckpointError
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.service import CorrelatorService, ServiceConfig
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ChangeKind, Incident, IncidentChange, IncidentScope
from breakfix.schemas.signal import Signal
from tests.conftest import T0, sig, wait_until


def workload(nodes: int = 40, rounds: int = 30) -> list[Signal]:
    """A varied stream: DBEs with remaps, flapping throttles, app XIDs, a switch, re-sends."""
    out: list[Signal] = []
    for r in range(rounds):
        t = r * 7.0
        for i in range(nodes):
            node = f"n{i:03d}"
            labels = {"switch": f"leaf-{i // 8}", "rack": f"rack-{i // 4}"}
            k = (r + i) % 6
            if k == 0:
                out.append(sig(node=node, code="48", gpu_index=i % 8, at=t, n=r, labels=labels))
            elif k == 1:
                out.append(sig(node=node, code="63", gpu_index=i % 8, at=t + 0.5, n=r, labels=labels))
            elif k == 2:
                out.append(sig(node=node, check="clock.hw_slowdown", code=None, gpu_index=1, at=t, n=r,
                               healthy=r % 2 == 0, labels=labels))
            elif k == 3:
                out.append(sig(node=node, code="13", gpu_index=2, pod=f"job-{r % 3}", at=t, n=r, labels=labels))
            elif k == 4 and i // 8 == 2:
                out.append(sig(node=node, check="ib.link_down", code=None, gpu_index=None, component="mlx5_0/1",
                               at=t, n=r, labels=labels))
            else:
                out.append(sig(node=node, check="ecc.dbe", code=None, gpu_index=3, at=t, n=r, healthy=True,
                               labels=labels))
            if (r * nodes + i) % 17 == 0:
                out.append(out[-1])  # a collector re-send
    return out


def reference(catalog: Catalog, signals: list[Signal]) -> dict[str, Incident]:
    core = Correlator(catalog)
    for s in signals:
        core.ingest(s, s.observed_at)
    return {i.id: i.snapshot() for i in core.incidents.values()}


def essence(inc: Incident) -> tuple[object, ...]:
    """What a consumer of the incident stream must agree on (counts of repeats are not re-published)."""
    return (inc.category, inc.status, inc.flaps, inc.parent, inc.version, tuple(inc.members), inc.codes)


async def read_changes(bus: JetStreamBus) -> list[IncidentChange]:
    await bus.reset_consumer(stream=subjects.INCIDENTS.name, durable="test-reader",
                             filter_subject=subjects.INCIDENTS_ALL, start_seq=1, ack_all=False)
    out: list[IncidentChange] = []
    while batch := await bus.pull(stream=subjects.INCIDENTS.name, durable="test-reader", batch=1000, timeout_s=0.5):
        out.extend(IncidentChange.model_validate_json(m.data) for m in batch)
    return out


def latest(changes: list[IncidentChange]) -> dict[str, Incident]:
    out: dict[str, Incident] = {}
    for ch in changes:
        prev = out.get(ch.incident.id)
        if prev is None or ch.incident.version >= prev.version:
            out[ch.incident.id] = ch.incident
    return out


class TestCheckpoint:
    def test_state_round_trip_continues_exactly_like_an_uninterrupted_core(self, catalog: Catalog) -> None:
        """Checkpoint half-way, load into a fresh core, feed the rest: same incidents as one pass."""
        signals = workload()
        half = len(signals) // 2
        first = Correlator(catalog)
        for s in signals[:half]:
            first.ingest(s, s.observed_at)
        blob = Checkpoint(first.to_state(), {"correlator": half}).encode()
        resumed = Correlator(catalog)
        cp = Checkpoint.decode(blob)
        resumed.load_state(cp.state)
        for s in signals[half:]:
            resumed.ingest(s, s.observed_at)
        got = {i.id: i.snapshot() for i in resumed.incidents.values()}
        assert got == reference(catalog, signals)
        assert cp.positions == {"correlator": half}

    @pytest.mark.parametrize("blob", [b"not zlib", b"x\x01\x03\x00\x00\x00\x00\x01", ZSTD_MAGIC + b"not a frame",
                                      zstandard.ZstdCompressor().compress(b"")[:-2]],
                             ids=["garbage", "empty", "zstd-garbage", "zstd-truncated"])
    def test_unreadable_checkpoint_refuses_to_start(self, blob: bytes) -> None:
        with pytest.raises(CheckpointError):
            Checkpoint.decode(blob)

    def test_a_checkpoint_is_stored_as_zstd_and_one_stored_as_zlib_before_still_loads(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        for s in workload(nodes=4, rounds=3):
            core.ingest(s, s.observed_at)
        cp = Checkpoint(core.to_state(), {"correlator": 7})
        blob = cp.encode()
        assert blob.startswith(ZSTD_MAGIC)
        for damaged in (blob[: len(blob) // 2], blob[:-6], blob[:-4] + bytes(4)):  # cut short; its checksum wrong
            with pytest.raises(CheckpointError):
                Checkpoint.decode(damaged)
        for stored in (blob, zlib.compress(cp.to_json(), 1)):
            again = Checkpoint.decode(stored)
            assert again.positions == {"correlator": 7}
            assert again.state == Checkpoint.decode(blob).state
            restored = Correlator(catalog)
            restored.load_state(again.state)
            assert {i.id: i.snapshot() for i in restored.incidents.values()} == \
                {i.id: i.snapshot() for i in core.incidents.values()}

    @pytest.mark.parametrize("codec", ["zstd", "zlib"])
    def test_a_checkpoint_that_inflates_past_the_cap_is_refused_not_expanded(
            self, codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(checkpoint_mod, "MAX_CHECKPOINT_BYTES", 4 << 20)
        zeros = b"0" * (6 << 20)  # 6 MiB of one byte: a blob of a few KiB
        blob = zstandard.ZstdCompressor().compress(zeros) if codec == "zstd" else zlib.compress(zeros)
        assert len(blob) < 64 << 10
        with pytest.raises(CheckpointError, match="inflates past"):
            Checkpoint.decode(blob)


class TestServiceOnMemoryBus:
    async def test_restart_loads_checkpoint_and_skips_what_it_covers(self, catalog: Catalog) -> None:
        bus = MemoryBus()
        await bus.ensure_streams(subjects.STREAMS)
        signals = workload(nodes=10, rounds=6)
        for s in signals[:30]:
            await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
        await bus.publish(subjects.signal_subject("c1", "bad"), b'{"node": 1}')

        async def run_until(svc: CorrelatorService, handled: int) -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(svc.run(stop), name="test-correlator")
            while svc.signal_stats.handled + svc.signal_stats.dead_lettered < handled:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            stop.set()
            await task

        first = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
        await run_until(first, 31)
        assert first.signal_stats.dead_lettered == 1
        assert len(bus.messages(subjects.DEAD_LETTERS.name)) == 1
        for s in signals[30:]:
            await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
        second = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
        await run_until(second, len(signals) - 30)
        assert second.signal_stats.handled == len(signals) - 30, "the restart re-read nothing its checkpoint covered"
        assert {i.id: i.snapshot() for i in second.core.incidents.values()} == reference(catalog, signals)


    async def test_a_restart_keeps_open_incidents_on_the_open_incident_gauge(self, catalog: Catalog) -> None:
        """An escalated incident changes no more: the gauge (and BreakfixEscalatedIncidentsOpen) must still count it
        after the correlator restarts from its checkpoint."""
        from prometheus_client import generate_latest

        bus = MemoryBus()
        await bus.ensure_streams(subjects.STREAMS)
        for s in (sig(code="79", node="n7"), sig(code="48", node="n8", at=1), sig(code="48", node="n8", at=2,
                                                                                   healthy=True)):
            await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
        first = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop), name="test-correlator")
        await wait_until(lambda: _handled(first, 3), 10, "the signals")
        stop.set()
        await task

        def gauge(svc: CorrelatorService) -> list[str]:
            return [ln for ln in generate_latest(svc.metrics.registry).decode().splitlines()
                    if ln.startswith("breakfix_correlator_open_incidents{")]

        second = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
        await second.restore()
        assert gauge(second) == gauge(first) and len(gauge(second)) == 1, "the XID 79 incident; the healed one is gone"


async def _handled(svc: CorrelatorService, n: int) -> bool:
    return svc.signal_stats.handled >= n


def _spawn(url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from breakfix.cli.main import app; app()", "correlator", "--nats", url,
         "--checkpoint-interval", "0.3", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.nats
class TestKilledMidStream:
    async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(self, catalog: Catalog,
                                                                         nats_server: EmbeddedNats) -> None:
        """Kill -9 the correlator while it works, restart it: the incidents equal one clean pass, and
        no incident is opened (or reopened) twice on the stream."""
        signals = workload()
        bus = await JetStreamBus.connect(nats_server.url)
        await bus.ensure_streams(subjects.STREAMS)

        async def acked() -> int:
            state = await bus.consumer_state(subjects.SIGNALS.name, "correlator")
            return state.ack_floor if state else 0

        async def incidents_published() -> int:
            return await bus.stream_messages(subjects.INCIDENTS.name)

        proc = _spawn(nats_server.url)
        try:
            for s in signals[: len(signals) // 2]:
                await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))  # re-sends reach the core

            async def some_work_done() -> bool:
                return await acked() > 0 and await incidents_published() > 20

            await wait_until(some_work_done, 30, "the first correlator to checkpoint")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            for s in signals[len(signals) // 2:]:
                await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))  # re-sends reach the core
            last = await bus.stream_messages(subjects.SIGNALS.name)
            proc = _spawn(nats_server.url)

            async def caught_up() -> bool:
                return await acked() >= last

            await wait_until(caught_up, 60, "the restarted correlator to catch up")
        finally:
            proc.kill()
            proc.wait(10)
        changes = await read_changes(bus)
        cp = Checkpoint.decode(await bus.get_blob("breakfix-correlator", "correlator") or b"")
        await bus.close()
        want = reference(catalog, signals)
        restored = Correlator(catalog)
        restored.load_state(cp.state)
        have = {i.id: i.snapshot() for i in restored.incidents.values()}
        for iid, inc in want.items():
            diff = {k: (v, getattr(have[iid], k)) for k, v in inc if getattr(have[iid], k) != v}
            assert not diff, f"{iid}: {diff}"
        got = latest(changes)
        assert set(got) == set(want), "no incident lost, none invented"
        assert {k: essence(v) for k, v in got.items()} == {k: essence(v) for k, v in want.items()}
        opened = Counter(ch.incident.id for ch in changes if ch.kind is ChangeKind.OPENED)
        assert max(opened.values()) == 1, "an incident was opened twice"
        reopened = Counter((ch.incident.id, ch.incident.flaps) for ch in changes if ch.kind is ChangeKind.REOPENED)
        assert not reopened or max(reopened.values()) == 1, "an incident was reopened twice"


@pytest.mark.nats
class TestPartitions:
    async def test_nodes_split_across_partitions_and_fleet_stage_builds_fabric_incident(
            self, catalog: Catalog, nats_server: EmbeddedNats) -> None:
        """Two partitions own disjoint nodes; the fleet stage groups a switch's nodes into one fabric incident."""
        signals = [sig(node=f"n{i}", check="ib.link_down", code=None, gpu_index=None, component="mlx5_0/1", at=i,
                       labels={"switch": "leaf-07"}) for i in range(8)]
        signals += [sig(node=f"m{i}", code="48", at=i) for i in range(12)]
        bus = await JetStreamBus.connect(nats_server.url)
        stop = asyncio.Event()
        parts = [build_correlator(CorrelatorConfig(catalog=catalog, service=ServiceConfig(partition=p, partitions=2)),
                                  bus=bus, clock=lambda: T0) for p in range(2)]
        fleet = build_fleet_stage(CorrelatorConfig(rules=parts[0].core.rules), bus=bus, clock=lambda: T0)
        async with asyncio.TaskGroup() as tg:
            for p, svc in enumerate(parts):
                tg.create_task(svc.run(stop), name=f"test-partition-{p}")
            await asyncio.gather(*(svc.ready.wait() for svc in parts))
            tg.create_task(fleet.run(stop), name="test-fleet")
            for s in signals:
                await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))  # re-sends reach the core

            async def done() -> bool:
                now = latest(await read_changes(bus))
                fabric = [i for i in now.values() if i.scope is IncidentScope.FABRIC]
                folded = [i for i in now.values() if i.parent is not None]
                return sum(p.signal_stats.handled for p in parts) == len(signals) and len(fabric) == 1 \
                    and len(fabric[0].members) == 8 and len(folded) == 8

            await wait_until(done, 30, "both partitions and the fleet stage")
            stop.set()
        by_part = [{i.node for i in p.core.incidents.values()} for p in parts]
        assert by_part[0] and by_part[1], "both partitions got work"
        assert not by_part[0] & by_part[1], "a node belongs to exactly one partition"
        fabric = [i for i in latest(await read_changes(bus)).values() if i.scope is IncidentScope.FABRIC]
        assert fabric[0].topology == {"switch": "leaf-07"}
        members = [i for p in parts for i in p.core.incidents.values() if i.id in fabric[0].members]
        assert len(members) == 8 and all(i.parent == fabric[0].id for i in members), \
            "each partition folded its own members under the fabric incident"
        await bus.close()


class TestStorm:
    def test_switch_failure_and_flapping_gpus_give_one_incident_each(self, catalog: Catalog) -> None:
        """1,000 nodes x 8 GPUs speak for 10 s: exactly one fabric incident per failed switch and one
        incident per flapping GPU, with memory bounded by incidents, not by signals."""
        storm = switch_storm(build_fleet(1000), start=datetime(2026, 11, 23, tzinfo=UTC))
        core = Correlator(catalog)
        for s in storm.signals:
            core.ingest(s, s.observed_at)
        top = [i for i in core.incidents.values() if i.parent is None]
        fabric = sorted(i.topology["switch"] for i in top if i.scope is IncidentScope.FABRIC)
        assert fabric == sorted(storm.failed_switches)
        gpu = sorted(f"{i.node}/{next(iter(i.gpus.values())).index}" for i in top if i.scope is IncidentScope.GPU)
        assert gpu == list(storm.flapping)
        assert len(top) == len(storm.failed_switches) + len(storm.flapping)
        assert all(i.flaps > 10 for i in top if i.scope is IncidentScope.GPU), "flapping is counted, not re-opened"
        assert len(core.seen) <= core.rules.seen_limit
        assert all(len(i.timeline) <= core.rules.timeline_limit for i in core.incidents.values())

    def test_storm_memory_does_not_grow_with_duration(self, catalog: Catalog) -> None:
        fleet = build_fleet(50)
        core = Correlator(catalog)
        sizes = []
        for minute in range(3):
            storm = switch_storm(fleet, start=datetime(2026, 11, 23, tzinfo=UTC) + timedelta(minutes=minute),
                                 duration_s=60, failed_switches=1, flapping=10)
            for s in storm.signals:
                core.ingest(s, s.observed_at)
            sizes.append((len(core.incidents), sum(len(i.timeline) + len(i.evidence) + len(i.signal_ids)
                                                   for i in core.incidents.values())))
        assert sizes[1] == sizes[2], f"state grew with a steady storm: {sizes}"

