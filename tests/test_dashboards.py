"""The Grafana dashboards against a real Prometheus (Debian's ``prometheus``) scraping the running daemons.

A real nats-server, a node collector (fake NVML, node agent on), the correlator and the remediator (simulated
cluster, a webhook notification channel) run in this process, each serving its own metrics endpoint. A scenario
opens incidents, runs a plan, trips the circuit breaker and sends a malformed signal. Prometheus scrapes all
three every second; the test checks the scraped values against what happened, then runs every panel's PromQL
from ``deploy/grafana/*.json``: each must parse and return series.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats, free_port
from breakfix.collectors.app import build_collector
from breakfix.collectors.config import CollectorConfig
from breakfix.correlator.app import CorrelatorConfig, build_correlator
from breakfix.correlator.metrics_serve import correlator_server, poll_lag
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.metrics_serve import run_observed
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.policy import Policy
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id
from tests.conftest import wait_until
from tests.test_notify_receivers import Receivers

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
NODES = [f"gpu-{i:02d}" for i in range(16)]


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            for t in p["targets"]:
                out.append((path.stem, p["title"], t["expr"]))
    return out


def test_dashboards_are_grafana_json_with_a_datasource_variable_and_unique_panels() -> None:
    assert [p.stem for p in DASHBOARDS] == ["breakfix-fleet-health", "breakfix-incidents-remediation",
                                            "breakfix-pipeline-health"]
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"].startswith("breakfix-") and d["schemaVersion"] >= 36
        assert [v["name"] for v in d["templating"]["list"]] == ["datasource"]
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and all(p["targets"] for p in d["panels"])
        assert all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])


def signal(node: str, code: str, at_s: float = 0.0, gpu: int = 0) -> Signal:
    from datetime import UTC, datetime, timedelta

    observed = datetime.now(UTC) + timedelta(seconds=at_s)
    g = GpuRef(index=gpu, uuid=f"GPU-{node}-{gpu}")
    return Signal(id=make_signal_id(cluster="c1", node=node, source="sim", check="xid", code=code, healthy=False,
                                    observed_at=observed, gpu=g, discriminator=""),
                  cluster="c1", node=node, source=SignalSource.SIM, check="xid", code=code, gpu=g,
                  message=f"NVRM: Xid (PCI:0000:18:00): {code}", observed_at=observed)


def start_prometheus(cfg: Path, tsdb: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Pipeline:
    prometheus: str
    receivers: Receivers


async def prom_query(http: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/api/v1/query", params={"query": expr}) as r:
        body = await r.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]  # type: ignore[no-any-return]


def value(result: list[dict[str, Any]]) -> float:
    return sum(float(s["value"][1]) for s in result)


@pytest.fixture
async def pipeline(tmp_path: Path, catalog: Catalog, policy: Policy) -> AsyncIterator[Pipeline]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus not installed: apt-get install -y --no-install-recommends prometheus (make test does)")
    nats = EmbeddedNats(tmp_path / "nats").start()
    receivers = Receivers()
    hook_runner, hook_url = await receivers.start()
    stop = asyncio.Event()
    buses: list[JetStreamBus] = []
    tasks: list[asyncio.Task[Any]] = []
    proc = None
    try:
        async def bus(name: str) -> JetStreamBus:
            b = await JetStreamBus.connect(nats.url, name=name)
            buses.append(b)
            return b

        clock = SystemClock()
        # the correlator
        corr = build_correlator(CorrelatorConfig(catalog=catalog), bus=await bus("t-correlator"), clock=clock)
        corr_server = correlator_server(corr, 0, "127.0.0.1")
        corr_port = await corr_server.start()
        consumers = [(s, d) for s, d, _ in corr._consumers()]
        tasks += [asyncio.create_task(corr.run(stop), name="t-correlator"),
                  asyncio.create_task(poll_lag(corr.bus, corr.metrics, consumers, stop, 0.5), name="t-lag")]
        # the remediator: a 16-node simulated cluster, a breaker that trips at the third node, a webhook channel
        pol = policy.model_copy(update={"settle_s": 0.2, "guards": policy.guards.model_copy(update={
            "soak_s": 0.2, "budget": policy.guards.budget.model_copy(update={"max_nodes": 16}),
            "topology_budgets": (), "breaker": policy.guards.breaker.model_copy(update={
                "max_percent": 10.0, "min_nodes": 3, "window_s": 600.0})})})
        cluster = SimCluster({n: SimNode(n, gpus=8) for n in NODES})
        notify = NotifyConfig.model_validate({"channels": [{"name": "hook", "type": "webhook",
                                                            "url": f"{hook_url}/webhook"}], "default": ["hook"],
                                              "runbook_base": "https://runbooks.example/breakfix/"})
        rem = await build_remediator(RemediatorConfig(cluster="c1", actor="remediator/test"),
                                     bus=await bus("t-remediator"), clock=clock, cluster_api=cluster, policy=pol,
                                     retry_refused_s=1.0)
        rem_port = free_port()
        tasks.append(asyncio.create_task(run_observed(rem, stop, clock=clock, notify=notify, port=rem_port,
                                                      host="127.0.0.1"), name="t-remediator"))
        # a node collector (fake NVML with 8 GPUs, node agent on)
        col_port = free_port()
        col_cfg = CollectorConfig.model_validate({
            "cluster": "c1", "node": "gpu-00", "state_dir": str(tmp_path / "col"),
            "http_listen": f"127.0.0.1:{col_port}",
            "nats": {"url": nats.url}, "spool": {"dir": str(tmp_path / "spool")},
            "sources": {"nvml": {"fake_gpus": 8, "interval_s": 0.5}},
            "agent": {"enabled": True, "nvidia_smi": str(ROOT / "tests" / "bin" / "nvidia-smi"),
                      "dcgmi": str(ROOT / "tests" / "bin" / "dcgmi")}})
        collector = build_collector(col_cfg, clock=clock, catalog=catalog, bus=await bus("t-collector"))
        tasks.append(asyncio.create_task(collector.run(stop), name="t-collector"))
        # Prometheus scraping all three
        prom_port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - {{job_name: breakfix-correlator, static_configs: [{{targets: ["127.0.0.1:{corr_port}"]}}]}}
  - {{job_name: breakfix-remediator, static_configs: [{{targets: ["127.0.0.1:{rem_port}"]}}]}}
  - {{job_name: breakfix-collector, static_configs: [{{targets: ["127.0.0.1:{col_port}"]}}]}}
""")
        proc = start_prometheus(cfg, tmp_path / "tsdb", prom_port)
        base = f"http://127.0.0.1:{prom_port}"
        async with aiohttp.ClientSession() as http:
            async def all_up() -> bool:
                try:
                    res = await prom_query(http, base, 'up{job=~"breakfix-.*"} == 1')
                except (aiohttp.ClientError, AssertionError):
                    return False
                return len(res) == 3
            await wait_until(all_up, 60, "prometheus scraping all three daemons")
        # the scenario: a plan runs on gpu-00, then two more nodes fail and trip the breaker; one bad message
        pub = await bus("t-sim")
        await pub.ensure_streams(subjects.STREAMS)
        await pub.publish(subjects.signal_subject("c1", "gpu-00"), encode(signal("gpu-00", "48")))
        await asyncio.sleep(1.5)
        for node in ("gpu-01", "gpu-02"):
            await pub.publish(subjects.signal_subject("c1", node), encode(signal(node, "79")))
        await pub.publish(subjects.signal_subject("c1", "gpu-bad"), b'{"schema": "breakfix.signal/v1", "node": 42}')
        yield Pipeline(base, receivers)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        for b in buses:
            await b.close()
        receivers.release.set()
        await hook_runner.cleanup()
        nats.stop()


