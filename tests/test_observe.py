"""The one observability endpoint every daemon serves: /metrics, /healthz, /readyz (bus/observe.py)."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry, Gauge

from breakfix.bus.observe import LabelCap, ObserveServer, consumer_pending


def boom() -> tuple[bool, str]:
    raise RuntimeError("nats gone")


async def test_metrics_are_refreshed_before_each_scrape_and_probes_report_each_check() -> None:
    registry = CollectorRegistry()
    g = Gauge("breakfix_test_value", "a value", registry=registry)
    calls: list[int] = []
    server = ObserveServer(registry, port=0, host="127.0.0.1", name="test")
    server.on_scrape(lambda: (calls.append(1), g.set(len(calls)))[-1])  # type: ignore[func-returns-value]
    ready = {"caught_up": False}
    server.health.add("loop", lambda: (True, ""))
    server.readiness.add("caught_up", lambda: (ready["caught_up"], "lag 120"))
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            for expected in (1, 2):
                async with http.get(f"{base}/metrics") as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                    assert f"breakfix_test_value {expected}.0" in await r.text()
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200 and (await r.json())["checks"] == {"loop": "ok"}
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 503 and (await r.json())["checks"] == {"caught_up": "lag 120"}
            ready["caught_up"] = True
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            server.health.add("nats", boom)
            async with http.get(f"{base}/healthz") as r:
                body = await r.json()
                assert r.status == 503 and body["checks"]["nats"] == "check raised RuntimeError('nats gone')"
    finally:
        await server.stop()


async def test_a_failing_refresh_still_serves_the_last_values() -> None:
    registry = CollectorRegistry()
    Gauge("breakfix_test_static", "static", registry=registry).set(7)
    server = ObserveServer(registry, port=0)
    server.on_scrape(lambda: 1 / 0)  # type: ignore[func-returns-value,arg-type]
    assert b"breakfix_test_static 7.0" in server.render()


def test_label_values_stay_bounded() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("xid", "ecc.dbe", "xid", "made.up.1", "made.up.2")] == [
        "xid", "ecc.dbe", "xid", "other", "other"]


async def test_consumer_lag_is_none_on_a_bus_without_consumer_state() -> None:
    assert await consumer_pending(object(), "BREAKFIX_SIGNALS", "correlator") is None


async def test_consumer_lag_comes_from_the_bus_consumer_state() -> None:
    from breakfix.bus.memory import MemoryBus
    from breakfix.schemas import subjects

    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    await bus.ensure_consumer(stream=subjects.SIGNALS.name, durable="correlator", filter_subject=subjects.SIGNALS_ALL)
    for i in range(3):
        await bus.publish(subjects.signal_subject("c1", "n1"), b"{}", msg_id=f"m{i}")
    assert await consumer_pending(bus, subjects.SIGNALS.name, "correlator") == 3
    assert await consumer_pending(bus, subjects.SIGNALS.name, "nobody") is None
