"""The on-call commands on a real nats-server: ``incidents`` and ``audit`` read the incident index
(KV) and the audit stream; the verbs publish audited records as the caller's bus identity and refuse
a missing incident, a step that is not waiting or another cluster's incident with exit 2."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import nats.errors
import pytest
from typer.testing import CliRunner

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.cli.main import app
from breakfix.console.oncall import OncallError, read_records, user_from_creds
from breakfix.schemas import subjects
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    IncidentStatus,
    StepAction,
    WaitingOn,
)
from tests.conftest import T0
from tests.console_fixtures import awaiting, incident, seed

runner = CliRunner()
pytestmark = pytest.mark.nats


async def _seed(url: str) -> None:
    bus = await JetStreamBus.connect(url)
    a = incident("inc-open", waiting=WaitingOn.APPROVAL)
    done = incident("inc-done", node="gpu-node-002", status=IncidentStatus.RESOLVED, version=2)
    rec = ActionRecord(id="a1", cluster="c1", incident_id="inc-open", kind=ActionKind.STEP,
                       action=StepAction.RESET_GPU, outcome=ActionOutcome.SUCCEEDED, actor="remediator/test",
                       rule="gpu-reset", reason="GPU 00000000:18:00.0 was successfully reset.", at=T0)
    await seed(bus, [a, done, incident("inc-far", cluster="c2", node="gpu-node-100")], [rec, awaiting(a)])
    await bus.close()


async def _records(url: str) -> list[ActionRecord]:
    bus = await JetStreamBus.connect(url)
    try:
        return await read_records(bus)
    finally:
        await bus.close()


def test_incidents_lists_open_ones_and_audit_tells_the_story(nats_server: EmbeddedNats) -> None:
    asyncio.run(_seed(nats_server.url))
    listing = runner.invoke(app, ["incidents", "--nats", nats_server.url])
    assert listing.exit_code == 0, listing.output
    assert "inc-open" in listing.output and "inc-done" not in listing.output and "approval" in listing.output
    everything = runner.invoke(app, ["incidents", "--nats", nats_server.url, "--all", "--cluster", "c1"])
    assert "inc-done" in everything.output and "resolved" in everything.output and "inc-far" not in everything.output
    as_json = runner.invoke(app, ["incidents", "--nats", nats_server.url, "--format", "json"])
    assert {json.loads(x)["id"] for x in as_json.stdout.splitlines()} == {"inc-open", "inc-far"}
    story = runner.invoke(app, ["audit", "inc-open", "--nats", nats_server.url])
    assert story.exit_code == 0, story.output
    assert "opened: xid:48 on gpu-node-001/gpu2" in story.output
    assert "reset_gpu=succeeded by remediator/test" in story.output
    doc = json.loads(runner.invoke(app, ["audit", "inc-open", "--nats", nats_server.url, "--format", "json"]).stdout)
    assert doc["incident"]["id"] == "inc-open" and [r["id"] for r in doc["records"]] == ["a1", "wait-inc-open"]
    missing = runner.invoke(app, ["audit", "inc-nope", "--nats", nats_server.url])
    assert missing.exit_code == 2 and "no incident inc-nope" in missing.output


def test_verbs_publish_records_as_the_bus_user(nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_seed(nats_server.url))
    monkeypatch.setenv("USER", "olga")
    url = ["--nats", nats_server.url]
    for args in (["approve", "inc-open", "reprovision", "--reason", "spare on site"],
                 ["ack", "inc-open"], ["note", "inc-open", "vendor ticket 4711"],
                 ["assign", "inc-open", "--to", "bob"],
                 ["release", "inc-open", "--reason", "riser replaced", "--skip-validation"],
                 ["cancel", "inc-open", "--reason", "moving to RMA"],
                 ["silence", "--cluster", "c1", "--node", "gpu-node-001", "--for", "2h", "--reason", "maintenance"],
                 ["breaker", "reset", "--cluster", "c1", "--reason", "storm over"],
                 ["killswitch", "--cluster", "c1", "--code", "xid:79", "--reason", "bad driver"]):
        r = runner.invoke(app, [*args, *url])
        assert r.exit_code == 0, (args, r.output)
    recs = [r for r in asyncio.run(_records(nats_server.url)) if r.actor == "olga"]
    kinds = [(r.kind.value, r.outcome.value) for r in recs]
    assert kinds == [("approval", "approved"), ("ack", "requested"), ("note", "completed"), ("assign", "completed"),
                     ("release", "requested"), ("cancel", "requested"), ("silence", "requested"),
                     ("breaker", "requested"), ("kill_switch", "requested")]
    assert recs[0].step_index == 1 and recs[4].details == {"skip_validation": "true"}
    listed = runner.invoke(app, ["silences", *url])
    assert recs[6].details["silence_id"] in listed.output and "gpu-node-001" in listed.output
    status = runner.invoke(app, ["breaker", "status", "--cluster", "c1", *url])
    assert status.exit_code == 0 and "closed (last reset by olga)" in status.output


@pytest.mark.parametrize(("args", "error"), [
    (["approve", "inc-nope"], "no incident inc-nope"),
    (["approve", "inc-done"], "inc-done is not waiting for approval"),
    (["approve", "inc-open", "0"], "step 0 of inc-open is not waiting"),
    (["approve", "inc-open", "--cluster", "c2"], "incident inc-open belongs to cluster c1, not c2"),
    (["release", "inc-open", "--reason", " "], "release needs a reason"),
    (["ack", "inc-far", "--cluster", "c1"], "belongs to cluster c2, not c1"),
    (["silence", "--cluster", "c1", "--for", "2x", "--reason", "r", "--node", "n"], "duration '2x'"),
    (["killswitch", "--cluster", "c1", "--reason", "r"], "exactly one of a rule"),
])
def test_bad_verbs_are_one_line_errors_with_exit_2(nats_server: EmbeddedNats, args: list[str], error: str) -> None:
    asyncio.run(_seed(nats_server.url))
    r = runner.invoke(app, [*args, "--nats", nats_server.url])
    assert r.exit_code == 2 and error in r.output and "Traceback" not in r.output, r.output
    assert not [x for x in asyncio.run(_records(nats_server.url)) if x.kind is not ActionKind.STEP
                and x.kind is not ActionKind.REFUSAL]


def _creds(tmp_path: Path, claims: dict[str, object]) -> Path:
    def part(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    jwt = f"{part({'typ': 'JWT', 'alg': 'ed25519-nkey'})}.{part(claims)}.c2ln"
    path = tmp_path / "user.creds"
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
                    "-----BEGIN USER NKEY SEED-----\nSUAxxxx\n------END USER NKEY SEED------\n")
    return path


def test_the_user_is_the_creds_name_claim_and_user_only_without_creds(tmp_path: Path) -> None:
    assert user_from_creds(_creds(tmp_path, {"name": "olga", "sub": "UABC"})) == "olga"
    assert user_from_creds(None, env={"USER": "lab"}) == "lab"
    with pytest.raises(OncallError, match="no name claim"):
        user_from_creds(_creds(tmp_path, {"sub": "UABC"}))
    (tmp_path / "junk.creds").write_text("hello")
    with pytest.raises(OncallError, match="not a NATS creds file"):
        user_from_creds(tmp_path / "junk.creds")


def test_unreachable_nats_is_a_one_line_error() -> None:
    r = runner.invoke(app, ["ack", "inc-a", "--nats", "nats://127.0.0.1:1"])
    assert r.exit_code == 2 and "cannot reach NATS" in r.output and "Traceback" not in r.output


def test_subjects_carry_the_user(nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_seed(nats_server.url))
    monkeypatch.setenv("USER", "olga")

    async def subjects_seen() -> list[str]:  # read with plain nats-py: the test looks at raw subjects
        bus = await nats.connect(nats_server.url)
        try:
            sub = await bus.jetstream().subscribe(subjects.ACTIONS_ALL, ordered_consumer=True)
            out = []
            while True:
                try:
                    out.append((await sub.next_msg(timeout=0.5)).subject)
                except (TimeoutError, nats.errors.TimeoutError):
                    return out
        finally:
            await bus.close()

    acked = runner.invoke(app, ["ack", "inc-open", "--nats", nats_server.url])
    assert acked.exit_code == 0, acked.output
    assert "breakfix.actions.c1.oncall.olga.ack" in asyncio.run(subjects_seen())


async def test_incidents_watch_prints_each_change_until_interrupted(nats_server: EmbeddedNats) -> None:
    import signal
    import sys

    from breakfix.correlator.index import IncidentIndex

    await _seed(nats_server.url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from breakfix.cli.main import app; app()", "incidents", "--nats", nats_server.url,
        "--format", "json", "--watch", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first = {json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["id"] for _ in range(2)}
        assert first == {"inc-open", "inc-far"}
        bus = await JetStreamBus.connect(nats_server.url)
        await IncidentIndex(bus).write([incident("inc-open", status=IncidentStatus.RESOLVED, version=2)])
        await bus.close()
        change = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert (change["id"], change["status"], change["version"]) == ("inc-open", "resolved", 2)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0


async def test_audit_watch_prints_new_records_of_the_incident(nats_server: EmbeddedNats,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import sys

    await _seed(nats_server.url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from breakfix.cli.main import app; app()", "audit", "inc-open", "--nats",
        nats_server.url, "--format", "json", "--watch", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        doc = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert [r["id"] for r in doc["records"]] == ["a1", "wait-inc-open"]
        monkeypatch.setenv("USER", "olga")
        note = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from breakfix.cli.main import app; app()", "note", "inc-open", "vendor ticket 4711",
            "--nats", nats_server.url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(note.communicate(), 60)
        assert note.returncode == 0, err.decode(errors="replace")[-2000:]
        rec = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert (rec["kind"], rec["actor"], rec["reason"]) == ("note", "olga", "vendor ticket 4711")
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
