"""The collector daemon: edge behaviour, the spool, store-and-forward through a real nats-server
that is stopped mid-stream, and a full daemon end to end with /metrics and /healthz."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from breakfix.bus.clock import SystemClock
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats, free_port
from breakfix.collectors.app import build_collector
from breakfix.collectors.config import CollectorConfig
from breakfix.collectors.edge import Cycle, EdgeFilter
from breakfix.collectors.forwarder import Forwarder
from breakfix.collectors.nvml_api import FakeNvml
from breakfix.collectors.spool import Spool
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal
from tests.conftest import T0, sig, wait_until
from tests.test_collector_sources import SAMPLE, FakeVllm

DATA = Path(__file__).resolve().parent / "data"


def flap(healthy: bool, at: float, check: str = "clock.hw_slowdown", **kw: object) -> Signal:
    return sig(check=check, code=None, healthy=healthy, at=at, **kw)  # type: ignore[arg-type]


class TestEdgeFilter:
    def test_transitions_only_and_first_healthy_is_not_news(self) -> None:
        edge = EdgeFilter(resync_s=3600)
        seq = [True, True, False, False, False, True, True]
        sent = [s for i, h in enumerate(seq) for s in edge.apply(Cycle(states=[flap(h, i)]), T0)]
        assert [s.healthy for s in sent] == [False, True]
        assert edge.stats.suppressed_states == 4

    def test_a_fault_whose_severity_changes_is_news_and_the_same_severity_again_is_not(self) -> None:
        """A garbled port reading is a warning; the same port then read down is a critical fault."""
        edge = EdgeFilter(resync_s=3600)
        seq = [Severity.WARNING, Severity.WARNING, Severity.CRITICAL, Severity.CRITICAL, Severity.WARNING]
        sent = [s for i, sev in enumerate(seq)
                for s in edge.apply(Cycle(states=[flap(False, i, check="ib.link_down", severity=sev)]), T0)]
        assert [s.severity for s in sent] == [Severity.WARNING, Severity.CRITICAL, Severity.WARNING]
        assert edge.stats.suppressed_states == 2

    def test_entity_missing_from_a_cycle_is_never_cleared(self) -> None:
        edge = EdgeFilter(resync_s=3600)
        edge.apply(Cycle(states=[flap(False, 0, gpu_index=0), flap(False, 0, gpu_index=1)]), T0)
        sent = edge.apply(Cycle(states=[flap(True, 1, gpu_index=0)]), T0)  # gpu1 unreadable this cycle
        assert [(s.gpu.index if s.gpu else None, s.healthy) for s in sent] == [(0, True)]

    def test_a_fault_open_before_a_restart_is_cleared_by_its_first_healthy_reading(self) -> None:
        before = EdgeFilter(resync_s=3600)
        before.apply(Cycle(states=[flap(False, 0, gpu_index=0), flap(False, 0, gpu_index=1)]), T0)
        carried = before.faulted_keys()
        after = EdgeFilter(resync_s=3600, faulted=carried)  # the collector restarted; gpu0 was fixed meanwhile
        sent = after.apply(Cycle(states=[flap(True, 5, gpu_index=0), flap(False, 5, gpu_index=1),
                                         flap(True, 5, gpu_index=2)]), T0)
        assert [(s.gpu.index if s.gpu else None, s.healthy) for s in sent] == [(0, True)], \
            "gpu0's clearing is news; gpu1 is still faulted (known upstream); gpu2 was never faulted"
        assert after.faulted_keys() == [k for k in carried if "00000001" in k], "gpu1 stays open"

    def test_a_carried_fault_whose_check_is_read_without_it_for_three_resyncs_is_forgotten(self) -> None:
        edge = EdgeFilter(resync_s=60, faulted=["clock.hw_slowdown@n1/gone-gpu", "ib.link_down@n1/mlx5_0/1"])
        edge.apply(Cycle(), T0)
        edge.apply(Cycle(states=[flap(True, 10, gpu_index=0)]), T0 + timedelta(seconds=10))  # the source is up
        edge.apply(Cycle(), T0 + timedelta(seconds=189))
        assert len(edge.faulted_keys()) == 2
        edge.apply(Cycle(), T0 + timedelta(seconds=191))
        assert edge.faulted_keys() == ["ib.link_down@n1/mlx5_0/1"], \
            "its check read for three resync periods without it: gone; a check never read yet is kept"

    def test_a_carried_fault_of_a_source_that_comes_up_late_is_still_cleared(self) -> None:
        """After a reboot the driver may take longer to load than three resync periods."""
        key = EdgeFilter(resync_s=60).apply(Cycle(states=[flap(False, 0, gpu_index=0)]), T0)[0].fault_key()
        edge = EdgeFilter(resync_s=60, faulted=[key])
        edge.apply(Cycle(), T0)
        edge.apply(Cycle(), T0 + timedelta(seconds=1800))
        sent = edge.apply(Cycle(states=[flap(True, 1801, gpu_index=0)]), T0 + timedelta(seconds=1801))
        assert [(s.fault_key(), s.healthy) for s in sent] == [(key, True)], "fixed while away: the clearing is news"
        later = EdgeFilter(resync_s=60, faulted=[key])
        later.apply(Cycle(), T0)
        later.apply(Cycle(), T0 + timedelta(days=1, seconds=1))
        assert later.faulted_keys() == [], "a check never read for a day: its source is off"

    def test_resync_resends_faults_and_recovered_entities(self) -> None:
        edge = EdgeFilter(resync_s=60)
        edge.apply(Cycle(states=[flap(False, 0, gpu_index=0), flap(False, 0, gpu_index=1), flap(True, 0, gpu_index=2)]),
                   T0)
        edge.apply(Cycle(states=[flap(True, 10, gpu_index=1)]), T0 + timedelta(seconds=10))
        sent = edge.apply(Cycle(), T0 + timedelta(seconds=61))
        assert sorted((s.gpu.index if s.gpu else -1, s.healthy, s.details.get("resync")) for s in sent) == [
            (0, False, "true"), (1, True, "true")], "never-faulted gpu2 is not resent"
        assert len({s.id for s in sent}) == 2

    def test_repeated_events_are_counted_then_reported(self) -> None:
        edge = EdgeFilter(repeat_window_s=60)
        xids = [sig(code="13", at=i, n=i, pod="p1") for i in range(5)] + [sig(code="13", at=61, n=99, pod="p1")]
        sent = [s for x in xids for s in edge.apply(Cycle(events=[x]), T0)]
        assert len(sent) == 2 and sent[1].details["suppressed_repeats"] == "4"

    def test_a_window_that_closes_on_counted_repeats_sends_the_latest_one(self) -> None:
        """A fault that recurs only inside the window still reaches the correlator (the soak must see it)."""
        edge = EdgeFilter(repeat_window_s=60)
        first = edge.apply(Cycle(events=[sig(code="48", at=0, n=0)]), T0)
        during = [s for i in (10, 20, 30) for s in edge.apply(Cycle(events=[sig(code="48", at=i, n=i)]),
                                                                T0 + timedelta(seconds=i))]
        assert len(first) == 1 and during == []
        assert edge.apply(Cycle(), T0 + timedelta(seconds=59)) == []
        (trailing,) = edge.apply(Cycle(), T0 + timedelta(seconds=61))
        assert trailing.observed_at == T0 + timedelta(seconds=30) and trailing.details["suppressed_repeats"] == "2"
        assert edge.apply(Cycle(), T0 + timedelta(seconds=200)) == [], "sent once, not again"

    def test_a_repeat_the_catalog_rates_more_severe_goes_at_once_and_no_milder_repeat_replaces_it(
            self, catalog: Catalog) -> None:
        """XID 154's class is in its line: None, then GPU Reset Required, then None again, all inside one window.
        Keyed without the severity, the reset waited behind the first None and the last None replaced it."""
        edge = EdgeFilter(repeat_window_s=60)
        sent = [s for at, v in ((0, "None"), (10, "GPU Reset Required"), (20, "None"))
                for s in edge.apply(Cycle(events=[xid154_event(catalog, at, v)]), T0 + timedelta(seconds=at))]
        sent += edge.apply(Cycle(), T0 + timedelta(seconds=61))
        assert [(s.observed_at, s.severity) for s in sent] == [
            (T0, Severity.INFO), (T0 + timedelta(seconds=10), Severity.CRITICAL),
            (T0 + timedelta(seconds=20), Severity.INFO)]

    def test_a_repeat_of_another_class_at_the_same_severity_is_not_replaced_either(self, catalog: Catalog) -> None:
        """GPU Reset Required and Drain and Reset are both critical: the class from the line keys them apart."""
        edge = EdgeFilter(repeat_window_s=60, catalog=catalog)
        sent = [s for at, v in ((0, "GPU Reset Required"), (10, "Drain and Reset"), (20, "GPU Reset Required"))
                for s in edge.apply(Cycle(events=[xid154_event(catalog, at, v)]), T0 + timedelta(seconds=at))]
        sent += edge.apply(Cycle(), T0 + timedelta(seconds=61))
        assert [(s.observed_at - T0).seconds for s in sent] == [0, 10, 20]
        assert "Drain and Reset" in sent[1].message

    def test_same_xid_from_another_pod_is_not_a_repeat(self) -> None:
        edge = EdgeFilter(repeat_window_s=60)
        sent = [s for x in (sig(code="13", pod="p1"), sig(code="13", at=1, pod="p2"))
                for s in edge.apply(Cycle(events=[x]), T0)]
        assert len(sent) == 2


def xid154_event(catalog: Catalog, at: int, verdict: str) -> Signal:
    """An XID 154 line whose recovery action is ``verdict``, with the severity the collector gives it."""
    msg = f"NVRM: Xid (PCI:0000:18:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 ({verdict})"
    return sig(code="154", at=at, n=at, message=msg,
               severity=catalog.classify(check="xid", code="154", message=msg).severity)


def sev_sig(i: int, severity: Severity) -> Signal:
    return sig(check="ecc.dbe", code=None, at=i, n=i, severity=severity)


class TestSpool:
    def test_order_survives_a_restart(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool")
        for i in range(5):
            spool.append(sev_sig(i, Severity.WARNING))
        again = Spool(tmp_path / "spool")
        assert [Signal.model_validate_json(d).observed_at for _, d in again.peek(10)] == [
            T0 + timedelta(seconds=i) for i in range(5)]

    def test_full_spool_drops_informational_first_and_fatal_never(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", max_records=10)
        for i in range(4):
            spool.append(sev_sig(i, Severity.INFO))
        for i in range(4, 10):
            spool.append(sev_sig(i, Severity.FATAL))
        for i in range(10, 14):
            spool.append(sev_sig(i, Severity.WARNING))  # evicts the 4 info ones
        assert spool.dropped == Counter({"info": 4})
        for i in range(14, 20):
            spool.append(sev_sig(i, Severity.FATAL))  # evicts warnings, then grows rather than lose a fatal
        kept = [Signal.model_validate_json(d).severity for _, d in spool.peek(100)]
        assert kept.count(Severity.FATAL) == 12 and Severity.INFO not in kept
        assert spool.dropped == Counter({"info": 4, "warning": 4})
        spool.append(sev_sig(30, Severity.INFO))  # nothing less important to evict: the newcomer goes
        assert spool.dropped["info"] == 5

    def test_half_written_entry_is_discarded_on_start(self, tmp_path: Path) -> None:
        d = tmp_path / "spool"
        Spool(d).append(sev_sig(1, Severity.CRITICAL))
        (d / "000000000099-2.tmp").write_text("{partial")
        assert len(Spool(d)) == 1 and not list(d.glob("*.tmp"))


@pytest.mark.nats
class TestStoreAndForward:
    async def test_server_stopped_mid_stream_loses_nothing_and_delivers_once(self, tmp_path: Path) -> None:
        """Acceptance: stop nats-server mid-stream, keep collecting, restart it: every signal arrives
        exactly once."""
        server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
        bus = await JetStreamBus.connect(server.url)
        await bus.ensure_streams(subjects.STREAMS)
        fwd = Forwarder(Spool(tmp_path / "spool"), publish_timeout_s=0.5, retry_s=0.2)
        fwd.attach(bus)
        stop = asyncio.Event()
        drain = asyncio.create_task(fwd.drain(stop), name="test-drain")
        signals = [sig(code="48", gpu_index=i % 8, at=i, n=i) for i in range(300)]
        try:
            await fwd.send(signals[:100])
            server.stop()
            await fwd.send(signals[100:200])  # NATS is gone: these wait in the spool
            assert len(fwd.spool) > 0 and not fwd.up
            server.start()
            await fwd.send(signals[200:])

            async def drained() -> bool:
                return len(fwd.spool) == 0 and fwd.up

            await wait_until(drained, 30, "the spool to drain after the restart")
            stored = await bus.stream_messages(subjects.SIGNALS.name)
            await bus.reset_consumer(stream=subjects.SIGNALS.name, durable="count", filter_subject=subjects.SIGNALS_ALL,
                                     start_seq=1, ack_all=False)
            ids: list[str] = []
            deadline = time.monotonic() + 20  # a pull under load may come back short or empty before the end
            while len(ids) < stored and time.monotonic() < deadline:
                batch = await bus.pull(stream=subjects.SIGNALS.name, durable="count", batch=500, timeout_s=0.5)
                ids.extend(Signal.model_validate_json(m.data).id for m in batch)
            while batch := await bus.pull(stream=subjects.SIGNALS.name, durable="count", batch=500, timeout_s=0.5):
                ids.extend(Signal.model_validate_json(m.data).id for m in batch)  # anything past the count: duplicates
        finally:
            stop.set()
            await drain
            await bus.close()
            server.stop()
        assert stored == len(signals) and len(ids) == len(signals), "0 lost"
        assert len(set(ids)) == len(ids), "0 duplicates delivered"
        assert fwd.stats.spooled >= 100


class _Http:
    def __init__(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app)
        self.port = 0

    async def __aenter__(self) -> _Http:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def dcgm_app() -> web.Application:
    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(text=SAMPLE)

    a = web.Application()
    a.add_routes([web.get("/metrics", metrics)])
    return a


@pytest.mark.nats
class TestDaemonEndToEnd:
    async def test_all_sources_reach_nats_and_metrics_and_health_answer(self, tmp_path: Path, catalog: Catalog,
                                                                         nats_server: EmbeddedNats) -> None:
        kern = tmp_path / "kern.log"
        kern.write_text("")
        ib = tmp_path / "ib"
        shutil.copytree(DATA / "ib_sysfs", ib)
        fake = FakeNvml.hgx(8)
        # the node's own exporter lists the node's own GPUs: NVML names them the same
        fake.gpus[0].uuid, fake.gpus[1].uuid = ("GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77",
                                                "GPU-6043e4b2-feaa-8010-34c7-61d1a01576bb")
        vllm = FakeVllm()
        async with _Http(dcgm_app()) as dcgm, _Http(vllm.app()) as ep:
            cfg = CollectorConfig.model_validate({
                "cluster": "c1", "node": "gpu-node-007", "labels": {"rack": "r1", "switch": "leaf-01"},
                "state_dir": str(tmp_path / "state"), "http_listen": "127.0.0.1:0",
                "nats": {"url": nats_server.url}, "spool": {"dir": str(tmp_path / "spool")},
                "sources": {
                    "nvml": {"interval_s": 0.2, "expected_gpus": 8},
                    "kmsg": {"path": str(kern), "poll_s": 0.1},
                    "dcgm": {"enabled": True, "url": f"http://127.0.0.1:{dcgm.port}/metrics", "interval_s": 0.2},
                    "fabric": {"sysfs": str(ib), "interval_s": 0.2, "thresholds": {"expected_rate_gbps": 400}},
                    "endpoint": {"enabled": True, "interval_s": 0.2, "endpoints": [
                        {"name": "chat", "namespace": "team-llm", "url": f"http://127.0.0.1:{ep.port}"}]},
                }})
            daemon = build_collector(cfg, clock=SystemClock(), catalog=catalog, nvml=fake,
                                     connect=lambda: JetStreamBus.connect(nats_server.url))
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop), name="test-collector")
            await asyncio.wait_for(daemon.ready.wait(), 10)
            bus = await JetStreamBus.connect(nats_server.url)
            await bus.ensure_streams(subjects.STREAMS)
            await bus.reset_consumer(stream=subjects.SIGNALS.name, durable="t", filter_subject=subjects.SIGNALS_ALL,
                                     start_seq=1, ack_all=False)
            seen: list[Signal] = []

            async def has(check: str, **match: object) -> bool:
                for m in await bus.pull(stream=subjects.SIGNALS.name, durable="t", batch=500, timeout_s=0.2):
                    seen.append(Signal.model_validate_json(m.data))
                return any(s.check == check and all(getattr(s, k) == v for k, v in match.items()) for s in seen)

            try:
                async def first_cycles() -> bool:  # healthy baselines first, so the faults below are transitions
                    return all(daemon.metrics.cycles.labels(n)._value.get() >= 1
                               for n in ("nvml", "kmsg", "dcgm", "fabric", "endpoint"))

                await wait_until(first_cycles, 15, "every source's first cycle")
                fake.gpus[2].dbe_volatile = 1
                with kern.open("a") as fh:
                    fh.write("[  219.470994] NVRM: Xid (PCI:0000:3a:00): 79, pid='<unknown>', name=<unknown>, "
                             "GPU has fallen off the bus.\n")
                vllm.healthy = False
                (ib / "mlx5_0/ports/1/state").write_text("1: DOWN\n")  # a link that worked goes down
                (ib / "mlx5_0/ports/1/phys_state").write_text("3: Disabled\n")
                for check, match in [("ecc.dbe", {"source": "nvml"}), ("xid", {"source": "kmsg", "code": "79"}),
                                     ("ecc.dbe", {"source": "dcgm"}), ("ib.link_down", {"component": "mlx5_0/1"}),
                                     ("ib.rate_degraded", {"component": "mlx5_2/1"}), ("endpoint.down", {})]:
                    await wait_until(lambda c=check, m=match: has(c, **m), 15, f"{check} {match}")  # type: ignore[misc]
                kmsg_xid = next(s for s in seen if s.source.value == "kmsg")
                assert kmsg_xid.gpu is not None and kmsg_xid.gpu.index == 2, "PCI 3a maps to NVML GPU 2"
                assert kmsg_xid.labels == {"rack": "r1", "switch": "leaf-01"}
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{daemon.port}/metrics") as r:
                        text = await r.text()
                        assert r.status == 200 and 'breakfix_collector_signals_total{source="nvml"}' in text
                    async with http.get(f"http://127.0.0.1:{daemon.port}/healthz") as r:
                        body = await r.json()
                        assert r.status == 200 and body["nats"] is True and body["stale_sources"] == {}
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)
                await bus.close()
        assert (tmp_path / "state" / "kmsg-position.json").exists(), "the kmsg position was committed"

    async def test_broken_source_is_counted_and_retried_not_fatal(self, tmp_path: Path, catalog: Catalog) -> None:
        cfg = CollectorConfig.model_validate({
            "cluster": "c1", "node": "n1", "state_dir": str(tmp_path), "http_listen": "127.0.0.1:0",
            "nats": {"url": "nats://127.0.0.1:9", "connect_retry_s": 0.2}, "spool": {"dir": str(tmp_path / "spool")},
            "sources": {"nvml": {"interval_s": 0.1}, "kmsg": {"enabled": False}, "fabric": {"enabled": False}}})
        daemon = build_collector(cfg, clock=SystemClock(), catalog=catalog, nvml=FakeNvml([], library_missing=True),
                                 connect=lambda: JetStreamBus.connect("nats://127.0.0.1:9"))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop), name="test-broken-collector")

        async def failed_twice() -> bool:
            return bool(daemon.metrics.errors.labels("nvml")._value.get() >= 2)

        try:
            await wait_until(failed_twice, 15, "the broken nvml source to fail and be retried")
            ok, body = daemon.health()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert body["nats"] is False
        assert ok and body["wedged_sources"] == {}, "a failing source is not a dead daemon: no restart loop"


def test_only_a_wedged_cycle_fails_liveness_a_failing_source_is_listed_stale(tmp_path: Path, catalog: Catalog) -> None:
    from breakfix.bus.clock import ManualClock

    cfg = CollectorConfig.model_validate({"cluster": "c1", "node": "n1", "state_dir": str(tmp_path),
                                          "spool": {"dir": str(tmp_path / "spool")}})
    clock = ManualClock(T0)
    daemon = build_collector(cfg, clock=clock, catalog=catalog)
    daemon.intervals.update({"dcgm": 15.0, "nvml": 1.0})
    daemon.last_ok["nvml"] = clock.monotonic()
    clock.advance(120)  # dcgm never succeeded (its exporter is away); nvml ended its last cycle 2 minutes ago
    ok, body = daemon.health()
    assert ok and set(body["stale_sources"]) == {"dcgm", "nvml"} and body["wedged_sources"] == {}
    daemon.running["nvml"] = clock.monotonic()  # a cycle starts and never ends (a hung NVML call)
    clock.advance(601)
    ok, body = daemon.health()
    assert not ok and set(body["wedged_sources"]) == {"nvml"}


async def test_the_open_faults_outlive_a_collector_restart_on_disk(tmp_path: Path, catalog: Catalog) -> None:
    cfg = CollectorConfig.model_validate({"cluster": "c1", "node": "n1", "state_dir": str(tmp_path),
                                          "spool": {"dir": str(tmp_path / "spool")}})
    first = build_collector(cfg, clock=SystemClock(), catalog=catalog)
    await first.emit("nvml", Cycle(states=[flap(False, 0, node="n1")]))
    assert (tmp_path / "edge-faults.json").exists()
    again = build_collector(cfg, clock=SystemClock(), catalog=catalog)  # restarted; the fault was fixed meanwhile
    await again.emit("nvml", Cycle(states=[flap(True, 60, node="n1")]))
    assert again.forwarder.stats.spooled + again.forwarder.stats.published == 1, "the clearing went out"
    assert (tmp_path / "edge-faults.json").read_text() == "[]"


async def test_a_disk_that_refuses_the_open_faults_file_is_retried_a_minute_later_not_every_cycle(
        tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    from breakfix.bus.clock import ManualClock
    from breakfix.collectors import daemon as daemon_module

    cfg = CollectorConfig.model_validate({"cluster": "c1", "node": "n1", "state_dir": str(tmp_path),
                                          "spool": {"dir": str(tmp_path / "spool")}})
    clock = ManualClock(T0)
    d = build_collector(cfg, clock=clock, catalog=catalog)
    tries: list[list[str]] = []
    monkeypatch.setattr(daemon_module, "save_keys", lambda path, keys: tries.append(keys) and False)
    await d.emit("nvml", Cycle(states=[flap(False, 0, node="n1")]))
    await d.emit("nvml", Cycle(states=[flap(False, 1, node="n1")]))
    assert len(tries) == 1, "refused once: not tried again at the next cycle"
    clock.advance(61)
    await d.emit("nvml", Cycle(states=[flap(False, 2, node="n1")]))
    assert len(tries) == 2


async def test_a_reading_whose_signal_cannot_be_built_is_counted_by_source_and_logged(
        tmp_path: Path, catalog: Catalog) -> None:
    from structlog.testing import capture_logs

    from breakfix.collectors.context import Reading
    from breakfix.schemas.common import GpuRef
    from breakfix.schemas.signal import SignalSource

    cfg = CollectorConfig.model_validate({"cluster": "c1", "node": "n1", "state_dir": str(tmp_path),
                                          "spool": {"dir": str(tmp_path / "spool")}})
    d = build_collector(cfg, clock=SystemClock(), catalog=catalog)

    def reading(gpu: int, *, good: bool) -> Reading:
        r = d.ctx.reading(source=SignalSource.NVML, check="nvlink.down", healthy=False, at=T0,
                          gpu=GpuRef(index=gpu, uuid=f"GPU-{gpu}"))
        if not good:
            r._args["details"] = {"n": 1}  # not a string: the Signal refuses it
        return r

    def count(source: str) -> float | None:
        return d.metrics.registry.get_sample_value("breakfix_collector_states_unbuildable_total", {"source": source})

    with capture_logs() as logs:
        await d.emit("nvml", Cycle(readings=[reading(0, good=False), reading(1, good=True)]))
        await d.emit("nvml", Cycle(readings=[reading(0, good=False)]))
        await d.emit("dcgm", Cycle(states=[]))
    assert count("nvml") == 2.0, "each cycle's unbuildable reading counted"
    assert count("dcgm") is None, "nothing counted under a source that had none"
    assert [e["states"] for e in logs if e["event"] == "states_unbuildable"] == [1, 1]
    sent = d.forwarder.stats.spooled + d.forwarder.stats.published
    assert sent == 1, "the good reading beside it was still sent; the bad one never was"
    assert d.edge.faulted_keys() == [reading(1, good=True).key]
