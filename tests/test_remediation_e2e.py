"""Remediation end to end through a real nats-server: signals -> correlator -> remediator ->
Kubernetes (kmock, an API emulator) and the node agent (stand-in nvidia-smi / dcgmi) -> audit.

- XID 48 on a GPU: drain that GPU's pod, reset the GPU, validate, return to service;
- the remediator process is SIGKILLed during validation and resumes at that step: nothing
  is reset twice, the validation is not run twice;
- a reset that fails takes the reboot rung: cordon, drain, reboot (confirmed by a new boot id),
  validate r3, return, and the node is uncordoned because breakfix cordoned it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.agent import NodeAgent
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.service import CorrelatorService
from breakfix.remediator.composite import ClusterActuator
from breakfix.remediator.k8s import KubernetesActuator, api_for
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.remediator.policy import DEFAULT_POLICY, load_policy
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.store import KvStore
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord
from tests.conftest import sig, wait_until
from tests.test_k8s import Cluster, emulator

pytestmark = pytest.mark.nats
BIN = Path(__file__).resolve().parent / "bin"


def now() -> datetime:
    return datetime.now(UTC)


def fast_policy(tmp_path: Path) -> Path:
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["settle_s"] = 0.3
    data["guards"]["soak_s"] = 0.2
    p = tmp_path / "policy.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


class Rig:
    """NATS, kmock with one GPU node and its pods, the correlator, and the node agent."""

    def __init__(self, tmp: Path, nats: EmbeddedNats, k: kmock.KubernetesEmulator, url: str) -> None:
        self.tmp, self.nats, self.k8s_url = tmp, nats, url
        self.cluster = Cluster(k, url)
        self.boots = ["boot-1"]
        self.records: list[ActionRecord] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self, catalog: Catalog) -> None:
        await self.cluster.add_node("gpu-node-1")
        await self.cluster.add_pod("ml", "train-0", "gpu-node-1")
        await self.cluster.add_pod("ml", "train-1", "gpu-node-1")
        self.bus = await JetStreamBus.connect(self.nats.url)
        await self.bus.ensure_streams(subjects.STREAMS)
        agent = NodeAgent("gpu-node-1", self.tmp / "agent", nvidia_smi=str(BIN / "nvidia-smi"),
                          dcgmi=str(BIN / "dcgmi"), reboot_cmd=("touch", str(self.tmp / "rebooted")),
                          boot_id=self._reboot_aware_boot_id)  # "rebooting" flips the boot id
        self.agent_bus = await JetStreamBus.connect(self.nats.url)
        await self.agent_bus.serve(subjects.agent_subject("c1", "gpu-node-1"), agent.handle_bytes)
        corr = CorrelatorService(await JetStreamBus.connect(self.nats.url), Correlator(catalog), now)
        self.tasks.append(asyncio.create_task(corr.run(self.stop), name="e2e-correlator"))
        await corr.ready.wait()
        await self.bus.reset_consumer(stream=subjects.ACTIONS.name, durable="e2e-audit",
                                      filter_subject=subjects.ACTIONS_ALL, start_seq=1, ack_all=False)

    def _reboot_aware_boot_id(self) -> str:
        log = self.tmp / "rebooted"
        return "boot-2" if log.exists() else "boot-1"

    async def xid48(self) -> None:
        s = sig(node="gpu-node-1", code="48", gpu_index=2, tenant=TenantRef(namespace="ml", pod="train-0"))
        await self.bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=s.id)

    async def audit(self) -> list[ActionRecord]:
        for m in await self.bus.pull(stream=subjects.ACTIONS.name, durable="e2e-audit", batch=500, timeout_s=0.2):
            self.records.append(ActionRecord.model_validate_json(m.data))
        return self.records

    def steps(self, outcome: ActionOutcome = ActionOutcome.SUCCEEDED) -> list[str]:
        return [r.action.value for r in self.records if r.kind is ActionKind.STEP and r.outcome is outcome and r.action]

    async def plan_done(self) -> bool:
        return any(r.kind is ActionKind.PLAN and r.outcome in (ActionOutcome.COMPLETED, ActionOutcome.ESCALATED)
                   for r in await self.audit())

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.agent_bus.close()
        await self.bus.close()


@pytest.fixture
async def rig(tmp_path: Path, nats_server: EmbeddedNats, catalog: Catalog,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setenv("FAKE_NVSMI_LOG", str(tmp_path / "nvidia-smi.log"))
    monkeypatch.setenv("FAKE_DCGMI_LOG", str(tmp_path / "dcgmi.log"))
    async with emulator() as (k, url):
        r = Rig(tmp_path, nats_server, k, url)
        await r.start(catalog)
        try:
            yield r
        finally:
            await r.close()


def spawn_remediator(rig: Rig) -> subprocess.Popen[bytes]:
    cfg = rig.tmp / "remediator.yaml"
    cfg.write_text(yaml.safe_dump({
        "cluster": "c1", "nats_url": rig.nats.url, "policy": str(fast_policy(rig.tmp)),
        "kubernetes": {"in_cluster": False, "host": rig.k8s_url, "drain_timeout_s": 30},
        "lease": {"enabled": True, "identity": "e2e", "lease_s": 5}, "reboot_wait_s": 30, "reboot_poll_s": 0.2}))
    return subprocess.Popen([sys.executable, "-c", "from breakfix.cli.main import app; app()", "remediator", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "BREAKFIX_LOG_LEVEL": "WARNING"})


async def test_xid48_runs_drain_reset_validate_return_and_survives_a_kill_mid_validation(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DCGMI_SLEEP", "2")
    proc = spawn_remediator(rig)
    try:
        await rig.xid48()
        dcgmi_log = rig.tmp / "dcgmi.log"

        async def validating() -> bool:
            return dcgmi_log.exists()

        await wait_until(validating, 30, "the remediator to reach validation")
        proc.send_signal(signal.SIGKILL)  # killed, not stopped: no cleanup, no goodbye
        proc.wait(10)
        proc = spawn_remediator(rig)
        await wait_until(rig.plan_done, 60, "the resumed plan to finish")
    finally:
        proc.kill()
        proc.wait(10)
    assert [r.outcome for r in rig.records if r.kind is ActionKind.PLAN][-1] is ActionOutcome.COMPLETED
    assert rig.steps() == ["drain_gpu", "reset_gpu", "validate", "return_to_service"]
    assert rig.cluster.evictions == ["ml/train-0"], "only the pod on the failing GPU moved"
    assert (rig.tmp / "nvidia-smi.log").read_text().count("--gpu-reset") == 1, "the GPU was reset once"
    assert dcgmi_log.read_text().count("diag") == 1, "the resumed plan got the agent's stored diagnosis"
    node = rig.cluster.obj("v1/nodes", None, "gpu-node-1")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["GPUHealthy"] == "True"


async def test_failed_reset_escalates_to_the_reboot_rung(rig: Rig, catalog: Catalog,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVSMI_MODE", "fail")
    (rig.tmp / "agent").mkdir(exist_ok=True)
    bus = await JetStreamBus.connect(rig.nats.url)
    k8s = KubernetesActuator(api_for(rig.k8s_url))

    actuator = ClusterActuator(k8s, NodeAgentClient(bus, "c1", now), reboot_wait_s=10, poll_s=0.1)
    service = RemediatorService(bus, actuator, load_policy(fast_policy(rig.tmp)), now,
                                store=await KvStore.open(bus))
    task = asyncio.create_task(service.run(rig.stop), name="e2e-remediator")
    try:
        await rig.xid48()
        await wait_until(rig.plan_done, 60, "the ladder to finish")
    finally:
        rig.stop.set()
        await task
        await bus.close()
    assert "reset_gpu" in rig.steps(ActionOutcome.FAILED)
    assert rig.steps() == ["drain_gpu", "cordon", "drain", "reboot", "validate", "return_to_service"]
    validate = next(r for r in rig.records if r.action and r.action.value == "validate"
                    and r.outcome is ActionOutcome.STARTED)
    assert validate.details["rung"] == "reboot"
    node = rig.cluster.obj("v1/nodes", None, "gpu-node-1")
    assert node["spec"]["unschedulable"] is False, "breakfix cordoned it, so breakfix uncordons it"
