"""The notifier inside the remediator: from the incident and action streams to channels and back to the
audit trail (NOTIFICATION records), with on-call verbs believed only from their own subject, followers
silent, a restart that re-reads the streams without paging anyone twice (nor re-firing what resolved), and a
new leader that resolves what the old one paged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakfix.bus.clock import ManualClock, SystemClock
from breakfix.bus.codec import encode
from breakfix.bus.memory import MemoryBus
from breakfix.remediator.notify.channels import Transient
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.core import StepSeen
from breakfix.remediator.notify.model import Notification
from breakfix.remediator.notify.sender import Dispatcher
from breakfix.remediator.notify.service import Delivered, NotifierService, believed, decode_change, decode_record
from breakfix.schemas import subjects
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    IncidentChange,
    IncidentStatus,
)
from tests.conftest import T0, wait_until
from tests.test_notify_core import ESCALATED, change, inc, rec

CFG = NotifyConfig.model_validate({"channels": [{"name": "hook", "type": "webhook", "url": "https://h.example/"}],
                                   "default": ["hook"], "runbook_base": "https://runbooks.example/breakfix/"})


class FakeSender:
    name = "hook"
    kind = "webhook"

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def send(self, n: Notification) -> None:
        self.sent.append(n)

    async def repost(self) -> int:
        return 0


async def read_records(bus: MemoryBus) -> list[ActionRecord]:
    await bus.reset_consumer(stream=subjects.ACTIONS.name, durable="t-read", filter_subject=subjects.ACTIONS_ALL,
                             start_seq=1, ack_all=False)
    msgs = await bus.pull(stream=subjects.ACTIONS.name, durable="t-read", batch=1000, timeout_s=0.05)
    return [ActionRecord.model_validate_json(m.data) for m in msgs]


@pytest.fixture
async def running() -> AsyncIterator[Any]:
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(bus: MemoryBus, clock: ManualClock, **kw: Any) -> tuple[NotifierService, FakeSender]:
        sender = FakeSender()
        svc = NotifierService(bus, CFG, clock, senders={"hook": sender}, **kw)
        stop = asyncio.Event()
        stops.append((stop, asyncio.create_task(svc.run(stop), name="test-notifier")))
        await asyncio.wait_for(svc.ready.wait(), 10)
        svc.stop = stop  # type: ignore[attr-defined]
        return svc, sender

    yield start
    for stop, task in stops:
        stop.set()
        await asyncio.wait_for(task, 10)


async def publish_change(bus: MemoryBus, ch: Any) -> None:
    await bus.publish(subjects.incident_subject("c1"), encode(ch))


async def test_an_escalation_handed_over_by_the_remediator_is_sent_and_audited(running: Any) -> None:
    bus = MemoryBus()
    clock = ManualClock(T0)
    svc, sender = await running(bus, clock)
    svc.change(change(inc()))
    svc.record(rec(*ESCALATED, at=1), subjects.action_subject("c1"))

    async def audited() -> bool:
        return any(r.kind is ActionKind.NOTIFICATION for r in await read_records(bus))
    await wait_until(audited, 10, "the NOTIFICATION record")
    (n,) = sender.sent
    (note,) = [r for r in await read_records(bus) if r.kind is ActionKind.NOTIFICATION]
    assert note.outcome is ActionOutcome.SUCCEEDED and note.details["channel"] == "hook"
    assert note.details["notification"] == n.id and note.incident_id == "inc-1"
    svc.record(rec(ActionKind.ACK, ActionOutcome.SUCCEEDED, actor="mallory", at=2), subjects.action_subject("c1"))
    assert svc.refused == 1  # an ack that did not come from its own on-call subject is not believed


def test_an_ack_counts_only_from_its_own_oncall_subject() -> None:
    ack = rec(ActionKind.ACK, ActionOutcome.SUCCEEDED, actor="alice")
    assert believed(ack, subjects.oncall_subject("c1", "alice", "ack"))
    assert not believed(ack, subjects.oncall_subject("c1", "mallory", "ack"))
    assert not believed(ack, subjects.action_subject("c1"))
    assert not believed(ack, subjects.oncall_subject("c2", "alice", "ack"))
    assert believed(rec(*ESCALATED), subjects.action_subject("c1"))


def test_a_remediator_record_counts_only_from_the_remediators_subject_and_a_verb_only_as_its_exact_user() -> None:
    """An operator may publish on her own subject: a plan escalation there is a forgery that must not page, and
    ``jane_doe_corp`` may not ack as ``jane.doe@corp`` though their subject tokens are one."""
    assert not believed(rec(*ESCALATED), subjects.oncall_subject("c1", "alice", "note"))
    ack = rec(ActionKind.ACK, ActionOutcome.SUCCEEDED, actor="jane.doe@corp")
    assert not believed(ack, subjects.oncall_subject("c1", "jane_doe_corp", "ack"))


async def test_a_follower_sends_nothing_and_a_restart_rebuilds_from_the_streams_without_paging_twice(
        running: Any) -> None:
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    clock = ManualClock(T0)
    quiet, follower = await running(bus, clock, is_leader=lambda: False, durable="follower")
    leader, sender = await running(bus, clock, durable="leader")
    opened, escalated = change(inc()), rec(*ESCALATED, at=1)
    await publish_change(bus, opened)  # what the streams hold, as the remediator read it
    await bus.publish(subjects.action_subject("c1"), encode(escalated))
    for svc in (leader, quiet):
        svc.change(opened)
        svc.record(escalated, subjects.action_subject("c1"))

    async def sent() -> bool:
        return len(sender.sent) == 1
    await wait_until(sent, 10, "the leader's page")
    leader.stop.set()  # type: ignore[attr-defined]
    clock.advance(3600)  # an hour later the leader restarts and reads both streams once
    again, resent = await running(bus, clock, durable="leader")
    assert [n.dedup_key for n in again.core.firing()] == ["inc-1"]
    again.change(change(inc(status=inc().status.RESOLVED, version=5), ChangeKind.RESOLVED, at=3601))

    async def resolved() -> bool:
        return [n.action.value for n in resent.sent] == ["resolve"]
    await wait_until(resolved, 10, "only the resolve after the restart")
    assert follower.sent == []
    assert clock.now() == T0 + timedelta(seconds=3600)


async def notified(bus: MemoryBus, n: int) -> None:
    """Wait until ``n`` NOTIFICATION records are on the actions stream."""
    async def recorded() -> bool:
        return sum(r.kind is ActionKind.NOTIFICATION for r in await read_records(bus)) >= n
    await wait_until(recorded, 10, f"{n} delivery records")


async def paged(running: Any) -> tuple[MemoryBus, ManualClock, Any, Any]:
    """A leader's notifier that paged inc-1's escalation, with the incident and the record on the streams."""
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    clock = ManualClock(T0)
    first, sender = await running(bus, clock, durable="leader")
    opened, escalated = change(inc()), rec(*ESCALATED, at=1)
    await publish_change(bus, opened)
    await bus.publish(subjects.action_subject("c1"), encode(escalated))
    first.change(opened)
    first.record(escalated, subjects.action_subject("c1"))
    return bus, clock, first, sender


async def test_a_restart_never_refires_a_page_whose_incident_resolved(running: Any) -> None:
    bus, clock, first, sender = await paged(running)
    resolved = change(inc(status=IncidentStatus.RESOLVED, version=5), ChangeKind.RESOLVED, at=30)
    await publish_change(bus, resolved)  # the incident stream holds the resolution, the actions stream the escalation
    first.change(resolved)
    await notified(bus, 2)
    assert [n.action.value for n in sender.sent] == ["trigger", "resolve"]
    first.stop.set()  # type: ignore[attr-defined]
    clock.advance(3600)  # an hour later the remediator restarts and reads both streams
    again, resent = await running(bus, clock, durable="leader")
    await again.dispatcher.idle()
    assert again.core.firing() == []  # nothing for Alertmanager to re-post
    assert resent.sent == []


async def test_a_restart_does_not_redeliver_what_its_notification_records_say_was_delivered(running: Any) -> None:
    bus, clock, first, sender = await paged(running)
    await notified(bus, 1)
    first.stop.set()  # type: ignore[attr-defined]
    # a second escalation reached the streams, but the process stopped before its notifier sent it
    await publish_change(bus, change(inc("inc-2"), at=100))
    await bus.publish(subjects.action_subject("c1"), encode(rec(*ESCALATED, iid="inc-2", at=101)))
    clock.advance(120)  # within replay_send_s: what was not delivered goes out, what was does not

    again, resent = await running(bus, clock, durable="leader")

    async def sent_one() -> bool:
        return bool(resent.sent)
    await wait_until(sent_one, 10, "the undelivered page")
    await again.dispatcher.idle()
    assert [(n.dedup_key, n.action.value) for n in resent.sent] == [("inc-2", "trigger")]
    assert [n.dedup_key for n in sender.sent] == ["inc-1"]


class ResolvesFail(FakeSender):
    """A receiver that takes pages but is down when the resolve comes."""

    async def send(self, n: Notification) -> None:
        if n.action.value == "resolve":
            raise Transient("503 from the receiver")
        await super().send(n)


async def test_a_resolve_that_never_got_through_before_a_restart_is_retried_after_it() -> None:
    """The page was delivered, its resolve failed, and the remediator restarted an hour later (past replay_send_s):
    the replay reads both delivery records and puts the resolve back on the channel's retry, so the page closes."""
    cfg = NotifyConfig.model_validate({
        "channels": [{"name": "hook", "type": "webhook", "url": "https://h.example/", "attempts": 1, "retry_s": 0.05}],
        "default": ["hook"], "runbook_base": "https://runbooks.example/breakfix/"})
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    clock = ManualClock(T0)
    down = ResolvesFail()
    first = NotifierService(bus, cfg, clock, senders={"hook": down}, durable="leader", replay_send_s=300)
    stop_first = asyncio.Event()
    task = asyncio.create_task(first.run(stop_first), name="test-notifier-first")
    await asyncio.wait_for(first.ready.wait(), 10)
    opened, escalated = change(inc()), rec(*ESCALATED, at=1)
    resolved = change(inc(status=IncidentStatus.RESOLVED, version=5), ChangeKind.RESOLVED, at=30)
    await publish_change(bus, opened)
    await bus.publish(subjects.action_subject("c1"), encode(escalated))
    first.change(opened)
    first.record(escalated, subjects.action_subject("c1"))
    await notified(bus, 1)
    await publish_change(bus, resolved)
    first.change(resolved)
    await notified(bus, 2)
    stop_first.set()
    await asyncio.wait_for(task, 10)
    outcomes = [r.outcome for r in await read_records(bus) if r.kind is ActionKind.NOTIFICATION]
    assert outcomes == [ActionOutcome.SUCCEEDED, ActionOutcome.FAILED] and [n.action.value for n in down.sent] == [
        "trigger"]
    clock.advance(3600)

    resent = FakeSender()
    again = NotifierService(bus, cfg, clock, senders={"hook": resent}, durable="leader", replay_send_s=300)
    stop_again = asyncio.Event()
    task = asyncio.create_task(again.run(stop_again), name="test-notifier-again")
    try:
        async def closed() -> bool:
            return [n.action.value for n in resent.sent] == ["resolve"]
        await wait_until(closed, 10, "the resolve retried after the restart")
        assert resent.sent[0].dedup_key == "inc-1" and again.dispatcher.retry["hook"] == {}
    finally:
        stop_again.set()
        await asyncio.wait_for(task, 10)


