"""Human verbs the remediator acts on: approve, deny, release, cancel, breaker reset, kill switch.

Records arrive from ``breakfix.actions.<cluster>.oncall.<user>.<verb>`` and
``breakfix.actions.<cluster>.admin.<user>.<verb>`` (``schemas.subjects``; published by the
``breakfix approve|deny|release|cancel|breaker reset|kill-switch`` commands and the console),
consumed from the BREAKFIX_ACTIONS stream by the service (``remediator.service``). nats-server's
per-user permissions prove who published, so a record is acted on only when the subject's user is
exactly the record's ``actor``, the subject's cluster is the record's and this remediator's cluster, the
verb matches the record's kind and outcome, the incident exists, and (approve, deny) the named step
is the one actually waiting. Anything else is logged with its reason and ignored; the remediator's
own records on the same stream are not human verbs and pass by.

- approve (APPROVAL/APPROVED, ``step_index``): the waiting step runs; refused once the incident is resolved or
  stale (its plan was cancelled then);
- deny (DENIAL/DENIED): the plan stops there, the node stays fenced, a human owns it;
- release (RELEASE/REQUESTED, reason required): validation first unless ``details.skip_validation``
  is ``"true"``, then the incident's hold is dropped and the node returns only if nothing else holds it
  (a group incident: each member node it holds);
- cancel (CANCEL/REQUESTED, reason required): the plan in flight stops; the node stays as it is;
- breaker reset (BREAKER on the admin subject): the breaker closes and the queued incidents are
  re-driven, oldest first, each through the budgets again;
- kill switch (KILL_SWITCH on the admin subject; ``details.rule`` or ``details.code``, ``details.enabled``):
  ``enabled: "true"`` switches that rule or code off, ``"false"`` switches it back on.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING

import structlog

from breakfix.bus.consumer import Redeliver
from breakfix.bus.protocol import Delivery
from breakfix.remediator.breaker import return_plan
from breakfix.remediator.reconcile import ATTEMPT_STRIDE
from breakfix.remediator.records import WAIT_ENDS, PlanRecord, ProgressState
from breakfix.schemas import subjects
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    Incident,
    StepAction,
    WaitingOn,
)

if TYPE_CHECKING:
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")

VERBS: dict[str, tuple[ActionKind, ActionOutcome]] = {
    "approve": (ActionKind.APPROVAL, ActionOutcome.APPROVED), "deny": (ActionKind.DENIAL, ActionOutcome.DENIED),
    "release": (ActionKind.RELEASE, ActionOutcome.REQUESTED), "cancel": (ActionKind.CANCEL, ActionOutcome.REQUESTED),
    "breaker_reset": (ActionKind.BREAKER, ActionOutcome.REQUESTED),
    "kill_switch": (ActionKind.KILL_SWITCH, ActionOutcome.REQUESTED),
}
NEEDS_INCIDENT = frozenset({"approve", "deny", "release", "cancel"})
NEEDS_REASON = frozenset({"release", "cancel", "breaker_reset", "kill_switch"})


def refuse_reason(subject: str, rec: ActionRecord, cluster: str) -> tuple[str | None, str | None]:
    """``(verb, None)`` for a well-formed human record for ``cluster``; ``(None, why)`` otherwise;
    ``(None, None)`` for a record that is not a human verb at all (the remediator's own audit)."""
    parts = subjects.human_subject_parts(subject)
    if parts is None:
        return None, None
    s_cluster, _role, user, verb = parts
    if verb not in VERBS:  # note, ack, assign, silence, unsilence: for the console and the notifier, not for us
        return None, None
    if s_cluster != subjects.token(cluster) or rec.cluster != cluster:
        return None, f"for cluster {rec.cluster!r} on subject cluster {s_cluster!r}, not this cluster {cluster!r}"
    # The actor must BE the subject's user, not merely map to it: subjects.token is lossy (``jane.doe@corp``
    # and ``jane_doe_corp`` share a token), so comparing tokens let the NATS user ``jane_doe_corp`` act,
    # on its own permitted subject, as someone else. Every identity that publishes verbs is one subject
    # token (bus users by ``authinit``, console users by its auth config and proxy check), so exact
    # equality costs nobody their verbs and keeps the server-enforced subject the whole identity.
    if rec.actor != user:
        return None, f"actor {rec.actor!r} is not the subject's user {user!r}"
    if (rec.kind, rec.outcome) != VERBS[verb]:
        return None, f"{verb} needs kind {VERBS[verb][0].value}/{VERBS[verb][1].value}, got " \
                     f"{rec.kind.value}/{rec.outcome.value}"
    if verb in NEEDS_REASON and not rec.reason.strip():
        return None, f"{verb} needs a reason"
    if rec.details.get("skip_validation") == "true" and not rec.reason.strip():
        return None, "skipping validation needs a reason"
    return verb, None


class HumanVerbs:
    """The approvals / human-verbs handler; it changes the service's plans and guard state."""

    def __init__(self, service: RemediatorService) -> None:
        self.svc = service
        self.releases = 0

    async def on_record(self, rec: ActionRecord, msg: Delivery) -> None:
        if not self.svc.leading:
            raise Redeliver  # the lease is gone: the new leader takes this verb
        self.svc.observe.control(rec, msg.subject)  # metrics and the notifier see every record (remediator.metrics)
        verb, why = refuse_reason(msg.subject, rec, self.svc.cluster)
        if verb is None:
            if why is not None:
                log.warning("human_record_ignored", subject=msg.subject, incident=rec.incident_id, actor=rec.actor,
                            reason=why)
            return
        if verb in NEEDS_INCIDENT:
            got = await self.svc.book.get(rec.incident_id)
            inc = self.svc.latest.get(rec.incident_id) or (got[0].incident if got else None)
            if inc is None:
                log.warning("human_record_ignored", subject=msg.subject, incident=rec.incident_id,
                            actor=rec.actor, reason="no such incident")
                return
            if verb == "approve" and inc.status in WAIT_ENDS:
                log.warning("human_record_ignored", incident=rec.incident_id, actor=rec.actor, verb=verb,
                            reason=f"the incident is {inc.status.value}: no step of it waits for approval")
                return
            if verb in ("approve", "deny"):
                await self._decide_step(verb, rec, got[0] if got else None, got[1] if got else None)
            elif verb == "release":
                await self._release(rec, inc)
            else:
                await self._cancel(rec, inc)
        elif verb == "breaker_reset":
            await self._breaker_reset(rec)
        else:
            self._kill_switch(rec)

    async def _decide_step(self, verb: str, rec: ActionRecord, plan: PlanRecord | None, rev: int | None) -> None:
        if plan is None or rev is None or plan.progress.state is not ProgressState.AWAITING_APPROVAL:
            log.warning("human_record_ignored", incident=rec.incident_id, actor=rec.actor, verb=verb,
                        reason="no step of this incident is waiting for approval")
            return
        prog = plan.progress
        waiting = plan.current_step_action()
        if (rec.step_index is not None and rec.step_index != prog.step) or \
                (rec.action is not None and rec.action.value != waiting):
            log.warning("human_record_ignored", incident=rec.incident_id, actor=rec.actor, verb=verb,
                        reason=f"step {rec.step_index} {rec.action} is not the waiting step {prog.step} {waiting}")
            return
        if verb == "approve":
            prog.approved = [*prog.approved, prog.tag]
            prog.state = ProgressState.RUNNING
        else:
            prog.state = ProgressState.DENIED
        try:
            await self.svc.book.put(plan, rev)
        except Exception as exc:  # a conflict: someone else moved the plan on
            log.warning("human_record_ignored", incident=rec.incident_id, verb=verb, reason=repr(exc))
            return
        log.info(verb + "d", incident=rec.incident_id, step=waiting, by=rec.actor)
        if verb == "approve":
            old = self.svc.tasks.get(rec.incident_id)
            if old is not None and not old.done():  # still returning from the approval wait: spawn would skip it
                self.svc.resume_after(old, rec.incident_id)
                return
            got = await self.svc.book.get(rec.incident_id)
            if got is not None:
                self.svc.spawn(rec.incident_id, prog.attempt, got[0])
            return
        why = f"step {waiting} denied by {rec.actor}: {rec.reason or 'no reason given'}; the node stays fenced"
        await self.svc.publish(self.svc.record(plan.incident, ActionKind.PLAN, ActionOutcome.ESCALATED, why,
                                               tag="denied", rule=plan.plan.rule, waiting=WaitingOn.HUMAN))

    async def _cancel(self, rec: ActionRecord, inc: Incident) -> None:
        current = self.svc.current.get(inc.id)
        rule = current[0].rule if current else ""
        await self.svc.stop_plan(inc, f"cancelled by {rec.actor}: {rec.reason}", outcome=ActionOutcome.CANCELLED,
                                 rule=rule, waiting=WaitingOn.HUMAN)  # the stored plan is marked cancelled there
        log.warning("cancelled", incident=inc.id, by=rec.actor, reason=rec.reason)

    async def _release(self, rec: ActionRecord, inc: Incident) -> None:
        """Validate (unless skipped with a reason), drop the hold; the node returns if nobody else holds it."""
        svc = self.svc
        if inc.id in svc.tasks:
            current = svc.current.get(inc.id)
            await svc.stop_plan(inc, f"stopped for a release by {rec.actor}", outcome=ActionOutcome.CANCELLED,
                                rule=current[0].rule if current else "")
        else:
            await svc.cancel_record(inc.id)  # e.g. a plan awaiting approval: a later approve must not run it
        skip = rec.details.get("skip_validation") == "true"
        nodes = (inc.node,) if inc.node else tuple(sorted(n for n, h in svc.guards.holds.items() if inc.id in h))
        why = f"released by {rec.actor}: {rec.reason}" + ("; validation skipped" if skip else "")
        plan = return_plan(inc, nodes, why, rule="human-release", validate=not skip)
        svc.guards.unhold(inc.id)
        svc.keeper.save()
        self.releases += 1
        attempt = int(svc.clock.now().timestamp())  # a release is its own attempt: its records never collide

        async def release() -> None:  # validation takes minutes: other verbs must not wait behind it
            try:
                outcome = await svc.executor.run(inc, plan, attempt=attempt, guarded=False)
                if outcome is not ActionOutcome.COMPLETED:
                    for node in nodes:  # the node stays out (a group's: each it was released with)
                        svc.guards.hold(node, inc.id, "release failed validation")
                    svc.keeper.save()
                log.warning("released", incident=inc.id, by=rec.actor, outcome=outcome.value, skip_validation=skip)
            except Exception as exc:
                log.error("release_crashed", incident=inc.id, error=repr(exc))
            finally:
                if svc.tasks.get(inc.id) is asyncio.current_task():
                    del svc.tasks[inc.id]

        svc.tasks[inc.id] = asyncio.create_task(release(), name=f"release-{inc.id}")

    async def _breaker_reset(self, rec: ActionRecord) -> None:
        order = self.svc.guards.reset_breaker()
        self.svc.keeper.save()
        log.warning("breaker_reset", by=rec.actor, reason=rec.reason, redrive=order)
        for iid in order:  # oldest first; each goes through the budgets again
            inc = self.svc.latest.get(iid)
            if inc is not None and not inc.status.terminal:
                self.svc.spawn(iid, inc.flaps * ATTEMPT_STRIDE, None, settle=False)

    def _kill_switch(self, rec: ActionRecord) -> None:
        on = rec.details.get("enabled", "true") == "true"
        g = self.svc.guards
        for key, bucket in (("rule", g.killed_rules), ("code", g.killed_codes)):
            value = rec.details.get(key)
            if value:
                if on:
                    bucket.add(value)
                else:
                    bucket.discard(value)
        self.svc.keeper.save()
        log.warning("kill_switch", by=rec.actor, rule=rec.details.get("rule"), code=rec.details.get("code"), on=on)


def human_record(*, verb: str, cluster: str, actor: str, incident: str, reason: str, at: object,
                 step_index: int | None = None, action: StepAction | None = None,
                 details: dict[str, str] | None = None) -> tuple[str, ActionRecord]:
    """``(subject, record)`` for one human verb, as the CLI and the console publish it."""
    from datetime import datetime

    assert isinstance(at, datetime)
    kind, outcome = VERBS[verb]
    subject = (subjects.admin_subject if verb in subjects.ADMIN_VERBS else subjects.oncall_subject)(
        cluster, actor, verb)
    raw = "\x1f".join([verb, cluster, actor, incident, reason, str(step_index), str(action), str(sorted(
        (details or {}).items())), at.isoformat()])
    rec = ActionRecord(id=f"{verb}-" + hashlib.sha256(raw.encode()).hexdigest()[:20], cluster=cluster,
                       incident_id=incident, kind=kind, outcome=outcome, actor=actor, reason=reason,
                       step_index=step_index, action=action, details=details or {}, at=at)
    return subject, rec
