"""The Bus protocol, against the real nats-server and against the in-memory fake, same tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from breakfix.bus.codec import decoder
from breakfix.bus.consumer import ConsumerSpec, run_consumer
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.memory import MemoryBus
from breakfix.bus.protocol import Bus, Delivery, subject_matches
from breakfix.bus.server import EmbeddedNats
from breakfix.bus.streamread import DirectGetUnavailable, read_direct
from breakfix.schemas import subjects
from breakfix.schemas.signal import Signal
from tests.conftest import sig, wait_until


@pytest.fixture(params=["jetstream", "memory"])
async def bus(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Bus]:
    if request.param == "memory":
        b: Bus = MemoryBus()
        await b.ensure_streams(subjects.STREAMS)
        yield b
        return
    server = EmbeddedNats(tmp_path / "nats").start()
    js = await JetStreamBus.connect(server.url)
    try:
        await js.ensure_streams(subjects.STREAMS)
        yield js
    finally:
        await js.close()
        server.stop()


async def drain(b: Bus, durable: str, n: int, filter_subject: str = subjects.SIGNALS_ALL) -> list[Delivery]:
    await b.ensure_consumer(stream=subjects.SIGNALS.name, durable=durable, filter_subject=filter_subject)
    got: list[Delivery] = []
    for _ in range(20):
        got += await b.pull(stream=subjects.SIGNALS.name, durable=durable, batch=100, timeout_s=0.2)
        if len(got) >= n:
            break
    return got


class TestSubjectMatch:
    @pytest.mark.parametrize(("pattern", "subject", "ok"), [
        ("breakfix.signals.>", "breakfix.signals.c.n", True),
        ("breakfix.signals.>", "breakfix.signals", False),
        ("breakfix.*.c", "breakfix.signals.c", True),
        ("breakfix.*.c", "breakfix.signals.c.n", False),
        ("a.b", "a.b", True),
    ])
    def test_wildcards(self, pattern: str, subject: str, ok: bool) -> None:
        assert subject_matches(pattern, subject) is ok


class TestBus:
    async def test_ensure_streams_again_keeps_messages_and_consumer_positions(self, bus: Any) -> None:
        s = sig()
        await bus.publish(subjects.signal_subject(s.cluster, s.node), s.model_dump_json().encode(), msg_id=s.id)
        got = await drain(bus, "idem", 1)
        await got[0].ack()
        await bus.ensure_streams(subjects.STREAMS)
        await bus.ensure_streams(subjects.STREAMS)
        assert await bus.stream_messages(subjects.SIGNALS.name) == 1
        state = await bus.consumer_state(subjects.SIGNALS.name, "idem")
        assert state is not None and state.num_pending == 0 and state.ack_floor == 1
        dup = await bus.publish(subjects.signal_subject(s.cluster, s.node), b"again", msg_id=s.id)
        assert dup.duplicate  # the duplicate window survived too

    async def test_consumer_state_is_none_for_a_missing_consumer_and_delete_reports_it(self, bus: Any) -> None:
        assert await bus.consumer_state(subjects.SIGNALS.name, "never") is None
        assert await bus.delete_consumer(subjects.SIGNALS.name, "never") is False
        await bus.ensure_consumer(stream=subjects.SIGNALS.name, durable="once", filter_subject=subjects.SIGNALS_ALL)
        assert await bus.delete_consumer(subjects.SIGNALS.name, "once") is True

    async def test_a_durable_ensured_with_a_new_filter_reads_only_what_the_new_filter_matches(self, bus: Any) -> None:
        stream = subjects.ACTIONS.name
        await bus.ensure_consumer(stream=stream, durable="narrowed", filter_subject=subjects.ACTIONS_ALL)
        await bus.publish(subjects.action_subject("c1"), b"own", msg_id="own-1")
        await bus.publish(subjects.oncall_subject("c1", "alice", "approve"), b"verb", msg_id="verb-1")
        await bus.ensure_consumer(stream=stream, durable="narrowed", filter_subject=subjects.HUMAN_ACTIONS_ALL)
        got = await bus.pull(stream=stream, durable="narrowed", batch=10, timeout_s=0.5)
        assert [(m.subject, m.data) for m in got] == [(subjects.oncall_subject("c1", "alice", "approve"), b"verb")]

    async def test_core_subscribers_see_publishes_until_they_unsubscribe(self, bus: Any) -> None:
        seen: list[tuple[str, bytes]] = []

        async def on_msg(subject: str, data: bytes) -> None:
            seen.append((subject, data))

        unsubscribe = await bus.subscribe(subjects.SIGNALS_ALL, on_msg)
        await bus.publish_core("breakfix.signals.c1.n1", b"one")
        await bus.flush()

        async def arrived() -> bool:
            return len(seen) == 1

        await wait_until(arrived, 5, "the core message")
        await unsubscribe()
        await bus.publish_core("breakfix.signals.c1.n1", b"two")
        await bus.flush()
        assert seen == [("breakfix.signals.c1.n1", b"one")]

        async def stored() -> bool:  # the stream captures core publishes (stored after the flush, not with it)
            return await bus.stream_messages(subjects.SIGNALS.name) == 2

        await wait_until(stored, 5, "both core publishes in the stream")

    async def test_repeated_msg_id_is_dropped(self, bus: Bus) -> None:
        s = sig()
        subj = subjects.signal_subject("c1", "n1")
        first = await bus.publish(subj, s.model_dump_json().encode(), msg_id=s.id)
        second = await bus.publish(subj, s.model_dump_json().encode(), msg_id=s.id)
        assert not first.duplicate and second.duplicate
        got = await drain(bus, "t-dedupe", 1)
        assert len(got) == 1

    async def test_unacked_message_is_redelivered_after_nak(self, bus: Bus) -> None:
        await bus.publish(subjects.signal_subject("c1", "n1"), b"x", msg_id="m1")
        [first] = await drain(bus, "t-nak", 1)
        await first.nak(delay=0.05)
        await asyncio.sleep(0.1)
        again = await drain(bus, "t-nak", 1)
        assert [m.data for m in again] == [b"x"]
        assert again[0].num_delivered == 2

    async def test_durable_consumer_resumes_where_it_acked(self, bus: Bus) -> None:
        for i in range(5):
            await bus.publish(subjects.signal_subject("c1", "n1"), str(i).encode(), msg_id=f"r{i}")
        first = await drain(bus, "t-resume", 5)
        for m in first[:3]:
            await m.ack()
        for m in first[3:]:
            await m.nak(delay=0.01)
        await asyncio.sleep(0.05)
        rest = await drain(bus, "t-resume", 2)
        assert sorted(m.data for m in rest) == [b"3", b"4"]


class TestConsumerLoop:
    async def test_malformed_message_is_dead_lettered_and_loop_keeps_going(self, bus: Bus) -> None:
        handled: list[Signal] = []

        async def handle(s: Signal, _m: Delivery) -> None:
            handled.append(s)

        subj = subjects.signal_subject("c1", "n1")
        await bus.publish(subj, b"{not json", msg_id="bad-1")
        await bus.publish(subj, b'{"schema": "breakfix.signal/v1"}', msg_id="bad-2")
        good = sig()
        await bus.publish(subj, good.model_dump_json(by_alias=True).encode(), msg_id=good.id)
        stop = asyncio.Event()
        spec = ConsumerSpec(subjects.SIGNALS.name, "t-dlq", subjects.SIGNALS_ALL, decoder(Signal), handle,
                            fetch_timeout_s=0.1)
        task = asyncio.create_task(run_consumer(bus, spec, stop=stop), name="t-dlq")

        async def got_good() -> bool:
            return bool(handled)

        await wait_until(got_good, 10, "the valid signal after two malformed ones")
        stop.set()
        stats = await task
        assert handled == [good]
        assert stats.dead_lettered == 2
        await bus.ensure_consumer(stream=subjects.DEAD_LETTERS.name, durable="t-dlq-read",
                                  filter_subject=subjects.DLQ_ALL)
        dead: list[Any] = []  # a pull hands out what has arrived: read until both dead letters are in
        while len(dead) < 2 and (got := await bus.pull(stream=subjects.DEAD_LETTERS.name, durable="t-dlq-read",
                                                         batch=10, timeout_s=1)):
            dead.extend(got)
        assert [m.data for m in dead] == [b"{not json", b'{"schema": "breakfix.signal/v1"}']
        assert all(m.headers[subjects.HDR_DLQ_SUBJECT] == subj for m in dead)
        assert "invalid Signal" in dead[1].headers[subjects.HDR_DLQ_REASON]

    async def test_handler_error_naks_and_message_is_retried(self, bus: Bus) -> None:
        calls: list[int] = []

        async def flaky(s: Signal, m: Delivery) -> None:
            calls.append(m.num_delivered)
            if len(calls) == 1:
                raise RuntimeError("store briefly unavailable")

        good = sig()
        await bus.publish(subjects.signal_subject("c1", "n1"), good.model_dump_json(by_alias=True).encode(),
                          msg_id=good.id)
        stop = asyncio.Event()
        spec = ConsumerSpec(subjects.SIGNALS.name, "t-retry", subjects.SIGNALS_ALL, decoder(Signal), flaky,
                            fetch_timeout_s=0.1, retry_delay_s=0.05)
        task = asyncio.create_task(run_consumer(bus, spec, stop=stop), name="t-retry")
        for _ in range(60):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.05)
        stop.set()
        stats = await task
        assert calls[:2] == [1, 2]
        assert stats.failed == 1 and stats.handled == 1


class TestEmbeddedServer:
    def test_server_listens_on_loopback_with_store_under_data_dir(self, nats_server: EmbeddedNats) -> None:
        assert nats_server.url.startswith("nats://127.0.0.1:")
        assert nats_server.running
        assert (nats_server.store_dir / "jetstream").exists()


async def test_a_stream_made_before_direct_gets_is_opened_to_them(tmp_path: Path) -> None:
    """History reads on a secured bus are direct gets; a stream an older version created gets allow_direct."""
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        bus = await JetStreamBus.connect(server.url)
        try:
            await bus._js.add_stream(name=subjects.INCIDENTS.name, subjects=list(subjects.INCIDENTS.subjects),
                                     duplicate_window=subjects.INCIDENTS.duplicate_window_s,
                                     max_age=subjects.INCIDENTS.max_age_s, max_msgs=5000, description="tuned")
            with pytest.raises(DirectGetUnavailable, match="503"):  # said, never a silently empty history
                await read_direct(bus._nc, subjects.INCIDENTS.name, subjects.INCIDENTS_ALL, since=None, idle_s=1,
                                  limit=10)
            await bus.ensure_streams(subjects.STREAMS)
            info = await bus._js.stream_info(subjects.INCIDENTS.name)
            assert info.config.allow_direct
            assert (info.config.max_msgs, info.config.description) == (5000, "tuned"), "what an operator tuned stays"
        finally:
            await bus.close()
    finally:
        server.stop()


async def test_a_stream_update_keeps_tuning_and_never_shortens_retention(tmp_path: Path) -> None:
    """A daemon start that must change a stream (here: its subjects) sends breakfix's fields only: an operator's
    longer retention, limits and description stay, so a restart never deletes stored history."""
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        bus = await JetStreamBus.connect(server.url)
        try:
            longer = subjects.ACTIONS.max_age_s * 2
            await bus._js.add_stream(name=subjects.ACTIONS.name, subjects=["breakfix.actions.old"], max_age=longer,
                                     max_msgs=5000, description="tuned", allow_direct=True)
            await bus._js.add_stream(name=subjects.DEAD_LETTERS.name, subjects=list(subjects.DEAD_LETTERS.subjects),
                                     max_age=3600.0, allow_direct=True)
            await bus.ensure_streams(subjects.STREAMS)
            actions = (await bus._js.stream_info(subjects.ACTIONS.name)).config
            assert actions.subjects == list(subjects.ACTIONS.subjects)
            assert (actions.max_age, actions.max_msgs, actions.description) == (longer, 5000, "tuned")
            dlq = (await bus._js.stream_info(subjects.DEAD_LETTERS.name)).config
            assert dlq.max_age == subjects.DEAD_LETTERS.max_age_s, "a shorter age than breakfix needs is raised"
        finally:
            await bus.close()
    finally:
        server.stop()
