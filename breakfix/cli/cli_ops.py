"""The on-call verbs on the command line: approve, deny, ack, silence, unsilence, note, assign, release,
cancel, breaker status / reset, killswitch.

Each publishes one audited ``ActionRecord`` (built and checked by ``breakfix.console.verbs``, the
console's backend too) on the on-call or admin subject named after the caller's bus identity: the
``name`` claim of ``--creds``, or ``$USER`` in an unauthenticated lab. A missing incident, a step
that is not waiting or another cluster's incident is a one-line error with exit 2.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from breakfix.cli.cliutil import NatsFlags, app, breaker_app, fail, out, with_nats
from breakfix.schemas.incident import ActionRecord

if TYPE_CHECKING:
    from breakfix.console.oncall import Oncall

T = TypeVar("T")

ClusterOpt = Annotated[str | None, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster the incident must be in.")]
ReasonOpt = Annotated[str, typer.Option(help="Why (kept in the audit trail).")]
IncidentArg = Annotated[str, typer.Argument(help="Incident id, e.g. inc-1a2b3c4d5e6f7a8b.")]
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise fail(f"duration {text!r}: use a number and s, m, h or d (e.g. 2h)")
    return timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def _act(nats: NatsFlags, admin: bool, body: Callable[[Oncall], Awaitable[T]]) -> T:
    """Connect as the caller, run ``body(oncall)``, turn every failure into one line and exit 2."""
    import asyncio

    from breakfix.cli import logs
    from breakfix.console.oncall import BUS_ERRORS, Oncall, OncallError, connect, user_from_creds
    from breakfix.console.verbs import Identity, Role, VerbError

    logs.configure(json=False, level="WARNING")  # stderr: a refused publish shows up there
    opts = nats.options()
    try:
        user = user_from_creds(opts.creds)
    except OncallError as exc:
        raise fail(str(exc)) from None
    # The server's per-user permissions decide what this user may publish; the CLI claims the role
    # the subject needs and lets nats-server refuse a publish the user is not allowed.
    who = Identity(user, Role.ADMIN if admin else Role.OPERATOR)

    async def main() -> T:
        bus = await connect(opts, name="breakfix-cli")
        try:
            return await body(Oncall(bus, who, lambda: datetime.now(UTC)))
        finally:
            await bus.close()

    try:
        return asyncio.run(main())
    except (VerbError, OncallError) as exc:
        raise fail(str(exc)) from None
    except BUS_ERRORS as exc:
        raise fail(f"cannot reach NATS at {opts.url}: {exc or type(exc).__name__}") from None


def _done(rec: ActionRecord, what: str) -> None:
    out.print(f"{what} ({rec.kind.value} {rec.outcome.value} by {rec.actor}, record {rec.id})", highlight=False)


def _decide(verb: str, incident: str, step: str | None, cluster: str | None, nats: NatsFlags, reason: str) -> None:
    rec = _act(
        nats,
        False,
        lambda o: o.decide(
            verb,
            incident,
            cluster=cluster,
            step=step,
            reason=reason,
        ),
    )
    _done(rec, f"{verb}d step {rec.step_index} ({rec.action.value if rec.action else '-'}) of {incident}")


StepArg = Annotated[str | None, typer.Argument(help="The waiting step: index or action (default: the waiting one).")]


@app.command()
@with_nats()
def approve(
    nats: NatsFlags, incident: IncidentArg, step: StepArg = None, cluster: ClusterOpt = None, reason: ReasonOpt = ""
) -> None:
    """Approve the step that waits for a human (audited)."""
    _decide("approve", incident, step, cluster, nats, reason)


@app.command()
@with_nats()
def deny(
    nats: NatsFlags, incident: IncidentArg, step: StepArg = None, cluster: ClusterOpt = None, reason: ReasonOpt = ""
) -> None:
    """Deny the step that waits for a human: the plan stops there and the incident goes to a human."""
    _decide("deny", incident, step, cluster, nats, reason)


def _on_incident(
    verb: str,
    incident: str,
    cluster: str | None,
    nats: NatsFlags,
    reason: str,
    *,
    skip_validation: bool = False,
    assignee: str = "",
) -> ActionRecord:
    return _act(
        nats,
        False,
        lambda o: o.on_incident(
            verb, incident, cluster=cluster, reason=reason, skip_validation=skip_validation, assignee=assignee
        ),
    )


@app.command()
@with_nats()
def ack(nats: NatsFlags, incident: IncidentArg, cluster: ClusterOpt = None, reason: ReasonOpt = "") -> None:
    """Acknowledge an incident: you own it, re-notification stops."""
    _done(_on_incident("ack", incident, cluster, nats, reason), f"acknowledged {incident}")


@app.command()
@with_nats()
def note(
    nats: NatsFlags,
    incident: IncidentArg,
    text: Annotated[str, typer.Argument(help="The note.")],
    cluster: ClusterOpt = None,
) -> None:
    """Add a note to an incident's audit trail."""
    _done(_on_incident("note", incident, cluster, nats, text), f"noted on {incident}")


@app.command()
@with_nats()
def assign(
    nats: NatsFlags,
    incident: IncidentArg,
    to: Annotated[str, typer.Option("--to", help="Who takes it over.")],
    cluster: ClusterOpt = None,
    reason: ReasonOpt = "",
) -> None:
    """Hand an incident off to someone."""
    _done(_on_incident("assign", incident, cluster, nats, reason, assignee=to), f"assigned {incident} to {to}")


