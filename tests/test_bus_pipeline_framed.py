"""The pipelined publisher's framed batches (``PipelinedPublisher.send_many``) against a real nats-server: the
server stores what nats-py's own ``publish`` would have sent, in order, with its msg-ids, and anything the framing
does not take goes through ``publish`` and fails as it did."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.pipeline import PipelinedPublisher, PublishError, _Batch
from breakfix.bus.protocol import PublishAck
from breakfix.bus.server import EmbeddedNats
from breakfix.schemas import subjects

Items = list[tuple[str, bytes, str | None]]


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[JetStreamBus]:
    b = await JetStreamBus.connect(nats_server.url, name="t")
    try:
        await b.ensure_streams(subjects.STREAMS)
        yield b
    finally:
        await b.close()


def _changes(n: int, *, cluster: str = "c1", tag: str = "a") -> Items:
    return [(subjects.incident_subject(cluster), f'{{"n":{i},"tag":"{tag}","pad":"{"x" * (i % 700)}"}}'.encode(),
             f"inc-{tag}-{i}:1") for i in range(n)]


async def _stored(bus: JetStreamBus) -> list[tuple[str, bytes, str | None]]:
    got: Items = []
    await bus.reset_consumer(stream=subjects.INCIDENTS.name, durable="read", filter_subject=subjects.INCIDENTS_ALL,
                             start_seq=1)
    while batch := await bus.pull(stream=subjects.INCIDENTS.name, durable="read", batch=1000, timeout_s=0.3):
        got.extend((m.subject, m.data, m.headers.get("Nats-Msg-Id")) for m in batch)
    return got


async def test_a_framed_batch_is_stored_in_order_with_each_msg_id_and_acked_one_by_one(
        bus: JetStreamBus, monkeypatch: pytest.MonkeyPatch) -> None:
    items = _changes(1500)  # more than one 64 KiB piece, and mixed sizes

    async def not_framed(*args: object, **kwargs: object) -> None:
        raise AssertionError("sent through nats-py's publish, not framed")

    monkeypatch.setattr(bus._nc, "publish", not_framed)
    acks = await (await bus.publish_start(items))
    monkeypatch.undo()
    assert [a.seq for a in acks] == list(range(1, 1501))
    assert not any(a.duplicate for a in acks)
    assert await _stored(bus) == items


async def test_a_re_sent_batch_is_dropped_by_the_msg_ids_as_duplicates(bus: JetStreamBus) -> None:
    items = _changes(50)
    await (await bus.publish_start(items))
    again = await (await bus.publish_start(items[10:20] + _changes(5, tag="b")))
    assert [a.duplicate for a in again] == [True] * 10 + [False] * 5
    assert len(await _stored(bus)) == 55


async def test_messages_without_a_msg_id_are_framed_as_plain_publishes(
        bus: JetStreamBus, monkeypatch: pytest.MonkeyPatch) -> None:
    await bus.ensure_kv("framed")

    async def not_framed(*args: object, **kwargs: object) -> None:
        raise AssertionError("sent through nats-py's publish, not framed")

    monkeypatch.setattr(bus._nc, "publish", not_framed)
    await (await bus.kv_put_start("framed", {f"k{i}": f"v{i}".encode() for i in range(20)}))
    monkeypatch.undo()
    assert (await bus.kv_get("framed", "k7")).value == b"v7"  # type: ignore[union-attr]
    assert len(await bus.kv_keys("framed")) == 20


@pytest.mark.parametrize(("bad", "error"), [
    ("breakfix.incidents.c 1", nats.errors.BadSubjectError),  # a space would split the command on the wire
    ("breakfix.incidents.c\r\n1", nats.errors.BadSubjectError),
])
async def test_a_batch_the_framing_cannot_write_goes_through_publish_and_fails_as_it_did(
        bus: JetStreamBus, bad: str, error: type[Exception]) -> None:
    items = _changes(3)
    with pytest.raises(error):
        await bus.publish_start([*items, (bad, b"{}", "x:1")])
    assert await (await bus.publish_start(_changes(2, tag="after"))) is not None  # the connection survived
    assert [s for s, _, _ in await _stored(bus)][-2:] == [subjects.incident_subject("c1")] * 2


async def test_a_payload_over_the_servers_limit_fails_the_batch_as_publish_did(bus: JetStreamBus) -> None:
    big = b"x" * (bus._nc.max_payload + 1)
    with pytest.raises(nats.errors.MaxPayloadError):
        await bus.publish_start([*_changes(2), (subjects.incident_subject("c1"), big, "big:1")])
    assert len(await _stored(bus)) == 2  # one by one: the two before it went out, as they always did


async def test_a_closed_connection_refuses_a_framed_batch(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    pub = PipelinedPublisher(nc)
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pub.send_many(_changes(3))


async def test_a_framed_batch_fails_with_the_first_refusal_and_the_rest_is_still_stored(bus: JetStreamBus) -> None:
    items = _changes(4)
    stray = ("breakfix.nowhere.c1", b"{}", "stray:1")  # no stream takes this subject: the server answers 503
    with pytest.raises(PublishError) as refused:
        await (await bus.publish_start([*items[:2], stray, *items[2:]]))
    assert refused.value.status == "503"
    assert [d for _, d, _ in await _stored(bus)] == [d for _, d, _ in items]
    assert await (await bus.publish_start(_changes(2, tag="next"))) is not None  # later batches are unaffected


async def test_a_batch_resolves_in_order_once_every_ack_is_in_and_ignores_acks_after_a_refusal() -> None:
    loop = asyncio.get_running_loop()
    ok = _Batch(3, loop.create_future())
    for i in (2, 0, 1):
        assert not ok.done.done()
        ok.take(i, PublishAck(stream="S", seq=10 + i, duplicate=False))
    assert [a.seq for a in ok.done.result()] == [10, 11, 12]
    bad = _Batch(3, loop.create_future())
    bad.take(0, PublishAck(stream="S", seq=1, duplicate=False))
    bad.take(1, PublishError("wrong last sequence", err_code=10071))
    bad.take(2, PublishAck(stream="S", seq=3, duplicate=False))
    exc = bad.done.exception()
    assert isinstance(exc, PublishError) and exc.err_code == 10071


@pytest.fixture
async def quiet(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A client whose publishes on ``quiet.>`` reach a subscriber that never answers: no ack, no 503."""
    nc = await nats.connect(nats_server.url)

    async def ignore(_msg: Msg) -> None:
        return None

    try:
        await nc.subscribe("quiet.>", cb=ignore)
        yield nc
    finally:
        await nc.close()


