"""The node agent with stand-in nvidia-smi and dcgmi executables that print the real tools' formats,
and the remediator's client over a real nats-server request/reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.agent import NodeAgent, parse_diag
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.schemas import subjects
from breakfix.schemas.agent import AgentAction, AgentCommand
from tests.conftest import T0

BIN = Path(__file__).resolve().parent / "bin"


def agent(tmp_path: Path, boot: list[str] | None = None, **kw: object) -> NodeAgent:
    boots = boot or ["boot-1"]
    return NodeAgent("n1", tmp_path / "state", nvidia_smi=str(BIN / "nvidia-smi"), dcgmi=str(BIN / "dcgmi"),
                     reboot_cmd=("true",), boot_id=lambda: boots[-1], **kw)  # type: ignore[arg-type]


def cmd(action: AgentAction, key: str = "inc-1:0:0:1", **kw: object) -> AgentCommand:
    return AgentCommand(id=key, node="n1", action=action, incident="inc-1", issued_at=T0,
                        gpu_uuid=kw.pop("gpu_uuid", "GPU-aaaa"), **kw)  # type: ignore[arg-type]


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
        assert calls[2].startswith("-pm 0") and calls[4].startswith("-pm 1") and "-i GPU-aaaa" in calls[3]

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
        assert reply.evidence["PCIe"] == "pass" and len(reply.tests) == 5
        if not ok:
            assert "GPU Memory" in reply.detail

    def test_dcgm4_key_and_warnings_parse(self) -> None:
        doc = {"DCGM Diagnostic": {"test_categories": [{"category": "Hardware", "tests": [
            {"name": "memory", "results": [{"status": "Warn", "warnings": [{"warning": "throttled"}]}]}]}]}}
        passed, tests = parse_diag(json.dumps(doc))
        assert passed and tests[0].status == "warn" and tests[0].info == "throttled"

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
        await node_bus.serve(subjects.agent_subject("c1", "n1"), agent(tmp_path).handle_bytes)
        client = NodeAgentClient(remediator_bus, "c1", lambda: T0)
        ok = await client.call("n1", AgentAction.RESET_GPU, key="inc-7:0:0:1", incident="inc-7", gpu_uuid="GPU-aaaa")
        again = await client.call("n1", AgentAction.RESET_GPU, key="inc-7:0:0:1", incident="inc-7",
                                  gpu_uuid="GPU-aaaa")
        nobody = await NodeAgentClient(remediator_bus, "c1", lambda: T0, timeouts={AgentAction.REBOOT: 0.5}).call(
            "n2", AgentAction.REBOOT, key="inc-7:0:1:2", incident="inc-7")
        await node_bus.close()
        await remediator_bus.close()
        assert ok.ok and again.ok and again.evidence.get("replayed") == "true"
        assert nvsmi_log.read_text().count("--gpu-reset") == 1
        assert not nobody.ok and "did not answer" in nobody.detail