@app.command()
@with_nats()
def release(
    nats: NatsFlags,
    incident: IncidentArg,
    reason: Annotated[str, typer.Option(help="What was repaired (required).")],
    skip_validation: Annotated[
        bool, typer.Option("--skip-validation", help="Return the node without validation.")
    ] = False,
    cluster: ClusterOpt = None,
) -> None:
    """After a human repair, return the incident's node to service (validation first unless skipped)."""
    rec = _on_incident("release", incident, cluster, nats, reason, skip_validation=skip_validation)
    _done(rec, f"release of {incident} requested" + (" without validation" if skip_validation else ""))


@app.command()
@with_nats()
def cancel(
    nats: NatsFlags,
    incident: IncidentArg,
    reason: Annotated[str, typer.Option(help="Why the plan stops (required).")],
    cluster: ClusterOpt = None,
) -> None:
    """Cancel the plan in flight for an incident."""
    _done(_on_incident("cancel", incident, cluster, nats, reason), f"cancel of {incident}'s plan requested")


@app.command("silence")
@with_nats()
def silence_cmd(
    nats: NatsFlags,
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster (required).")],
    duration: Annotated[str, typer.Option("--for", help="How long, e.g. 30m, 2h, 1d.")],
    reason: ReasonOpt,
    node: Annotated[str | None, typer.Option(help="Only this node.")] = None,
    category: Annotated[str | None, typer.Option(help="Only this incident category.")] = None,
    code: Annotated[str | None, typer.Option(help="Only this fault code, e.g. 79 or xid:79.")] = None,
    incident: Annotated[str, typer.Option(help="The incident that prompted it (audit).")] = "-",
) -> None:
    """Silence notifications matching cluster + node / category / code for a while (remediation still runs)."""
    from breakfix.console import verbs

    span = parse_duration(duration)

    async def body(o: Oncall) -> ActionRecord:
        rec = verbs.silence(
            {"cluster": cluster, "node": node, "category": category, "code": code},
            o.who,
            duration=span,
            reason=reason,
            at=o.clock(),
            incident=incident,
        )
        return await o.publish("silence", rec)

    rec = _act(nats, False, body)
    _done(
        rec,
        f"silence {rec.details['silence_id']} until {rec.details['until']} on {rec.details['matcher']}; "
        "notifications only, remediation still runs",
    )


@app.command()
@with_nats()
def unsilence(
    nats: NatsFlags,
    silence_id: Annotated[str, typer.Argument(help="sil-...")],
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster of the silence.")],
    reason: ReasonOpt = "",
) -> None:
    """Remove a silence before it expires."""
    from breakfix.console import verbs

    async def body(o: Oncall) -> ActionRecord:
        return await o.publish("unsilence", verbs.unsilence(cluster, silence_id, o.who, reason=reason, at=o.clock()))

    _done(_act(nats, False, body), f"silence {silence_id} removed")


@app.command()
@with_nats()
def silences(
    nats: NatsFlags,
    cluster: Annotated[str | None, typer.Option(envvar="BREAKFIX_CLUSTER", help="Only this cluster.")] = None,
) -> None:
    """Silences in force (neither removed nor expired)."""
    from breakfix.console import verbs

    found: list[verbs.Silence] = []

    async def body(o: Oncall) -> None:
        from breakfix.console.oncall import read_records

        now = o.clock()
        found.extend(
            verbs.active_silences(await read_records(o.bus, cluster=cluster, since=now - verbs.MAX_SILENCE), now)
        )

    _act(nats, False, body)
    if not found:
        out.print("no silences in force")
    for s in found:
        out.print(
            f"{s.silence_id} {s.cluster} {s.matcher} until {s.until.isoformat()} by {s.by}: {s.reason}", highlight=False
        )


@breaker_app.command("reset")
@with_nats()
def breaker_reset(
    nats: NatsFlags,
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster.")],
    reason: Annotated[str, typer.Option(help="Why it is safe to act again (required).")],
) -> None:
    """Close the circuit breaker so automated operator actions resume (admin, audited)."""
    from breakfix.console import verbs

    async def body(o: Oncall) -> ActionRecord:
        return await o.publish("breaker_reset", verbs.breaker_reset(cluster, o.who, reason=reason, at=o.clock()))

    _done(_act(nats, True, body), f"breaker reset requested for {cluster}")


@breaker_app.command("status")
@with_nats()
def breaker_status(
    nats: NatsFlags, cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster.")]
) -> None:
    """Whether the breaker is open (automated operator actions stopped), from the audit trail."""
    from breakfix.console.fleetview import breaker_state

    state: list[str] = []

    async def body(o: Oncall) -> None:
        from breakfix.console.oncall import read_records

        records = await read_records(o.bus, cluster=cluster, since=o.clock() - timedelta(days=7))
        state.append(breaker_state(records).describe())

    _act(nats, False, body)
    out.print(f"{cluster}: {state[0]}", highlight=False)


@app.command()
@with_nats()
def killswitch(
    nats: NatsFlags,
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster.")],
    reason: ReasonOpt,
    rule: Annotated[str, typer.Option(help="Policy rule to switch.")] = "",
    code: Annotated[str, typer.Option(help="Fault code to switch, e.g. xid:79.")] = "",
    off: Annotated[bool, typer.Option("--off", help="Switch the kill switch off again.")] = False,
) -> None:
    """Stop a policy rule or a fault code from acting automatically (admin, audited); --off resumes it."""
    from breakfix.console import verbs

    async def body(o: Oncall) -> ActionRecord:
        return await o.publish(
            "kill_switch",
            verbs.kill_switch(cluster, o.who, rule=rule, code=code, enabled=not off, reason=reason, at=o.clock()),
        )

    _done(_act(nats, True, body), f"kill switch {'off' if off else 'on'} for {rule or code} in {cluster}")
