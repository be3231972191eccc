"""The daemons' metric hooks and endpoints: a correlator on a bus counts what it consumed, dead-lettered and
published, serves it on /metrics with /readyz following its readiness, and polls its consumers' lag; a standby
remediator exports none of what only the leader knows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from breakfix.bus.codec import encode
from breakfix.bus.memory import MemoryBus
from breakfix.correlator.app import CorrelatorConfig, build_correlator
from breakfix.correlator.metrics_serve import run_observed
from breakfix.remediator.policy import Policy
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ChangeKind, IncidentChange
from tests.conftest import T0, sig, wait_until


async def test_a_running_correlator_serves_what_it_did_on_its_metrics_port(catalog: Catalog) -> None:
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    for i, s in enumerate([sig(node="n1", code="79"), sig(node="n2", code="48", n=1), sig(node="n3", check="ecc.dbe",
                                                                                           code=None, n=2)]):
        await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=f"s{i}")
    await bus.publish(subjects.signal_subject("c1", "bad"), b'{"node": 1}')
    svc = build_correlator(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
    stop = asyncio.Event()
    task = asyncio.create_task(run_observed(svc, stop, port=0, host="127.0.0.1", lag_every_s=0.1), name="test-observed")
    try:
        async def handled() -> bool:
            return svc.signal_stats.handled == 3 and svc.signal_stats.dead_lettered == 1
        await wait_until(handled, 10, "the correlator to take all four messages")
        get = svc.metrics.registry.get_sample_value
        assert get("breakfix_correlator_signals_consumed_total", {"source": "sim", "check": "xid"}) == 2
        assert get("breakfix_correlator_dead_letters_total", {"reason": "schema"}) == 1
        assert get("breakfix_correlator_incident_changes_total", {"kind": "opened"}) == 3
        assert get("breakfix_correlator_ingest_to_publish_seconds_count") >= 1  # type: ignore[operator]

        async def lag_read() -> bool:
            return get("breakfix_correlator_consumer_lag", {"consumer": "correlator"}) == 0
        await wait_until(lag_read, 10, "the lag poller")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_the_endpoint_answers_ready_only_once_the_correlator_consumes(catalog: Catalog) -> None:
    from breakfix.correlator.metrics_serve import correlator_server

    svc = build_correlator(CorrelatorConfig(catalog=catalog), bus=MemoryBus(), clock=lambda: T0)
    server = correlator_server(svc, port=0, host="127.0.0.1")
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
            svc.ready.set()
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert "breakfix_correlator_checkpoint_age_seconds" in await r.text()
    finally:
        await server.stop()


async def test_a_running_remediator_counts_its_plans_and_its_notifier_pages_once_through_the_hooks(
        policy: Policy) -> None:
    from breakfix.bus.clock import SystemClock
    from breakfix.remediator.app import build_remediator
    from breakfix.remediator.config import RemediatorConfig
    from breakfix.remediator.metrics_serve import run_observed
    from breakfix.remediator.notify.config import NotifyConfig
    from breakfix.remediator.simcluster import SimCluster, SimNode
    from tests.test_notify_core import inc
    from tests.test_notify_receivers import Receivers

    receivers = Receivers()
    hook_runner, base = await receivers.start()
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    fast = policy.model_copy(update={"settle_s": 0.0, "guards": policy.guards.model_copy(update={"soak_s": 0.0})})
    svc = await build_remediator(RemediatorConfig(cluster="c1", actor="remediator/test"), bus=bus,
                                 clock=SystemClock(), policy=fast,
                                 cluster_api=SimCluster({f"n{i}": SimNode(f"n{i}") for i in range(1, 11)}))
    notify = NotifyConfig.model_validate({"channels": [{"name": "hook", "type": "webhook", "url": f"{base}/webhook"}],
                                          "default": ["hook"], "runbook_base": "https://runbooks.example/breakfix/"})
    stop = asyncio.Event()
    task = asyncio.create_task(run_observed(svc, stop, clock=SystemClock(), notify=notify, port=0,
                                            host="127.0.0.1"), name="test-remediator-observed")
    try:
        unknown = inc(category="unknown_fault", first_seen=datetime.now(UTC), last_seen=datetime.now(UTC))
        await bus.publish(subjects.incident_subject("c1"),
                          encode(IncidentChange(kind=ChangeKind.OPENED, incident=unknown, at=datetime.now(UTC))))

        async def paged() -> bool:
            return len(receivers.webhook) == 1
        await wait_until(paged, 10, "one page for the escalation")
        get = svc.observe.metrics.registry.get_sample_value
        assert get("breakfix_remediator_plans_total", {"rule": "unknown-fault", "outcome": "escalated"}) == 1

        async def counted() -> bool:
            return get("breakfix_remediator_notification_deliveries_total", {"channel": "hook"}) == 1
        await wait_until(counted, 10, "the delivery counted")
        _headers, body = receivers.webhook[0]
        assert body["event"] == "escalated" and body["incident"] == "inc-1" and body["category"] == "unknown_fault"
        assert get("breakfix_remediator_notification_failures_total", {"channel": "hook"}) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await hook_runner.cleanup()


def scrape(svc: Any) -> dict[str, float | None]:
    """What the remediator's /metrics says (its scrape hooks run first)."""
    from breakfix.remediator.metrics_serve import remediator_server

    remediator_server(svc, port=0).render()
    get = svc.observe.metrics.registry.get_sample_value
    return {name: get(f"breakfix_remediator_{name}") for name in ("leader", "breaker_open", "approvals_pending",
                                                                   "approval_oldest_age_seconds", "nodes_held")}


