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
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from breakfix.cli.cliutil import app, fail, out
from breakfix.schemas.incident import ActionRecord, Incident

NatsOpt = Annotated[str, typer.Option(envvar=["BREAKFIX_NATS", "BREAKFIX_NATS_URL"], help="NATS URL.")]
CredsOpt = Annotated[Path | None, typer.Option(envvar="BREAKFIX_NATS_CREDS", help="NATS user creds file.")]
FormatOpt = Annotated[str, typer.Option("--format", help="table or json")]
DEFAULT_NATS = "nats://127.0.0.1:4222"


def shown(inc: Incident, show_all: bool) -> bool:
    return show_all or ((not inc.status.terminal or inc.status.value == "escalated") and inc.parent is None)


def order(rows: list[Incident]) -> list[Incident]:
    return sorted(rows, key=lambda i: (i.status.terminal, -i.severity.rank, i.first_seen, i.id))


def since(inc: Incident, now: datetime) -> str:
    s = int((now - inc.first_seen).total_seconds())
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def line(inc: Incident, now: datetime) -> list[str]:
    where = f"{inc.cluster}/{inc.node or ','.join(inc.nodes) or '-'}"
    if inc.gpus:
        where += " gpu " + ",".join(g.label() for g in inc.gpus)
    blast = ",".join(t.key() for t in (*inc.tenants, *inc.impact)) or "-"
    plan = f"{inc.plan.rule}: {' -> '.join(inc.plan.actions())}" if inc.plan else "-"
    return [inc.id, since(inc, now), where, inc.category, inc.severity.value, inc.domain.value, inc.status.value,
            inc.waiting.value if inc.waiting else "-", blast, plan]


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "json"):
        raise fail(f"--format must be table or json, not {fmt!r}")


def _errors() -> tuple[type[BaseException], ...]:
    import nats.errors

    from breakfix.console.oncall import OncallError

    return (OSError, TimeoutError, nats.errors.Error, OncallError)


def _bus_error(nats: str, exc: BaseException) -> typer.Exit:
    return fail(f"cannot read from {nats}: {exc or type(exc).__name__}")


@app.command()
def incidents(
    nats: NatsOpt = DEFAULT_NATS,
    creds: CredsOpt = None,
    cluster: Annotated[str | None, typer.Option(envvar="BREAKFIX_CLUSTER", help="Only this cluster.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include resolved and folded incidents.")] = False,
    fmt: FormatOpt = "table",
    watch: Annotated[bool, typer.Option("--watch", help="Keep printing changes until Ctrl-C.")] = False,
) -> None:
    """Every incident as it is now (open and escalated first), from the incident index."""
    from rich.table import Table

    from breakfix.console.oncall import connect
    from breakfix.correlator.index import IncidentIndex

    _check_format(fmt)

    async def main() -> None:
        bus = await connect(nats, creds=creds, name="breakfix-cli")
        try:
            idx = IncidentIndex(bus)
            now = datetime.now(UTC)
            rows = order([i for i in (await idx.snapshot(cluster)).values() if shown(i, show_all)])
            if fmt == "json":
                for inc in rows:
                    sys.stdout.write(inc.model_dump_json(by_alias=True) + "\n")
            else:
                t = Table(title=f"{len(rows)} incidents" + (f" in {cluster}" if cluster else ""))
                for col in ("incident", "since", "where", "category", "severity", "domain", "status", "waiting on",
                            "blast radius", "plan"):
                    t.add_column(col, overflow="fold")
                for inc in rows:
                    t.add_row(*line(inc, now))
                out.print(t)
            if watch:
                await _watch(idx, cluster, fmt, {i.id: i.version for i in rows})
        finally:
            await bus.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except _errors() as exc:
        raise _bus_error(nats, exc) from None


async def _watch(idx: object, cluster: str | None, fmt: str, seen: dict[str, int]) -> None:
    from breakfix.correlator.index import IncidentIndex

    assert isinstance(idx, IncidentIndex)
    async for _key, inc in idx.watch(cluster):
        if inc is None or seen.get(inc.id) == inc.version:
            continue
        seen[inc.id] = inc.version
        if fmt == "json":
            sys.stdout.write(inc.model_dump_json(by_alias=True) + "\n")
            sys.stdout.flush()
        else:
            out.print(" ".join(line(inc, datetime.now(UTC))), highlight=False)


def _print_audit(inc: Incident, records: list[ActionRecord]) -> None:
    i = inc
    out.print(f"[bold]{i.id}[/bold] {i.category} ({i.domain.value}, {i.severity.value}) {i.status.value}"
              f"{' waiting on ' + i.waiting.value if i.waiting else ''}: {i.title}")
    out.print(f"  where: {i.cluster}/{i.node or ','.join(i.nodes)} gpus={','.join(g.label() for g in i.gpus) or '-'} "
              f"tenants={','.join(t.key() for t in i.tenants) or '-'} parent={i.parent or '-'}", highlight=False)
    out.print(f"  counts: {', '.join(f'{c.key}={c.count}' for c in i.counts)}; flaps={i.flaps}; "
              f"time to repair={i.time_to_repair_s if i.time_to_repair_s is not None else '-'}s", highlight=False)
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
def audit(
    incident: Annotated[str, typer.Argument(help="Incident id.")],
    nats: NatsOpt = DEFAULT_NATS,
    creds: CredsOpt = None,
    fmt: FormatOpt = "table",
    watch: Annotated[bool, typer.Option("--watch", help="Keep printing new records until Ctrl-C.")] = False,
) -> None:
    """Why an incident exists and everything done about it: timeline, evidence, every action record."""
    from breakfix.console.oncall import connect, read_records
    from breakfix.correlator.index import IncidentIndex
    from breakfix.schemas import subjects

    _check_format(fmt)
    missing = False

    async def main() -> None:
        nonlocal missing
        bus = await connect(nats, creds=creds, name="breakfix-cli")
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
            sub = await bus.client.subscribe(subjects.action_subject(inc.cluster))
            sub2 = await bus.client.subscribe(subjects.action_subject(inc.cluster) + ".>")
            queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

            async def pump(s: object) -> None:
                async for m in s.messages:  # type: ignore[attr-defined]
                    with contextlib.suppress(asyncio.QueueFull):
                        queue.put_nowait(m.data)

            async with asyncio.TaskGroup() as tg:
                tg.create_task(pump(sub), name="audit-watch-actions")
                tg.create_task(pump(sub2), name="audit-watch-oncall")
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

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except _errors() as exc:
        raise _bus_error(nats, exc) from None
    if missing:
        raise fail(f"no incident {incident} on {nats}")
