"""Forgeries a reader can try with what its role allows: a push consumer aimed at a node agent, and records of
the remediator's kinds published on its own on-call subject. nats-server does not check a push consumer's
delivery subject against its creator's publish rights (nats-io/nats-server#8274), and it de-duplicates and
stores whatever a permitted subject carries; the receivers must tell."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from breakfix.bus.codec import decoder
from breakfix.bus.consumer import DecodeError, decode_message
from breakfix.bus.jetstream import JetStreamBus
from breakfix.collectors.agent import NodeAgent
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord
from tests.security.conftest import NOW, SecureBus

pytestmark = pytest.mark.nats


async def test_a_push_consumer_aimed_at_a_node_agent_never_runs_its_command(
        secure: SecureBus, streams: JetStreamBus, tmp_path: Path) -> None:
    """An operator stores a reboot command on her own on-call subject and has her durable deliver it to
    node-b's agent subject: the agent hears it, and drops it (not a core request on its subject)."""
    marker = tmp_path / "REBOOTED"
    agent = NodeAgent("node-b", tmp_path / "agent", reboot_cmd=("touch", str(marker)), boot_id=lambda: "boot-1")
    node_b = await secure.connect("node", "node-b")
    alice = await secure.connect("operator", "alice")
    try:
        await node_b.serve(subjects.agent_subject("c1", "node-b"), agent.handle_bytes)
        cmd = {"schema": "breakfix.agent-command/v1", "id": "alice-forged-0001", "node": "node-b",
               "action": "reboot", "issued_at": datetime.now(UTC).isoformat()}
        nc = alice._nc  # the raw client: a consumer config breakfix itself never sends
        await nc.jetstream().publish(subjects.oncall_subject("c1", "alice", "note"), json.dumps(cmd).encode())
        req = {"stream_name": subjects.ACTIONS.name, "config": {
            "durable_name": "alice", "name": "alice", "deliver_subject": subjects.agent_subject("c1", "node-b"),
            "ack_policy": "none", "deliver_policy": "all",
            "filter_subject": subjects.oncall_subject("c1", "alice", "note")}}
        created = json.loads((await nc.request(f"$JS.API.CONSUMER.CREATE.{subjects.ACTIONS.name}.alice",
                                               json.dumps(req).encode(), timeout=5)).data)
        assert "error" not in created, "the server lets a reader aim a push consumer anywhere (upstream #8274)"
        await asyncio.sleep(1.5)
        assert not marker.exists() and agent.done == {}, "the delivery reached the agent and was dropped"
    finally:
        await alice.close()
        await node_b.close()


def _record(kind: ActionKind, outcome: ActionOutcome, actor: str) -> ActionRecord:
    return ActionRecord(id="forged-1", cluster="c1", incident_id="inc-1", kind=kind, outcome=outcome, actor=actor,
                        at=NOW + timedelta(seconds=1), reason="forged")


class _Msg:
    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data = subject, data


@pytest.mark.parametrize(("subject", "kind", "outcome", "actor", "ok"), [
    ("breakfix.actions.c1", ActionKind.PLAN, ActionOutcome.COMPLETED, "remediator", True),
    ("breakfix.actions.c1.oncall.alice.note", ActionKind.PLAN, ActionOutcome.COMPLETED, "remediator", False),
    ("breakfix.actions.c1.oncall.alice.note", ActionKind.PLAN, ActionOutcome.ESCALATED, "alice", False),
    ("breakfix.actions.c1.oncall.alice.note", ActionKind.STEP, ActionOutcome.SUCCEEDED, "alice", False),
    ("breakfix.actions.c1.oncall.alice.note", ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, "alice", False),
    ("breakfix.actions.c1.oncall.alice.note", ActionKind.NOTE, ActionOutcome.COMPLETED, "alice", True),
    ("breakfix.actions.c1.oncall.alice.note", ActionKind.NOTE, ActionOutcome.COMPLETED, "bob", False),
    ("breakfix.actions.c1.oncall.jane_doe_corp.note", ActionKind.NOTE, ActionOutcome.COMPLETED, "jane.doe@corp",
     False),
    ("breakfix.actions.c2.oncall.alice.note", ActionKind.NOTE, ActionOutcome.COMPLETED, "alice", False),
    ("breakfix.actions.c1.admin.adam.breaker_reset", ActionKind.BREAKER, ActionOutcome.REQUESTED, "adam", True),
    ("breakfix.dlq.breakfix_signals", ActionKind.PLAN, ActionOutcome.COMPLETED, "remediator", False),
], ids=["the-remediators-own-subject", "plan-record-on-an-oncall-subject", "plan-record-as-oneself",
        "step-record-on-an-oncall-subject", "notification-record-on-an-oncall-subject", "a-note-by-its-user",
        "a-note-claiming-another-user", "a-name-sharing-the-subjects-token", "another-clusters-subject",
        "an-admin-verb", "a-delivery-from-another-stream"])
def test_an_action_record_is_believed_only_from_the_subject_its_author_may_publish_on(
        subject: str, kind: ActionKind, outcome: ActionOutcome, actor: str, ok: bool) -> None:
    """Only the remediator may publish on ``breakfix.actions.<cluster>``: a plan, step or notification record
    anywhere else is a forgery (an operator resolving incidents or paging "as the remediator"), and a human
    record must be its subject's user's, exactly."""
    msg = _Msg(subject, _record(kind, outcome, actor).model_dump_json(by_alias=True).encode())
    if ok:
        assert decode_message(decoder(ActionRecord), msg).actor == actor  # type: ignore[arg-type]
    else:
        with pytest.raises(DecodeError, match="forged ActionRecord"):
            decode_message(decoder(ActionRecord), msg)  # type: ignore[arg-type]


def test_the_remediators_record_ids_are_keyed_by_its_credentials(tmp_path: Path) -> None:
    """JetStream drops a message whose Nats-Msg-Id it has seen, whoever sent it: an operator who could compute
    the remediator's next record ids could publish them first, on her own subject, and its records would vanish.
    Keyed by its credentials, the ids stay deterministic for the remediator (a re-send after a restart is still
    a duplicate) and unknowable to anyone else."""
    from breakfix.remediator.app import _id_key
    from breakfix.remediator.config import RemediatorConfig
    from breakfix.remediator.executor import record_id, record_key

    args = ("inc-1", 0, "step", 2, "reset_gpu", "started")
    creds = tmp_path / "remediator.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0...\n------END NATS USER JWT------\n"
                     "-----BEGIN USER NKEY SEED-----\nSUAEXAMPLESEED\n------END USER NKEY SEED------\n")
    key = _id_key(RemediatorConfig.model_validate({"cluster": "c1", "nats": {"url": "nats://x:4222",
                                                                             "creds": str(creds)}}))
    assert key == record_key(creds.read_bytes()) and key
    keyed = record_id(*args, key=key)
    assert keyed == record_id(*args, key=key), "the same record, the same id: re-sends stay duplicates"
    assert keyed != record_id(*args), "not the id anyone can compute"
    assert keyed != record_id(*args, key=record_key(b"another credential"))
    assert _id_key(RemediatorConfig.model_validate({"cluster": "c1"})) == b"", "no credentials: a lab bus"
