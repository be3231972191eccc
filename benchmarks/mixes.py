"""Signal mixes for the correlator benchmarks (deterministic, seeded).

- ``fleet_hour``: an hour of a 10,000-GPU fleet as the collectors send it: every GPU's resync
  heartbeat every 5 minutes, 200 GPUs flapping a hardware-slowdown throttle, 40 bad GPUs
  repeating their XIDs, 30 jobs hitting application XIDs, InfiniBand links flapping under two
  leaf switches, a few new hardware faults, and 3 % collector re-sends. This is the mix the
  correlator issue's "realistic" throughput target is measured on.
- ``stress_mix``: a change-heavy worst case: a third of the signals open or change an incident
  (random XIDs, DBEs and throttles spread over the whole fleet).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from breakfix.collectors.fleet import Fleet, SimGpu, SimNodeSpec, build_fleet
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def _sig(node: SimNodeSpec, g: SimGpu | None, check: str, code: str | None, healthy: bool, at: datetime, n: int,
         component: str | None = None, tenant: bool = True) -> Signal:
    return Signal(
        id=make_signal_id(cluster="bench", node=node.name, source="sim", check=check, code=code, healthy=healthy,
                          observed_at=at, gpu=g.ref if g else None, component=component, discriminator=str(n)),
        cluster="bench", node=node.name, source=SignalSource.SIM, check=check, code=code, healthy=healthy,
        gpu=g.ref if g else None, component=component, tenant=g.tenant if g and tenant else None,
        message=f"{check} {code or ''}", labels=dict(node.labels), observed_at=at)


def fleet_hour(seed: int = 3, fleet: Fleet | None = None) -> list[Signal]:
    rng = random.Random(seed)
    fleet = fleet or build_fleet(1250)
    nodes = list(fleet.nodes)
    out: list[Signal] = []
    n = 0

    def add(node: SimNodeSpec, g: SimGpu | None, check: str, code: str | None, healthy: bool, t: float,
            **kw: object) -> None:
        nonlocal n
        n += 1
        out.append(_sig(node, g, check, code, healthy, T0 + timedelta(seconds=t), n, **kw))  # type: ignore[arg-type]

    for tick in range(12):  # resync heartbeats: every GPU, every 5 minutes
        for node in nodes:
            for g in node.gpus:
                add(node, g, "ecc.dbe", None, True, tick * 300 + rng.random() * 300, tenant=False)
    flappers = rng.sample([(nd, g) for nd in nodes for g in nd.gpus], 200)
    for nd, g in flappers:  # throttles toggling every ~30 s
        start = rng.random() * 60
        for k in range(120):
            add(nd, g, "clock.hw_slowdown", None, k % 2 == 1, start + k * 30, tenant=False)
    every_gpu = [(nd, g) for nd in nodes for g in nd.gpus]
    for bad_node, bad_gpu in rng.sample(every_gpu, 40):  # bad GPUs repeating XIDs
        code = rng.choice(["48", "63", "94", "74"])
        for _ in range(rng.randrange(20, 120)):
            add(bad_node, bad_gpu, "xid", code, False, rng.random() * 3600)
    for job_node, job_gpu in rng.sample(every_gpu, 30):  # jobs with application XIDs
        for _ in range(rng.randrange(10, 80)):
            add(job_node, job_gpu, "xid", rng.choice(["13", "31", "43"]), False, rng.random() * 3600)
    leaves = [nd for nd in nodes if nd.labels["switch"] in ("leaf-07", "leaf-42")]
    for _ in range(30):  # IB links flapping under two leaf switches
        nd = rng.choice(leaves)
        t = rng.random() * 3500
        add(nd, None, "ib.link_down", None, False, t, component="mlx5_0/1")
        add(nd, None, "ib.link_down", None, True, t + 20 + rng.random() * 60, component="mlx5_0/1")
    for _ in range(20):  # new hardware faults
        nd = rng.choice(nodes)
        add(nd, rng.choice(nd.gpus), "xid", rng.choice(["79", "48", "173", "95"]), False, rng.random() * 3600)
    for _ in range(len(out) * 3 // 100):  # collector re-sends
        out.append(out[rng.randrange(len(out))])
    out.sort(key=lambda s: s.observed_at)
    return out


def stress_mix(n: int, seed: int = 7) -> list[Signal]:
    """Throttle flaps, app XIDs, DBEs with remaps, off-the-bus, re-sends, spread over the fleet."""
    rng = random.Random(seed)
    fleet = build_fleet(1250)
    out: list[Signal] = []
    kinds = [("clock.hw_slowdown", None, 0.45), ("xid", "13", 0.2), ("xid", "31", 0.1), ("xid", "48", 0.05),
             ("xid", "63", 0.05), ("xid", "45", 0.05), ("ecc.dbe", None, 0.05), ("xid", "79", 0.01),
             ("xid", "173", 0.04)]
    weights = [k[2] for k in kinds]
    for i in range(n):
        if out and rng.random() < 0.05:
            out.append(out[rng.randrange(len(out))])  # a re-send
            continue
        check, code, _ = rng.choices(kinds, weights)[0]
        node = fleet.node(rng.randrange(len(fleet.nodes)) if rng.random() < 0.3 else rng.randrange(40))
        g = node.gpus[rng.randrange(8)]
        healthy = check == "clock.hw_slowdown" and rng.random() < 0.5
        out.append(_sig(node, g, check, code, healthy, T0 + timedelta(milliseconds=i * 5), i))
    return out
