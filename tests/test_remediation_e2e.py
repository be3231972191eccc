"""Remediation end to end through a real nats-server: signals -> correlator -> remediator ->
Kubernetes (kmock, an API emulator) and the node agent (stand-in nvidia-smi / dcgmi) -> audit.

- XID 48 on a GPU: drain that GPU's pod, reset the GPU, validate, return to service;
- the remediator process is SIGKILLed during validation and resumes at that step: nothing
  is reset twice, the validation is not run twice;
- a reset that fails takes the reboot rung: cordon, drain, reboot (confirmed by a new boot id),
  validate r3, return, and the node is uncordoned because breakfix cordoned it;
- the lifecycle (issue 10): an RMA incident holds its node through another GPU's reset until a human releases
  it (validated on that GPU only); XID 79 again after its reboot fences the node and pages with the reason;
  XID 154 "Node Reboot Required" during a reset re-decides the plan; an XID not in NVIDIA's catalog during its
  validation stops the plan after that step, and the node stays fenced and paged; a repeat during the soak blocks
  the return while an XID 63 companion does not.
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

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.agent import NodeAgent
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.service import CorrelatorService
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.human import human_record
from breakfix.remediator.policy import DEFAULT_POLICY
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, StepAction, WaitingOn
from tests.conftest import sig, wait_until
from tests.test_k8s import Cluster, emulator

pytestmark = pytest.mark.nats
BIN = Path(__file__).resolve().parent / "bin"


def now() -> datetime:
    return datetime.now(UTC)


def fast_policy(tmp_path: Path, **guards: Any) -> Path:
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["settle_s"] = 0.3
    data["guards"]["soak_s"] = 0.2
    data["guards"].update(guards)
    p = tmp_path / f"policy-{len(list(tmp_path.glob('policy*.yaml')))}.yaml"
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

    def config(self, **policy: Any) -> RemediatorConfig:
        return RemediatorConfig.model_validate({
            "cluster": "c1", "nats_url": self.nats.url, "policy": str(fast_policy(self.tmp, **policy)),
            "kubernetes": {"in_cluster": False, "host": self.k8s_url, "drain_timeout_s": 30},
            "lease": {"enabled": False}, "reboot_wait_s": 10, "reboot_poll_s": 0.1})

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
    cfg.write_text(yaml.safe_dump({**rig.config().model_dump(mode="json", exclude_none=True),
                                   "lease": {"enabled": True, "identity": "e2e", "lease_s": 5}}))
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
    assert rig.steps() == ["cordon", "notify_tenant", "drain_gpu", "reset_gpu", "validate", "return_to_service"]
    assert rig.cluster.evictions == ["ml/train-0"], "only the pod on the failing GPU moved, told first"
    assert (rig.tmp / "nvidia-smi.log").read_text().count("--gpu-reset") == 1, "the GPU was reset once"
    assert dcgmi_log.read_text().count("diag") == 1, "the resumed plan got the agent's stored diagnosis"
    node = rig.cluster.obj("v1/nodes", None, "gpu-node-1")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["GPUHealthy"] == "True"


async def test_failed_reset_escalates_to_the_reboot_rung(rig: Rig, catalog: Catalog,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVSMI_MODE", "fail")
    (rig.tmp / "agent").mkdir(exist_ok=True)
    bus = await JetStreamBus.connect(rig.nats.url)
    service = await build_remediator(rig.config(), bus=bus, clock=SystemClock())
    task = asyncio.create_task(service.run(rig.stop), name="e2e-remediator")
    try:
        await rig.xid48()
        await wait_until(rig.plan_done, 60, "the ladder to finish")
    finally:
        rig.stop.set()
        await task
        await bus.close()
    assert "reset_gpu" in rig.steps(ActionOutcome.FAILED)
    assert rig.steps() == ["cordon", "notify_tenant", "drain_gpu", "cordon", "drain", "reboot", "validate",
                           "return_to_service"]
    validate = next(r for r in rig.records if r.action and r.action.value == "validate"
                    and r.outcome is ActionOutcome.STARTED)
    assert validate.details["rung"] == "reboot"
    node = rig.cluster.obj("v1/nodes", None, "gpu-node-1")
    assert node["spec"]["unschedulable"] is False, "breakfix cordoned it, so breakfix uncordons it"


async def publish_signal(rig: Rig, **kw: Any) -> None:
    s = sig(node="gpu-node-1", **kw)
    await rig.bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=s.id)


async def human(rig: Rig, verb: str, incident: str, reason: str, **kw: Any) -> None:
    subject, rec = human_record(verb=verb, cluster="c1", actor="alice", incident=incident, reason=reason,
                                at=now(), **kw)
    await rig.bus.publish(subject, encode(rec), msg_id=rec.id)


class Running:
    """The remediator in this process, built by the composition root."""

    def __init__(self, rig: Rig, **policy: Any) -> None:
        self.rig, self.policy = rig, policy

    async def __aenter__(self) -> Running:
        self.bus = await JetStreamBus.connect(self.rig.nats.url)
        self.service = await build_remediator(self.rig.config(**self.policy), bus=self.bus, clock=SystemClock())
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.service.run(self.stop), name="e2e-remediator")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task
        await self.bus.close()


def unschedulable(rig: Rig) -> bool:
    return bool(rig.cluster.obj("v1/nodes", None, "gpu-node-1")["spec"].get("unschedulable"))


async def until_record(rig: Rig, what: str, pred: Any, within: float = 60) -> ActionRecord:
    async def seen() -> bool:
        return any(pred(r) for r in await rig.audit())

    await wait_until(seen, within, what)
    return next(r for r in rig.records if pred(r))


class TestLifecyclePipeline:
    async def test_an_rma_hold_keeps_the_node_out_until_a_human_releases_it(self, rig: Rig) -> None:
        async with Running(rig):
            await publish_signal(rig, check="row_remap.failure", code=None, gpu_index=1)
            rma = await until_record(rig, "the RMA escalation", lambda r: r.action is StepAction.ESCALATE
                                     and r.outcome is ActionOutcome.SUCCEEDED)
            await publish_signal(rig, code="95", gpu_index=2, at=5)
            kept = await until_record(rig, "the XID 95 plan's return", lambda r: r.incident_id != rma.incident_id
                                      and r.action is StepAction.RETURN_TO_SERVICE
                                      and r.outcome is ActionOutcome.SUCCEEDED)
            assert f"still held by {rma.incident_id}" in kept.reason and unschedulable(rig)
            await human(rig, "release", rma.incident_id, "GPU 1 swapped")

            async def back() -> bool:
                return not unschedulable(rig)

            await wait_until(back, 30, "the released node to return")
        assert any("-i 1" in line for line in (rig.tmp / "dcgmi.log").read_text().splitlines()), \
            "the release validated the RMA GPU only"

    async def test_a_fault_again_after_its_reboot_fences_the_node_and_pages_with_the_reason(self, rig: Rig) -> None:
        async with Running(rig):
            await publish_signal(rig, code="79", gpu_index=3)
            await until_record(rig, "the reboot plan", lambda r: r.kind is ActionKind.PLAN
                               and r.outcome is ActionOutcome.COMPLETED)
            assert not unschedulable(rig)
            await publish_signal(rig, code="79", gpu_index=3, at=600)
            refusal = await until_record(rig, "the retry cap", lambda r: r.kind is ActionKind.REFUSAL)
            await until_record(rig, "the page", lambda r: r.kind is ActionKind.PLAN
                               and r.outcome is ActionOutcome.ESCALATED)
        assert "reboot already ran 1x on gpu-node-1" in refusal.reason and refusal.waiting is WaitingOn.HUMAN
        assert unschedulable(rig), "a broken node is never left in service"
        node = rig.cluster.obj("v1/nodes", None, "gpu-node-1")
        assert any(t["key"] == "breakfix.io/quarantine" for t in node["spec"]["taints"])

    async def test_a_reboot_required_during_a_reset_re_decides_the_plan(self, rig: Rig,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FAKE_DCGMI_SLEEP", "2")  # the reset plan is still validating when XID 154 arrives
        async with Running(rig):
            await publish_signal(rig, code="48", gpu_index=2)
            await until_record(rig, "the reset", lambda r: r.action is StepAction.RESET_GPU)
            await publish_signal(rig, code="154", gpu_index=2, at=1, message="NVRM: Xid (PCI:0000:1a:00): 154, GPU "
                                 "recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)")
            done = await until_record(rig, "the re-decided plan", lambda r: r.kind is ActionKind.PLAN
                                      and r.outcome is ActionOutcome.COMPLETED and r.rule == "node-reboot")
        cancelled = next(r for r in rig.records if r.outcome is ActionOutcome.CANCELLED)
        assert "re-decided: node-reboot needs more than gpu-reset" in cancelled.reason
        assert "reboot" in rig.steps() and not any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.COMPLETED
                                                   and r.rule == "gpu-reset" for r in rig.records)
        returns = [r for r in rig.records if r.action is StepAction.RETURN_TO_SERVICE
                   and r.outcome is ActionOutcome.SUCCEEDED]
        reboot = next(r for r in rig.records if r.action is StepAction.REBOOT and r.outcome is ActionOutcome.SUCCEEDED)
        assert len(returns) == 1 and returns[0].at >= reboot.at, "the node returned only after its reboot"
        assert done.at >= reboot.at

    async def test_an_unknown_xid_during_a_resets_validation_stops_the_plan_there_and_the_node_stays_fenced(
            self, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FAKE_DCGMI_SLEEP", "2")  # the reset plan is still validating when the unknown XID arrives
        async with Running(rig):
            await publish_signal(rig, code="48", gpu_index=2)
            await until_record(rig, "the validation", lambda r: r.action is StepAction.VALIDATE
                               and r.outcome is ActionOutcome.STARTED)
            await publish_signal(rig, code="173", gpu_index=2, at=1)  # not in NVIDIA's catalog: unknown_fault
            await until_record(rig, "the cautious plan's page", lambda r: r.kind is ActionKind.PLAN
                               and r.outcome is ActionOutcome.ESCALATED and r.rule == "unknown-fault")
        stopped = next(r for r in rig.records if r.outcome is ActionOutcome.CANCELLED)
        assert stopped.rule == "gpu-reset" and "gpu_reset_required -> unknown_fault" in stopped.reason
        assert rig.steps() == ["cordon", "drain_gpu", "reset_gpu", "validate", "cordon", "escalate"], \
            "the validation in flight finished; nothing after it ran"
        assert unschedulable(rig), "an unknown fault's node is never returned automatically"

    async def test_the_soak_sees_the_fault_recur_and_ignores_an_informational_companion(self, rig: Rig) -> None:
        async with Running(rig, soak_s=2.0):
            await publish_signal(rig, code="48", gpu_index=2)
            await until_record(rig, "the soak", lambda r: r.waiting is WaitingOn.SOAK)
            await publish_signal(rig, code="63", gpu_index=2, at=2)  # companion: NVIDIA IGNORE
            await publish_signal(rig, code="48", gpu_index=2, at=3, n=1)  # the same fault again
            failed = await until_record(rig, "the blocked return", lambda r: r.action is StepAction.RETURN_TO_SERVICE
                                        and r.outcome is ActionOutcome.FAILED)
        assert "recurred" in failed.reason and "xid:48" in failed.reason and "xid:63" not in failed.reason
