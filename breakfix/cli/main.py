"""The ``breakfix`` command line (typer): the pipeline on a simulated fleet, replays, contracts.

``demo`` runs the whole pipeline on embedded defaults; ``replay`` correlates and decides over a
recorded JSONL of signals with no NATS; ``schema export`` regenerates the JSON Schemas;
``catalog`` explains a fault code. The daemons, the offline sources and the operator commands
are registered from ``cli_daemons``, ``cli_signals`` and ``cli_ops`` on the same ``app``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from breakfix.cli import logs
from breakfix.cli.cliutil import app, err, fail, load, out, schema_app

__all__ = ["app", "cli_console", "cli_daemons", "cli_oncall", "cli_ops", "cli_signals", "cli_simulate", "main"]


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(min=1, max=10_000, help="Simulated nodes (8 GPUs each).")] = 16,
    scenario: Annotated[str, typer.Option(help="Bundled scenario name or a YAML file.")] = "mixed",
    duration: Annotated[float, typer.Option(min=1, help="Stop after this many seconds at most.")] = 60.0,
    data_dir: Annotated[Path | None, typer.Option(help="Keep NATS data here (default: a temp dir).")] = None,
    policy: Annotated[Path | None, typer.Option(help="Remediation policy YAML.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Record what would be done; touch nothing.")] = False,
    speed: Annotated[float, typer.Option(min=0.1, help="Replay speed factor.")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show daemon logs.")] = False,
    console: Annotated[bool, typer.Option("--console", help="Then serve the SRE console on it until Ctrl-C.")] = False,
) -> None:
    """Run collectors, correlator and remediator over a simulated fleet and print what happened."""
    from breakfix.cli.demo import run_demo
    from breakfix.cli.render import print_demo
    from breakfix.collectors.sim import load_scenario
    from breakfix.remediator.policy import load_policy
    from breakfix.schemas.catalog import load_catalog

    logs.configure(json=False, level="INFO" if verbose else "WARNING")
    catalog = load(load_catalog)
    scen = load(lambda: load_scenario(scenario))
    pol = load(lambda: load_policy(policy))
    if dry_run:
        pol = pol.model_copy(update={"dry_run": True})
    out.print(f"[bold]breakfix demo[/bold]: {scen.name} - {scen.description}")

    def run(d: Path) -> None:
        result = asyncio.run(run_demo(scenario=scen, nodes=nodes, data_dir=d, catalog=catalog, policy=pol,
                                      duration_s=duration, speed=speed, progress=lambda s: out.print(f"  {s}")))
        print_demo(result, out)
        cli_console.demo_console(d, serve=console)  # the console over the demo's data (hook: breakfix.cli.cli_console)

    if data_dir is not None:
        run(data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="breakfix-demo-") as d:
            run(Path(d))


@app.command()
def replay(
    signals: Annotated[Path, typer.Argument(help="JSONL file, one Signal per line.")],
    policy: Annotated[Path | None, typer.Option(help="Remediation policy YAML.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    skip_invalid: Annotated[bool, typer.Option(help="Report broken lines and go on.")] = False,
) -> None:
    """Correlate recorded signals and decide plans, using each signal's observed_at as the clock."""
    from breakfix.cli.render import incident_table
    from breakfix.cli.replay import ReplayError
    from breakfix.cli.replay import replay as do_replay
    from breakfix.remediator.policy import load_policy
    from breakfix.schemas.catalog import load_catalog

    if fmt not in ("table", "json"):
        raise fail(f"--format must be table or json, not {fmt!r}")
    catalog = load(load_catalog)
    pol = load(lambda: load_policy(policy))
    errors: list[str] = []
    try:
        incidents = do_replay(signals, catalog=catalog, policy=pol, skip_invalid=skip_invalid, errors=errors)
    except ReplayError as exc:
        raise fail(str(exc)) from None
    for e in errors:
        err.print(f"[yellow]skipped:[/yellow] {e}", highlight=False)
    if fmt == "json":
        for inc in incidents:
            sys.stdout.write(inc.model_dump_json(by_alias=True) + "\n")
    else:
        out.print(incident_table(incidents, f"Incidents from {signals}"))


@schema_app.command("export")
def schema_export() -> None:
    """Regenerate schemas/json/*.json from the pydantic models."""
    from breakfix.schemas.export import export

    for p in export():
        out.print(f"wrote {p}")


@schema_app.command("check")
def schema_check() -> None:
    """Exit 1 when schemas/json is stale."""
    from breakfix.schemas.export import stale

    bad = stale()
    if bad:
        err.print(f"stale JSON Schema files: {', '.join(bad)}; run 'breakfix schema export'")
        raise typer.Exit(1)
    out.print("schemas/json is up to date")


@app.command()
def catalog(code: Annotated[str, typer.Argument(help="XID number or DCGM_FR_* code.")]) -> None:
    """Show how breakfix classifies one fault code, and NVIDIA's source for it."""
    from breakfix.schemas.catalog import load_catalog

    cat = load(load_catalog)
    fc = cat.dcgm_code(code) if code.startswith("DCGM_FR_") else cat.xid(code)
    out.print_json(json.dumps({"code": code, "category": fc.category, "severity": fc.severity.value,
                               "domain": fc.domain.value, "nvidia_bucket": fc.bucket, "known": fc.known,
                               "title": fc.title, "source": fc.source}))


# The other command groups register on the same app, after these (so `breakfix --help` lists
# the demo first).
from breakfix.cli import cli_console, cli_daemons, cli_oncall, cli_ops, cli_signals, cli_simulate  # noqa: E402


def main() -> None:  # pragma: no cover
    app()
