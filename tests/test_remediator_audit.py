"""The audit writer: records are stored before their writer goes on, in the order written, many per round trip;
a failure reaches every writer it concerns; and the pipelined publisher keeps no acked publish alive."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from breakfix.bus.memory import MemoryBus
from breakfix.bus.pipeline import PipelinedPublisher
from breakfix.bus.protocol import PublishAck
from breakfix.remediator.audit import AuditWriter
from breakfix.schemas import subjects

SUBJECT = "breakfix.actions.c1"


async def stored(bus: MemoryBus) -> list[bytes]:
    return [m.data for m in bus.streams[subjects.ACTIONS.name].messages]


class FailingBus(MemoryBus):
    """A bus that refuses the records whose body says so, and so every batch that holds one."""

    async def publish_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[PublishAck]:
        if any(data.startswith(b"bad") for _, data, _ in items):
            raise RuntimeError("stream unavailable")
        return await super().publish_many(items)

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Any = None) -> PublishAck:
        if data.startswith(b"bad"):
            raise RuntimeError("stream unavailable")
        return await super().publish(subject, data, msg_id=msg_id, headers=headers)


async def test_concurrent_records_are_stored_in_order_in_fewer_rounds_before_writers_return() -> None:
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    writer = AuditWriter(bus, max_batch=16)
    done: list[int] = []

    async def write(i: int) -> None:
        await writer.write(SUBJECT, f"r{i}".encode(), f"id-{i}")
        assert f"r{i}".encode() in await stored(bus)  # durable by the time the writer goes on
        done.append(i)

    await asyncio.gather(*(write(i) for i in range(100)))
    assert await stored(bus) == [f"r{i}".encode() for i in range(100)]
    assert sorted(done) == list(range(100))
    assert writer.rounds < 100
    await writer.write(SUBJECT, b"r0", "id-0")  # the same id again: deduplicated by the stream
    assert len(await stored(bus)) == 100


async def test_a_refused_record_fails_only_its_own_writer_and_the_others_are_stored_in_order() -> None:
    bus = FailingBus()
    await bus.ensure_streams(subjects.STREAMS)
    writer = AuditWriter(bus, max_batch=8)
    bodies = [b"bad" if i == 3 else f"r{i}".encode() for i in range(10)]
    results = await asyncio.gather(*(writer.write(SUBJECT, b, f"id-{i}") for i, b in enumerate(bodies)),
                                   return_exceptions=True)
    assert [isinstance(r, RuntimeError) for r in results] == [i == 3 for i in range(10)]
    assert await stored(bus) == [b for b in bodies if b != b"bad"]
    with pytest.raises(RuntimeError, match="stream unavailable"):
        await writer.write(SUBJECT, b"bad again", "id-y")


async def test_a_record_written_from_inside_a_publish_does_not_wait_on_itself() -> None:
    bus = MemoryBus()
    await bus.ensure_streams(subjects.STREAMS)
    writer = AuditWriter(bus)

    async def echo(subject: str, data: bytes) -> None:
        if data == b"first":
            await writer.write(SUBJECT, b"echo", "id-echo")

    await bus.subscribe(subjects.ACTIONS_ALL, echo)
    await asyncio.wait_for(writer.write(SUBJECT, b"first", "id-first"), timeout=5)
    assert sorted(await stored(bus)) == [b"echo", b"first"]  # in the order the bus itself gives a nested publish


class _Client:
    """Enough of a nats-py client for the publisher: it acks every publish at once."""

    def __init__(self) -> None:
        self.cb: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.t"

    async def subscribe(self, subject: str, cb: Any, pending_msgs_limit: int) -> Any:
        self.cb = cb
        return self

    async def publish(self, subject: str, data: bytes, reply: str, headers: Any) -> None:
        class Msg:
            headers = None

        msg: Any = Msg()
        msg.subject, msg.data = reply, b'{"stream": "S", "seq": 1}'
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.cb(msg)))


async def test_the_pipelined_publisher_keeps_no_acked_publish_alive() -> None:
    pub = PipelinedPublisher(_Client(), max_pending=1000)  # type: ignore[arg-type]
    for _ in range(50):
        futs: list[Awaitable[PublishAck]] = [await pub.send("s", b"d", None) for _ in range(20)]
        await asyncio.gather(*futs)
    assert len(pub._order) <= 21  # what it keeps alive is the point of this test


class SlowBus(MemoryBus):
    async def publish_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[PublishAck]:
        await asyncio.sleep(0.05)
        return await super().publish_many(items)


async def test_drain_waits_for_records_already_written_even_when_their_writers_were_cancelled() -> None:
    bus = SlowBus()
    await bus.ensure_streams(subjects.STREAMS)
    writer = AuditWriter(bus, max_batch=4)
    tasks = [asyncio.create_task(writer.write(SUBJECT, f"r{i}".encode(), f"id-{i}"), name=f"w{i}") for i in range(10)]
    await asyncio.sleep(0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await writer.drain(timeout_s=5)
    assert await stored(bus) == [f"r{i}".encode() for i in range(10)]
