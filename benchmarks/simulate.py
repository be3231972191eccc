"""``breakfix simulate`` speed: simulated GPU-hours per wall second, per contender and in all.

The target (issue 17): 30 days of a 2,000-node, 16,000-GPU fleet under the default policy and the
three baselines in under 60 s on one core. Reported by ``make bench`` (``benchmarks/run.py``).
"""

from __future__ import annotations

import time

from breakfix.remediator.policy import load_policy
from breakfix.schemas.catalog import load_catalog
from breakfix.simulate.model import load_failure_model
from breakfix.simulate.run import Setup, contenders, simulate


def bench_simulate(nodes: int = 2000, days: float = 30.0) -> dict[str, object]:
    model = load_failure_model()
    catalog = load_catalog()
    who = contenders([("default", load_policy())], ["naive-reboot", "cordon-and-wait", "none"], catalog)
    gpu_hours = nodes * model.fleet.gpus_per_node * days * 24
    per: dict[str, float] = {}
    t_all = time.perf_counter()
    for c in who:
        t0 = time.perf_counter()
        simulate(model, catalog, [c], Setup(nodes=nodes, days=days, seed=1))
        per[c.name] = round(gpu_hours / (time.perf_counter() - t0))
    wall = time.perf_counter() - t_all
    return {"nodes": nodes, "days": days, "wall_s_all_contenders": round(wall, 2), "target_wall_s": 60,
            "simulated_gpu_hours_per_wall_s": per,
            "simulated_gpu_hours_per_wall_s_all": round(gpu_hours * len(who) / wall)}
