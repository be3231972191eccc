"""The on-call verbs' pure core: who may do what, the checks before publishing, and the record formats
the remediator acts on (kinds, outcomes, step_index, details)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from breakfix.console import verbs
from breakfix.console.verbs import Identity, Role, VerbError
from breakfix.remediator.human import refuse_reason
from breakfix.schemas import subjects
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    Incident,
    IncidentStatus,
    StepAction,
    WaitingOn,
)
from tests.conftest import T0
from tests.console_fixtures import awaiting, incident

OLGA = Identity("olga", Role.OPERATOR)


@pytest.mark.parametrize(("role", "verb", "allowed"), [
    (Role.VIEWER, "approve", False), (Role.VIEWER, "ack", False), (Role.OPERATOR, "approve", True),
    (Role.OPERATOR, "silence", True), (Role.OPERATOR, "release", True), (Role.OPERATOR, "breaker_reset", False),
    (Role.OPERATOR, "kill_switch", False), (Role.ADMIN, "breaker_reset", True), (Role.ADMIN, "cancel", True),
])
def test_roles_allow_exactly_their_verbs(role: Role, verb: str, allowed: bool) -> None:
    assert verbs.may(role, verb) is allowed


@pytest.mark.parametrize(("verb", "subject"), [
    ("approve", "breakfix.actions.c1.oncall.olga.approve"),
    ("breaker_reset", "breakfix.actions.c1.admin.olga.breaker_reset"),
])
def test_verbs_publish_on_the_subject_naming_the_user(verb: str, subject: str) -> None:
    assert verbs.subject_for(verb, "c1", "olga") == subject
    assert subjects.human_subject_parts(subject) is not None


def test_approve_names_the_waiting_step_with_its_index_and_action() -> None:
    inc = incident("inc-a")
    rec = verbs.decide_step("approve", inc, [awaiting(inc)], OLGA, step=None, reason="", at=T0)
    assert (rec.kind, rec.outcome, rec.step_index, rec.action) == (ActionKind.APPROVAL, ActionOutcome.APPROVED, 1,
                                                                   StepAction.REPROVISION)
    assert rec.actor == "olga" and rec.cluster == "c1" and rec.details["command"] == "approve"
    assert rec.details["rung"] == "reprovision"


def test_deny_is_a_denial_of_the_same_step() -> None:
    inc = incident("inc-a")
    rec = verbs.decide_step("deny", inc, [awaiting(inc)], OLGA, step="reprovision", reason="spare not here", at=T0)
    assert (rec.kind, rec.outcome, rec.step_index) == (ActionKind.DENIAL, ActionOutcome.DENIED, 1)


def test_the_waiting_step_comes_from_incident_waiting_when_no_record_is_known() -> None:
    inc = incident("inc-a", waiting=WaitingOn.APPROVAL)
    assert verbs.waiting_step(inc, []) == verbs.WaitingStep(1, StepAction.REPROVISION, "reprovision")


@pytest.mark.parametrize(("inc", "records", "step", "error"), [
    (incident("inc-a"), [], None, "inc-a is not waiting for approval"),
    (incident("inc-a", waiting=WaitingOn.BUDGET), [], None, "waiting budget"),
    (incident("inc-a", waiting=WaitingOn.APPROVAL), [], "0", r"step 0 of inc-a is not waiting; step 1 \(reprovision"),
    (incident("inc-a", status=IncidentStatus.RESOLVED, waiting=WaitingOn.APPROVAL), [], None, "status resolved"),
])
def test_approving_a_step_that_is_not_waiting_is_refused(inc: Incident, records: list[ActionRecord], step: str | None,
                                                          error: str) -> None:
    with pytest.raises(VerbError, match=error):
        verbs.decide_step("approve", inc, records, OLGA, step=step, reason="", at=T0)


def test_an_approved_step_no_longer_waits() -> None:
    inc = incident("inc-a")
    first = verbs.decide_step("approve", inc, [awaiting(inc)], OLGA, step=None, reason="", at=T0)
    assert verbs.waiting_step(inc, [awaiting(inc), first]) is None


@pytest.mark.parametrize(("found", "cluster", "error"), [
    (None, None, "no incident inc-x"),
    (None, "c1", "no incident inc-x in cluster c1"),
    (incident("inc-x", cluster="c2"), "c1", "incident inc-x belongs to cluster c2, not c1"),
])
def test_missing_or_foreign_incidents_are_refused(found: Incident | None, cluster: str | None, error: str) -> None:
    with pytest.raises(VerbError, match=error):
        verbs.check_incident(found, "inc-x", cluster)


@pytest.mark.parametrize(("verb", "kind", "outcome"), [
    ("ack", ActionKind.ACK, ActionOutcome.REQUESTED), ("release", ActionKind.RELEASE, ActionOutcome.REQUESTED),
    ("cancel", ActionKind.CANCEL, ActionOutcome.REQUESTED), ("note", ActionKind.NOTE, ActionOutcome.COMPLETED),
])
def test_incident_verbs_have_their_kind_and_outcome(verb: str, kind: ActionKind, outcome: ActionOutcome) -> None:
    rec = verbs.incident_verb(verb, incident("inc-a"), OLGA, reason="replaced the riser", at=T0)
    assert (rec.kind, rec.outcome, rec.actor, rec.reason) == (kind, outcome, "olga", "replaced the riser")
    assert rec.node == "gpu-node-001"


def test_release_needs_a_reason_and_skips_validation_only_when_asked() -> None:
    inc = incident("inc-a", status=IncidentStatus.ESCALATED)
    with pytest.raises(VerbError, match="release needs a reason"):
        verbs.incident_verb("release", inc, OLGA, reason="  ", at=T0)
    assert "skip_validation" not in verbs.incident_verb("release", inc, OLGA, reason="fixed", at=T0).details
    rec = verbs.incident_verb("release", inc, OLGA, reason="fixed, diag passed by hand", at=T0, skip_validation=True)
    assert rec.details == {"skip_validation": "true"}


def test_assign_records_the_assignee_and_resolved_incidents_cannot_be_released() -> None:
    rec = verbs.incident_verb("assign", incident("inc-a"), OLGA, reason="", at=T0, assignee="bob")
    assert rec.kind is ActionKind.ASSIGN and rec.details == {"assignee": "bob"} and rec.reason == "assigned to bob"
    with pytest.raises(VerbError, match="resolved; nothing to release"):
        verbs.incident_verb("release", incident("inc-a", status=IncidentStatus.RESOLVED), OLGA, reason="x", at=T0)


def test_silence_carries_matcher_until_and_id_and_expires() -> None:
    rec = verbs.silence({"cluster": "c1", "node": "gpu-node-001", "category": None}, OLGA,
                        duration=timedelta(hours=2), reason="maintenance", at=T0)
    assert (rec.kind, rec.outcome) == (ActionKind.SILENCE, ActionOutcome.REQUESTED)
    assert json.loads(rec.details["matcher"]) == {"cluster": "c1", "node": "gpu-node-001"}
    assert rec.details["until"] == "2026-11-23T14:00:00Z" and rec.details["silence_id"].startswith("sil-")
    assert [s.silence_id for s in verbs.active_silences([rec], T0 + timedelta(hours=1))] == [rec.details["silence_id"]]
    assert verbs.active_silences([rec], T0 + timedelta(hours=3)) == []
    gone = verbs.unsilence("c1", rec.details["silence_id"], OLGA, reason="done", at=T0)
    assert gone.outcome is ActionOutcome.CANCELLED
    assert verbs.active_silences([rec, gone], T0 + timedelta(minutes=1)) == []


@pytest.mark.parametrize(("matcher", "hit"), [
    ({"cluster": "c1", "node": "gpu-node-001"}, True), ({"cluster": "c1", "category": "gpu_reset_required"}, True),
    ({"cluster": "c1", "code": "48"}, True), ({"cluster": "c1", "code": "xid:48"}, True),
    ({"cluster": "c2", "node": "gpu-node-001"}, False), ({"cluster": "c1", "node": "gpu-node-002"}, False),
    ({"cluster": "c1", "node": "gpu-node-001", "code": "79"}, False),
])
def test_a_silence_matches_when_every_field_it_names_matches(matcher: dict[str, str], hit: bool) -> None:
    assert verbs.matches(matcher, incident("inc-a")) is hit


@pytest.mark.parametrize(("matcher", "hours", "error"), [
    ({"node": "n1"}, 1, "needs a cluster"), ({"cluster": "c1"}, 1, "besides the cluster"),
    ({"cluster": "c1", "node": "n1"}, 0, "between 0 and 30 days"),
    ({"cluster": "c1", "node": "n1"}, 24 * 31, "between 0 and 30 days"),
])
def test_bad_silences_are_refused(matcher: dict[str, str], hours: int, error: str) -> None:
    with pytest.raises(VerbError, match=error):
        verbs.silence(matcher, OLGA, duration=timedelta(hours=hours), reason="x", at=T0)


def test_admin_records_breaker_reset_and_kill_switch() -> None:
    adam = Identity("adam", Role.ADMIN)
    reset = verbs.breaker_reset("c1", adam, reason="storm over", at=T0)
    assert (reset.kind, reset.outcome, reset.incident_id) == (ActionKind.BREAKER, ActionOutcome.REQUESTED, "-")
    ks = verbs.kill_switch("c1", adam, code="xid:79", enabled=True, reason="bad driver", at=T0)
    assert ks.kind is ActionKind.KILL_SWITCH and ks.details == {"code": "xid:79", "enabled": "true"}
    with pytest.raises(VerbError, match="exactly one of a rule"):
        verbs.kill_switch("c1", adam, rule="r", code="c", enabled=True, reason="x", at=T0)


@pytest.mark.parametrize("code", ["xid:0079", "xid79", "rowremap.pending", "dcgm.health:DCGM_FR_UNCONTAINED_ERROR"])
def test_a_kill_switch_on_a_code_the_catalog_does_not_know_is_refused_as_it_would_stop_nothing(code: str) -> None:
    adam = Identity("adam", Role.ADMIN)
    with pytest.raises(VerbError, match="kill switch code"):
        verbs.kill_switch("c1", adam, code=code, enabled=True, reason="bad driver", at=T0)
    off = verbs.kill_switch("c1", adam, code=code, enabled=False, reason="typo", at=T0)  # a mistyped one can go
    assert off.details == {"code": code, "enabled": "false"}



def test_the_remediator_ignores_a_verb_whose_actor_only_shares_the_subjects_user_token() -> None:
    """``jane.doe@corp`` and ``jane_doe_corp`` are one subject token: the NATS user ``jane_doe_corp`` may
    publish on that subject, so a record there is that user's, under that exact name, or nobody's."""
    subject = subjects.oncall_subject("c1", "jane_doe_corp", "cancel")
    forged = verbs.incident_verb("cancel", incident("inc-a"), Identity("jane.doe@corp"), reason="forged", at=T0)
    own = verbs.incident_verb("cancel", incident("inc-a"), Identity("jane_doe_corp"), reason="stop", at=T0)
    assert subject == subjects.oncall_subject("c1", forged.actor, "cancel")
    assert refuse_reason(subject, forged, "c1") == (
        None, "actor 'jane.doe@corp' is not the subject's user 'jane_doe_corp'")
    assert refuse_reason(subject, own, "c1") == ("cancel", None)


@pytest.mark.parametrize("verb", ["note", "ack", "assign"])
def test_the_remediator_passes_over_the_console_and_notifier_verbs_without_failing(verb: str) -> None:
    """A note, ack or assignment is for the console and the notifier: the remediator's handler lets it by
    (before, it raised KeyError and the record was redelivered twenty times, each a handler failure)."""
    rec = verbs.incident_verb(verb, incident("inc-a"), Identity("alice"), reason="looking", at=T0,
                              **({"assignee": "bob"} if verb == "assign" else {}))
    assert refuse_reason(subjects.oncall_subject("c1", "alice", verb), rec, "c1") == (None, None)


def test_a_kill_switch_takes_a_new_drivers_xid_the_catalog_does_not_list_yet() -> None:
    adam = Identity("adam", Role.ADMIN)
    ks = verbs.kill_switch("c1", adam, code="xid:9999", enabled=True, reason="new driver storm", at=T0)
    assert ks.details == {"code": "xid:9999", "enabled": "true"}
