"""Collector sources as plugins: the registry keyed by config section, thresholds embedded in each
source's config (and settable from YAML), the daemon's one loop for every plugin, and the kmsg
position committed only after the batch's signals were spooled."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from breakfix.bus.clock import ManualClock
from breakfix.collectors import kmsg_source
from breakfix.collectors import source as source_mod
from breakfix.collectors.app import build_collector
from breakfix.collectors.config import CollectorConfig, Sources, load_config
from breakfix.collectors.daemon import CollectorDaemon
from breakfix.collectors.edge import Cycle
from breakfix.collectors.nvml_api import FakeNvml
from breakfix.collectors.source import REGISTRY, Plugin, SourceEnv, build_sources
from breakfix.collectors.sources import KmsgPlugin, NvmlPoll
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.datafile import DataFileError
from breakfix.schemas.signal import Signal, SignalSource
from tests.conftest import T0

XID79 = "[  219.470994] NVRM: Xid (PCI:0000:3a:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n"
XID48 = "[  220.000001] NVRM: Xid (PCI:0000:18:00): 48, pid=1, name=python3, An uncorrectable double bit error.\n"


def config(tmp_path: Path, **sources: Any) -> CollectorConfig:
    base = {"nvml": {"enabled": False}, "kmsg": {"enabled": False}, "fabric": {"enabled": False}}
    return CollectorConfig.model_validate({
        "cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"), "http_listen": "127.0.0.1:0",
        "spool": {"dir": str(tmp_path / "spool")}, "sources": {**base, **sources}})


def spool_only(tmp_path: Path, catalog: Catalog, **sources: Any) -> CollectorDaemon:
    return build_collector(config(tmp_path, **sources), clock=ManualClock(T0), catalog=catalog, nvml=FakeNvml.hgx(8))


class TestRegistry:
    def test_every_config_section_has_a_registered_source_and_back(self) -> None:
        assert set(REGISTRY) == set(Sources.model_fields)

    def test_a_second_factory_for_one_section_is_refused(self) -> None:
        with pytest.raises(ValueError, match="registered twice"):
            source_mod.register("nvml")(lambda c, env: [])

    async def test_a_new_source_needs_only_a_registration(self, tmp_path: Path, catalog: Catalog,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        class Probe:
            name = "probe"
            interval = 5.0

            async def read(self) -> int:
                return 7

            def apply(self, raw: int, at: datetime, mono: float) -> Cycle:
                return Cycle(events=[env.ctx.signal(source=SignalSource.SIM, check="xid", code="79", healthy=False,
                                                    at=at, message=f"probe read {raw}")])

        def factory(cfg: Any, env: SourceEnv) -> Sequence[Plugin]:
            return [Probe()]

        monkeypatch.setitem(REGISTRY, "probe", factory)
        daemon = spool_only(tmp_path, catalog)
        async with aiohttp.ClientSession() as http:
            env = SourceEnv(ctx=daemon.ctx, clock=daemon.clock, http=http, state_dir=tmp_path)
            sections = SimpleNamespace(**{k: getattr(daemon.config.sources, k) for k in Sources.model_fields},
                                       probe=SimpleNamespace(enabled=True))
            (plugin,) = build_sources(sections, env)
            await daemon.poll_once(plugin)  # type: ignore[arg-type]
        (_, data), = daemon.spool.peek(10)
        assert Signal.model_validate_json(data).message == "probe read 7"

    def test_disabled_sections_build_nothing(self, tmp_path: Path, catalog: Catalog) -> None:
        daemon = spool_only(tmp_path, catalog, nvml={"xid_events": False})
        stop = asyncio.Event()

        async def names() -> list[str]:
            async with aiohttp.ClientSession() as http:
                tasks = daemon.tasks(stop, http)
                for _, coro in tasks:
                    coro.close()  # type: ignore[attr-defined]
                return [n for n, _ in tasks]

        assert asyncio.run(names()) == ["nvml"]


class TestThresholdsFromYaml:
    def test_retired_pages_limit_and_temperature_margin_reach_the_nvml_rules(self, tmp_path: Path) -> None:
        p = tmp_path / "c.yaml"
        p.write_text("cluster: c1\nnode: n1\nsources:\n  nvml:\n    thresholds:\n      retired_pages_limit: 10\n"
                     "      temperature_margin_c: 5\n  fabric:\n    thresholds: {flap_count: 4}\n"
                     "  dcgm:\n    thresholds: {pcie_replay_per_min: 5}\n")
        cfg = load_config(p)
        th = cfg.sources.nvml.thresholds
        assert (th.retired_pages_limit, th.temperature_margin_c, th.sbe_burst) == (10, 5, 100)
        assert cfg.sources.fabric.thresholds.flap_count == 4
        assert cfg.sources.dcgm.thresholds.pcie_replay_per_min == 5

    async def test_configured_retired_pages_limit_decides_the_fault(self, tmp_path: Path, catalog: Catalog) -> None:
        fake = FakeNvml.hgx(2)
        fake.gpus[1].retired_pages = 12
        cfg = config(tmp_path, nvml={"thresholds": {"retired_pages_limit": 10}, "xid_events": False})
        daemon = build_collector(cfg, clock=ManualClock(T0), catalog=catalog, nvml=fake)
        async with aiohttp.ClientSession() as http:
            (plugin,) = build_sources(daemon.config.sources, SourceEnv(ctx=daemon.ctx, clock=daemon.clock, http=http,
                                                                       state_dir=tmp_path, nvml=fake))
            assert isinstance(plugin, NvmlPoll)
            await daemon.poll_once(plugin)
        spooled = [Signal.model_validate_json(d) for _, d in daemon.spool.peek(100)]
        assert [(s.check, s.gpu.index if s.gpu else None) for s in spooled] == [("retired_pages.limit", 1)]

    @pytest.mark.parametrize(("body", "needle"), [
        ("nvml:\n    thresholds: {retired_pages_limit: .nan}", "finite"),
        ("nvml:\n    thresholds: {temperature_margin_c: -3}", "finite number >= 0"),
        ("fabric:\n    thresholds: {flap_window_s: 0}", "must be > 0"),
        ("dcgm:\n    thresholds: {pcie_replay_per_min: .inf}", "finite"),
        ("nvml:\n    thresholds: {sbe_burts: 3}", "unknown threshold"),
        ("nvml:\n    sbe_burst: 3", "sbe_burst"),
        ("kmsg:\n    timezone: Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ], ids=["nan", "negative", "zero-window", "inf", "misspelt", "flat-key-no-longer-accepted", "unknown-log-zone"])
    def test_bad_thresholds_name_file_and_line(self, tmp_path: Path, body: str, needle: str) -> None:
        p = tmp_path / "c.yaml"
        p.write_text(f"cluster: c1\nnode: n1\nsources:\n  {body}\n")
        with pytest.raises(DataFileError) as exc:
            load_config(p)
        assert needle in str(exc.value) and str(p) in str(exc.value)


def test_the_kmsg_zone_reads_a_syslog_files_local_times(tmp_path: Path, catalog: Catalog) -> None:
    """A syslog file written in New York time: the signal's time is the UTC instant the line names."""
    from datetime import UTC

    from breakfix.collectors.context import NodeContext
    from breakfix.collectors.kmsg_follow import Line, Position
    from breakfix.collectors.sources import kmsg_plugins

    p = tmp_path / "c.yaml"
    p.write_text(f"cluster: c1\nnode: n1\nsources:\n  kmsg:\n    path: {tmp_path / 'kern.log'}\n"
                 "    timezone: America/New_York\n")
    env = SourceEnv(ctx=NodeContext(cluster="c1", node="n1", catalog=catalog), clock=ManualClock(T0), http=None,  # type: ignore[arg-type]
                    state_dir=tmp_path)
    (plugin,) = kmsg_plugins(load_config(p).sources.kmsg, env)
    assert isinstance(plugin, KmsgPlugin)
    line = "Nov 22 08:15:30 n1 kernel: NVRM: Xid (PCI:0000:01:00): 48, pid=1, name=x, An uncorrectable DBE"
    (sig,) = plugin.src.signals([Line(line, Position(), "kern.log:1")], T0)
    assert sig.observed_at == datetime(2026, 11, 22, 13, 15, 30, tzinfo=UTC)


