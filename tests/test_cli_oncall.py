"""The on-call commands read the incident and action streams of a real nats-server."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.cli.main import app
from breakfix.schemas import subjects
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    StepAction,
    TimelineEntry,
)
from tests.conftest import T0

runner = CliRunner()
pytestmark = pytest.mark.nats


def inc(iid: str, status: IncidentStatus, version: int, category: str = "gpu_reset_required") -> Incident:
    return Incident(id=iid, cluster="c1", scope=IncidentScope.GPU, node="n1", nodes=("n1",), gpus=(GpuRef(index=2),),
                    category=category, severity=Severity.CRITICAL, status=status, first_seen=T0, last_seen=T0,
                    version=version, timeline=(TimelineEntry(at=T0, event="opened", note="xid:48 on n1/gpu2"),))


async def seed(url: str) -> None:
    bus = await JetStreamBus.connect(url)
    await bus.ensure_streams(subjects.STREAMS)
    for ch in (IncidentChange(kind=ChangeKind.OPENED, incident=inc("inc-open", IncidentStatus.OPEN, 1), at=T0),
               IncidentChange(kind=ChangeKind.OPENED, incident=inc("inc-done", IncidentStatus.OPEN, 1), at=T0),
               IncidentChange(kind=ChangeKind.RESOLVED, incident=inc("inc-done", IncidentStatus.RESOLVED, 2), at=T0)):
        await bus.publish(subjects.incident_subject("c1"), encode(ch))
    rec = ActionRecord(id="a1", cluster="c1", incident_id="inc-open", kind=ActionKind.STEP,
                       action=StepAction.RESET_GPU, outcome=ActionOutcome.SUCCEEDED, actor="remediator/test",
                       rule="gpu-reset", reason="GPU 00000000:18:00.0 was successfully reset.", at=T0)
    await bus.publish(subjects.action_subject("c1"), encode(rec))
    await bus.close()


def test_incidents_lists_open_ones_and_audit_tells_the_story(nats_server: EmbeddedNats) -> None:
    asyncio.run(seed(nats_server.url))
    listing = runner.invoke(app, ["incidents", "--nats", nats_server.url])
    assert listing.exit_code == 0, listing.output
    assert "inc-open" in listing.output and "inc-done" not in listing.output
    everything = runner.invoke(app, ["incidents", "--nats", nats_server.url, "--all"])
    assert "inc-done" in everything.output and "resolved" in everything.output
    story = runner.invoke(app, ["audit", "inc-open", "--nats", nats_server.url])
    assert story.exit_code == 0, story.output
    assert "opened: xid:48 on n1/gpu2" in story.output and "reset_gpu=succeeded by remediator/test" in story.output
    missing = runner.invoke(app, ["audit", "inc-nope", "--nats", nats_server.url])
    assert missing.exit_code == 2 and "no incident inc-nope" in missing.output
