"""The on-call verbs, pure: who may do what, the checks made before publishing, and the ``ActionRecord``s.

One backend for the console and the CLI (``breakfix.console.oncall`` publishes what this module
builds). Each verb is an audited ``ActionRecord`` carrying the authenticated identity and a
reason, published on ``oncall_subject(cluster, user, verb)`` or ``admin_subject(...)``; the
remediator acts on them and checks them again (subject user == actor, subject cluster == cluster).
Record formats (the remediator's contract): approve = APPROVAL/APPROVED step_index; deny =
DENIAL/DENIED step_index; release = RELEASE/REQUESTED (``skip_validation``); cancel, ack =
REQUESTED; silence = SILENCE/REQUESTED with ``matcher``, ``until``, ``silence_id``; unsilence =
SILENCE/CANCELLED; note = NOTE (reason is the text); assign = ASSIGN (``assignee``); breaker
reset = BREAKER/REQUESTED (admin); kill switch = KILL_SWITCH (``rule`` or ``code``, ``enabled``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from breakfix.schemas import subjects
from breakfix.schemas.catalog import default_catalog
from breakfix.schemas.common import format_rfc3339
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    Incident,
    IncidentStatus,
    StepAction,
    WaitingOn,
)
from breakfix.schemas.silence import silence_matches

MAX_REASON = 2000
MAX_SILENCE = timedelta(days=30)


class VerbError(ValueError):
    """A verb that must not be published; the message is one line for the CLI or the page."""


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"viewer": 0, "operator": 1, "admin": 2}[self.value]


OPERATOR_VERBS = frozenset(subjects.ONCALL_VERBS)
ADMIN_VERBS = frozenset(subjects.ADMIN_VERBS)


def required_role(verb: str) -> Role:
    if verb in OPERATOR_VERBS:
        return Role.OPERATOR
    if verb in ADMIN_VERBS:
        return Role.ADMIN
    raise VerbError(f"unknown verb {verb!r}")


def may(role: Role, verb: str) -> bool:
    return role.rank >= required_role(verb).rank


@dataclass(frozen=True, slots=True)
class Identity:
    """Who acts: the bus identity (CLI) or the console's authenticated user, and their role."""

    user: str
    role: Role = Role.OPERATOR


def subject_for(verb: str, cluster: str, user: str) -> str:
    if verb in ADMIN_VERBS:
        return subjects.admin_subject(cluster, user, verb)
    return subjects.oncall_subject(cluster, user, verb)


@dataclass(frozen=True, slots=True)
class WaitingStep:
    """The step a plan waits at for a human decision."""

    index: int
    action: StepAction
    rung: str = ""


def _awaiting(rec: ActionRecord) -> bool:
    return rec.waiting is WaitingOn.APPROVAL or (
        rec.kind is ActionKind.REFUSAL and rec.reason.startswith("awaiting approval"))


def waiting_step(inc: Incident, records: Iterable[ActionRecord]) -> WaitingStep | None:
    """The step of ``inc`` that waits for approval now, from its audit records (latest wins), else
    from ``Incident.waiting`` and the plan's first step that requires approval."""
    pending: WaitingStep | None = None
    for rec in records:
        if rec.incident_id != inc.id:
            continue
        if _awaiting(rec) and rec.step_index is not None and rec.action is not None:
            pending = WaitingStep(rec.step_index, rec.action, rec.details.get("rung", ""))
        elif pending is not None and (
                rec.kind in (ActionKind.APPROVAL, ActionKind.DENIAL, ActionKind.CANCEL, ActionKind.PLAN)
                or (rec.kind is ActionKind.STEP and rec.step_index == pending.index)):
            pending = None
    if pending is not None:
        return pending
    if inc.waiting is WaitingOn.APPROVAL and inc.plan is not None:
        for rung in inc.plan.rungs():
            for i, step in enumerate(rung.steps):
                if step.requires_approval:
                    return WaitingStep(i, step.action, rung.name)
    return None


def _reason(reason: str, verb: str) -> str:
    text = " ".join(reason.split())
    if not text:
        raise VerbError(f"{verb} needs a reason (--reason TEXT); it is kept in the audit trail")
    if len(text) > MAX_REASON:
        raise VerbError(f"reason longer than {MAX_REASON} characters")
    return text


