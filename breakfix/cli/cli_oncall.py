"""What the SRE on call reads: ``breakfix incidents`` (latest state of every incident, from the
incident stream) and ``breakfix audit INCIDENT`` (the incident's timeline and every action record).

Both read JetStream with an ephemeral ordered view (a fresh durable that starts at the beginning
and is deleted afterwards), so they never disturb the daemons' consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Annotated

import typer
from pydantic import ValidationError

from breakfix.bus.options import NatsOptions
from breakfix.cli.cliutil import NatsFlags, app, fail, out, with_nats
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionRecord, Incident, IncidentChange


async def _read(nats: NatsOptions, stream: str, filter_subject: str) -> list[bytes]:
    from breakfix.bus.jetstream import JetStreamBus

    bus = await JetStreamBus.connect(nats, name="breakfix-cli")
    durable = f"cli-{uuid.uuid4().hex[:12]}"
    try:
        await bus.ensure_streams(subjects.STREAMS)
        await bus.reset_consumer(stream=stream, durable=durable, filter_subject=filter_subject, start_seq=1,
                                 ack_all=False, max_ack_pending=1_000_000)
        data: list[bytes] = []
        while batch := await bus.pull(stream=stream, durable=durable, batch=1000, timeout_s=0.5):
            data.extend(m.data for m in batch)
        return data
    finally:
        with contextlib.suppress(Exception):
            await bus.delete_consumer(stream, durable)
        await bus.close()


def _latest(raw: list[bytes]) -> dict[str, Incident]:
    latest: dict[str, Incident] = {}
    for data in raw:
        try:
            inc = IncidentChange.model_validate_json(data).incident
        except ValidationError:
            continue
        prev = latest.get(inc.id)
        if prev is None or inc.version >= prev.version:
            latest[inc.id] = inc
    return latest


@app.command()
@with_nats()
def incidents(
    nats: NatsFlags,
    cluster: Annotated[str | None, typer.Option(envvar="BREAKFIX_CLUSTER", help="Only this cluster.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include resolved and folded incidents.")] = False,
) -> None:
    """List incidents as the correlator last published them (open and escalated first)."""
    from breakfix.cli.render import incident_table

    filt = subjects.incident_subject(cluster) if cluster else subjects.INCIDENTS_ALL
    opts = nats.options()
    try:
        raw = asyncio.run(_read(opts, subjects.INCIDENTS.name, filt))
    except Exception as exc:
        raise fail(f"cannot read incidents from {opts.url}: {exc}") from None
    rows = [i for i in _latest(raw).values()
            if show_all or ((not i.status.terminal or i.status.value == "escalated") and i.parent is None)]
    rows.sort(key=lambda i: (i.status.terminal, -i.severity.rank, i.first_seen))
    out.print(incident_table(rows, f"{len(rows)} incidents" + (f" in {cluster}" if cluster else "")))


@app.command()
@with_nats()
def audit(
    incident: Annotated[str, typer.Argument(help="Incident id.")],
    nats: NatsFlags,
) -> None:
    """Why an incident exists and everything done about it: timeline, evidence, action records."""
    opts = nats.options()
    try:
        latest = _latest(asyncio.run(_read(opts, subjects.INCIDENTS.name, subjects.INCIDENTS_ALL))).get(incident)
        records = [ActionRecord.model_validate_json(d) for d in
                   asyncio.run(_read(opts, subjects.ACTIONS.name, subjects.ACTIONS_ALL))]
    except Exception as exc:
        raise fail(f"cannot read from {opts.url}: {exc}") from None
    if latest is None:
        raise fail(f"no incident {incident} on {opts.url}")
    i = latest
    out.print(f"[bold]{i.id}[/bold] {i.category} ({i.domain.value}, {i.severity.value}) {i.status.value}: {i.title}")
    out.print(f"  where: {i.node or ','.join(i.nodes)} gpus={','.join(g.label() for g in i.gpus) or '-'} "
              f"tenants={','.join(t.key() for t in i.tenants) or '-'} parent={i.parent or '-'}")
    out.print(f"  counts: {', '.join(f'{c.key}={c.count}' for c in i.counts)}; flaps={i.flaps}; "
              f"time to repair={i.time_to_repair_s if i.time_to_repair_s is not None else '-'}s")
    out.print(f"  runbook: runbooks/{i.category}.md", highlight=False)
    for e in i.timeline:
        out.print(f"  {e.at.isoformat()} {e.event}: {e.note}", highlight=False)
    for line in i.evidence[:5]:
        out.print(f"  evidence: {line}", highlight=False)
    for r in (r for r in records if r.incident_id == incident):
        what = r.action.value if r.action else r.kind.value
        out.print(f"  {r.at.isoformat()} {what}={r.outcome.value} by {r.actor} ({r.rule}): {r.reason}",
                  highlight=False)
