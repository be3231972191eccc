"""The ``breakfix`` command line (typer): the pipeline on a simulated fleet, replays, contracts.

``demo`` runs the whole pipeline on embedded defaults; ``replay`` correlates and decides over a
recorded JSONL of signals with no NATS; ``schema export`` regenerates the JSON Schemas;
``catalog`` explains a fault code. The daemons, the offline sources and the operator commands
are registered from ``cli_daemons``, ``cli_signals`` and ``cli_ops`` on the same ``app``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from breakfix.cli import logs
from breakfix.cli.cliutil import app, err, fail, load, out, schema_app
from breakfix.schemas.datafile import read_text

MAX_REPLAY_BYTES = 256 * 1024 * 1024

__all__ = ["app", "cli_bus", "cli_console", "cli_daemons", "cli_oncall", "cli_ops", "cli_signals", "cli_simulate",
           "main"]


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(min=1, max=10_000, help="Simulated nodes (8 GPUs each).")] = 16,
    scenario: Annotated[str, typer.Option(help="Bundled scenario name or a YAML file (may list failures:).")] = "mixed",
    duration: Annotated[float, typer.Option(min=1, help="Stop after this many seconds at most.")] = 60.0,
    data_dir: Annotated[Path | None, typer.Option(help="Keep NATS data here (default: a temp dir).")] = None,
    policy: Annotated[Path | None, typer.Option(help="Remediation policy YAML, honoured as written.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Record what would be done; touch nothing.")] = False,
    speed: Annotated[float, typer.Option(min=0.1, help="Replay speed factor.")] = 1.0,
    fmt: Annotated[str, typer.Option("--format", help="table, or json: incidents and the full audit trail")] = "table",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show daemon logs.")] = False,
    console: Annotated[bool, typer.Option("--console", help="Then serve the SRE console on it until Ctrl-C.")] = False,
    secure: Annotated[bool, typer.Option("--secure", help="Run over TLS with one JWT identity per process "
                                                         "(breakfix bus init in the data dir).")] = False,
) -> None:
    """Run collectors, correlator and remediator over a simulated fleet and print what happened."""
    from breakfix.cli.demo import demo_json, load_demo_scenario, run_demo, temp_data_dir
    from breakfix.cli.render import print_demo
    from breakfix.remediator.policy import load_policy
    from breakfix.schemas.catalog import load_catalog

    if fmt not in ("table", "json"):
        raise fail(f"--format must be table or json, not {fmt!r}")
    logs.configure(json=False, level="INFO" if verbose else "WARNING")
    catalog = load(load_catalog)
    scen, failures = load(lambda: load_demo_scenario(scenario))
    pol = load(lambda: load_policy(policy))
    if dry_run:
        pol = pol.model_copy(update={"dry_run": True})
    def say(line: str) -> None:
        (err if fmt == "json" else out).print(f"  {line}", highlight=False)

    say(f"breakfix demo: {scen.name} - {scen.description}")
    temp = None if data_dir is not None else temp_data_dir()
    # with --console the demo's data must outlive the run: the folder is removed after the console stops
    keep = temp if console else None
    try:
        result = asyncio.run(run_demo(scenario=scen, nodes=nodes, data_dir=data_dir or temp or Path("."),
                                      catalog=catalog, policy=pol, duration_s=duration, speed=speed,
                                      policy_given=policy is not None, failures=failures,
                                      temp_dir=None if console else temp, secure=secure, progress=say))
        if fmt == "json":
            sys.stdout.write(demo_json(result) + "\n")
        else:
            print_demo(result, out)
            # the console over the demo's data (hook: breakfix.cli.cli_console)
            cli_console.demo_console(data_dir or temp or Path("."), serve=console)
    finally:
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)


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
    load(lambda: read_text(signals, MAX_REPLAY_BYTES))  # size, binary, UTF-8: refused before line-by-line reading
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


_CODE = re.compile(r"^(?:xid\s*)?(?P<xid>\d{1,5})$|^(?P<dcgm>DCGM_FR_[A-Z0-9_]{1,80})$", re.IGNORECASE)
ARCHS = (("applies_a100", "A100"), ("applies_h100", "H100"), ("applies_b100", "B100"), ("applies_gb200", "GB200"))


def _xid_row(xid: int) -> dict[str, str]:
    """The catalog CSV row of one XID (architectures are not on the loaded entry)."""
    import csv

    from breakfix.schemas.catalog import CATALOG_DIR

    with (CATALOG_DIR / "xid_catalog.csv").open(newline="", encoding="utf-8") as fh:
        return next((row for row in csv.DictReader(fh) if row.get("xid") == str(xid)), {})


@app.command()
def catalog(
    code: Annotated[str, typer.Argument(help="XID number (79, xid79) or DCGM_FR_* code.")],
    fmt: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Show how breakfix classifies one fault code: NVIDIA's mnemonic and buckets, architectures, the runbook."""
    from breakfix.schemas.catalog import load_catalog

    if fmt not in ("text", "json"):
        raise fail(f"--format must be text or json, not {fmt!r}")
    m = _CODE.match(code.strip())
    if m is None:
        raise fail(f"{code!r} is not a fault code: give an XID number (e.g. 79) or a DCGM_FR_* code "
                   "(e.g. DCGM_FR_VOLATILE_DBE_DETECTED)")
    cat = load(load_catalog)
    info: dict[str, object]
    if m.group("xid"):
        xid = int(m.group("xid"))
        fc = cat.xid(str(xid))
        entry = cat.xids.get(xid)
        row = _xid_row(xid) if entry else {}
        info = {"code": str(xid), "kind": "xid", "mnemonic": entry.mnemonic if entry else None,
                "description": entry.description if entry else None,
                "immediate_bucket": entry.immediate_bucket if entry else None,
                "investigatory_bucket": entry.investigatory_bucket if entry else None,
                "architectures": [name for col, name in ARCHS if row.get(col, "").upper() == "YES"]}
    else:
        fc = cat.dcgm_code(m.group("dcgm").upper())
        info = {"code": m.group("dcgm").upper(), "kind": "dcgm", "mnemonic": None, "description": None,
                "immediate_bucket": cat.dcgm.get(m.group("dcgm").upper()), "investigatory_bucket": None,
                "architectures": []}
    info.update({"category": fc.category, "severity": fc.severity.value, "domain": fc.domain.value,
                 "nvidia_bucket": fc.bucket, "known": fc.known, "title": fc.title, "source": fc.source,
                 "runbook": f"runbooks/{fc.category}.md"})
    if fmt == "json":
        out.print_json(json.dumps(info))
        return
    head = f"{'XID ' if info['kind'] == 'xid' else ''}{info['code']}"
    lines = [f"[bold]{escape(head)}[/bold]  {escape(str(info['mnemonic'] or ''))}"]
    if info["description"]:
        lines.append(f"  {escape(str(info['description']))}")
    if not fc.known:
        lines.append("  [yellow]not a known fault in NVIDIA's catalog: the cautious path (cordon, escalate)[/yellow]")
    archs = info["architectures"]
    rows = [("category", f"{fc.category} ({fc.domain.value} domain, {fc.severity.value})"),
            ("NVIDIA buckets", f"immediate {info['immediate_bucket'] or '-'}, "
                               f"investigatory {info['investigatory_bucket'] or '-'}"),
            ("architectures", ", ".join(archs) if isinstance(archs, list) and archs else "-"),
            ("runbook", str(info["runbook"])), ("source", fc.source or "-")]
    lines += [f"  {k:<15}{escape(v)}" for k, v in rows]
    out.print("\n".join(lines), highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("breakfix")
        except PackageNotFoundError:
            v = "unknown"
        out.print(f"breakfix {v}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """GPU health and break-fix for GPU clusters."""


# The other command groups register on the same app, after these (so `breakfix --help` lists
# the demo first).
from breakfix.cli import cli_bus, cli_console, cli_daemons, cli_oncall, cli_ops, cli_signals, cli_simulate  # noqa: E402


def main() -> None:  # pragma: no cover
    app()
