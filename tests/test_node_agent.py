"""The node agent with stand-in nvidia-smi and dcgmi executables that print the real tools' formats,
and the remediator's client over a real nats-server request/reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.agent import Holders, NodeAgent
from breakfix.collectors.agent_checks import fingerprint, parse_diag, refuse
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.schemas import subjects
from breakfix.schemas.agent import AgentAction, AgentCommand
from tests.conftest import T0, wait_until

BIN = Path(__file__).resolve().parent / "bin"
UUID = "GPU-0000000a-aaaa-bbbb-cccc-dddddddddddd"


def agent(tmp_path: Path, boot: list[str] | None = None, **kw: object) -> NodeAgent:
    boots = boot or ["boot-1"]
    return NodeAgent("n1", tmp_path / "state", nvidia_smi=str(BIN / "nvidia-smi"), dcgmi=str(BIN / "dcgmi"),
                     reboot_cmd=("true",), boot_id=lambda: boots[-1], **kw)  # type: ignore[arg-type]


def cmd(action: AgentAction, key: str = "inc-1:0:0:1", **kw: object) -> AgentCommand:
    return AgentCommand(id=key, node="n1", action=action, incident="inc-1", issued_at=T0,
                        gpu_uuid=kw.pop("gpu_uuid", UUID), **kw)  # type: ignore[arg-type]


@pytest.fixture
def nvsmi_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "nvidia-smi.log"
    monkeypatch.setenv("FAKE_NVSMI_LOG", str(log))
    return log


class TestResetGpu:
    async def test_reset_toggles_persistence_mode_around_the_reset(self, tmp_path: Path, nvsmi_log: Path) -> None:
        reply = await agent(tmp_path).handle(cmd(AgentAction.RESET_GPU))
        assert reply.ok and "successfully reset" in reply.detail
        calls = nvsmi_log.read_text().splitlines()
        assert [c.split()[0] for c in calls] == [
            "--query-compute-apps=pid,process_name", "--query-gpu=persistence_mode", "-pm", "--gpu-reset", "-pm"]
        assert calls[2].startswith("-pm 0") and calls[4].startswith("-pm 1") and f"-i {UUID}" in calls[3]

    @pytest.mark.parametrize(("mode", "words"), [("inuse", "held by 1 process"), ("lost", "GPU is lost"),
                                                 ("fail", "In use by another client")],
                             ids=["refused-while-processes-hold-it", "lost-gpu-fails-cleanly", "driver-refuses"])
    async def test_reset_failures_are_clean(self, tmp_path: Path, nvsmi_log: Path, mode: str, words: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FAKE_NVSMI_MODE", mode)
        reply = await agent(tmp_path).handle(cmd(AgentAction.RESET_GPU))
        assert not reply.ok and words in reply.detail
        if mode in ("inuse", "lost"):
            assert "--gpu-reset" not in nvsmi_log.read_text(), "no reset attempted"

    async def test_a_reset_refused_in_use_names_the_processes_holding_the_device(
            self, tmp_path: Path, nvsmi_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Monitoring clients (DCGM's host engine, exporters) hold the GPU without being compute processes: the
        reply names them, so the human reading the audit knows what to stop."""
        proc = tmp_path / "proc"
        for pid, comm, devs in ((42, "nv-hostengine", ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1")),
                                (43, "sshd", ("/dev/null",)), (50, "python3", ("/dev/nvidiactl", "/dev/nvidia-uvm")),
                                (77, "dcgm-exporter", ("/dev/nvidia1",))):
            (proc / str(pid) / "fd").mkdir(parents=True)
            for n, dev in enumerate(devs):
                (proc / str(pid) / "fd" / str(n + 3)).symlink_to(dev)
            (proc / str(pid) / "comm").write_text(comm + "\n")
        (proc / "77" / "fd" / "9").symlink_to(proc / "77" / "fd" / "9")  # a link that cannot be read: skipped
        monkeypatch.setenv("FAKE_NVSMI_MODE", "fail")
        reply = await agent(tmp_path, proc=proc).handle(cmd(AgentAction.RESET_GPU))
        assert not reply.ok and reply.evidence["gpu_clients"] == \
            "nv-hostengine (pid 42: nvidia0,nvidia1), dcgm-exporter (pid 77: nvidia1)", "GPU device nodes only"
        assert "device open in: nv-hostengine (pid 42" in reply.detail
        by_index = await agent(tmp_path, proc=proc).handle(cmd(AgentAction.RESET_GPU, key="inc-1:0:0:9",
                                                               gpu_uuid=None, gpu_index=1))
        assert by_index.evidence["gpu_clients"].startswith("nv-hostengine (pid 42"), "both hold nvidia1: by pid"
        from breakfix.collectors.agent_clients import nvidia_clients
        assert nvidia_clients(proc, minor=0)[0].startswith("nv-hostengine")
        assert nvidia_clients(proc, minor=1, exclude=42) == ["dcgm-exporter (pid 77: nvidia1)"]

    async def test_same_key_never_resets_twice(self, tmp_path: Path, nvsmi_log: Path) -> None:
        a = agent(tmp_path)
        first = await a.handle(cmd(AgentAction.RESET_GPU))
        again = await agent(tmp_path).handle(cmd(AgentAction.RESET_GPU))  # a restarted agent, same disk
        assert first.ok and again.ok and again.replayed
        assert nvsmi_log.read_text().count("--gpu-reset") == 1


class TestValidate:
    @pytest.mark.parametrize(("result", "ok"), [("pass", True), ("fail", False)])
    async def test_dcgmi_diag_json_becomes_per_test_outcomes(self, tmp_path: Path, result: str, ok: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FAKE_DCGMI_RESULT", result)
        reply = await agent(tmp_path).handle(cmd(AgentAction.VALIDATE, level=3))
        assert reply.ok is ok
        assert {t.name: t.status for t in reply.tests}["GPU Memory"] == result
        assert reply.evidence["PCIe"] == "pass" and len(reply.tests) == 9, "r3: r2's tests and the four r3 adds"
        if not ok:
            assert "GPU Memory" in reply.detail

    def test_dcgm4_key_and_warnings_parse(self) -> None:
        doc = {"DCGM Diagnostic": {"test_categories": [{"category": "Hardware", "tests": [
            {"name": "memory", "results": [{"status": "Warn", "warnings": [{"warning": "throttled"}]}]},
            {"name": "pcie", "results": [{"status": "Pass"}]}]}]}}
        diag = parse_diag(json.dumps(doc), 2)
        assert diag.passed and diag.tests[0].status == "warn" and diag.tests[0].info == "throttled"
        assert diag.warnings == ("memory: throttled",), "a warning is a pass, and it is reported"

    @pytest.mark.parametrize(("down", "ok"), [(2, True), (10_000, False)], ids=["engine-starting", "engine-away"])
    async def test_validation_waits_for_the_dcgm_host_engine_after_a_reboot(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, down: int, ok: bool) -> None:
        from breakfix.bus.clock import ManualClock

        log = tmp_path / "dcgmi.log"
        monkeypatch.setenv("FAKE_DCGMI_LOG", str(log))
        monkeypatch.setenv("FAKE_DCGMI_ENGINE_DOWN", str(down))
        clock = ManualClock(T0)
        reply = await agent(tmp_path, clock=clock, ready_wait_s=60).handle(cmd(AgentAction.VALIDATE, level=2))
        asks = [line for line in log.read_text().splitlines() if line.startswith("discovery")]
        assert reply.ok is ok
        if ok:
            assert len(asks) == 3 and "diag -r 2" in log.read_text(), "asked until the engine answered, then ran"
        else:
            assert "host engine did not answer within 60s" in reply.detail and "diag" not in log.read_text()
            assert len(asks) == 7, "every 10 s for a minute"

    @pytest.mark.parametrize(("training", "ok"), [(2, True), (10_000, False)],
                             ids=["fabric-manager-finishing", "fabric-manager-never-done"])
    async def test_validation_waits_for_the_gpu_fabric_to_finish_training(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, training: int, ok: bool) -> None:
        """dcgmi discovery answers before Fabric Manager has trained an NVSwitch fabric; diagnosing then fails
        the NVLink tests of healthy GPUs."""
        from breakfix.bus.clock import ManualClock

        smi_log, dcgmi_log = tmp_path / "nvidia-smi.log", tmp_path / "dcgmi.log"
        monkeypatch.setenv("FAKE_NVSMI_LOG", str(smi_log))
        monkeypatch.setenv("FAKE_DCGMI_LOG", str(dcgmi_log))
        monkeypatch.setenv("FAKE_NVSMI_FABRIC_TRAINING", str(training))
        reply = await agent(tmp_path, clock=ManualClock(T0), ready_wait_s=60).handle(
            cmd(AgentAction.VALIDATE, level=2))
        reads = smi_log.read_text().splitlines().count("-q")
        assert reply.ok is ok
        if ok:
            assert reads == 3 and "diag -r 2" in dcgmi_log.read_text(), "read until trained, then diagnosed"
        else:
            assert "still training after 60s on gpu0, gpu1" in reply.detail and reply.error.endswith("not trained")
            assert "diag" not in dcgmi_log.read_text() and reads == 7, "every 10 s for a minute, never diagnosed"

    async def test_the_engine_and_fabric_waits_share_one_deadline(self, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """The remediator's validate request allows the diag plus ready_wait_s (and a margin): the two waits
        before the diag may not take ready_wait_s each."""
        from breakfix.bus.clock import ManualClock

        smi_log = tmp_path / "nvidia-smi.log"
        monkeypatch.setenv("FAKE_NVSMI_LOG", str(smi_log))
        monkeypatch.setenv("FAKE_DCGMI_LOG", str(tmp_path / "dcgmi.log"))
        monkeypatch.setenv("FAKE_DCGMI_ENGINE_DOWN", "5")  # the engine answers at t+50 s
        monkeypatch.setenv("FAKE_NVSMI_FABRIC_TRAINING", "10000")
        clock = ManualClock(T0)
        start = clock.monotonic()
        reply = await agent(tmp_path, clock=clock, ready_wait_s=60).handle(cmd(AgentAction.VALIDATE, level=2))
        assert not reply.ok and "still training after 60s" in reply.detail
        assert smi_log.read_text().splitlines().count("-q") == 2 and clock.monotonic() - start <= 60, \
            "the fabric wait ended at the validation's deadline, 10 s after the engine answered"

    async def test_missing_dcgmi_is_a_clear_failure(self, tmp_path: Path) -> None:
        a = NodeAgent("n1", tmp_path, dcgmi=str(tmp_path / "no-such-dcgmi"))
        reply = await a.handle(cmd(AgentAction.VALIDATE))
        assert not reply.ok and "no readable result" in reply.detail


class TestReboot:
    async def test_reboot_is_confirmed_by_a_new_boot_id_never_repeated(self, tmp_path: Path) -> None:
        boots = ["boot-1"]
        first = await agent(tmp_path, boots).handle(cmd(AgentAction.REBOOT, key="inc-1:0:1:2"))
        assert first.ok
        assert not (await agent(tmp_path, boots).handle(cmd(AgentAction.REBOOT, key="inc-1:0:1:2"))).ok, \
            "same boot: the reboot did not happen, and it is not tried again"
        boots.append("boot-2")
        again = await agent(tmp_path, boots).handle(cmd(AgentAction.REBOOT, key="inc-1:0:1:2"))
        assert again.ok and again.replayed and "new boot id" in again.detail

    async def test_commands_outside_the_allow_list_are_refused(self, tmp_path: Path) -> None:
        a = agent(tmp_path, allow=frozenset({AgentAction.VALIDATE}))
        reply = await a.handle(cmd(AgentAction.REBOOT))
        assert not reply.ok and "not allowed" in reply.detail

    async def test_malformed_request_gets_an_error_reply(self, tmp_path: Path) -> None:
        out = json.loads(await agent(tmp_path).handle_bytes(b'{"action": "format_disk"}'))
        assert out["ok"] is False and "invalid agent command" in out["detail"]


@pytest.mark.nats
class TestOverNats:
    async def test_client_and_agent_over_request_reply(self, tmp_path: Path, nats_server: EmbeddedNats,
                                                     nvsmi_log: Path) -> None:
        node_bus = await JetStreamBus.connect(nats_server.url)
        remediator_bus = await JetStreamBus.connect(nats_server.url)
        await serve_ready(node_bus, remediator_bus, agent(tmp_path))
        client = NodeAgentClient(remediator_bus, "c1", lambda: T0)
        ok = await client.call("n1", AgentAction.RESET_GPU, key="inc-7:0:0:1", incident="inc-7", gpu_uuid=UUID)
        again = await client.call("n1", AgentAction.RESET_GPU, key="inc-7:0:0:1", incident="inc-7",
                                  gpu_uuid=UUID)
        nobody = await NodeAgentClient(remediator_bus, "c1", lambda: T0, timeouts={AgentAction.REBOOT: 0.5}).call(
            "n2", AgentAction.REBOOT, key="inc-7:0:1:2", incident="inc-7")
        await node_bus.close()
        await remediator_bus.close()
        assert ok.ok and again.ok and again.evidence.get("replayed") == "true"
        assert nvsmi_log.read_text().count("--gpu-reset") == 1
        assert not nobody.ok and "did not answer" in nobody.detail


def raw(action: str = "validate", key: str = "inc-9:0:0:1", **kw: object) -> dict[str, object]:
    return {"schema": "breakfix.agent-command/v1", "id": key, "node": "n1", "action": action, "incident": "inc-9",
            "issued_at": T0.isoformat(), **kw}


REFUSALS = [
    pytest.param([raw("reset_gpu", gpu_index=8)], "bad_argument", "outside this node's GPUs 0-7",
                 id="gpu-out-of-range"),
    pytest.param([raw("format_disk")], "invalid", "invalid agent command", id="unknown-action"),
    pytest.param([raw("reset_gpu", gpu_uuid="GPU-x; reboot")], "bad_argument", "not a GPU UUID", id="shell-in-uuid"),
    pytest.param([raw("reset_gpu", gpu_uuid="--help")], "bad_argument", "not a GPU UUID", id="option-like-uuid"),
    pytest.param([raw("reset_gpu", gpu_uuid="0,1,2,3")], "bad_argument", "not a GPU UUID", id="gpu-list-as-uuid"),
    pytest.param([raw("reset_gpu", gpu_index="0,1,2,3")], "invalid", "invalid agent command", id="gpu-list-as-index"),
    pytest.param([raw("validate", incident="$(reboot)")], "bad_argument", "incident", id="shell-in-incident"),
    pytest.param([raw("validate", key="--help;rm -rf /")], "bad_argument", "id:", id="option-and-shell-in-key"),
    pytest.param([raw("validate", level=7)], "invalid", "invalid agent command", id="diag-level-out-of-range"),
    pytest.param([raw("reboot", node="n2")], "wrong_node", "reached n1", id="another-node"),
    pytest.param([raw("validate", key="inc-9:0:0:5"), raw("reboot", key="inc-9:0:0:5")], "key_reuse",
                 "already used for another command", id="replayed-key-another-action"),
    pytest.param([raw("reset_gpu", key="inc-9:0:0:6", gpu_index=1), raw("reset_gpu", key="inc-9:0:0:6", gpu_index=2)],
                 "key_reuse", "already used for another command", id="replayed-key-other-gpu"),
    pytest.param([raw("reboot", key="inc-9:0:1:1"), raw("reboot", key="inc-10:0:1:1")], "rate_limited",
                 "at most one per 3600s", id="second-reboot-inside-window"),
]


async def serve_ready(node_bus: JetStreamBus, caller: JetStreamBus, a: NodeAgent) -> None:
    """Serve the agent, then wait until the server routes requests to it (right after start-up a fresh
    nats-server can answer "no responders" for a moment even after the subscriber's flush)."""
    async def handler(data: bytes) -> bytes:
        return b"pong" if data == b"ping" else await a.handle_bytes(data)

    await node_bus.serve(subjects.agent_subject("c1", "n1"), handler)

    async def answers() -> bool:
        try:
            return await caller.request(subjects.agent_subject("c1", "n1"), b"ping", timeout_s=1) == b"pong"
        except Exception:
            return False

    await wait_until(answers, 10, "the agent's subject to have a responder")


@pytest.mark.nats
class TestRefusalsOverNats:
    @pytest.mark.parametrize(("requests", "reason", "words"), REFUSALS)
    async def test_agent_refuses_logs_and_counts(self, tmp_path: Path, nats_server: EmbeddedNats, nvsmi_log: Path,
                                                 requests: list[dict[str, object]], reason: str, words: str) -> None:
        from prometheus_client import CollectorRegistry
        from structlog.testing import capture_logs

        reg = CollectorRegistry()
        a = agent(tmp_path, gpu_count=lambda: 8, registry=reg)
        node_bus = await JetStreamBus.connect(nats_server.url)
        caller = await JetStreamBus.connect(nats_server.url)
        try:
            await serve_ready(node_bus, caller, a)
            with capture_logs() as logs:
                replies = [json.loads(await caller.request(subjects.agent_subject("c1", "n1"), json.dumps(r).encode(),
                                                           timeout_s=10)) for r in requests]
        finally:
            await node_bus.close()
            await caller.close()
        *earlier, last = replies
        assert all(r["ok"] for r in earlier), "the first of a pair is accepted"
        assert last["ok"] is False and words in last["detail"] and last["error"].startswith("refused:")
        assert reg.get_sample_value("breakfix_agent_refusals_total", {"reason": reason}) == 1.0
        assert [e["reason"] for e in logs if e["event"] == "agent_refused"] == [reason]
        calls = nvsmi_log.read_text() if nvsmi_log.exists() else ""
        assert "--help" not in calls and "0,1,2,3" not in calls and ";" not in calls and "--gpu-reset -i 8" not in calls


class TestBusyAndLimits:
    async def test_reset_is_refused_while_processes_hold_the_gpu_with_a_busy_error(self, tmp_path: Path,
                                                                                   nvsmi_log: Path) -> None:
        asked: list[str] = []

        async def busy(target: str) -> Holders:
            asked.append(target)
            return Holders(True, ("4242, /usr/bin/python3", "4343, /usr/bin/python3"))

        reply = await agent(tmp_path, busy=busy, gpu_count=lambda: 8).handle(
            cmd(AgentAction.RESET_GPU, gpu_uuid=None, gpu_index=3))
        assert not reply.ok and reply.error.startswith("busy:") and "held by 2 process" in reply.error
        assert asked == ["3"] and "--gpu-reset" not in (nvsmi_log.read_text() if nvsmi_log.exists() else "")

    async def test_the_reboot_window_holds_across_an_agent_restart(self, tmp_path: Path) -> None:
        from breakfix.bus.clock import ManualClock

        clock = ManualClock(T0)
        assert (await agent(tmp_path, clock=clock).handle(cmd(AgentAction.REBOOT, key="inc-1:0:1:1"))).ok
        clock.advance(1800)
        again = await agent(tmp_path, clock=clock).handle(cmd(AgentAction.REBOOT, key="inc-2:0:1:1"))
        assert not again.ok and again.error.startswith("refused:") and "ran 1800s ago" in again.detail
        clock.advance(1801)
        assert (await agent(tmp_path, clock=clock).handle(cmd(AgentAction.REBOOT, key="inc-3:0:1:1"))).ok

    async def test_a_second_reset_of_one_gpu_waits_for_its_window_another_gpu_does_not(
            self, tmp_path: Path, nvsmi_log: Path) -> None:
        a = agent(tmp_path, gpu_count=lambda: 8)
        assert (await a.handle(cmd(AgentAction.RESET_GPU, key="inc-1:0:0:1", gpu_uuid=None, gpu_index=1))).ok
        second = await a.handle(cmd(AgentAction.RESET_GPU, key="inc-2:0:0:1", gpu_uuid=None, gpu_index=1))
        other = await a.handle(cmd(AgentAction.RESET_GPU, key="inc-3:0:0:1", gpu_uuid=None, gpu_index=2))
        assert not second.ok and "at most one per 300s" in second.detail and other.ok
        assert nvsmi_log.read_text().count("--gpu-reset") == 2

    async def test_reply_is_bound_to_its_request(self, tmp_path: Path, nvsmi_log: Path) -> None:
        c = cmd(AgentAction.RESET_GPU)
        reply = await agent(tmp_path).handle(c)
        assert reply.id == c.id and reply.digest == f"{c.id}#{fingerprint(c)}"
        assert fingerprint(c) != fingerprint(cmd(AgentAction.VALIDATE)), "the key covers the action"


@pytest.mark.parametrize(("kw", "reason"), [
    ({"gpu_index": 7}, None), ({"gpu_index": 8}, "bad_argument"), ({"gpu_uuid": UUID}, None),
    ({"gpu_uuid": UUID.lower().replace("gpu", "GPU")}, None), ({"gpu_uuid": f"{UUID} -r"}, "bad_argument"),
    ({"gpu_uuid": "MIG-0000000a-aaaa-bbbb-cccc-dddddddddddd"}, "bad_argument"),
    ({"gpu_uuid": UUID, "gpu_index": 1}, "bad_argument"), ({}, "bad_argument"),
], ids=["last-index", "index-past-end", "uuid", "lower-case-hex", "uuid-with-option", "mig-uuid", "both", "neither"])
def test_reset_gpu_argument_table(kw: dict[str, object], reason: str | None) -> None:
    c = AgentCommand(id="inc-1:0:0:1", node="n1", action=AgentAction.RESET_GPU, issued_at=T0, **kw)  # type: ignore[arg-type]
    got = refuse(c, node="n1", allow=frozenset(AgentAction), gpu_count=8)
    assert (got.reason if got else None) == reason


async def test_built_agent_knows_the_nodes_gpus_from_nvml_and_exports_refusals(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from breakfix.bus.clock import ManualClock
    from breakfix.collectors.app import build_collector
    from breakfix.collectors.config import CollectorConfig
    from breakfix.schemas.common import GpuRef

    cfg = CollectorConfig.model_validate({"cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"),
                                          "spool": {"dir": str(tmp_path / "spool")}, "agent": {"enabled": True}})
    daemon = build_collector(cfg, clock=ManualClock(T0))
    assert daemon.agent is not None
    daemon.ctx.register_gpus([GpuRef(index=i, uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd") for i in range(4)])
    reply = await daemon.agent.handle(cmd(AgentAction.RESET_GPU, gpu_uuid=None, gpu_index=4))
    assert not reply.ok and "outside this node's GPUs 0-3" in reply.detail
    exported = generate_latest(daemon.metrics.registry).decode()
    assert 'breakfix_agent_refusals_total{reason="bad_argument"} 1.0' in exported
