"""Storm traffic for load tests and benchmarks: a leaf-switch failure plus flapping throttles.

Every GPU of the fleet speaks once a second for ``duration_s`` (the collectors' resync
heartbeat, healthy), the nodes under each failed leaf switch report their InfiniBand rail
ports down on every heartbeat, and ``flapping`` GPUs toggle a hardware-slowdown throttle at
``flap_hz``. The correct outcome is one fabric incident per failed switch and one incident
per flapping GPU; ``tests/test_correlator_service.py`` and ``benchmarks/run.py`` check that.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from breakfix.collectors.fleet import Fleet
from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id


@dataclass(frozen=True, slots=True)
class Storm:
    signals: list[Signal]
    failed_switches: tuple[str, ...]
    flapping: tuple[str, ...]  # "<node>/<gpu index>"


def _signal(fleet: Fleet, node: str, labels: dict[str, str], check: str, healthy: bool, at: datetime,
            n: int, **kw: object) -> Signal:
    gpu = kw.get("gpu")
    component = kw.get("component")
    return Signal.model_validate({
        "id": make_signal_id(cluster=fleet.cluster, node=node, source="sim", check=check, code=None, healthy=healthy,
                             observed_at=at, gpu=gpu, component=component,  # type: ignore[arg-type]
                             discriminator=str(n)),
        "cluster": fleet.cluster, "node": node, "source": SignalSource.SIM, "check": check, "healthy": healthy,
        "severity": Severity.INFO if healthy else Severity.WARNING, "labels": labels, "observed_at": at,
        "message": f"{check} {'ok' if healthy else 'fault'} on {node}", **kw})


def switch_storm(fleet: Fleet, *, start: datetime, duration_s: float = 10.0, failed_switches: int = 2,
                 flapping: int = 100, flap_hz: float = 10.0, seed: int = 11) -> Storm:
    rng = random.Random(seed)
    switches = sorted({n.labels["switch"] for n in fleet.nodes})
    failed = tuple(rng.sample(switches, min(failed_switches, len(switches))))
    gpus = [(node, g) for node in fleet.nodes for g in node.gpus]
    flap = rng.sample(gpus, min(flapping, len(gpus)))
    flap_ids = {(node.name, g.ref.index) for node, g in flap}
    out: list[Signal] = []
    n = 0
    for second in range(int(duration_s)):
        for node in fleet.nodes:
            down = node.labels["switch"] in failed
            for g in node.gpus:
                at = start + timedelta(seconds=second + rng.random())
                n += 1
                if down:
                    out.append(_signal(fleet, node.name, node.labels, "ib.link_down", False, at, n,
                                       component=f"mlx5_{g.ref.index}/1"))
                elif (node.name, g.ref.index) not in flap_ids:
                    out.append(_signal(fleet, node.name, node.labels, "clock.hw_slowdown", True, at, n, gpu=g.ref))
    ticks = int(duration_s * flap_hz)
    for node, g in flap:
        for k in range(ticks):
            n += 1
            at = start + timedelta(seconds=k / flap_hz)
            out.append(_signal(fleet, node.name, node.labels, "clock.hw_slowdown", k % 2 == 1, at, n, gpu=g.ref))
    out.sort(key=lambda s: s.observed_at)
    return Storm(out, failed, tuple(sorted(f"{a}/{b}" for a, b in flap_ids)))
