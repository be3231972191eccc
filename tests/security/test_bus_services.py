"""The daemons on a secured bus, each on its own identity and nothing more: the remediator's consumers,
KV store and records, a node's collector and agent, and the whole path from a node's DBE to a dry-run
plan an operator reads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.service import CorrelatorService
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.remediator.policy import Policy
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.remediator.store import KvStore
from breakfix.schemas import subjects
from breakfix.schemas.agent import AgentAction
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import ChangeKind, Incident, IncidentChange, IncidentScope
from tests.conftest import wait_until
from tests.security.conftest import NOW, SecureBus

pytestmark = pytest.mark.nats


class TestServicesUnderTheirOwnIdentity:
    async def test_the_remediator_runs_on_its_permissions_alone(self, secure: SecureBus, streams: JetStreamBus,
                                                                 policy: Policy) -> None:
        """Consumers on incidents and actions, its KV plan store, action records: all within its role."""
        rem_bus = await secure.connect("remediator", "remediator")
        svc = RemediatorService(rem_bus, SimCluster({"n1": SimNode("n1")}), policy.model_copy(update={"dry_run": True}),
                                SystemClock(), cluster="c1", store=await KvStore.open(rem_bus))
        stop = asyncio.Event()
        task = asyncio.create_task(svc.run(stop), name="secure-remediator")
        try:
            inc = Incident(id="inc-secure-1", cluster="c1", scope=IncidentScope.GPU, node="n1", nodes=("n1",),
                           gpus=(GpuRef(index=0),), category="gpu_reset_required", severity=Severity.CRITICAL,
                           codes=("xid:48",), first_seen=NOW, last_seen=NOW)
            await streams.publish(subjects.incident_subject("c1"),
                                  encode(IncidentChange(kind=ChangeKind.OPENED, incident=inc, at=NOW)))

            async def recorded() -> bool:
                return await streams.stream_messages(subjects.ACTIONS.name) >= 1

            await wait_until(recorded, 20, "the remediator's first action record")
            assert svc.stats.handled == 1 and not task.done()
            store = KvStore(rem_bus)
            rev = await store.put("probe", {"ok": True}, None)
            assert (await store.get("probe")) is not None and (await store.get("probe")).revision == rev  # type: ignore[union-attr]
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await rem_bus.close()


    async def test_a_node_collector_publishes_and_serves_its_agent_on_the_node_identity(
            self, secure: SecureBus, streams: JetStreamBus, catalog: Catalog, tmp_path: Path) -> None:
        """The collector daemon reads creds and TLS from its config's nats: section; its spool replay and
        its agent fit inside the node role."""
        from breakfix.collectors.app import build_collector
        from breakfix.collectors.config import CollectorConfig
        from breakfix.collectors.nvml_api import FakeNvml

        opts = secure.options("node", "gpu-node-7")
        cfg = CollectorConfig.model_validate({
            "cluster": "c1", "node": "gpu-node-7", "state_dir": str(tmp_path / "state"), "http_listen": "127.0.0.1:0",
            "nats": {k: str(v) for k, v in opts.model_dump().items()}, "spool": {"dir": str(tmp_path / "spool")},
            "agent": {"enabled": True, "allow": ["validate"], "dcgmi": "/bin/false"},
            "sources": {"nvml": {"interval_s": 0.2, "expected_gpus": 8}}})
        fake = FakeNvml.hgx(8)
        daemon = build_collector(cfg, clock=SystemClock(), catalog=catalog, nvml=fake,
                                 connect=lambda: JetStreamBus.connect(cfg.nats, name="gpu-node-7"))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop), name="secure-collector")
        remediator = await secure.connect("remediator", "remediator")
        try:
            fake.gpus[2].dbe_volatile = 1

            async def published() -> bool:
                return daemon.bus is not None and await streams.stream_messages(subjects.SIGNALS.name) >= 1

            await wait_until(published, 20, "the node's DBE signal on the stream")
            client = NodeAgentClient(remediator, "c1", lambda: datetime.now(UTC))
            result = await client.call("gpu-node-7", AgentAction.REBOOT, key="inc-9/0/reboot", incident="inc-9")
            assert not result.ok and "not allowed" in result.detail  # the agent answered: the reply path works
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await remediator.close()


class TestEndToEnd:
    async def test_a_dbe_goes_from_node_to_incident_to_plan_with_every_process_on_its_own_identity(
            self, secure: SecureBus, catalog: Catalog, policy: Policy, tmp_path: Path) -> None:
        """Collector (node), correlator, remediator (dry run) and an operator reading the result: the whole
        path works under TLS and JWT auth with nothing but each role's permissions."""
        from breakfix.collectors.app import build_collector
        from breakfix.collectors.config import CollectorConfig
        from breakfix.collectors.nvml_api import FakeNvml

        corr_bus = await secure.connect("correlator", "correlator")
        await corr_bus.ensure_streams(subjects.STREAMS)
        rem_bus = await secure.connect("remediator", "remediator")
        alice = await secure.connect("operator", "alice")
        opts = secure.options("node", "gpu-node-7")
        cfg = CollectorConfig.model_validate({
            "cluster": "c1", "node": "gpu-node-7", "state_dir": str(tmp_path / "state"), "http_listen": "127.0.0.1:0",
            "nats": {k: str(v) for k, v in opts.model_dump().items()}, "spool": {"dir": str(tmp_path / "spool")},
            "sources": {"nvml": {"interval_s": 0.2, "expected_gpus": 8}}})
        fake = FakeNvml.hgx(8)
        corr = CorrelatorService(corr_bus, Correlator(catalog), lambda: datetime.now(UTC))
        rem = RemediatorService(rem_bus, SimCluster({"gpu-node-7": SimNode("gpu-node-7")}),
                                policy.model_copy(update={"dry_run": True}), SystemClock(), cluster="c1",
                                store=await KvStore.open(rem_bus))
        stop = asyncio.Event()
        collector = build_collector(cfg, clock=SystemClock(), catalog=catalog, nvml=fake,
                                    connect=lambda: JetStreamBus.connect(cfg.nats, name="gpu-node-7"))
        tasks = [asyncio.create_task(corr.run(stop), name="e2e-secure-correlator"),
                 asyncio.create_task(rem.run(stop), name="e2e-secure-remediator"),
                 asyncio.create_task(collector.run(stop), name="e2e-secure-collector")]
        try:
            fake.gpus[2].dbe_volatile = 1

            async def planned() -> bool:
                return rem.stats.handled >= 1 and await alice.stream_messages(subjects.ACTIONS.name) >= 1

            await wait_until(planned, 30, "an incident and a dry-run plan from the node's DBE")
            assert any(i.node == "gpu-node-7" for i in corr.core.incidents.values())
            await alice.reset_consumer(stream=subjects.ACTIONS.name, durable="alice",
                                       filter_subject=subjects.ACTIONS_ALL, start_seq=1, ack_all=False)
            records = await alice.pull(stream=subjects.ACTIONS.name, durable="alice", batch=100, timeout_s=1)
            assert records, "the operator reads the audit trail through a durable named after them"
            assert not any(t.done() for t in tasks)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
            for b in (corr_bus, rem_bus, alice):
                await b.close()
