"""What the SRE on call reads: ``breakfix incidents`` and ``breakfix audit INCIDENT``.

Both read the incident index (JetStream KV ``breakfix-incidents``, the latest version of every
incident, written by the correlator), so they load in time proportional to the incidents kept,
not to the history; ``audit`` adds the incident's records from ``BREAKFIX_ACTIONS`` (read from
the incident's first sighting on). ``--format json`` prints one JSON document per line;
``--watch`` keeps printing changes until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
import typer

from breakfix.cli import listing
from breakfix.cli.cliutil import NatsFlags, app, err, fail, out, with_nats
from breakfix.schemas.incident import ActionRecord, Incident

FormatOpt = Annotated[str, typer.Option("--format", help="table or json")]


def _check_format(fmt: str) -> None:
    """Check ``--format``; logs go to stderr so stdout stays the listing (or clean JSON)."""
    from breakfix.cli import logs

    if fmt not in ("table", "json"):
        raise fail(f"--format must be table or json, not {fmt!r}")
    logs.configure(json=False, level="WARNING")


def _errors() -> tuple[type[BaseException], ...]:
    from breakfix.console.oncall import BUS_ERRORS, OncallError

    return (*BUS_ERRORS, OncallError)


def _run_reader(main: Callable[[], Coroutine[Any, Any, None]], url: str) -> None:
    """Run a reading command until it ends or Ctrl-C; a bus failure is one line and exit 2."""
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except _errors() as exc:
        raise fail(f"cannot read from {url}: {exc or type(exc).__name__}") from None


@app.command()
@with_nats()
def incidents(
    nats: NatsFlags,
    cluster: Annotated[str | None, typer.Option(envvar="BREAKFIX_CLUSTER", help="Only this cluster.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include resolved and folded incidents.")] = False,
    fmt: FormatOpt = "table",
    watch: Annotated[bool, typer.Option("--watch", help="Keep printing changes until Ctrl-C.")] = False,
) -> None:
    """Every incident as it is now (open and escalated first), from the incident index."""
    from breakfix.console.oncall import connect
    from breakfix.correlator.index import IncidentIndex

    _check_format(fmt)
    opts = nats.options()

    async def main() -> None:
        bus = await connect(opts, name="breakfix-cli")
        try:
            idx = IncidentIndex(bus)
            now = datetime.now(UTC)
            # a short-lived reader of 10,000s of small objects: no collector passes over them until printed
            gc.disable()
            try:
                values = [e.value for e in await idx.entries(cluster) if e.value is not None]
                rows, docs, broken = listing.select(values, show_all=show_all, with_docs=fmt == "json")
                if fmt == "json":
                    sys.stdout.buffer.write(b"".join(orjson.dumps(doc) + b"\n" for doc in docs))
                    sys.stdout.flush()
                else:
                    title = f"{len(rows)} incidents" + (f" in {cluster}" if cluster else "")
                    listing.print_rows(rows, now, title)
            finally:
                gc.enable()
            if broken:
                err.print(f"[yellow]skipped {broken} undecodable index entries[/yellow]")
            if watch:
                await _watch(idx, cluster, fmt, {r["id"]: r.get("version", 1) for r in rows}, show_all)
        finally:
            await bus.close()

    _run_reader(main, opts.url)


async def _watch(idx: object, cluster: str | None, fmt: str, seen: dict[str, int], show_all: bool) -> None:
    """Print incidents whose version moved on: listed ones (also when they resolve), and new ones."""
    from breakfix.correlator.index import IncidentIndex

    assert isinstance(idx, IncidentIndex)
    async for _key, inc in idx.watch(cluster):
        if inc is None or seen.get(inc.id) == inc.version:
            continue
        r = listing.row_of(inc)
        if inc.id not in seen and not listing.shown(r, show_all):
            continue
        seen[inc.id] = inc.version
        if fmt == "json":
            sys.stdout.write(inc.model_dump_json(by_alias=True) + "\n")
            sys.stdout.flush()
        else:
            out.print(" ".join(listing.line(r, datetime.now(UTC))), highlight=False)


def _print_audit(inc: Incident, records: list[ActionRecord]) -> None:
    i = inc
    out.print(f"[bold]{i.id}[/bold] {i.category} ({i.domain.value}, {i.severity.value}) {i.status.value}"
              f"{' waiting on ' + i.waiting.value if i.waiting else ''}: {i.title}")
    out.print(f"  where: {i.cluster}/{i.node or ','.join(i.nodes)} gpus={','.join(g.label() for g in i.gpus) or '-'} "
              f"tenants={','.join(t.key() for t in i.tenants) or '-'} parent={i.parent or '-'}", highlight=False)
    out.print(f"  counts: {', '.join(f'{c.key}={c.count}' for c in i.counts)}; flaps={i.flaps}; "
              f"time to repair={i.time_to_repair_s if i.time_to_repair_s is not None else '-'}s", highlight=False)
    out.print(f"  runbook: runbooks/{i.category}.md", highlight=False)
    for e in i.timeline:
        out.print(f"  {e.at.isoformat()} {e.event}: {e.note}", highlight=False)
    for ev in i.evidence[:5]:
        out.print(f"  evidence: {ev}", highlight=False)
    for r in records:
        _print_record(r)


def _print_record(r: ActionRecord) -> None:
    what = r.action.value if r.action else r.kind.value
    out.print(f"  {r.at.isoformat()} {what}={r.outcome.value} by {r.actor} ({r.rule or r.kind.value}): {r.reason}",
              highlight=False)


@app.command()
@with_nats()
def audit(
    incident: Annotated[str, typer.Argument(help="Incident id.")],
    nats: NatsFlags,
    fmt: FormatOpt = "table",
    watch: Annotated[bool, typer.Option("--watch", help="Keep printing new records until Ctrl-C.")] = False,
) -> None:
    """Why an incident exists and everything done about it: timeline, evidence, every action record."""
    from breakfix.console.oncall import connect, read_records
    from breakfix.correlator.index import IncidentIndex
    from breakfix.schemas import subjects

    _check_format(fmt)
    opts = nats.options()
    missing = False

    async def main() -> None:
        nonlocal missing
        bus = await connect(opts, name="breakfix-cli")
        try:
            inc = await IncidentIndex(bus).find(incident)
            if inc is None:
                missing = True
                return
            records = await read_records(bus, cluster=inc.cluster, since=inc.first_seen - timedelta(minutes=5),
                                         incident=inc.id)
            if fmt == "json":
                sys.stdout.write(json.dumps({"incident": inc.model_dump(mode="json", by_alias=True),
                                             "records": [r.model_dump(mode="json", by_alias=True) for r in records]})
                                 + "\n")
            else:
                _print_audit(inc, records)
            if not watch:
                return
            seen = {r.id for r in records}
            queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

            async def on_msg(_subject: str, data: bytes) -> None:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(data)

            await bus.subscribe(subjects.action_subject(inc.cluster), on_msg)
            await bus.subscribe(subjects.action_subject(inc.cluster) + ".>", on_msg)
            while True:
                data = await queue.get()
                try:
                    rec = ActionRecord.model_validate_json(data)
                except ValueError:
                    continue
                if rec.incident_id != inc.id or rec.id in seen:
                    continue
                seen.add(rec.id)
                if fmt == "json":
                    sys.stdout.write(rec.model_dump_json(by_alias=True) + "\n")
                    sys.stdout.flush()
                else:
                    _print_record(rec)
        finally:
            await bus.close()

    _run_reader(main, opts.url)
    if missing:
        raise fail(f"no incident {incident} on {opts.url}")
