"""The simulation report: one entry per policy and baseline, side by side.

Built from each contender's ``RunResult`` (``simulate.engine``). ``to_json`` is the
``report.json`` document; ``table`` renders the terminal table; ``plots`` writes PNGs
(capacity lost over time, time-to-repair distributions) with matplotlib's Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from breakfix.simulate.engine import RunResult


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def entry(r: RunResult) -> dict[str, Any]:
    """One contender's figures (hours and GPU-hours rounded to 0.1)."""
    led = r.ledger
    ttr = led.repair_times()
    every = [v for vs in ttr.values() for v in vs]
    return {
        "name": r.name, "kind": r.kind, "faults": r.faults, "incidents": r.incidents, "plans": r.plans,
        "gpu_hours_lost": round(led.gpu_hours_lost(), 1),
        "faulty_in_service_gpu_hours": round(led.faulty_in_service_gpu_hours(), 1),
        "jobs_interrupted": round(led.jobs_interrupted),
        "healthy_gpus_disrupted": led.healthy_disrupted,
        "pages": led.pages,
        "rma_opened": r.rma_opened, "rma_not_needed": r.rma_unneeded,
        "refusals": dict(sorted(r.refusals.items())),
        "time_to_repair_h": {
            "all": {"p50": round(_pct(every, 0.5) / 3600, 2), "p90": round(_pct(every, 0.9) / 3600, 2),
                    "repaired": len(every)},
            **{cause: {"p50": round(_pct(v, 0.5) / 3600, 2), "p90": round(_pct(v, 0.9) / 3600, 2),
                       "repaired": len(v)} for cause, v in sorted(ttr.items())},
        },
    }


def to_json(results: list[RunResult], *, nodes: int, days: float, seed: int, model: str) -> dict[str, Any]:
    return {"nodes": nodes, "days": days, "seed": seed, "failure_model": model,
            "entries": [entry(r) for r in results]}


def table(doc: dict[str, Any]) -> Table:
    t = Table(title=f"{doc['nodes']} nodes, {doc['days']:g} days, seed {doc['seed']}: "
                    f"{doc['entries'][0]['faults'] if doc['entries'] else 0} faults", expand=False)
    for col in ("policy", "GPU-h lost", "faulty in service GPU-h", "jobs hit", "healthy GPUs hit", "pages",
                "TTR p50/p90 h", "RMAs (unneeded)"):
        t.add_column(col, justify="right" if col != "policy" else "left", overflow="fold")
    for e in doc["entries"]:
        ttr = e["time_to_repair_h"]["all"]
        t.add_row(e["name"], f"{e['gpu_hours_lost']:,.0f}", f"{e['faulty_in_service_gpu_hours']:,.0f}",
                  f"{e['jobs_interrupted']:,}", f"{e['healthy_gpus_disrupted']:,}", f"{e['pages']:,}",
                  f"{ttr['p50']:.1f}/{ttr['p90']:.1f}", f"{e['rma_opened']} ({e['rma_not_needed']})")
    return t


def plots(results: list[RunResult], out: Path) -> list[Path]:
    """capacity.png (GPUs out of service per hour) and ttr.png (repair-time distributions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in results:
        series = r.ledger.capacity_lost_series()
        ax.plot([i / 24 for i in range(len(series))], series, label=r.name, linewidth=1.2)
    ax.set_xlabel("day")
    ax.set_ylabel("GPUs out of service (hourly mean)")
    ax.set_title("Capacity lost over time")
    ax.legend()
    fig.tight_layout()
    p = out / "capacity.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    data = [[v / 3600 for vs in r.ledger.repair_times().values() for v in vs] or [0.0] for r in results]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(results) + 1), [r.name for r in results])
    ax.set_yscale("symlog")
    ax.set_ylabel("hours from fault to repaired and back in service")
    ax.set_title("Time to repair")
    fig.tight_layout()
    p = out / "ttr.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written
