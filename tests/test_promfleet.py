"""The fleet collector against a real Prometheus (Debian's package) scraping fixture exporters.

The test starts ``prometheus`` itself on a free loopback port with a temp TSDB; it fails with
the install command when the binary is missing (``make test`` installs it).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from breakfix.bus.clock import SystemClock
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats, free_port
from breakfix.collectors.app import build_fleet_collector
from breakfix.collectors.promfleet import (
    FleetRule,
    FleetRules,
    FleetRulesFile,
    PrometheusClient,
    Series,
    load_fleet_rules,
)
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.signal import Signal
from tests.conftest import T0, wait_until
from tests.test_collector_sources import SAMPLE, as_dcgm4

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def remap_failed(page: str, family: str) -> str:
    """The page with GPU 0's row-remap failure gauge (under ``family``) reading 1."""
    lines = [line.rsplit(" ", 1)[0] + " 1" if line.startswith(family + "{") and 'gpu="0"' in line else line
             for line in page.splitlines()]
    return "\n".join(lines) + "\n"


class Exporters:
    """dcgm-exporter pages for two hosts (old ``Hostname`` and new ``hostname`` labels) and a vLLM
    endpoint whose counters move between scrapes."""

    def __init__(self) -> None:
        self.scrapes = 0

    def app(self) -> web.Application:
        async def dcgm_a(_r: web.Request) -> web.Response:
            return web.Response(text=SAMPLE)

        async def dcgm_b(_r: web.Request) -> web.Response:
            page = SAMPLE.replace('Hostname="gpu-node-074"', 'hostname="gpu-node-075"')
            page = page.replace("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL_X{")
            page = page.replace("DCGM_FI_DEV_ROW_REMAP_FAILURE{gpu=\"0\"", "DCGM_FI_DEV_ROW_REMAP_FAILURE{gpu=\"0\"")
            return web.Response(text=remap_failed(page, "DCGM_FI_DEV_ROW_REMAP_FAILURE"))

        async def dcgm_c(_r: web.Request) -> web.Response:  # DCGM 4.x canonical names: XID_ERROR, ROW_REMAP_FAILED
            page = as_dcgm4(SAMPLE.replace('Hostname="gpu-node-074"', 'hostname="gpu-node-076"'))
            return web.Response(text=remap_failed(page, "DCGM_FI_DEV_ROW_REMAP_FAILED"))

        async def vllm(_r: web.Request) -> web.Response:
            self.scrapes += 1
            n = self.scrapes * 100
            return web.Response(text=(
                "# TYPE vllm:request_success counter\n"  # half the requests end in vLLM v1's "error"
                f'vllm:request_success_total{{finished_reason="stop",model_name="m"}} {n}\n'
                f'vllm:request_success_total{{finished_reason="error",model_name="m"}} {n}\n'
                'vllm:request_success_total{finished_reason="abort",model_name="m"} 0\n'
                "# TYPE vllm:time_to_first_token_seconds histogram\n"
                f'vllm:time_to_first_token_seconds_bucket{{le="0.5",model_name="m"}} 0\n'
                f'vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="m"}} 0\n'
                f'vllm:time_to_first_token_seconds_bucket{{le="5.0",model_name="m"}} {n}\n'
                f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {n}\n'
                f'vllm:time_to_first_token_seconds_count{{model_name="m"}} {n}\n'
                f'vllm:time_to_first_token_seconds_sum{{model_name="m"}} {n * 4}\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                'vllm:kv_cache_usage_perc{model_name="m"} 0.97\n'))

        a = web.Application()
        a.add_routes([web.get("/dcgm-a", dcgm_a), web.get("/dcgm-b", dcgm_b), web.get("/dcgm-c", dcgm_c),
                      web.get("/vllm", vllm)])
        return a


def _start(cfg: Path, tsdb: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[str]:
    if not shutil.which(PROMETHEUS):
        pytest.fail("prometheus not installed: apt-get install -y --no-install-recommends prometheus (make test does)")
    exporters = Exporters()
    runner = web.AppRunner(exporters.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    target = f"127.0.0.1:{runner.addresses[0][1]}"
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: dcgm-a
    metrics_path: /dcgm-a
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: dcgm-b
    metrics_path: /dcgm-b
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: dcgm-c
    metrics_path: /dcgm-c
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: inference-chat
    metrics_path: /vllm
    static_configs: [{{targets: ["{target}"], labels: {{namespace: team-llm, endpoint: chat, node: gpu-node-074}}}}]
""")
    proc = _start(cfg, tmp_path / "tsdb", port)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def scraped() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited with {proc.returncode}")
                try:
                    async with http.get(f"{url}/api/v1/query", params={
                            "query": "count(rate(vllm:time_to_first_token_seconds_count[5m]) > 0) "
                                     "and count(DCGM_FI_DEV_ROW_REMAP_FAILED)"}) as r:
                        body = await r.json()
                        return bool(body.get("data", {}).get("result"))
                except aiohttp.ClientError:
                    return False

            await wait_until(scraped, 30, "prometheus to scrape the fixture exporters")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        await runner.cleanup()


async def test_fleet_rules_find_each_fault_on_the_right_node_gpu_and_endpoint(prometheus: str,
                                                                             catalog: Catalog) -> None:
    rules = FleetRules(load_fleet_rules(), cluster="c1", catalog=catalog, baseline_events=False)
    cycle = await asyncio.to_thread(rules.evaluate, PrometheusClient(prometheus), T0)
    faults = {(s.node, s.check, s.gpu.index if s.gpu else None, s.tenant.key() if s.tenant else None)
              for s in cycle.states if not s.healthy}
    assert faults == {
        ("gpu-node-074", "ecc.dbe", 1, None),
        ("gpu-node-075", "row_remap.failure", 0, None),
        ("gpu-node-076", "ecc.dbe", 1, None),
        ("gpu-node-076", "row_remap.failure", 0, None),  # DCGM 4.x DCGM_FI_DEV_ROW_REMAP_FAILED
        ("gpu-node-074", "endpoint.ttft", None, "team-llm/chat"),
        ("gpu-node-074", "endpoint.kv_cache", None, "team-llm/chat"),
        ("gpu-node-074", "endpoint.errors", None, "team-llm/chat"),  # finished_reason="error"
    }
    healthy = {(s.node, s.check, s.gpu.index if s.gpu else None) for s in cycle.states if s.healthy}
    assert ("gpu-node-074", "row_remap.failure", 0) in healthy, "observed and under threshold -> healthy"
    assert ("gpu-node-076", "row_remap.failure", 1) in healthy, "observed under its DCGM 4.x name"
    assert {(s.node, s.code) for s in cycle.events} == {("gpu-node-074", "79"), ("gpu-node-075", "79"),
                                                        ("gpu-node-076", "79")}
    errors = next(s for s in cycle.states if s.check == "endpoint.errors")
    assert errors.value == pytest.approx(0.5)
    assert all(s.source.value == "prometheus" and s.cluster == "c1" for s in cycle.states)
    again = await asyncio.to_thread(rules.evaluate, PrometheusClient(prometheus), T0)
    assert again.events == [], "the same last XID is reported once, not on every evaluation"


def test_bad_rules_file_names_file_and_line(tmp_path: Path) -> None:
    from breakfix.schemas.datafile import DataFileError

    p = tmp_path / "fleet.yaml"
    p.write_text("version: 1\nrules:\n  - name: x\n    check: xid\n    kind: sometimes\n    expr: up\n")
    with pytest.raises(DataFileError, match=r"fleet\.yaml:5"):
        load_fleet_rules(p)


class FakeProm:
    """Prometheus answering each exact PromQL with fixed series (nothing for any other)."""

    def __init__(self, answers: dict[str, list[Series]]) -> None:
        self.answers = answers

    def query(self, promql: str) -> list[Series]:
        return self.answers.get(promql, [])


A800 = {"gpu": "0", "UUID": "GPU-0f6a1c2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d", "device": "nvidia0",
        "modelName": "NVIDIA A800-SXM4-80GB", "Hostname": "a800-17", "pci_bus_id": "00000000:4F:00.0"}
NODE_B = {**A800, "Hostname": "node-b", "UUID": "GPU-5b"}


def rule(name: str) -> FleetRule:
    return next(r for r in load_fleet_rules().rules if r.name == name)


async def test_one_odd_series_is_skipped_and_counted_never_the_whole_evaluation(catalog: Catalog,
                                                                                tmp_path: Path) -> None:
    """Audit finding 7: a pci_bus_id of N/A (the real A800 page's) or a NaN last XID aborted every rule."""
    from prometheus_client import generate_latest

    from breakfix.bus.clock import ManualClock
    from breakfix.collectors.fleetd import FleetCollector
    from breakfix.collectors.spool import Spool

    dbe, xid = rule("dcgm-volatile-dbe"), rule("dcgm-last-xid")
    na = {**A800, "pci_bus_id": "N/A"}

    def other(i: int) -> dict[str, str]:
        return {**A800, "gpu": str(i), "UUID": f"GPU-{i}"}

    prom = FakeProm({
        dbe.expr: [Series(NODE_B, 2.0), Series(na, 3.0), Series(other(1), float("inf"))],
        str(dbe.observed): [Series(NODE_B, 2.0), Series(na, 3.0), Series(other(2), float("nan"))],
        xid.expr: [Series(A800, float("nan")), Series(NODE_B, 79.0), Series(other(3), 79.5), Series(other(4), -1.0)],
    })
    rules = FleetRules(load_fleet_rules(), cluster="c1", catalog=catalog, baseline_events=False)
    cycle = rules.evaluate(prom, T0)
    assert {(s.node, s.check, s.gpu.uuid if s.gpu else None, s.gpu.pci_bus_id if s.gpu else None)
            for s in cycle.states if not s.healthy} == {
        ("node-b", "ecc.dbe", "GPU-5b", "0000:4f:00.0"),
        ("a800-17", "ecc.dbe", A800["UUID"], None)}, "N/A is no address: the UUID still names the GPU"
    assert [(s.node, s.code) for s in cycle.events] == [("node-b", "79")]
    assert not [s for s in cycle.states if s.healthy], "the odd observed series is not reported healthy either"
    assert rules.skipped == 5, "+Inf and NaN DBE, NaN, 79.5 and -1 as an XID: each series counted"

    fc = FleetCollector(FleetRules(load_fleet_rules(), cluster="c1", catalog=catalog, baseline_events=False), prom=prom,
                        clock=ManualClock(T0), spool=Spool(tmp_path / "spool"), interval_s=30, connect=None)
    await fc.cycle()
    assert (fc.cycles, fc.failures, len(fc.spool)) == (1, 0, 3)
    page = generate_latest(fc.metrics.registry).decode()
    assert 'breakfix_collector_parse_skipped_total{source="prometheus"} 5.0' in page


def test_a_prometheus_answer_that_is_no_number_is_one_skipped_series(catalog: Catalog) -> None:
    class Rows:
        def custom_query(self, promql: str) -> list[dict[str, object]]:
            return [{"metric": {**NODE_B}, "value": [1.0, "79"]}, {"metric": {**A800}, "value": [1.0, "x"]},
                    {"metric": {**A800, "gpu": "1"}, "value": [1.0]}]

    client = PrometheusClient("http://127.0.0.1:1")
    client._prom = Rows()  # type: ignore[assignment]
    rules = FleetRules(load_fleet_rules(), cluster="c1", catalog=catalog, baseline_events=False)
    cycle = rules.apply(rule("dcgm-last-xid"), client.query("x"), None, T0)
    assert [(s.node, s.code) for s in cycle.events] == [("node-b", "79")] and rules.skipped == 2


def test_mig_instances_are_their_own_entities_and_an_unchanged_gauge_fires_once(catalog: Catalog) -> None:
    """Audit finding 8: two GPU instances of one GPU collapsed onto one key, so their last XIDs re-fired every
    evaluation and carried no GPU_I_ID."""
    rules = FleetRules(load_fleet_rules(), cluster="c1", catalog=catalog, baseline_events=False)
    mig1 = Series({**A800, "GPU_I_ID": "1", "GPU_I_PROFILE": "3g.40gb"}, 43.0)
    mig2 = Series({**A800, "GPU_I_ID": "2", "GPU_I_PROFILE": "3g.40gb"}, 94.0)
    first = rules.apply(rule("dcgm-last-xid"), [mig1, mig2], None, T0)
    assert [(e.code, e.component, e.details) for e in first.events] == [
        ("43", "mig1", {"GPU_I_ID": "1", "GPU_I_PROFILE": "3g.40gb"}),
        ("94", "mig2", {"GPU_I_ID": "2", "GPU_I_PROFILE": "3g.40gb"})]
    for _ in range(2):
        assert rules.apply(rule("dcgm-last-xid"), [mig1, mig2], None, T0).events == [], "unchanged: no new event"
    changed = rules.apply(rule("dcgm-last-xid"), [Series(mig1.labels, 31.0), mig2], None, T0)
    assert [(e.code, e.component) for e in changed.events] == [("31", "mig1")]

    dbe = rule("dcgm-volatile-dbe")
    cycle = rules.apply(dbe, [Series(mig1.labels, 2.0)], [Series(mig1.labels, 2.0), Series(mig2.labels, 0.0)], T0)
    assert [(s.component, s.healthy, s.details.get("GPU_I_ID")) for s in cycle.states] == [
        ("mig1", False, "1"), ("mig2", True, "2")], "the healthy instance is reported, not masked by its sibling"


class CountingProm:
    """A Prometheus that answers every query with one XID gauge that changes on every evaluation."""

    def __init__(self) -> None:
        self.queries = 0

    def query(self, promql: str) -> list[Series]:
        self.queries += 1
        return [Series({"Hostname": "gpu-node-003", "gpu": "2", "UUID": "GPU-2"}, float(40 + self.queries))]


@pytest.mark.nats
async def test_fleet_collector_spools_while_nats_is_down_and_replays_when_it_returns(
        tmp_path: Path, catalog: Catalog) -> None:
    """NATS down from the start: the rules are still evaluated, their signals wait in the spool, and
    once the server comes up on its address every one of them reaches the stream, in order."""
    spec = FleetRulesFile(rules=(FleetRule(name="last-xid", check="xid", expr="DCGM_FI_DEV_XID_ERRORS", kind="event",
                                           code_from_value=True),))
    prom = CountingProm()
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    rules = FleetRules(spec, cluster="c1", catalog=catalog, baseline_events=False)
    fleet = build_fleet_collector(rules, prom=prom, clock=SystemClock(),
                                  spool_dir=tmp_path / "spool", interval_s=0.1, retry_s=0.2, connect_timeout_s=0.5,
                                  connect=lambda: JetStreamBus.connect(url, name="test-fleet"))
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop), name="test-fleet-collector")
    server = EmbeddedNats(tmp_path / "nats", port=port)
    try:
        async def spooled() -> bool:
            return len(fleet.spool) >= 3

        await wait_until(spooled, 15, "signals spooled while NATS is down")
        assert fleet.cycles >= 3 and not fleet.forwarder.up
        waiting = [Signal.model_validate_json(d).id for _, d in fleet.spool.peek(1000)]
        server.start()

        async def replayed() -> bool:
            return fleet.forwarder.up and len(fleet.spool) == 0

        await wait_until(replayed, 30, "the spool replayed once NATS is back")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    bus = await JetStreamBus.connect(server.url)
    try:
        await bus.reset_consumer(stream=subjects.SIGNALS.name, durable="audit", filter_subject=subjects.SIGNALS_ALL,
                                 start_seq=1, ack_all=False)
        ids: list[str] = []  # a pull hands out what has arrived: read until the stream has nothing more
        while batch := await bus.pull(stream=subjects.SIGNALS.name, durable="audit", batch=1000, timeout_s=0.5):
            ids.extend(Signal.model_validate_json(m.data).id for m in batch)
    finally:
        await bus.close()
        server.stop()
    assert ids[:len(waiting)] == waiting, "every spooled signal, in the order it was spooled"
    assert len(set(ids)) == len(ids) and fleet.forwarder.stats.replayed >= len(waiting)


def test_a_restarted_fleet_collector_does_not_raise_every_old_last_xid_again(catalog: Catalog) -> None:
    """dcgm-exporter's last-XID gauge keeps a repaired GPU's old XID until DCGM restarts: the first evaluation is a
    baseline, and only a change after it is an event (as the node collector's dcgm source does)."""
    spec = load_fleet_rules()
    xid = next(r for r in spec.rules if r.name == "dcgm-last-xid")
    gpu = {"gpu": "1", "UUID": "GPU-1", "Hostname": "gpu-node-074"}
    rules = FleetRules(spec, cluster="c1", catalog=catalog)
    assert rules.apply(xid, [], None, T0).events == [], "Prometheus just restarted: nothing scraped yet, no baseline"
    assert rules.apply(xid, [Series(gpu, 79.0)], None, T0).events == [], "there before this collector started"
    assert rules.apply(xid, [Series(gpu, 79.0)], None, T0).events == []
    (new,) = rules.apply(xid, [Series(gpu, 48.0)], None, T0).events
    assert (new.code, new.gpu.uuid if new.gpu else None) == ("48", "GPU-1")
    other = {"gpu": "2", "UUID": "GPU-2", "Hostname": "gpu-node-074"}  # a GPU with an XID after the baseline
    (late,) = rules.apply(xid, [Series(gpu, 48.0), Series(other, 13.0)], None, T0).events
    assert late.code == "13"
