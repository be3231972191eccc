"""The lean pull loop (``bus.puller``) against a real nats-server: a pull request whose end never arrives."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from breakfix.bus.codec import encode
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.puller import EXPIRY_GRACE_S, BatchPuller
from breakfix.bus.server import EmbeddedNats
from breakfix.schemas import subjects
from tests.conftest import sig, wait_until


class StatusLosingPuller(BatchPuller):
    """A puller whose request-ending status messages (408 expired) are lost, as they are when the server sends
    them while the client is reconnecting."""

    lost = 0

    async def _on_msg(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status") and not msg.data:
            self.lost += 1
            return
        await super()._on_msg(msg)


@pytest.fixture
async def consumer(nats_server: EmbeddedNats) -> AsyncIterator[tuple[JetStreamBus, Client]]:
    """A real server with the signal stream and a durable ``c`` on it; breakfix's bus, and a plain client to pull on."""
    bus = await JetStreamBus.connect(nats_server.url, name="t")
    nc = await nats.connect(nats_server.url)
    try:
        await bus.ensure_streams(subjects.STREAMS)
        await bus.reset_consumer(stream=subjects.SIGNALS.name, durable="c", filter_subject=subjects.SIGNALS_ALL,
                                 start_seq=1)
        yield bus, nc
    finally:
        await nc.close()
        await bus.close()


async def test_a_pull_request_whose_expiry_status_is_lost_does_not_wedge_the_consumer(
        consumer: tuple[JetStreamBus, Client]) -> None:
    bus, nc = consumer
    puller = StatusLosingPuller(nc, subjects.SIGNALS.name, "c")
    assert await puller.pull(64, 0.1) == []  # the request expires on the server; its 408 is lost here

    async def lost_one() -> bool:
        return puller.lost >= 1

    await wait_until(lost_one, 5, "the server to end the first request")
    s = sig(node="n1")
    await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=s.id)
    got: list[bytes] = []

    async def delivered() -> bool:
        got.extend(m.data for m in await puller.pull(64, 0.1))
        return bool(got)

    await wait_until(delivered, 10, "the signal published after the lost status to be pulled")
    assert got == [encode(s)]


async def test_a_late_status_of_an_expired_request_does_not_end_the_request_sent_after_it(
        consumer: tuple[JetStreamBus, Client]) -> None:
    bus, nc = consumer
    puller = BatchPuller(nc, subjects.SIGNALS.name, "c")
    requests: list[str] = []
    publish = nc.publish

    async def counted(subject: str, payload: bytes = b"", reply: str = "", headers: object = None) -> None:
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            requests.append(reply)
        await publish(subject, payload, reply=reply)

    nc.publish = counted  # type: ignore[method-assign]
    s = sig(node="n1")
    await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s), msg_id=s.id)
    assert len(await puller.pull(64, 2.0)) == 1  # request 1 brought one message and is still out
    assert len(requests) == 1
    time.sleep(2.0 + EXPIRY_GRACE_S + 0.2)  # noqa: ASYNC251  the loop is busy past request 1's deadline: its
    # 408 arrives meanwhile and is read only after it
    assert await puller.pull(64, 2.0) == []  # request 2 goes out; request 1's late 408 is read
    assert len(requests) == 2
    started = time.monotonic()
    assert await puller.pull(64, 2.0) == []  # request 2 is still out: waited on, not doubled
    assert len(requests) == 2 and time.monotonic() - started > 1.0
