"""The fleet collector with NATS down: it still evaluates its rules, spools what it finds, and
publishes the spool once the server is up (bounded connect attempts, not a connect that never returns)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats, free_port
from breakfix.collectors.fleetd import run_fleet
from breakfix.collectors.promfleet import FleetRules, Series, load_fleet_rules
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from tests.conftest import wait_until


class OneBadGpu:
    """Prometheus answering that one GPU has a volatile double-bit ECC error, and nothing else."""

    def query(self, promql: str) -> list[Series]:
        if "ECC_DBE" in promql:
            return [Series({"Hostname": "gpu-node-1", "gpu": "0", "UUID": "GPU-1"}, 1.0)]
        return []


async def test_fleet_collector_spools_while_nats_is_down_and_publishes_when_it_comes_up(
        tmp_path: Path, catalog: Catalog) -> None:
    port = free_port()
    server = EmbeddedNats(tmp_path / "nats", port=port)
    spool_dir = tmp_path / "spool"
    stop = asyncio.Event()
    rules = FleetRules(load_fleet_rules(), cluster="c1", catalog=catalog)
    task = asyncio.create_task(run_fleet(rules=rules, prom=OneBadGpu(), nats_url=server.url, spool_dir=spool_dir,
                                         interval_s=0.2, clock=lambda: datetime.now(UTC), stop=stop),
                               name="fleet-under-test")
    try:
        async def spooled() -> bool:
            return spool_dir.is_dir() and any(spool_dir.iterdir())

        await wait_until(spooled, 15, "the DBE to be spooled while NATS is down")
        assert not task.done(), "the fleet collector keeps evaluating with NATS down"
        server.start()
        reader = await JetStreamBus.connect(server.url)
        try:
            async def published() -> bool:
                try:
                    return await reader.stream_messages(subjects.SIGNALS.name) >= 1
                except Exception:  # the collector has not created the stream yet
                    return False

            await wait_until(published, 30, "the spooled signal on the signal stream")
        finally:
            await reader.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        server.stop()
