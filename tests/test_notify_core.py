"""The pure what-to-notify core and its routing: one page per root cause, suppression by ack and
silence, what each notification carries, and the notify config's validation."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from breakfix.remediator.notify.config import NotifyConfig, SecretError, load_secret
from breakfix.remediator.notify.core import NotifyCore, route
from breakfix.remediator.notify.model import NotifyAction, NotifyEvent
from breakfix.schemas.common import Severity, TenantRef
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    StepAction,
)
from tests.conftest import T0, gpu

CFG = NotifyConfig.model_validate({
    "channels": [{"name": "am", "type": "alertmanager", "url": "http://am:9093"},
                 {"name": "hook", "type": "webhook", "url": "https://hooks.example/x"}],
    "routes": [{"severities": ["fatal", "critical"], "domains": ["operator"], "channels": ["am", "hook"]},
               {"categories": ["application_fault"], "channels": ["hook"]}],
    "default": ["am"], "runbook_base": "https://rb.example/", "console_url": "https://console.example",
    "wait_limit_s": 600})


def inc(iid: str = "inc-1", *, status: IncidentStatus = IncidentStatus.OPEN, parent: str | None = None,
        members: tuple[str, ...] = (), flaps: int = 0, version: int = 1, **kw: Any) -> Incident:
    base: dict[str, Any] = dict(id=iid, cluster="c1", scope=IncidentScope.NODE, node="n1",
                                category="gpu_reset_required", severity=Severity.CRITICAL, first_seen=T0,
                                last_seen=T0, status=status, parent=parent,
                                members=members, flaps=flaps, version=version, gpus=(gpu(0),),
                                tenants=(TenantRef(namespace="team-a", pod="train-0"),), title="XID 48")
    base.update(kw)
    return Incident(**base)


def change(i: Incident, kind: ChangeKind = ChangeKind.OPENED, at: float = 0) -> IncidentChange:
    return IncidentChange(kind=kind, incident=i, at=T0 + timedelta(seconds=at))


def rec(kind: ActionKind, outcome: ActionOutcome, *, iid: str = "inc-1", at: float = 10, reason: str = "",
        **kw: Any) -> ActionRecord:
    return ActionRecord(id=f"r-{kind}-{outcome}-{at}-{iid}", cluster="c1", incident_id=iid, kind=kind, outcome=outcome,
                        actor=kw.pop("actor", "remediator"), reason=reason, at=T0 + timedelta(seconds=at), **kw)


ESCALATED = (ActionKind.PLAN, ActionOutcome.ESCALATED)


def events(out: list[Any]) -> list[tuple[str, str, str]]:
    return [(n.dedup_key, n.event.value, n.action.value) for n in out]


def test_an_escalation_pages_once_carrying_blast_radius_steps_rma_and_links() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc()))
    core.record(rec(ActionKind.STEP, ActionOutcome.SUCCEEDED, action=StepAction.CORDON))
    (n,) = core.record(rec(*ESCALATED, reason="reset failed; RMA: GPU-0 serial 123 XID 48"))
    assert core.record(rec(*ESCALATED, reason="again", at=11)) == []  # the same event never pages twice
    assert (n.event, n.action, n.dedup_key, n.node) == (NotifyEvent.ESCALATED, NotifyAction.TRIGGER, "inc-1", "n1")
    assert n.tenants == ("team-a",) and n.pods == ("team-a/train-0",) and n.gpus[0].startswith("0:GPU-")
    assert n.done == ("cordon: succeeded",) and "RMA" in n.rma and "breakfix release inc-1" in n.next
    assert n.runbook_url == "https://rb.example/gpu_reset_required.md"
    assert n.console_url == "https://console.example/incidents/inc-1"
    (r,) = core.change(change(inc(status=IncidentStatus.RESOLVED, version=3), ChangeKind.RESOLVED, at=20))
    assert (r.event, r.action) == (NotifyEvent.RESOLVED, NotifyAction.RESOLVE)


def test_folded_members_never_page_and_a_paged_member_resolves_into_its_fabric_parent() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc("m1")))
    core.change(change(inc("m2")))
    assert events(core.record(rec(*ESCALATED, iid="m1"))) == [("m1", "escalated", "trigger")]
    fab = inc("fab", scope=IncidentScope.FABRIC, node=None, members=("m1", "m2"), nodes=("n1", "n2"),
              topology={"switch": "leaf-3"})
    core.change(change(fab))
    assert core.record(rec(*ESCALATED, iid="m2")) == []  # covered by the open fabric incident
    assert events(core.change(change(inc("m1", parent="fab", version=2), ChangeKind.FOLDED))) == [
        ("m1", "resolved", "resolve")]
    (n,) = core.record(rec(*ESCALATED, iid="fab"))
    assert n.title.startswith("[critical] gpu_reset_required on switch=leaf-3")
    assert n.nodes == ("n1", "n2") and n.node is None


@pytest.mark.parametrize(("human", "expect"), [
    (rec(ActionKind.ACK, ActionOutcome.SUCCEEDED, actor="alice", at=5), []),
    (rec(ActionKind.SILENCE, ActionOutcome.SUCCEEDED, actor="alice", at=5), []),
    (rec(ActionKind.SILENCE, ActionOutcome.SUCCEEDED, actor="alice", at=5, details={"duration_s": "2"}),
     [("inc-1", "escalated", "trigger")]),
    (rec(ActionKind.SILENCE, ActionOutcome.SUCCEEDED, actor="alice", at=5, details={"until": "2030-01-01T00:00:00Z"}),
     []),
])
def test_acks_and_silences_suppress_notification_until_they_end(human: ActionRecord, expect: list[Any]) -> None:
    core = NotifyCore(CFG)
    core.change(change(inc()))
    assert core.record(human) == []
    assert events(core.record(rec(*ESCALATED))) == expect


def test_an_ack_of_a_paged_incident_acknowledges_it_once_and_the_resolve_still_goes_out() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc()))
    core.record(rec(*ESCALATED))
    ack = rec(ActionKind.ACK, ActionOutcome.SUCCEEDED, actor="alice", at=12, reason="on it")
    assert events(core.record(ack)) == [("inc-1", "acknowledged", "acknowledge")]
    assert core.record(ack) == []
    assert core.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED, reason="awaiting approval: x", at=13)) == []
    assert events(core.change(change(inc(status=IncidentStatus.RESOLVED, version=4), ChangeKind.RESOLVED))) == [
        ("inc-1", "resolved", "resolve")]


def test_approval_wait_and_a_guard_wait_past_its_limit_notify() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc()))
    assert events(core.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED,
                                  reason="awaiting approval: breakfix approve inc-1 reprovision"))) == [
        ("inc-1", "approval", "trigger")]
    core.change(change(inc("inc-2")))
    budget = {"guard": "budget"}
    assert core.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED, iid="inc-2", at=0, details=budget)) == []
    assert core.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED, iid="inc-2", at=599, details=budget)) == []
    (n,) = core.record(rec(ActionKind.REFUSAL, ActionOutcome.REFUSED, iid="inc-2", at=600, details=budget,
                           reason="2 nodes already in remediation"))
    assert n.event is NotifyEvent.WAITING and "10 min on budget" in n.summary


def test_a_breaker_trip_is_one_notification_listing_held_incidents_resolved_by_the_reset() -> None:
    core = NotifyCore(CFG)
    for i in range(3):
        core.change(change(inc(f"inc-{i}", node=f"n{i}")))
    trip = rec(ActionKind.STEP, ActionOutcome.SUCCEEDED, iid="inc-2", details={"guard": "breaker"},
               reason="circuit breaker tripped: 3 of 10 nodes")
    (n,) = core.record(trip)
    assert core.record(trip) == []
    assert (n.dedup_key, n.event, n.category) == ("breaker-c1", NotifyEvent.BREAKER, "breaker")
    assert n.held == ("inc-0", "inc-1", "inc-2") and n.runbook_url.endswith("alerts/breaker_tripped.md")
    reset = rec(ActionKind.APPROVAL, ActionOutcome.APPROVED, actor="bob", details={"command": "breaker-reset"})
    assert events(core.record(reset)) == [("breaker-c1", "resolved", "resolve")]


def test_a_record_that_beats_its_incident_is_applied_when_the_incident_arrives() -> None:
    core = NotifyCore(CFG)
    assert core.record(rec(*ESCALATED)) == []
    assert events(core.change(change(inc()))) == [("inc-1", "escalated", "trigger")]


def test_a_record_read_after_its_incident_resolved_never_pages() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc(status=IncidentStatus.RESOLVED, version=4), ChangeKind.RESOLVED, at=30))
    assert core.record(rec(*ESCALATED, at=1)) == [] and core.firing() == []
    assert NotifyConfig().runbook_base == "runbooks/"  # no channel, no link to follow: the default stands


@pytest.mark.parametrize(("escalated_at", "pages"), [(20, False), (40, True)],
                         ids=["escalation-from-before-the-resolution", "escalation-after-the-resolution-pages"])
def test_a_plan_escalating_after_its_incident_resolved_pages_until_a_human_releases_the_node(
        escalated_at: float, pages: bool) -> None:
    """Healthy signals resolved the incident while its plan ran; the validation before the node's return then failed,
    so the node stays cordoned: on-call must hear of it, and only a release or cancel ends that page."""
    core = NotifyCore(CFG)
    core.change(change(inc()))
    done = inc(status=IncidentStatus.RESOLVED, version=2, resolved_at=T0 + timedelta(seconds=30))
    core.change(change(done, ChangeKind.RESOLVED, at=30))
    got = core.record(rec(*ESCALATED, reason="DCGM diag r2 failed: node stays cordoned", at=escalated_at))
    assert events(got) == ([("inc-1", "escalated", "trigger")] if pages else [])
    if pages:
        assert core.change(change(done.model_copy(update={"version": 3}), ChangeKind.UPDATED, at=50)) == []
        assert [n.incident for n in core.firing()] == ["inc-1"]
        release = rec(ActionKind.RELEASE, ActionOutcome.SUCCEEDED, actor="alice", reason="node checked", at=60)
        assert events(core.record(release)) == [("inc-1", "resolved", "resolve")] and core.firing() == []


def test_a_page_from_an_escalation_after_the_resolution_survives_a_reopen_until_a_release() -> None:
    """The GPU is still bad: its signals come back and the incident reopens (a new attempt). The page about the node
    left cordoned stands (re-posted, not paged twice) until a human releases it."""
    core = NotifyCore(CFG)
    core.change(change(inc()))
    done = inc(status=IncidentStatus.RESOLVED, version=2, resolved_at=T0 + timedelta(seconds=30))
    core.change(change(done, ChangeKind.RESOLVED, at=30))
    assert events(core.record(rec(*ESCALATED, reason="validation failed: node stays cordoned", at=40))) == [
        ("inc-1", "escalated", "trigger")]
    assert core.change(change(inc(version=3, flaps=1), ChangeKind.REOPENED, at=50)) == []
    assert [n.incident for n in core.firing()] == ["inc-1"]
    assert core.record(rec(*ESCALATED, reason="escalated again", at=55)) == [], "one page stands"
    release = rec(ActionKind.RELEASE, ActionOutcome.SUCCEEDED, actor="alice", reason="node checked", at=60)
    assert events(core.record(release)) == [("inc-1", "resolved", "resolve")] and core.firing() == []


def test_a_reopened_incident_may_page_again_and_a_release_resolves_the_page() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc()))
    core.record(rec(*ESCALATED))
    core.change(change(inc(status=IncidentStatus.RESOLVED, version=2), ChangeKind.RESOLVED))
    core.change(change(inc(flaps=1, version=3), ChangeKind.REOPENED))
    (n,) = core.record(rec(*ESCALATED, at=50))
    assert n.id == "inc-1:1:escalated:trigger"
    release = rec(ActionKind.RELEASE, ActionOutcome.SUCCEEDED, actor="alice", reason="checked by hand", at=60)
    assert events(core.record(release)) == [("inc-1", "resolved", "resolve")]
    assert [x.dedup_key for x in core.firing()] == []


@pytest.mark.parametrize(("severity", "domain", "category", "channels"), [
    ("critical", "operator", "gpu_reset_required", ("am", "hook")),
    ("warning", "operator", "gpu_reset_required", ("am",)),
    ("warning", "tenant", "application_fault", ("hook",)),
    ("fatal", "tenant", "thermal_power", ("am",)),
])
def test_routes_pick_channels_by_severity_domain_and_category(severity: str, domain: str, category: str,
                                                              channels: tuple[str, ...]) -> None:
    core = NotifyCore(CFG)
    core.change(change(inc(severity=Severity(severity), domain=domain, category=category)))
    (n,) = core.record(rec(*ESCALATED))
    assert route(n, CFG) == channels


@pytest.mark.parametrize(("section", "message"), [
    ({"channels": [{"name": "pd", "type": "pagerduty", "routing_key": "abc"}]}, "Extra inputs"),
    ({"channels": [{"name": "pd", "type": "pagerduty"}]}, "exactly one of routing_key_file or routing_key_env"),
    ({"channels": [{"name": "s", "type": "slack", "webhook_url": "https://hooks.slack.com/x"}]}, "Extra inputs"),
    ({"channels": [{"name": "a", "type": "alertmanager", "url": "ftp://x"}]}, "http(s) URL"),
    ({"channels": [{"name": "a", "type": "alertmanager", "url": "http://x"}], "default": ["b"]}, "unknown channel"),
    ({"channels": [{"name": "a", "type": "webhook", "url": "http://x", "timeout_s": 0}]}, "greater than 0"),
    ({"channels": [{"name": "a", "type": "webhook", "url": "http://x"}]}, "runbook_base must be an http(s) URL"),
    ({"channels": [{"name": "a", "type": "webhook", "url": "http://x"}], "runbook_base": "git.example.com/rb/"},
     "runbook_base must be an http(s) URL"),
])
def test_bad_notify_sections_are_refused_and_credentials_never_sit_in_config_text(section: dict[str, Any],
                                                                                   message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NotifyConfig.model_validate(section)


def test_secrets_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k").write_text("  key-1\n")
    assert load_secret(tmp_path / "k", None, "pd") == "key-1"
    monkeypatch.setenv("BF_TEST_KEY", "key-2")
    assert load_secret(None, "BF_TEST_KEY", "pd") == "key-2"
    with pytest.raises(SecretError, match="cannot read"):
        load_secret(tmp_path / "missing", None, "pd")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretError, match="is empty"):
        load_secret(tmp_path / "empty", None, "pd")
    with pytest.raises(SecretError, match="is not set"):
        load_secret(None, "BF_TEST_UNSET_VAR", "pd")


def test_the_remediators_breaker_page_notifies_with_its_held_list_and_an_admin_reset_resolves_it() -> None:
    core = NotifyCore(CFG)
    core.change(change(inc()))
    page = rec(ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, details={"guard": "breaker", "held": "inc-1,inc-9"},
               reason="circuit breaker tripped")
    (n,) = core.record(page)
    assert n.event is NotifyEvent.BREAKER and n.held == ("inc-1", "inc-9")
    own = rec(ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, details={"channel": "am"}, at=11)
    assert core.record(own) == []
    reset = rec(ActionKind.BREAKER, ActionOutcome.REQUESTED, actor="admin", reason="switch fixed", at=12)
    assert events(core.record(reset)) == [("breaker-c1", "resolved", "resolve")]


@pytest.mark.parametrize(("matcher", "silenced"), [
    ({"cluster": "c1", "node": "n1"}, True),
    ({"cluster": "c1", "category": "gpu_reset_required"}, True),
    ({"cluster": "c1", "code": "48"}, True),
    ({"cluster": "c1", "code": "xid:48"}, True),
    ({"cluster": "c1", "node": "n2"}, False),
    ({"cluster": "c2", "node": "n1"}, False),
    ({"cluster": "c1", "node": "n1", "code": "79"}, False),
])
def test_console_silences_match_cluster_and_node_category_or_code_until_they_end(matcher: dict[str, str],
                                                                                 silenced: bool) -> None:
    import json

    core = NotifyCore(CFG)
    core.change(change(inc(codes=("xid:48",))))
    sil = rec(ActionKind.SILENCE, ActionOutcome.REQUESTED, iid="-", actor="alice", at=5,
              details={"matcher": json.dumps(matcher), "until": "2026-11-23T13:00:00Z", "silence_id": "sil-1"})
    assert core.record(sil) == []
    assert bool(core.record(rec(*ESCALATED))) is not silenced


def test_an_unsilence_or_the_end_of_a_silence_lets_notifications_through_again() -> None:
    import json

    core = NotifyCore(CFG)
    core.change(change(inc()))
    core.change(change(inc("inc-2")))
    details = {"matcher": json.dumps({"cluster": "c1", "node": "n1"}), "until": "2026-11-23T12:00:20Z",
               "silence_id": "sil-9"}
    core.record(rec(ActionKind.SILENCE, ActionOutcome.REQUESTED, iid="-", actor="alice", at=1, details=details))
    assert core.record(rec(*ESCALATED, at=10)) == []
    assert events(core.record(rec(*ESCALATED, iid="inc-2", at=30))) == [("inc-2", "escalated", "trigger")]  # ended
    core.record(rec(ActionKind.SILENCE, ActionOutcome.REQUESTED, iid="-", actor="alice", at=31,
                    details={**details, "until": "2030-01-01T00:00:00Z"}))
    core.change(change(inc("inc-3")))
    assert core.record(rec(*ESCALATED, iid="inc-3", at=32)) == []
    core.record(rec(ActionKind.SILENCE, ActionOutcome.CANCELLED, iid="-", actor="alice", at=33,
                    details={"silence_id": "sil-9"}))
    core.change(change(inc("inc-4")))
    assert events(core.record(rec(*ESCALATED, iid="inc-4", at=34))) == [("inc-4", "escalated", "trigger")]


def test_a_remediator_notice_that_asks_for_a_human_pages_once() -> None:
    from breakfix.schemas.incident import WaitingOn

    core = NotifyCore(CFG)
    core.change(change(inc()))
    stale = rec(ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, waiting=WaitingOn.HUMAN, details={"held": "n1"},
                reason="inc-1 closed as stale, but n1 stays cordoned for it")
    (n,) = core.record(stale)
    assert n.event is NotifyEvent.ESCALATED and "stays cordoned" in n.summary
    assert core.record(stale) == []