class TestKmsgBatch:
    async def kmsg_daemon(self, tmp_path: Path, catalog: Catalog, lines: str) -> tuple[CollectorDaemon, KmsgPlugin]:
        kern = tmp_path / "kern.log"
        kern.write_text("")
        daemon = spool_only(tmp_path, catalog, kmsg={"path": str(kern)})
        async with aiohttp.ClientSession() as http:
            for _, coro in daemon.tasks(asyncio.Event(), http):  # the daemon's own plugin loop builds it
                coro.close()  # type: ignore[attr-defined]
        (plugin,) = daemon.plugins
        assert isinstance(plugin, KmsgPlugin)
        with kern.open("a") as fh:
            fh.write(lines)
        return daemon, plugin

    async def test_a_bad_line_between_two_fatal_xids_costs_neither(self, tmp_path: Path, catalog: Catalog,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        real = kmsg_source.line_signals

        def hostile(text: str, *args: Any, **kw: Any) -> Any:
            if "POISON" in text:
                raise OverflowError("date value out of range")
            return real(text, *args, **kw)

        monkeypatch.setattr(kmsg_source, "line_signals", hostile)
        daemon, plugin = await self.kmsg_daemon(tmp_path, catalog, XID79 + "[ 219.5] NVRM: Xid POISON\n" + XID48)
        await daemon.poll_once(plugin)
        spooled = [Signal.model_validate_json(d) for _, d in daemon.spool.peek(10)]
        assert sorted(s.code or "" for s in spooled) == ["48", "79"]
        assert plugin.skipped == 1
        assert (daemon.config.state_dir / "kmsg-position.json").exists(), "the batch was spooled, then committed"
        for _ in range(2):  # the count, however often /metrics is scraped
            assert daemon.metrics.registry.get_sample_value("breakfix_collector_parse_skipped_total",
                                                            {"source": "kmsg"}) == 1.0

    async def test_position_is_not_committed_when_the_batch_was_not_spooled(self, tmp_path: Path, catalog: Catalog,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        daemon, plugin = await self.kmsg_daemon(tmp_path, catalog, XID79)

        async def refuse(signals: list[Signal]) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(daemon.forwarder, "send", refuse)
        with pytest.raises(OSError):
            await daemon.poll_once(plugin)
        assert not (daemon.config.state_dir / "kmsg-position.json").exists()