def _quiet(*tags: str) -> Items:
    return [("quiet.a", tag.encode(), f"m-{tag}") for tag in tags]


async def test_a_batch_its_caller_gave_up_on_neither_blocks_nor_cancels_the_next_one(quiet: Client) -> None:
    pub = PipelinedPublisher(quiet, max_pending=4)
    first = await pub.send_many(_quiet("1", "2"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first, 0.1)  # what publish_start's acks() does after 30 s
    assert first.cancelled() and not pub._batched  # its tokens went with it
    second = await asyncio.wait_for(pub.send_many(_quiet("3", "4", "5")), 2)  # at capacity before the fix
    assert not second.done()
    second.cancel()


async def test_a_connection_closed_while_a_batch_waits_for_room_refuses_the_batch(quiet: Client) -> None:
    pub = PipelinedPublisher(quiet, max_pending=2)
    first = await pub.send_many(_quiet("1", "2"))
    second = asyncio.create_task(pub.send_many(_quiet("3", "4")), name="waits-for-room")
    await asyncio.sleep(0.2)
    assert not second.done()  # waiting for the first batch's acks
    await quiet.close()
    first.cancel()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await asyncio.wait_for(second, 2)


async def test_a_batch_that_fails_while_it_is_written_leaves_nothing_waiting(quiet: Client) -> None:
    pub = PipelinedPublisher(quiet)
    with pytest.raises(TypeError):
        await pub.send_many([("quiet.a", b"1", "m1"), ("quiet.a", "not bytes", "m2")])  # type: ignore[list-item]
    assert not pub._batched and all(f.done() for f in pub._order)
