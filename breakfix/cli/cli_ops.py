"""Audited human decisions: ``breakfix approve`` and ``breakfix breaker reset`` publish an
approval ``ActionRecord`` the remediator acts on and the audit trail keeps."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from breakfix.bus.options import NatsOptions
from breakfix.cli.cliutil import NatsFlags, app, breaker_app, fail, out, with_nats


def _publish_decision(nats: NatsOptions, record: Any) -> None:
    from breakfix.bus.codec import encode
    from breakfix.bus.jetstream import JetStreamBus
    from breakfix.schemas import subjects as subj

    async def send() -> None:
        bus = await JetStreamBus.connect(nats, name="breakfix-cli")
        try:
            await bus.ensure_streams(subj.STREAMS)
            await bus.publish(subj.action_subject(record.cluster), encode(record), msg_id=record.id)
        finally:
            await bus.close()

    try:
        asyncio.run(send())
    except Exception as exc:
        raise fail(f"could not publish to {nats.url}: {exc}") from None


@app.command()
@with_nats()
def approve(
    incident: Annotated[str, typer.Argument(help="Incident id, e.g. inc-1a2b3c4d5e6f7a8b.")],
    step: Annotated[str, typer.Argument(help="The step waiting for approval, e.g. reprovision.")],
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster of the incident.")],
    nats: NatsFlags,
    by: Annotated[str, typer.Option(envvar="USER", help="Who approves (recorded in the audit trail).")] = "unknown",
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
) -> None:
    """Approve a step that waits for a human (recorded as an audited approval)."""
    from breakfix.remediator.service import APPROVE, approval_record
    from breakfix.schemas.incident import StepAction

    try:
        action = StepAction(step)
    except ValueError:
        raise fail(f"unknown step {step!r}; one of: {', '.join(a.value for a in StepAction)}") from None
    rec = approval_record(cluster=cluster, incident=incident, action=action, actor=by, reason=reason or "approved",
                          command=APPROVE, at=datetime.now(UTC))
    _publish_decision(nats.options(), rec)
    out.print(f"approved {step} for {incident} as {by}")


@breaker_app.command("reset")
@with_nats()
def breaker_reset(
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster whose breaker to reset.")],
    reason: Annotated[str, typer.Option(help="Why it is safe to act again (recorded).")],
    nats: NatsFlags,
    by: Annotated[str, typer.Option(envvar="USER", help="Who resets it (recorded).")] = "unknown",
) -> None:
    """Close the circuit breaker so automated operator actions resume (audited)."""
    from breakfix.remediator.service import BREAKER_RESET, approval_record

    rec = approval_record(cluster=cluster, incident="-", action=None, actor=by, reason=reason, command=BREAKER_RESET,
                          at=datetime.now(UTC))
    _publish_decision(nats.options(), rec)
    out.print(f"breaker reset requested for {cluster} by {by}")