async def test_a_new_leader_resolves_what_the_old_leader_paged_and_pages_nothing_twice(running: Any) -> None:
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    clock = ManualClock(T0)
    lease = {"holder": "a"}
    a, sent_a = await running(bus, clock, durable="a", is_leader=lambda: lease["holder"] == "a", term_poll_s=0.02)
    b, sent_b = await running(bus, clock, durable="b", is_leader=lambda: lease["holder"] == "b", term_poll_s=0.02)
    opened, escalated = change(inc()), rec(*ESCALATED, at=1)
    await publish_change(bus, opened)
    await bus.publish(subjects.action_subject("c1"), encode(escalated))
    a.change(opened)  # only the leader's remediator consumes: the standby hears nothing
    a.record(escalated, subjects.action_subject("c1"))
    await notified(bus, 1)
    lease["holder"] = "b"  # the lease moves; then on-call takes the incident over on the new leader
    clock.advance(60)
    release = rec(ActionKind.RELEASE, ActionOutcome.SUCCEEDED, actor="alice", at=60, reason="RMA filed")
    subject = subjects.oncall_subject("c1", "alice", "release")
    await bus.publish(subject, encode(release))
    b.record(release, subject)

    async def resolved() -> bool:
        return bool(sent_b.sent)
    await wait_until(resolved, 10, "the new leader's resolve")
    await b.dispatcher.idle()
    assert [(n.dedup_key, n.action.value) for n in sent_b.sent] == [("inc-1", "resolve")]
    assert [(n.dedup_key, n.action.value) for n in sent_a.sent] == [("inc-1", "trigger")]