async def test_prometheus_sees_what_happened_and_every_panel_returns_series(pipeline: Pipeline) -> None:
    base = pipeline.prometheus
    async with aiohttp.ClientSession() as http:
        async def scraped(expr: str, want: float) -> bool:
            return value(await prom_query(http, base, expr)) >= want

        for expr, want, what in (
                ('sum(breakfix_correlator_incident_changes_total{kind="opened"})', 3, "three incidents opened"),
                ('sum(breakfix_correlator_dead_letters_total{reason="schema"})', 1, "the malformed signal counted"),
                ('sum(breakfix_remediator_plans_total{outcome="planned"})', 1, "a plan ran"),
                ("sum(breakfix_remediator_breaker_trips_total)", 1, "the breaker tripped"),
                ("max(breakfix_remediator_breaker_open)", 1, "the breaker is open"),
                ('sum(breakfix_remediator_notification_deliveries_total{channel="hook"})', 1, "the breaker page"),
                ("sum(breakfix_correlator_open_incidents)", 1, "open incidents"),
                ('sum(breakfix_correlator_signals_consumed_total{source="sim", check="xid"})', 3, "signals")):
            async def check(e: str = expr, w: float = want) -> bool:
                return await scraped(e, w)
            await wait_until(check, 60, what)
        assert value(await prom_query(http, base, "sum(breakfix_remediator_breaker_trips_total)")) == 1
        assert value(await prom_query(http, base, 'sum(breakfix_correlator_dead_letters_total)')) == 1
        await asyncio.sleep(2)  # a few more scrapes, so rate() and increase() have two samples everywhere
        empty = []
        for dash, title, expr in panel_queries():
            if not await prom_query(http, base, expr):
                empty.append(f"{dash} / {title}: {expr}")
        assert empty == [], "panels without series"
    assert any(b["event"] == "breaker" for _, b in pipeline.receivers.webhook)
