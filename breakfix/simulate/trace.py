"""The failure trace: which faults start where and when, drawn once per seed from a failure model.

Pure given its seed: every policy and baseline in one ``breakfix simulate`` run sees the very same
list of ``Fault``s. Arrivals of each process are a Poisson process over the whole fleet
(exponential inter-arrival times at rate x entities); the entity is uniform. Per-fault coin flips
(does it need RMA, does a weaker action happen to fix it) are drawn here too, so they do not depend
on the order in which a policy happens to act.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from breakfix.simulate.model import FailureModel, Process

MAX_FAULTS = 2_000_000  # a cap on the trace, far above any sane model (guards a typo'd rate)


@dataclass(slots=True)
class Fault:
    """One fault on one entity. ``node``/``gpu`` are indexes; ``gpu`` is None for node and switch faults,
    whose ``nodes`` list every node they touch."""

    id: int
    process: Process
    start_s: float
    nodes: tuple[int, ...]
    gpu: int | None
    needs_rma: bool
    lesser_rolls: tuple[float, ...] = field(default=())  # one uniform draw per repair attempt

    def lesser_fixes(self, attempt: int) -> bool:
        """Does a weaker-than-needed action fix it on this attempt?"""
        p = self.process.lesser_fail_probability
        roll = self.lesser_rolls[attempt % len(self.lesser_rolls)] if self.lesser_rolls else 1.0
        return roll >= p


def generate(model: FailureModel, *, nodes: int, days: float, seed: int) -> list[Fault]:
    """Every fault of ``days`` on a fleet of ``nodes`` nodes, in start order."""
    if nodes < 1 or days <= 0:
        raise ValueError("nodes must be >= 1 and days > 0")
    rng = random.Random(seed)
    gpn = model.fleet.gpus_per_node
    per_switch = model.fleet.nodes_per_switch
    switches = max(1, -(-nodes // per_switch))
    horizon_s = days * 86400.0
    drawn: list[tuple[float, Process, tuple[int, ...], int | None]] = []
    for proc in model.processes:
        count = {"gpu": nodes * gpn, "node": nodes, "switch": switches}[proc.per]
        lam_per_s = model.rate(proc) * count / 3600.0
        t = rng.expovariate(lam_per_s)
        while t < horizon_s:
            if len(drawn) >= MAX_FAULTS:
                raise ValueError(f"the model draws more than {MAX_FAULTS} faults; check the rates")
            k = rng.randrange(count)
            if proc.per == "gpu":
                drawn.append((t, proc, (k // gpn,), k % gpn))
            elif proc.per == "node":
                drawn.append((t, proc, (k,), None))
            else:
                members = tuple(range(k * per_switch, min(nodes, (k + 1) * per_switch)))
                drawn.append((t, proc, members, None))
            t += rng.expovariate(lam_per_s)
    drawn.sort(key=lambda d: (d[0], d[1].name, d[2], d[3] if d[3] is not None else -1))
    out: list[Fault] = []
    for i, (t, proc, where, gpu) in enumerate(drawn):
        out.append(Fault(id=i, process=proc, start_s=t, nodes=where, gpu=gpu,
                         needs_rma=rng.random() < proc.rma_probability,
                         lesser_rolls=tuple(rng.random() for _ in range(4))))
    return out