async def test_a_standby_exports_no_breaker_it_cannot_know_so_a_reset_resolves_the_alert(policy: Policy) -> None:
    from breakfix.bus.clock import ManualClock
    from breakfix.remediator.store import MemoryStore
    from tests.test_remediator_service import Harness, Lease, fast, incident

    bus, store, clock = MemoryBus(), MemoryStore(), ManualClock(T0)
    async with Harness(fast(policy), store=store, bus=bus, clock=clock, elector=Lease(True),
                       lease_renew_s=0.05) as a:
        for i in range(1, 5):  # 4 of 10 nodes at once: the breaker trips
            await a.open(incident(f"n{i}", iid=f"inc-{i}", category="node_reboot_required"))
        await a.until(lambda: a.svc.guards.breaker_tripped_at is not None)
        # the leader's keeper stores the trip soon after (write-behind): the standby starts once it is stored
        await a.until(lambda: (store.data.get("guards") is not None
                               and store.data["guards"].value.get("breaker_tripped_at") is not None))
        async with Harness(fast(policy), store=store, bus=bus, clock=clock, elector=Lease(False),
                           lease_renew_s=0.05) as b:  # the standby (re)starts during the trip: it loads it
            await b.until(lambda: b.svc.guards.breaker_tripped_at is not None)
            assert scrape(b.svc)["breaker_open"] == 0 and scrape(a.svc)["breaker_open"] == 1
            await a.human("breaker_reset", actor="alice", reason="storm understood")
            await a.until(lambda: a.svc.guards.breaker_tripped_at is None)
            assert b.svc.guards.breaker_tripped_at is not None  # what the standby loaded is stale ...
            assert scrape(b.svc) == {"leader": 0, "breaker_open": 0, "approvals_pending": 0,  # ... and not exported
                                 "approval_oldest_age_seconds": 0, "nodes_held": 0}
            assert scrape(a.svc)["leader"] == 1 and scrape(a.svc)["breaker_open"] == 0


async def test_a_new_leader_counts_the_approvals_its_plan_store_says_are_waiting(policy: Policy) -> None:
    from breakfix.bus.clock import ManualClock
    from breakfix.remediator.simcluster import SimCluster, SimNode
    from breakfix.remediator.store import MemoryStore
    from breakfix.schemas.incident import ActionKind, StepAction
    from tests.test_remediator_service import Harness, Lease, fast, incident

    cluster = SimCluster({"n1": SimNode("n1")}, failing_resets={("n1", 2)}, failing_validation={"n1"})
    bus, store, clock = MemoryBus(), MemoryStore(), ManualClock(T0)
    first, second = Lease(True), Lease(False)
    pol = fast(policy, retry_caps={})
    async with Harness(pol, cluster, store=store, bus=bus, clock=clock, elector=first, lease_renew_s=0.05) as a, \
            Harness(pol, cluster, store=store, bus=bus, clock=clock, elector=second, lease_renew_s=0.05) as b:
        await a.open(incident())
        await a.until(lambda: any(r.kind is ActionKind.REFUSAL and r.action is StepAction.REPROVISION
                                  for r in a.records()))
        clock.advance(3600)
        assert (scrape(a.svc)["approvals_pending"], scrape(a.svc)["approval_oldest_age_seconds"]) == (1, 3600)
        first.leader, second.leader = False, True  # the lease moves while the step waits
        await b.until(lambda: b.svc.leading and not a.svc.leading)
        await b.until(lambda: scrape(b.svc)["approvals_pending"] == 1)
        assert scrape(a.svc)["approvals_pending"] == 0  # the old leader, now standby, no longer counts it
        await b.human("approve", action=StepAction.REPROVISION, reason="RMA agreed")
        await b.until(lambda: scrape(b.svc)["approvals_pending"] == 0)


