"""One ``breakfix simulate`` run: the same trace for every contender, results side by side.

Called by the CLI (``breakfix.cli.cli_simulate``), the benchmarks and the tests. Policies come as
loaded ``Policy`` objects with their names; baselines by name (``simulate.baselines``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from breakfix.remediator.policy import Policy
from breakfix.schemas.catalog import Catalog
from breakfix.simulate.baselines import baseline
from breakfix.simulate.engine import Contender, Engine, RunResult
from breakfix.simulate.model import FailureModel
from breakfix.simulate.trace import generate


@dataclass(frozen=True)
class Setup:
    nodes: int = 2000
    days: float = 30.0
    seed: int = 1


def contenders(policies: list[tuple[str, Policy]], baselines: list[str], catalog: Catalog) -> list[Contender]:
    return [Contender(name, pol) for name, pol in policies] + [baseline(b, catalog) for b in baselines]


def simulate(model: FailureModel, catalog: Catalog, who: list[Contender], setup: Setup, *,
             on_day: Callable[[str, int], None] | None = None) -> list[RunResult]:
    """Run every contender over one trace drawn from ``model`` with ``setup.seed``."""
    trace = generate(model, nodes=setup.nodes, days=setup.days, seed=setup.seed)
    out: list[RunResult] = []
    for c in who:
        # the engine never mutates a Fault, so every contender reads the very same trace
        eng = Engine(model, catalog, trace, nodes=setup.nodes, days=setup.days, contender=c)
        cb = (lambda d, name=c.name: on_day(name, d)) if on_day is not None else None
        out.append(asyncio.run(eng.run(cb)))
    return out