async def test_a_standby_never_reposts_to_alertmanager() -> None:
    cfg = NotifyConfig.model_validate({"channels": [{"name": "am", "type": "alertmanager", "url": "http://am:9093",
                                                     "resend_s": 0.02}], "default": ["am"],
                                       "runbook_base": "https://runbooks.example/breakfix/"})

    class Alertmanager(FakeSender):
        name, kind = "am", "alertmanager"
        reposts = 0

        async def repost(self) -> int:
            self.reposts += 1
            return 1

    am = Alertmanager()
    leading = asyncio.Event()  # a standby first: it keeps what it replayed, and posts none of it
    d = Dispatcher(cfg, {"am": am}, SystemClock(), is_leader=leading.is_set)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop), name="test-dispatch")
    try:
        await asyncio.sleep(0.3)
        assert am.reposts == 0
        leading.set()

        async def reposted() -> bool:
            return am.reposts > 0
        await wait_until(reposted, 10, "the leader's re-post")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=300),
                 st.dictionaries(st.sampled_from(["kind", "outcome", "incident_id", "action", "details", "at",
                                                  "cluster", "id", "actor"]),
                                 st.one_of(st.text(max_size=12), st.integers(), st.none(),
                                           st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2)),
                                 max_size=9).map(lambda d: json.dumps(d).encode())))