async def test_the_fleet_stage_counts_the_fabric_incidents_it_publishes(catalog: Catalog) -> None:
    from breakfix.correlator.app import build_fleet_stage
    from breakfix.correlator.grouping import Correlator
    from breakfix.correlator.metrics_serve import run_fleet_observed

    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    core = Correlator(catalog, topology=False)  # a partition: node incidents only, the stage groups them
    for i in range(4):
        s = sig(node=f"n{i}", check="ib.link_down", code=None, gpu_index=None, component="mlx5_0/1", at=i,
                labels={"switch": "leaf-07"})
        for ch in core.ingest(s, s.observed_at):
            await bus.publish(subjects.incident_subject("c1"), encode(ch.to_wire(s.observed_at)))
    stage = build_fleet_stage(CorrelatorConfig(catalog=catalog), bus=bus, clock=lambda: T0)
    stop = asyncio.Event()
    task = asyncio.create_task(run_fleet_observed(stage, stop, port=0, host="127.0.0.1", lag_every_s=0.1),
                               name="test-fleet-observed")
    try:
        get = stage.metrics.registry.get_sample_value

        async def grouped() -> bool:
            return get("breakfix_fleet_stage_incident_changes_total", {"kind": "opened"}) == 1
        await wait_until(grouped, 10, "one fabric incident")
        assert get("breakfix_fleet_stage_open_incidents", {"category": "fabric_link", "severity": "critical",
                                                           "domain": "operator", "status": "open",
                                                           "waiting": "none"}) == 1

        async def lag_read() -> bool:
            return get("breakfix_fleet_stage_consumer_lag", {"consumer": "correlator-fleet"}) == 0
        await wait_until(lag_read, 10, "the fleet stage's lag")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(("command", "default"), [("correlator", "9471"), ("correlator-fleet", "9472"),
                                                  ("remediator", None), ("collector", None),
                                                  ("fleet-collector", "9474")])
def test_every_daemon_command_takes_metrics_port(command: str, default: str | None) -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app

    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--metrics-port" in out.output
    if default:
        assert f"[default: {default}]" in out.output


async def test_the_fleet_collector_serves_its_cycles_and_goes_unhealthy_without_evaluations() -> None:
    from breakfix.bus.clock import ManualClock
    from breakfix.collectors.fleetd import FleetCollector
    from breakfix.collectors.metrics_serve import fleet_server
    from breakfix.collectors.promfleet import FleetRules, load_fleet_rules
    from breakfix.collectors.spool import Spool
    from breakfix.schemas.catalog import default_catalog

    class NoPrometheus:
        def query(self, promql: str) -> list[object]:
            raise ConnectionError("prometheus is down")

    import tempfile
    from pathlib import Path

    clock = ManualClock(T0)
    with tempfile.TemporaryDirectory() as d:
        rules = FleetRules(load_fleet_rules(), cluster="c1", catalog=default_catalog(), baseline_events=False)
        fc = FleetCollector(rules, prom=NoPrometheus(), clock=clock, spool=Spool(Path(d)), interval_s=30,
                            connect=None)  # type: ignore[arg-type]
        server = fleet_server(fc, port=0, host="127.0.0.1")
        port = await server.start()
        try:
            await fc.cycle()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert 'breakfix_collector_source_errors_total{source="prometheus"} 1.0' in await r.text()
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 200
                clock.advance(96)  # three intervals and a bit without a good evaluation
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 503
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    assert r.status == 503 and (await r.json())["checks"]["nats"].startswith("not linked")
        finally:
            await server.stop()
