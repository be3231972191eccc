"""``breakfix simulate``: compare remediation policies and baselines on one simulated month.

Reads the failure model (bundled, or ``--failures FILE``) and policies (``--policy FILE``, any
number; the bundled default when none), runs ``breakfix.simulate.run.simulate`` with a progress
bar of simulated days, and prints a table or JSON; ``--out DIR`` also writes ``report.json``
and the PNG plots.
"""

from __future__ import annotations

import json
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from breakfix.cli.cliutil import app, fail, load, out


class Baseline(StrEnum):
    NAIVE_REBOOT = "naive-reboot"
    CORDON_AND_WAIT = "cordon-and-wait"
    NONE = "none"


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"


@app.command("simulate")
def simulate_cmd(
    nodes: Annotated[int, typer.Option(min=1, max=100_000, help="Nodes in the simulated fleet.")] = 2000,
    days: Annotated[float, typer.Option(min=0.01, max=366, help="Simulated days.")] = 30.0,
    failures: Annotated[Path | None, typer.Option(help="Failure model YAML (default: the bundled one).")] = None,
    policy: Annotated[list[Path] | None, typer.Option(help="Policy file; repeat to compare several.")] = None,
    baseline: Annotated[list[Baseline] | None, typer.Option(help="Baseline(s); default: all three.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the failure trace (same seed, same trace).")] = 1,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write report.json and PNG plots here.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="table or json.")] = Format.TABLE,
) -> None:
    """A month of a fleet's failures through the real correlator, decide() and executor, per policy."""
    import math

    from rich.progress import Progress

    from breakfix.remediator.policy import DEFAULT_POLICY, Policy, load_policy
    from breakfix.schemas.catalog import load_catalog
    from breakfix.simulate.model import DEFAULT_MODEL, load_failure_model
    from breakfix.simulate.report import plots, table, to_json
    from breakfix.simulate.run import Setup, contenders, simulate

    if not math.isfinite(days):
        raise fail("--days must be a finite number")
    model = load(lambda: load_failure_model(failures))
    catalog = load(load_catalog)
    paths = policy or [DEFAULT_POLICY]
    named: list[tuple[str, Policy]] = []
    for p in paths:
        name = "default" if p == DEFAULT_POLICY else p.stem
        if any(n == name for n, _ in named):
            name = str(p)
        named.append((name, load(partial(load_policy, p))))
    bases = [b.value for b in (baseline if baseline is not None else list(Baseline))]
    who = contenders(named, bases, catalog)
    setup = Setup(nodes=nodes, days=days, seed=seed)
    with Progress(transient=True, disable=fmt is Format.JSON) as bar:
        task = bar.add_task("simulating", total=len(who) * math.ceil(days))

        def tick(name: str, _day: int) -> None:
            bar.update(task, advance=1, description=f"simulating {name}")

        results = simulate(model, catalog, who, setup, on_day=tick)
    doc = to_json(results, nodes=nodes, days=days, seed=seed, model=str(failures or DEFAULT_MODEL))
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "report.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            written = plots(results, out_dir)
        except OSError as exc:
            raise fail(f"{out_dir}: cannot write: {exc.strerror or exc}") from None
    if fmt is Format.JSON:
        print(json.dumps(doc, indent=2))
        return
    out.print(table(doc))
    if out_dir is not None:
        out.print(f"wrote {out_dir / 'report.json'} and {', '.join(str(p) for p in written)}")