def test_the_notifiers_decoders_are_total(data: bytes) -> None:
    rec = decode_record(data)
    assert rec is None or isinstance(rec, ActionRecord | StepSeen | Delivered)
    ch = decode_change(data)
    assert ch is None or isinstance(ch, IncidentChange)


def test_the_remediator_refuses_a_notify_section_whose_credential_is_missing(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app

    cfg = tmp_path / "remediator.yaml"
    cfg.write_text("cluster: c1\nnotify:\n  runbook_base: https://runbooks.example/breakfix/\n  channels:\n"
                   f"    - {{name: pd, type: pagerduty, routing_key_file: {tmp_path}/missing-key}}\n  default: [pd]\n")
    out = CliRunner().invoke(app, ["remediator", "--config", str(cfg)])
    assert out.exit_code == 2
    assert f"{tmp_path}/missing-key: channel pd: cannot read: No such file or directory" in out.output
    assert "Traceback" not in out.output


def test_the_remediator_refuses_a_notify_section_whose_runbook_links_cannot_be_followed(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app

    cfg = tmp_path / "remediator.yaml"
    cfg.write_text("cluster: c1\nnotify:\n  channels:\n    - {name: hook, type: webhook, url: https://h.example/}\n"
                   "  default: [hook]\n")
    out = CliRunner().invoke(app, ["remediator", "--config", str(cfg)])
    assert out.exit_code == 2
    (line,) = out.output.strip().splitlines()
    assert "runbook_base must be an http(s) URL" in line and "got 'runbooks/'" in line