def check_incident(inc: Incident | None, incident_id: str, cluster: str | None) -> Incident:
    """The incident exists and belongs to ``cluster`` (when one is named)."""
    if inc is None:
        raise VerbError(f"no incident {incident_id}" + (f" in cluster {cluster}" if cluster else ""))
    if cluster and inc.cluster != cluster:
        raise VerbError(f"incident {incident_id} belongs to cluster {inc.cluster}, not {cluster}")
    return inc


def _record_id(verb: str, target: str, user: str, at: datetime) -> str:
    return f"{verb}-{target}-{subjects.token(user)}-{int(at.timestamp() * 1000)}"


def _base(verb: str, kind: ActionKind, outcome: ActionOutcome, *, cluster: str, incident: str, who: Identity,
          reason: str, at: datetime, inc: Incident | None = None, **kw: object) -> ActionRecord:
    return ActionRecord.model_validate({
        "id": _record_id(verb, incident, who.user, at), "cluster": cluster, "incident_id": incident, "kind": kind,
        "outcome": outcome, "actor": who.user, "reason": reason, "at": at,
        "node": inc.node if inc else None, "domain": inc.domain if inc else None, **kw})


def decide_step(verb: str, inc: Incident, records: Iterable[ActionRecord], who: Identity, *, step: str | None,
                reason: str, at: datetime) -> ActionRecord:
    """approve / deny the step that waits (``step`` an index or an action name; None: the waiting one)."""
    target = waiting_step(inc, records)
    if target is None or inc.status.terminal:
        raise VerbError(f"incident {inc.id} is not waiting for approval (status {inc.status.value}, waiting "
                        f"{inc.waiting.value if inc.waiting else '-'})")
    if step is not None and step not in (str(target.index), target.action.value):
        raise VerbError(f"step {step} of {inc.id} is not waiting; step {target.index} ({target.action.value}) is")
    approve = verb == "approve"
    text = " ".join(reason.split()) or ("approved" if approve else "")
    return _base(verb, ActionKind.APPROVAL if approve else ActionKind.DENIAL,
                 ActionOutcome.APPROVED if approve else ActionOutcome.DENIED, cluster=inc.cluster, incident=inc.id,
                 who=who, reason=_reason(text, verb), at=at, inc=inc, step_index=target.index, action=target.action,
                 details={"command": verb, **({"rung": target.rung} if target.rung else {})})


def incident_verb(verb: str, inc: Incident, who: Identity, *, reason: str, at: datetime,
                  skip_validation: bool = False, assignee: str = "") -> ActionRecord:
    """ack, note, assign, release, cancel on one incident."""
    if inc.status is IncidentStatus.RESOLVED and verb in ("ack", "release", "cancel"):
        raise VerbError(f"incident {inc.id} is resolved; nothing to {verb}")
    details: dict[str, str] = {}
    kind, outcome = {
        "ack": (ActionKind.ACK, ActionOutcome.REQUESTED), "release": (ActionKind.RELEASE, ActionOutcome.REQUESTED),
        "cancel": (ActionKind.CANCEL, ActionOutcome.REQUESTED), "note": (ActionKind.NOTE, ActionOutcome.COMPLETED),
        "assign": (ActionKind.ASSIGN, ActionOutcome.COMPLETED),
    }.get(verb, (None, None))
    if kind is None or outcome is None:
        raise VerbError(f"unknown incident verb {verb!r}")
    text = " ".join(reason.split())
    if verb == "ack":
        text = text or "acknowledged"
    if verb == "assign":
        name = assignee.strip()
        if not name or len(name) > 200:
            raise VerbError("assign needs an assignee (--to NAME)")
        details["assignee"] = name
        text = text or f"assigned to {name}"
    if verb == "cancel" and inc.plan is None:
        raise VerbError(f"incident {inc.id} has no plan in flight to cancel")
    if verb == "release":
        if inc.node is None and not inc.nodes:
            raise VerbError(f"incident {inc.id} holds no node to release")
        if skip_validation:
            details["skip_validation"] = "true"
    return _base(verb, kind, outcome, cluster=inc.cluster, incident=inc.id, who=who, reason=_reason(text, verb),
                 at=at, inc=inc, details=details)


MATCHER_FIELDS = ("cluster", "node", "category", "code")


