"""Months of uptime, the remediator's half: 180 simulated days of a 1,000-node fleet through its guard state
(opens, holds, budget slots, executed actions, finished plans, breaker queue) written through the guard keeper
(which prunes on every write) and through its incident memory (``latest``: finished incidents forgotten after
the retention window, LRU-capped). Memory measured with tracemalloc stays flat after a 30-day warm-up, and the
stored guard record stays bounded."""

from __future__ import annotations

import asyncio
import random
import tracemalloc

from breakfix.bus.clock import ManualClock
from breakfix.bus.memory import MemoryBus
from breakfix.remediator.keeper import GUARDS_KEY
from breakfix.remediator.policy import Policy
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.simcluster import SimCluster
from breakfix.remediator.store import MemoryStore
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import ChangeKind, Incident, IncidentChange, IncidentScope, IncidentStatus, StepAction
from tests.conftest import T0

NODES, DAYS, PER_DAY = 1000, 180, 24  # ~3x the Llama 3 interruption rate per node
CATEGORIES = (("gpu_reset_required", StepAction.RESET_GPU), ("node_reboot_required", StepAction.REBOOT),
              ("gpu_drain_reset_required", StepAction.RESET_GPU))


async def one_day(svc: RemediatorService, clock: ManualClock, rng: random.Random, day: int) -> None:
    g = svc.guards
    for k in range(PER_DAY):
        clock.advance(86400 / PER_DAY)
        now = clock.now()
        node, gpu = f"n{rng.randrange(NODES)}", rng.randrange(8)
        category, action = CATEGORIES[k % len(CATEGORIES)]
        iid = f"inc-{day}-{k}"
        inc = Incident(id=iid, cluster="c1", scope=IncidentScope.GPU, node=node, nodes=(node,),
                       gpus=(GpuRef(index=gpu),), category=category, severity=Severity.CRITICAL,
                       codes=("xid:48",), first_seen=now, last_seen=now)
        g.observe_open(node, now, svc.policy.guards.breaker, NODES)
        g.hold(node, iid, category)
        g.start(node, iid)
        g.record_action(f"{node}/gpu{gpu}" if action is StepAction.RESET_GPU else node, action, now)
        g.finish(node, iid, now, inc)
        g.unhold(iid)
        if k % 40 == 0:  # a few incidents wait on the breaker and are re-driven
            g.queued[iid] = now
            g.reset_breaker()
        done = inc.model_copy(update={"status": IncidentStatus.RESOLVED, "resolved_at": now, "version": 3})
        await svc.on_change(IncidentChange(kind=ChangeKind.RESOLVED, incident=done, at=now), None)  # type: ignore[arg-type]
        if k % 4 == 0:  # the keeper's write-behind coalesces bursts of changes into one write
            await svc.keeper.write()


def test_half_a_year_of_a_thousand_nodes_keeps_remediator_memory_flat(policy: Policy) -> None:
    async def run() -> tuple[int, int, int, int]:
        clock = ManualClock(T0)
        store = MemoryStore()
        svc = RemediatorService(MemoryBus(), SimCluster(), policy, clock, cluster="c1", store=store)
        rng = random.Random(7)
        tracemalloc.start()
        try:
            for day in range(30):
                await one_day(svc, clock, rng, day)
            warm, _ = tracemalloc.get_traced_memory()
            for day in range(30, DAYS):
                await one_day(svc, clock, rng, day)
            end, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        entry = await store.get(GUARDS_KEY)
        assert entry is not None
        return warm, end, len(svc.latest), len(str(entry.value))

    warm, end, remembered, stored = asyncio.run(run())
    assert remembered <= 2 * PER_DAY, "finished incidents are forgotten after the retention window (1 day)"
    assert stored < 200_000, "the guard record in KV stays bounded"
    growth = end - warm
    print(f"remediator memory after 30 days {warm / 1024:.0f} KiB, after {DAYS} days {end / 1024:.0f} KiB "
          f"(growth {growth / 1024:.0f} KiB); {DAYS * PER_DAY} incidents; guard record {stored} bytes")
    assert growth < 0.1 * warm + 256 * 1024, f"memory grew {growth} bytes over 150 days after warm-up"
