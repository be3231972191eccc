"""180 days of a 1,000-node fleet through the correlator core: memory stays flat after warm-up (issue 12 item 6).

Every simulated day: 20 hardware faults (most remediated, some escalated and never touched again, some
cleared by a healthy reading), 10 application faults, 5 non-fatal SXids, repeats, 50 healthy heartbeats and
the remediator's records; at the end of the day the service's housekeeping (``close_stale``, ``expire``).
The core's state is measured with tracemalloc after warm-up (the 30-day stale age plus retention) and at the
end; the figure is printed (``-s``) and quoted in the README. Duplicate detection remembers
``evidence.seen_ids`` signal ids, a fixed bound; the test lowers it so the bound is reached during warm-up.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from datetime import timedelta

from breakfix.correlator.app import CorrelatorConfig, build_core
from breakfix.correlator.checkpoint import Checkpoint
from breakfix.correlator.grouping import Correlator
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, IncidentStatus
from tests.conftest import T0, make_rules, sig

NODES = 1000
DAYS = 180
WARM_UP = 45


def day_of_signals(rng: random.Random, day: int) -> list:  # type: ignore[type-arg]
    base = day * 86400.0
    out = []
    for i in range(20):
        node, g = f"node-{rng.randrange(NODES):04d}", rng.randrange(8)
        out += [sig(node=node, gpu_index=g, code=rng.choice(["48", "95", "119", "64"]), at=base + i * 1200 + k, n=k)
                for k in range(3)]
        if i % 8 == 7:
            out.append(sig(node=node, gpu_index=g, check="ecc.dbe", code=None, at=base + i * 1200 + 5))
            out.append(sig(node=node, gpu_index=g, check="ecc.dbe", code=None, healthy=True, at=base + i * 1200 + 60))
    for i in range(10):
        node = f"node-{rng.randrange(NODES):04d}"
        pod = f"job{rng.randrange(500)}-{rng.randrange(4):05d}"  # a fleet's pods come and go from a finite set
        out.append(sig(node=node, gpu_index=rng.randrange(8), code="13", at=base + 300 + i * 1800,
                       tenant=TenantRef(namespace=f"team{i % 7}", pod=pod)))
    for i in range(5):
        out.append(sig(node=f"node-{rng.randrange(NODES):04d}", check="sxid", code="20009", gpu_index=None,
                       component="nvswitch0:0000:c3:00.0", at=base + 500 + i * 4000, details={"fatal": "Non-fatal"}))
    for i in range(50):
        out.append(sig(node=f"node-{rng.randrange(NODES):04d}", gpu_index=rng.randrange(8),
                       check="clock.hw_slowdown", code=None, healthy=True, at=base + i * 340))
    out.sort(key=lambda s: s.observed_at)
    return out


def core_bytes(catalog: Catalog, core: Correlator) -> int:
    """The memory of the core's state, measured with tracemalloc: the state restored into a fresh core (every
    index and incident the core keeps is in its checkpoint form; the class cache is a fixed-size LRU)."""
    state = Checkpoint.decode(Checkpoint(core.to_state()).encode()).state
    fresh = build_core(CorrelatorConfig(catalog=catalog, rules=core.rules))
    gc.collect()
    tracemalloc.start()
    try:
        fresh.load_state(state)
        del state
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_180_days_of_a_1000_node_fleet_keep_core_memory_flat(catalog: Catalog) -> None:
    rng = random.Random(180)
    core = build_core(CorrelatorConfig(catalog=catalog, rules=make_rules(evidence={"seen_ids": 1000})))
    sizes: dict[int, int] = {}
    for day in range(DAYS):
        n = 0
        for s in day_of_signals(rng, day):
            for ch in core.ingest(s, s.observed_at):
                inc = ch.incident
                n += 1
                if ch.kind.value == "opened" and inc.status is IncidentStatus.OPEN and n % 10 != 0:
                    outcome = ActionOutcome.COMPLETED if n % 10 else ActionOutcome.ESCALATED
                    core.apply_action(ActionRecord(id=f"r-{inc.id}", cluster="c1", incident_id=inc.id,
                                                   kind=ActionKind.PLAN, outcome=outcome, actor="sim",
                                                   at=s.observed_at + timedelta(minutes=30)), s.observed_at)
        end = T0 + timedelta(days=day + 1)
        core.close_stale(end)
        core.expire(end)
        if day in (WARM_UP, DAYS - 1):
            sizes[day] = core_bytes(catalog, core)
    print("\ncorrelator core state (tracemalloc): " + ", ".join(f"day {d}: {b / 1e6:.2f} MB" for d, b in sizes.items())
          + f"; {len(core.incidents)} incidents held; stats {core.stats}")
    assert core.stats["expired"] > 2500, "settled and stale incidents were forgotten"
    assert not any(i.status is IncidentStatus.ESCALATED and (T0 + timedelta(days=DAYS) - i.last_seen).days > 31
                   for i in core.incidents.values()), "no escalated incident outlives the maximum age"
    warm = sizes[WARM_UP]
    assert all(b < warm * 1.15 for b in sizes.values()), f"memory grew after warm-up: {sizes}"