def silence(matcher: Mapping[str, str | None], who: Identity, *, duration: timedelta, reason: str, at: datetime,
            incident: str = "-") -> ActionRecord:
    """A silence: notifications matching (cluster and any of node / category / code) are not sent
    until ``at + duration``. It never stops remediation."""
    m = {k: str(v).strip() for k, v in matcher.items() if k in MATCHER_FIELDS and v and str(v).strip()}
    if "cluster" not in m:
        raise VerbError("a silence needs a cluster")
    if len(m) < 2:
        raise VerbError("a silence needs a node, a category or a code besides the cluster")
    if not timedelta(0) < duration <= MAX_SILENCE:
        raise VerbError(f"silence duration must be between 0 and {MAX_SILENCE.days} days")
    until = at + duration
    doc = json.dumps(m, sort_keys=True, separators=(",", ":"))
    sid = "sil-" + hashlib.sha256(f"{doc}|{who.user}|{at.isoformat()}".encode()).hexdigest()[:12]
    return _base("silence", ActionKind.SILENCE, ActionOutcome.REQUESTED, cluster=m["cluster"], incident=incident,
                 who=who, reason=_reason(reason, "silence"), at=at,
                 details={"matcher": doc, "until": format_rfc3339(until), "silence_id": sid})


def unsilence(cluster: str, silence_id: str, who: Identity, *, reason: str, at: datetime) -> ActionRecord:
    if not silence_id.startswith("sil-"):
        raise VerbError(f"not a silence id: {silence_id!r}")
    return _base("unsilence", ActionKind.SILENCE, ActionOutcome.CANCELLED, cluster=cluster, incident="-", who=who,
                 reason=_reason(reason or "removed", "unsilence"), at=at, details={"silence_id": silence_id})


def breaker_reset(cluster: str, who: Identity, *, reason: str, at: datetime) -> ActionRecord:
    return _base("breaker_reset", ActionKind.BREAKER, ActionOutcome.REQUESTED, cluster=cluster, incident="-", who=who,
                 reason=_reason(reason, "breaker reset"), at=at, details={"command": "breaker-reset"})


def kill_switch(cluster: str, who: Identity, *, rule: str = "", code: str = "", enabled: bool, reason: str,
                at: datetime) -> ActionRecord:
    """``enabled`` true: the switch is on, the rule or code stops acting automatically."""
    if bool(rule) == bool(code):
        raise VerbError("a kill switch names exactly one of a rule (--rule) or a code (--code)")
    if code and enabled and (why := default_catalog().unknown_code_key(code, listed_only=False)) is not None:
        raise VerbError(f"kill switch code {why}")  # it would stop nothing; switching a mistyped one off stays possible
    key = {"rule": rule} if rule else {"code": code}
    return _base("kill_switch", ActionKind.KILL_SWITCH, ActionOutcome.REQUESTED, cluster=cluster, incident="-",
                 who=who, reason=_reason(reason, "kill switch"), at=at,
                 details={**key, "enabled": "true" if enabled else "false"})


def matches(matcher: Mapping[str, str], inc: Incident) -> bool:
    """Whether a silence's matcher covers an incident (``schemas.silence``: the notifier uses the same rule)."""
    return silence_matches(matcher, cluster=inc.cluster, category=inc.category, nodes=(inc.node, *inc.nodes),
                           codes=inc.codes)


@dataclass(frozen=True, slots=True)
class Silence:
    silence_id: str
    cluster: str
    matcher: dict[str, str]
    until: datetime
    by: str
    reason: str


def active_silences(records: Iterable[ActionRecord], now: datetime) -> list[Silence]:
    """Silences requested and neither removed nor expired at ``now``."""
    live: dict[str, Silence] = {}
    for rec in records:
        if rec.kind is not ActionKind.SILENCE:
            continue
        sid = rec.details.get("silence_id", "")
        if rec.outcome is ActionOutcome.CANCELLED:
            live.pop(sid, None)
            continue
        try:
            matcher = {str(k): str(v) for k, v in json.loads(rec.details.get("matcher", "{}")).items()}
            until = datetime.fromisoformat(rec.details["until"].replace("Z", "+00:00"))
        except (ValueError, KeyError, AttributeError):
            continue
        live[sid] = Silence(sid, rec.cluster, matcher, until, rec.actor, rec.reason)
    return sorted((s for s in live.values() if s.until > now), key=lambda s: s.until)
