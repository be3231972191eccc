"""Plans that follow their incident, and a soak that sees recurrences: pure rules, no I/O.

The service (``remediator.service``) asks ``redecision`` on every incident update while a plan is
in flight (``turns_cautious``: whether it stops at its next step rather than at once), ``wait_ends`` while
a deferred repair waits for its GPU to go idle, and ``recurrence`` at the end of the soak before capacity
returns. Inputs are the incident versions the correlator published (``breakfix.incidents.>``) and the plans
``decide`` chose.
"""

from __future__ import annotations

from collections.abc import Callable

from breakfix.remediator.policy import FORBIDDEN_FOR_UNKNOWN
from breakfix.schemas.incident import Domain, Incident, Plan, Step, StepAction

# how far each action takes capacity away: a plan is re-decided when the new one needs more
ACTION_RANK = {StepAction.NOTIFY_TENANT: 0, StepAction.RESTART_POD: 0, StepAction.ESCALATE: 0,
               StepAction.VALIDATE: 1, StepAction.RETURN_TO_SERVICE: 0, StepAction.CORDON: 2,
               StepAction.DRAIN_GPU: 3, StepAction.RESET_GPU: 4, StepAction.DRAIN: 5, StepAction.REBOOT: 6,
               StepAction.REPROVISION: 7}


def plan_rank(plan: Plan) -> int:
    """The most disruptive action of the plan's first rung (what it does unless something fails)."""
    first = plan.rungs()[0].steps if plan.rungs() else ()
    return max((ACTION_RANK[s.action] for s in first), default=0)


def _forbidden(plan: Plan) -> bool:
    """The plan (any rung) would reset, reboot or reprovision: what an unknown fault never gets automatically."""
    return any(s.action in FORBIDDEN_FOR_UNKNOWN for r in plan.rungs() for s in r.steps)


def turns_cautious(old: Plan, old_category: str, new: Plan, incident: Incident) -> bool:
    """The incident's category changed to ``unknown_fault``, or to one whose plan takes none of the actions an
    unknown fault never gets (``policy.FORBIDDEN_FOR_UNKNOWN``: reset, reboot, reprovision) while the plan in flight
    would take one (in any rung: a failed validation climbs to a reboot). Such a plan stops at its next step, whatever
    it ran already, and the new plan replaces it (README: an unknown fault takes the most cautious path)."""
    if new.rule == old.rule or incident.category == old_category:
        return False
    return incident.category == "unknown_fault" or (_forbidden(old) and not _forbidden(new))


def redecision(old: Plan, old_category: str, new: Plan, incident: Incident, acted: bool) -> str | None:
    """Why the plan in flight must be replaced by ``new``, or None to keep it.

    - the category turned cautious (``turns_cautious``: an unknown fault joined a reset): always, whatever ran;
    - the required action became more severe (XID 48 then XID 154 "node reboot required"): always;
    - a late signal changed the category (XID 63 3.5 s after XID 48: drain-and-reset) before the old
      plan ran anything disruptive: the plan is revised; after that the old plan runs on, so a
      companion never makes a GPU reset twice.
    """
    if new.rule == old.rule:
        return None
    if turns_cautious(old, old_category, new, incident):
        return (f"re-decided: {new.rule} never resets, reboots or reprovisions ({old_category} -> "
                f"{incident.category}); {old.rule} stops at its next step, whatever it ran")
    if plan_rank(new) > plan_rank(old):
        return f"re-decided: {new.rule} needs more than {old.rule} ({old_category} -> {incident.category})"
    if incident.category != old_category and not acted:
        return f"re-decided: {new.rule} now fits the incident ({old_category} -> {incident.category})"
    return None


def wait_ends(old: Plan, old_category: str, new: Plan, incident: Incident, bare: Plan | None = None) -> str | None:
    """Why a deferred repair's wait for its GPU to go idle ends now (the incident changed while it waited: XID 154,
    XID 48 or a failed row remap joined a pending remap), or None to keep waiting. Nothing of the deferred plan ran
    yet. The wait ends when the incident turned cautious (``turns_cautious``), when its category changed, or when
    the plan ``decide`` now picks is more disruptive than the deferred one (a higher ``plan_rank``, or the same rank
    acting now instead of waiting) and not only because of companions: ``bare`` is the plan decided for the incident
    without its informational or sympathetic companion codes (XID 63, XID 92, ecc.sbe: NVIDIA IGNORE), None when it
    has none; when that is still the deferring rule, the companions alone changed the rule and the job is not evicted
    for them. Otherwise it keeps waiting (the plan is decided again from the incident as it stands once the wait is
    over)."""
    if new.rule == old.rule:
        return None
    if turns_cautious(old, old_category, new, incident):
        return redecision(old, old_category, new, incident, acted=False)
    if incident.category != old_category:
        return f"re-decided: {new.rule} now fits the incident ({old_category} -> {incident.category}), not {old.rule}"
    if bare is not None and bare.rule == old.rule:
        return None  # only companions joined: the deferring rule still fits the fault itself
    if (plan_rank(new), deferral(new) is None) > (plan_rank(old), deferral(old) is None):
        return f"re-decided: {new.rule} needs more than {old.rule} now " \
            f"({', '.join(incident.codes) or incident.category})"
    return None


