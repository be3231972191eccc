"""Conditional KV writes on the pipelined publisher: each writer gets its own revision, a stale one conflicts,
a key NATS would refuse is refused as before, and the store's revisions are what a read sees."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.js.errors
import pytest

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.protocol import KvConflict
from breakfix.bus.server import EmbeddedNats

B = "test-kv-pipelined"


async def test_concurrent_conditional_writes_get_their_revisions_and_stale_ones_conflict(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    bus = await JetStreamBus.connect(server.url)
    try:
        await bus.ensure_kv(B, history=5)
        created = await asyncio.gather(*(bus.kv_create(B, f"plan.inc-{i}", b"0") for i in range(200)))
        assert len(set(created)) == 200
        updated = await asyncio.gather(*(bus.kv_update(B, f"plan.inc-{i}", b"1", rev)
                                         for i, rev in enumerate(created)))
        for i, rev in enumerate(updated):
            got = await bus.kv_get(B, f"plan.inc-{i}")
            assert got is not None and got.value == b"1" and got.revision == rev
        with pytest.raises(KvConflict):
            await bus.kv_update(B, "plan.inc-0", b"2", created[0])  # someone wrote since that revision
        with pytest.raises(KvConflict):
            await bus.kv_create(B, "plan.inc-1", b"2")
        await bus.kv_delete(B, "plan.inc-2")
        again = await bus.kv_create(B, "plan.inc-2", b"3")  # over the tombstone
        assert (await bus.kv_get(B, "plan.inc-2")).revision == again  # type: ignore[union-attr]
        with pytest.raises(nats.js.errors.InvalidKeyError):
            await bus.kv_create(B, "not a key", b"x")
    finally:
        await bus.close()
        server.stop()
