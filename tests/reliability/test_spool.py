"""The spool never stops the collector and never loses what it accepted: a torn file at start-up is
quarantined while every other spooled signal is published (real nats-server), every write is atomic,
and a disk that refuses writes is a drop counted by severity."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from breakfix.bus.clock import SystemClock
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.app import build_collector
from breakfix.collectors.config import CollectorConfig
from breakfix.collectors.forwarder import Forwarder
from breakfix.collectors.spool import QUARANTINE, Spool
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal
from tests.conftest import sig, wait_until


def fatal(i: int) -> Signal:
    return sig(code="79", gpu_index=i % 8, at=i, n=i, severity=Severity.FATAL)


def fill(d: Path, n: int) -> list[Signal]:
    spool = Spool(d)
    signals = [fatal(i) for i in range(n)]
    for s in signals:
        assert spool.append(s)
    return signals


async def stream_ids(bus: JetStreamBus) -> list[str]:
    await bus.reset_consumer(stream=subjects.SIGNALS.name, durable="audit", filter_subject=subjects.SIGNALS_ALL,
                             start_seq=1, ack_all=False)
    ids: list[str] = []
    while batch := await bus.pull(stream=subjects.SIGNALS.name, durable="audit", batch=500, timeout_s=0.3):
        ids.extend(Signal.model_validate_json(m.data).id for m in batch)
    return ids


@pytest.mark.nats
async def test_torn_spool_file_at_start_up_is_quarantined_and_the_rest_are_published(
        tmp_path: Path, catalog: Catalog, nats_server: EmbeddedNats) -> None:
    spool_dir = tmp_path / "spool"
    signals = fill(spool_dir, 20)
    files = sorted(spool_dir.glob("*.json"))
    torn = files[7]
    torn.write_bytes(torn.read_bytes()[:40])  # a crash (or a bad disk) cut it short
    (spool_dir / "000000000500-9.json").write_text("{}")  # an unknown severity rank
    cfg = CollectorConfig.model_validate({
        "cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"), "http_listen": "127.0.0.1:0",
        "nats": {"url": nats_server.url}, "spool": {"dir": str(spool_dir)},
        "sources": {"nvml": {"enabled": False}, "kmsg": {"enabled": False}, "fabric": {"enabled": False}}})
    with capture_logs() as logs:
        daemon = build_collector(cfg, clock=SystemClock(), catalog=catalog,
                                 connect=lambda: JetStreamBus.connect(nats_server.url))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop), name="test-collector-torn-spool")
        try:
            async def drained() -> bool:
                return len(daemon.spool) == 0 and daemon.forwarder.up

            await wait_until(drained, 20, "the spool to drain")
            assert not task.done(), "the collector is still running"
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
    bus = await JetStreamBus.connect(nats_server.url)
    try:
        published = await stream_ids(bus)
    finally:
        await bus.close()
    lost = signals[7].id
    assert sorted(published) == sorted(s.id for s in signals if s.id != lost), "every intact signal, once"
    assert sorted(p.name for p in (spool_dir / QUARANTINE).iterdir()) == sorted([torn.name, "000000000500-9.json"])
    assert daemon.spool.quarantined == 2
    assert {e["file"] for e in logs if e["event"] == "spool_file_quarantined"} == {torn.name, "000000000500-9.json"}


def test_misnamed_and_empty_files_are_quarantined_not_fatal(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    fill(d, 3)
    (d / "garbage.json").write_text("{}")
    (d / f"000000000050-{Severity.FATAL.rank}.json").write_bytes(b"")
    with capture_logs() as logs:
        spool = Spool(d)
    assert len(spool) == 3 and spool.quarantined == 2
    assert sorted(p.name for p in (d / QUARANTINE).iterdir()) == [f"000000000050-{Severity.FATAL.rank}.json",
                                                                  "garbage.json"]
    assert sorted(e["reason"] for e in logs if e["event"] == "spool_file_quarantined") == [
        "empty file", "not a spool file name"]


@pytest.mark.parametrize("severity", list(Severity), ids=lambda s: s.value)
def test_every_write_is_temp_fsync_rename_whatever_the_severity(tmp_path: Path, severity: Severity,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]))
        real_fsync(fd)

    def replace(a: Any, b: Any) -> None:
        calls.append(("rename", f"{Path(a).name}->{Path(b).name}"))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    spool = Spool(tmp_path / "spool")
    assert spool.append(sig(n=1, severity=severity))
    name = f"000000000001-{severity.rank}"
    assert calls == [("fsync", f"{name}.tmp"), ("rename", f"{name}.tmp->{name}.json"), ("fsync", "spool")]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO], ids=["disk-full", "quota", "io-error"])
async def test_a_disk_that_refuses_writes_is_a_counted_drop_by_severity(tmp_path: Path, err: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append(sig(n=0, severity=Severity.FATAL))

    def full(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", full)
    fwd = Forwarder(spool)  # no bus: everything goes to the spool
    with capture_logs() as logs:
        await fwd.send([sig(n=i, at=i, severity=sev) for i, sev in enumerate(
            [Severity.FATAL, Severity.CRITICAL, Severity.WARNING, Severity.INFO, Severity.FATAL], start=1)])
    assert dict(spool.dropped) == {"fatal": 2, "critical": 1, "warning": 1, "info": 1}
    assert len(spool) == 1 and not list((tmp_path / "spool").glob("*.tmp")), "no half-written file left"
    assert [e["event"] for e in logs] == ["spool_write_failed"], "logged once, not once per signal"
    monkeypatch.undo()
    assert spool.append(sig(n=9, severity=Severity.INFO)), "writes work again once the disk has room"


async def test_a_full_disk_after_a_bus_blip_does_not_drop_signals_once_the_bus_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One failed publish marks the bus down; with the disk full the spool stays empty, so no replay would ever
    find the bus back. A signal the spool refuses is tried on the bus instead of being dropped."""
    from breakfix.bus.memory import MemoryBus

    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    fails = [True]
    real = bus.publish

    async def publish(subject: str, data: bytes, **kw: Any) -> Any:
        if fails:
            fails.pop()
            raise ConnectionError("nats: connection closed")
        return await real(subject, data, **kw)

    monkeypatch.setattr(bus, "publish", publish)
    spool = Spool(tmp_path / "spool")
    fwd = Forwarder(spool)
    fwd.attach(bus)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    await fwd.send([sig(n=1, severity=Severity.CRITICAL)])  # the blip: refused by the bus and by the disk
    assert not fwd.up and spool.dropped["critical"] == 1
    await fwd.send([sig(n=2, at=2, severity=Severity.CRITICAL), sig(n=3, at=3, severity=Severity.WARNING)])
    assert fwd.up and fwd.stats.published == 2, "the bus answered: published, not dropped"
    assert len(bus.messages(subjects.SIGNALS.name)) == 2