def without_companions(incident: Incident, companion: Callable[[str], bool]) -> Incident | None:
    """The incident without its informational or sympathetic companion codes (``companion``), or None when it has
    none: what ``wait_ends`` decides again to tell a change of fault from a companion that joined."""
    codes = tuple(c for c in incident.codes if not companion(c))
    if len(codes) == len(incident.codes):
        return None
    return incident.model_copy(update={"codes": codes,
                                       "counts": tuple(c for c in incident.counts if not companion(c.key))})


def recurrence(before: Incident, after: Incident, companion: Callable[[str], bool]) -> str | None:
    """What recurred between two versions of one incident, or None when it stayed quiet.

    A code counted again (the same fault) or a higher severity blocks a return to service;
    informational or sympathetic companions (NVIDIA IGNORE, e.g. XID 63 after XID 48) do not.
    """
    counts = {c.key: c.count for c in before.counts}
    again = sorted(c.key for c in after.counts if c.count > counts.get(c.key, 0) and not companion(c.key))
    if again:
        return ", ".join(again)
    if after.severity.rank > before.severity.rank:
        return f"severity {before.severity.value} -> {after.severity.value}"
    return None


def takes_node(plan: Plan) -> bool:
    """An operator plan that would cordon or disrupt its node, in a dry run or shadow mode too: what the circuit
    breaker counts, whatever the incident's domain (an XID 94 is a tenant fault whose GPU reset is not)."""
    return plan.domain is Domain.OPERATOR and any(
        s.action.disruptive or s.action is StepAction.CORDON for r in plan.rungs() for s in r.steps)


def needs_node(plan: Plan) -> bool:
    """An operator plan that would cordon or disrupt the node: its incident holds the node until it is done."""
    return not (plan.dry_run or plan.shadow) and takes_node(plan)


def held_nodes(plan: Plan, incident: Incident) -> tuple[str, ...]:
    """The nodes the incident holds for ``plan``: its node, or the members a group incident's plan fences (the
    nodes its cordon and drain steps name); none when the plan needs no node."""
    if not needs_node(plan):
        return ()
    if incident.node is not None:
        return (incident.node,)
    return tuple(dict.fromkeys(str(s.params["node"]) for r in plan.rungs() for s in r.steps
                               if s.action in (StepAction.CORDON, StepAction.DRAIN) and s.params.get("node")))


def step_at(plan: Plan, rung: int, step: int) -> Step | None:
    """The plan's step at ``(rung, step)``, or None past its end."""
    rungs = plan.rungs()
    return rungs[rung].steps[step] if rung < len(rungs) and step < len(rungs[rung].steps) else None


def ran_until(plan: Plan, rung: int, step: int) -> bool:
    """Whether a disruptive step of ``plan`` is at or before ``(rung, step)``: one a plan resumed there may already
    have run (the step it stands at may have started before the restart)."""
    rungs = plan.rungs()
    return any(s.action.disruptive for r in rungs[:rung] for s in r.steps) or \
        (rung < len(rungs) and any(s.action.disruptive for s in rungs[rung].steps[:step + 1]))


def deferral(plan: Plan) -> tuple[Step, float] | None:
    """The deferred step of the plan's first rung and its wait (``defer_s``), or None when it acts at once."""
    for s in plan.rungs()[0].steps if plan.rungs() else ():
        wait = s.params.get("defer_s")
        if wait is not None and not isinstance(wait, bool | str):
            return s, float(wait)
    return None


def undefer(plan: Plan) -> Plan:
    """The plan once its deferral is over: the same steps, acting at once."""
    def strip(steps: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(s.model_copy(update={"params": {k: v for k, v in s.params.items() if k != "defer_s"}})
                     for s in steps)
    ladder = tuple(r.model_copy(update={"steps": strip(r.steps)}) for r in plan.ladder)
    return plan.model_copy(update={"steps": strip(plan.steps), "ladder": ladder})
