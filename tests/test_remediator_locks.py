"""``remediator.locks.KeyedLocks``: one holder per key at a time, and no entry left once nobody holds or waits."""

from __future__ import annotations

import asyncio

from breakfix.remediator.locks import KeyedLocks


async def test_one_holder_per_key_and_the_entry_goes_with_the_last_user() -> None:
    locks, order = KeyedLocks(), []

    async def plan(name: str, key: str, gate: asyncio.Event) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await gate.wait()
            order.append(f"{name}-")

    first, second, other = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(plan("a", "n1", first), name="a"),
             asyncio.create_task(plan("b", "n1", second), name="b"),
             asyncio.create_task(plan("c", "n2", other), name="c")]
    await asyncio.sleep(0.01)
    assert order == ["a+", "c+"], "b waits for a on the same node; c runs on another node"
    assert len(locks) == 2
    other.set()
    first.set()
    await asyncio.sleep(0.01)
    assert order[-1] == "b+" and "n1" in locks and "n2" not in locks
    second.set()
    await asyncio.gather(*tasks)
    assert len(locks) == 0, "nothing kept once every plan has finished"


async def test_a_cancelled_waiter_leaves_no_entry_behind() -> None:
    locks, gate = KeyedLocks(), asyncio.Event()

    async def holder() -> None:
        async with locks.hold("n1"):
            await gate.wait()

    async def waiter() -> None:
        async with locks.hold("n1"):
            pass

    h = asyncio.create_task(holder(), name="holder")
    await asyncio.sleep(0)
    w = asyncio.create_task(waiter(), name="waiter")
    await asyncio.sleep(0.01)
    w.cancel()
    await asyncio.gather(w, return_exceptions=True)
    gate.set()
    await h
    assert len(locks) == 0
