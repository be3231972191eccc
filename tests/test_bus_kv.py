"""The KeyValue protocol, against the real nats-server and against the in-memory fake, same tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.memory import MemoryBus
from breakfix.bus.protocol import KeyValue, KvConflict, KvEntry
from breakfix.bus.server import EmbeddedNats
from tests.conftest import wait_until

B = "test-kv"


class KvBus(KeyValue, Protocol):
    async def close(self) -> None: ...


@pytest.fixture(params=["jetstream", "memory"])
async def kv(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[KvBus]:
    if request.param == "memory":
        m = MemoryBus()
        await m.ensure_kv(B, history=5)
        yield m
        return
    server = EmbeddedNats(tmp_path / "nats").start()
    js = await JetStreamBus.connect(server.url)
    try:
        await js.ensure_kv(B, history=5)
        yield js
    finally:
        await js.close()
        server.stop()


class TestKeyValue:
    async def test_exists_finds_a_bucket_and_never_creates_a_missing_one(self, kv: KvBus) -> None:
        assert await kv.kv_exists(B)
        assert not await kv.kv_exists("test-kv-absent")
        assert not await kv.kv_exists("test-kv-absent"), "asking does not create it"

    async def test_missing_key_reads_none(self, kv: KvBus) -> None:
        assert await kv.kv_get(B, "nope") is None

    async def test_put_then_get_returns_value_and_revision(self, kv: KvBus) -> None:
        rev = await kv.kv_put(B, "a.b", b"one")
        got = await kv.kv_get(B, "a.b")
        assert got == KvEntry(key="a.b", value=b"one", revision=rev)

    async def test_create_on_existing_key_conflicts(self, kv: KvBus) -> None:
        await kv.kv_create(B, "k", b"1")
        with pytest.raises(KvConflict):
            await kv.kv_create(B, "k", b"2")
        assert (await kv.kv_get(B, "k")) is not None
        assert (await kv.kv_get(B, "k")).value == b"1"  # type: ignore[union-attr]

    async def test_update_at_stale_revision_conflicts_and_current_revision_wins(self, kv: KvBus) -> None:
        r1 = await kv.kv_create(B, "k", b"1")
        r2 = await kv.kv_update(B, "k", b"2", r1)
        assert r2 > r1
        with pytest.raises(KvConflict):
            await kv.kv_update(B, "k", b"stale", r1)
        assert (await kv.kv_get(B, "k")) == KvEntry("k", b"2", r2)

    async def test_deleted_key_reads_none_and_can_be_created_again(self, kv: KvBus) -> None:
        await kv.kv_create(B, "k", b"1")
        await kv.kv_delete(B, "k")
        assert await kv.kv_get(B, "k") is None
        assert await kv.kv_keys(B) == []
        await kv.kv_create(B, "k", b"again")
        assert (await kv.kv_get(B, "k")).value == b"again"  # type: ignore[union-attr]

    async def test_keys_filters_by_prefix_and_sorts(self, kv: KvBus) -> None:
        for k in ("plan.b", "plan.a", "guards"):
            await kv.kv_put(B, k, b"x")
        assert await kv.kv_keys(B, "plan.") == ["plan.a", "plan.b"]
        assert await kv.kv_keys(B) == ["guards", "plan.a", "plan.b"]

    async def test_empty_bucket_has_no_keys(self, kv: KvBus) -> None:
        assert await kv.kv_keys(B) == []

    async def test_ensure_kv_twice_keeps_the_values(self, kv: KvBus) -> None:
        await kv.kv_put(B, "k", b"v")
        await kv.ensure_kv(B, history=5)
        assert (await kv.kv_get(B, "k")).value == b"v"  # type: ignore[union-attr]

    async def test_watch_yields_current_values_then_changes_and_deletes(self, kv: KvBus) -> None:
        await kv.kv_put(B, "p.one", b"1")
        await kv.kv_put(B, "other", b"x")
        seen: list[KvEntry] = []
        it = kv.kv_watch(B, "p.")

        async def collect() -> None:
            async for e in it:
                seen.append(e)
                if len(seen) == 3:
                    return

        task = asyncio.create_task(collect(), name="kv-watch-test")

        async def current_seen() -> bool:
            return bool(seen)

        await wait_until(current_seen, 5, "the watch to yield the current value")
        await kv.kv_put(B, "p.two", b"2")
        await kv.kv_put(B, "other", b"y")
        await kv.kv_delete(B, "p.one")
        await asyncio.wait_for(task, 5)
        assert [(e.key, e.value) for e in seen] == [("p.one", b"1"), ("p.two", b"2"), ("p.one", None)]
