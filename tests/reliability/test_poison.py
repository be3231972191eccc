"""Poison messages of every contract type against the real nats-server: the daemon stays up, the poison
is dead-lettered with its reason, and the next valid message is processed.

The correlator runs as the real ``breakfix correlator`` process (the crash loop the adversarial probe
found: one ``0001-01-01T00:00:00+01:00`` signal killed every restart). The remediator service runs
in-process on its own connection, with a simulated cluster. The node agent and the remediator's
agent client exchange poison requests and replies over core NATS request/reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.remediator.policy import Policy
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.remediator.store import MemoryStore
from breakfix.schemas import subjects
from breakfix.schemas.agent import AgentAction
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentScope,
)
from tests.conftest import sig, wait_until

pytestmark = pytest.mark.nats

NOW = datetime.now(UTC).replace(microsecond=0)


def _replace(valid: bytes, path: tuple[str, ...], raw: str) -> bytes:
    """``valid`` with the JSON value at ``path`` replaced by ``raw`` text (which may be invalid JSON)."""
    doc = json.loads(valid)
    inner = doc
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = "__POISON__"
    return json.dumps(doc).replace('"__POISON__"', raw).encode()


def poison_of(valid: bytes, time_path: tuple[str, ...], float_path: tuple[str, ...] | None) -> dict[str, bytes]:
    """The probe's poison, for one contract: impossible times, non-finite numbers, deep nesting,
    invalid UTF-8, wrong types and plain garbage."""
    out = {
        "time-before-year-1-in-utc": _replace(valid, time_path, '"0001-01-01T00:00:00+01:00"'),
        "time-after-9999-in-utc": _replace(valid, time_path, '"9999-12-31T23:59:59-01:00"'),
        "deep-nesting": _replace(valid, time_path, '{"a":' * 3000 + "1" + "}" * 3000),
        "invalid-utf8": _replace(valid, ("id",), '"__BAD_UTF8__"').replace(b"__BAD_UTF8__", b"\xff\xfe"),
        "wrong-type": _replace(valid, ("id",), "[1, 2]"),
        "garbage": b"\x00not json at all",
    }
    if float_path is not None:
        out["nan"] = _replace(valid, float_path, "NaN")
        out["infinity-string"] = _replace(valid, float_path, '"Infinity"')
        out["overflowing-number"] = _replace(valid, float_path, "1e999")
    return out


def incident_change(n: int) -> IncidentChange:
    inc = Incident(id=f"inc-poison-{n}", cluster="c1", scope=IncidentScope.GPU, node=f"n{n}", nodes=(f"n{n}",),
                   gpus=(GpuRef(index=0),), category="gpu_reset_required", severity=Severity.CRITICAL,
                   codes=("xid:48",), first_seen=NOW, last_seen=NOW)
    return IncidentChange(kind=ChangeKind.OPENED, incident=inc, at=NOW)


def action_record(n: int) -> ActionRecord:
    return ActionRecord(id=f"act-poison-{n}", cluster="c1", incident_id=f"inc-none-{n}", kind=ActionKind.NOTE,
                        outcome=ActionOutcome.REQUESTED, actor="alice", reason="note", at=NOW)


async def dead_letters(bus: JetStreamBus, durable: str) -> list[tuple[str, str]]:
    """(original subject, reason) of every message in the dead-letter stream."""
    await bus.reset_consumer(stream=subjects.DEAD_LETTERS.name, durable=durable, filter_subject=subjects.DLQ_ALL,
                             start_seq=1, ack_all=False)
    got: list[tuple[str, str]] = []
    while batch := await bus.pull(stream=subjects.DEAD_LETTERS.name, durable=durable, batch=500, timeout_s=0.3):
        got += [(m.headers.get(subjects.HDR_DLQ_SUBJECT, ""), m.headers.get(subjects.HDR_DLQ_REASON, ""))
                for m in batch]
    await bus.delete_consumer(subjects.DEAD_LETTERS.name, durable)
    return got


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[JetStreamBus]:
    b = await JetStreamBus.connect(nats_server.url)
    await b.ensure_streams(subjects.STREAMS)
    try:
        yield b
    finally:
        await b.close()


class TestCorrelatorDaemon:
    async def test_poison_signals_and_action_records_are_dead_lettered_and_the_process_keeps_going(
            self, bus: JetStreamBus, nats_server: EmbeddedNats, tmp_path: Path) -> None:
        valid_signal = sig(node="n1", code="79", at=1)
        signal_poison = poison_of(encode(valid_signal), ("observed_at",), ("value",))
        forged = sig(node="attacker", code="79")  # a body naming the attacker, on the victim's subject
        record_poison = poison_of(encode(action_record(0)), ("at",), None)
        subject = subjects.signal_subject("c1", "n1")
        for data in signal_poison.values():
            await bus.publish(subject, data)
        await bus.publish(subjects.signal_subject("c1", "victim"), encode(forged))
        for data in record_poison.values():
            await bus.publish(subjects.action_subject("c1"), data)
        proc = subprocess.Popen(  # noqa: ASYNC220 - the real daemon, started once
            [sys.executable, "-c", "from breakfix.cli.main import app; app()", "correlator", "--nats", nats_server.url,
             "--checkpoint-interval", "0.3", "--data-dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            await bus.publish(subject, encode(valid_signal), msg_id=valid_signal.id)  # after the poison

            async def incident_published() -> bool:
                return await bus.stream_messages(subjects.INCIDENTS.name) >= 1

            await wait_until(incident_published, 30, "the valid signal after the poison to open an incident")
            expected = len(signal_poison) + 1 + len(record_poison)

            async def all_dead_lettered() -> bool:
                return await bus.stream_messages(subjects.DEAD_LETTERS.name) >= expected

            await wait_until(all_dead_lettered, 30, "every poison message in the dead-letter stream")
            assert proc.poll() is None, "the correlator died on a poison message"
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        letters = await dead_letters(bus, "poison-audit-correlator")
        assert len(letters) == expected
        by_subject = [s for s, _ in letters]
        assert by_subject.count(subject) == len(signal_poison)
        assert by_subject.count(subjects.action_subject("c1")) == len(record_poison)
        forged_reasons = [r for s, r in letters if s == subjects.signal_subject("c1", "victim")]
        assert len(forged_reasons) == 1 and "forged Signal" in forged_reasons[0]
        assert all(reason for _, reason in letters), "every dead letter says why"
        assert b"Traceback" not in err
        assert proc.returncode == 0


class TestRemediatorService:
    async def test_poison_incident_changes_and_action_records_are_dead_lettered_and_the_next_is_handled(
            self, bus: JetStreamBus, nats_server: EmbeddedNats, policy: Policy) -> None:
        change_poison = poison_of(encode(incident_change(0)), ("incident", "first_seen"),
                                  ("incident", "time_to_repair_s"))
        record_poison = poison_of(encode(action_record(0)), ("at",), None)
        for data in change_poison.values():
            await bus.publish(subjects.incident_subject("c1"), data)
        verbs = subjects.oncall_subject("c1", "alice", "note")  # what its control consumer reads: human verbs
        for data in record_poison.values():
            await bus.publish(verbs, data)
        rem_bus = await JetStreamBus.connect(nats_server.url)
        svc = RemediatorService(rem_bus, SimCluster({"n1": SimNode("n1")}), policy.model_copy(update={"dry_run": True}),
                                SystemClock(), cluster="c1", store=MemoryStore())
        stop = asyncio.Event()
        task = asyncio.create_task(svc.run(stop), name="poison-remediator")
        try:
            ok = incident_change(1)
            await bus.publish(subjects.incident_subject("c1"), encode(ok), msg_id="poison-ok-change")
            await bus.publish(verbs, encode(action_record(1)), msg_id="poison-ok-record")

            async def valid_ones_handled() -> bool:
                return svc.stats.handled >= 1 and svc.control_stats.handled >= 1

            await wait_until(valid_ones_handled, 30, "the valid change and record after the poison")
            assert not task.done(), "the remediator stopped on a poison message"
            assert svc.stats.dead_lettered == len(change_poison)
            assert svc.control_stats.dead_lettered == len(record_poison)
            assert ok.incident.id in svc.latest
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await rem_bus.close()
        letters = await dead_letters(bus, "poison-audit-remediator")
        reasons = [r for s, r in letters if s == subjects.incident_subject("c1")]
        assert len(reasons) == len(change_poison)
        assert any("IncidentChange" in r and "first_seen" in r for r in reasons)


class TestNodeAgentExchange:
    async def test_poison_agent_commands_get_an_error_reply_and_the_next_command_is_served(
            self, bus: JetStreamBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from breakfix.collectors.agent import NodeAgent

        bin_dir = Path(__file__).resolve().parents[1] / "bin"
        monkeypatch.setenv("FAKE_NVSMI_LOG", str(tmp_path / "nvidia-smi.log"))
        agent = NodeAgent("n1", tmp_path / "agent", nvidia_smi=str(bin_dir / "nvidia-smi"),
                          dcgmi=str(bin_dir / "dcgmi"), reboot_cmd=("true",), boot_id=lambda: "boot-1")
        await bus.serve(subjects.agent_subject("c1", "n1"), agent.handle_bytes)
        cmd = {"id": "inc-1/0/reset_gpu", "node": "n1", "action": "reset_gpu", "incident": "inc-1",
               "gpu_index": 0, "issued_at": NOW.isoformat()}
        for data in poison_of(json.dumps(cmd).encode(), ("issued_at",), None).values():
            reply = json.loads(await bus.request(subjects.agent_subject("c1", "n1"), data, timeout_s=5))
            assert reply["ok"] is False and "invalid agent command" in reply["detail"]
        client = NodeAgentClient(bus, "c1", lambda: datetime.now(UTC))
        result = await client.call("n1", AgentAction.RESET_GPU, key="inc-2/0/reset_gpu", incident="inc-2", gpu_index=0)
        assert result.ok, result.detail

    async def test_a_poison_agent_reply_is_a_failed_step_not_a_crash(self, bus: JetStreamBus) -> None:
        replies: list[bytes] = list(poison_of(json.dumps({
            "id": "inc-3/0/reset_gpu", "node": "n9", "action": "reset_gpu", "ok": True, "detail": "done",
            "at": NOW.isoformat()}).encode(), ("at",), None).values())

        async def poison_responder(_data: bytes) -> bytes:
            return replies.pop(0)

        await bus.serve(subjects.agent_subject("c1", "n9"), poison_responder)
        client = NodeAgentClient(bus, "c1", lambda: datetime.now(UTC))
        while replies:
            result = await client.call("n9", AgentAction.RESET_GPU, key="inc-3/0/reset_gpu", incident="inc-3",
                                      gpu_index=0)
            assert not result.ok and "unreadably" in result.detail
