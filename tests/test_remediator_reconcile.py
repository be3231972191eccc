"""Start-up reconciliation (``remediator.reconcile``): which open incidents from the index a restarted
remediator takes up again, and a decoder of index entries that never raises."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakfix.bus.codec import encode
from breakfix.bus.protocol import KvEntry
from breakfix.remediator.reconcile import open_incidents, unplanned
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import (
    ChangeKind,
    Domain,
    Incident,
    IncidentChange,
    IncidentScope,
    IncidentStatus,
    Plan,
    WaitingOn,
)
from tests.conftest import T0

PLAN = Plan(rule="gpu-reset", domain=Domain.OPERATOR, reason="XID 48")
DRY = PLAN.model_copy(update={"dry_run": True})
SHADOW = PLAN.model_copy(update={"shadow": True})


def incident(iid: str = "inc-1", **kw: Any) -> Incident:
    base: dict[str, Any] = {"codes": ("xid:48",), "severity": Severity.CRITICAL, "first_seen": T0, "last_seen": T0}
    return Incident(id=iid, cluster="c1", scope=IncidentScope.GPU, node="n1", nodes=("n1",), gpus=(GpuRef(index=2),),
                    category="gpu_reset_required", **{**base, **kw})


def entry(inc: Incident, kind: ChangeKind = ChangeKind.OPENED) -> KvEntry:
    return KvEntry(f"c1.{inc.id}", encode(IncidentChange(kind=kind, incident=inc, at=T0)), 1)


@pytest.mark.parametrize(("inc", "planned", "running", "queued", "covered", "taken_up"), [
    (incident(), {}, set(), set(), {}, True),
    (incident(waiting=None), {}, set(), set(), {}, True),
    (incident(plan=DRY), {}, set(), set(), {}, False),  # its dry run ran (no record: the index shows the plan)
    (incident(plan=SHADOW), {}, set(), set(), {}, False),
    (incident(plan=PLAN), {}, set(), set(), {}, True),  # planned, stopped before the first step saved a record
    (incident(plan=PLAN), {"inc-1": 0}, set(), set(), {}, False),
    (incident(status=IncidentStatus.RESOLVED), {}, set(), set(), {}, False),
    (incident(status=IncidentStatus.ESCALATED), {}, set(), set(), {}, False),
    (incident(parent="fab-1"), {}, set(), set(), {}, False),  # the fabric incident's plan acts for it
    (incident(), {}, set(), set(), {"inc-1": "fab-1"}, False),
    (incident(), {}, {"inc-1"}, set(), {}, False),  # resumed from its record already
    (incident(), {}, set(), {"inc-1"}, {}, False),  # behind the breaker: a breaker reset re-drives it
    (incident(), {"inc-1": 0}, set(), set(), {}, False),  # a record for this opening
    (incident(), {"inc-1": 3}, set(), set(), {}, False),  # a re-decided plan of this opening
    (incident(flaps=1), {"inc-1": 2}, set(), set(), {}, True),  # the record is the previous opening's
    (incident(flaps=1), {"inc-1": 100}, set(), set(), {}, False),
    (incident(status=IncidentStatus.MITIGATING), {}, set(), set(), {}, True),
    (incident(waiting=WaitingOn.HUMAN), {}, set(), set(), {}, False),  # cancelled by a human, or fenced
    (incident(waiting=WaitingOn.BUDGET), {}, set(), set(), {}, True),
], ids=["settling", "no-wait", "dry-run-ran", "shadow-ran", "live-plan-without-record", "live-plan-with-record",
        "resolved", "escalated", "folded", "covered", "running", "breaker-queue",
        "record", "redecided-record", "reopened-after-record", "reopened-record", "mitigating-no-plan",
        "waiting-on-a-human", "waiting-on-a-budget"])
def test_unplanned_takes_up_only_open_incidents_no_plan_covers(inc: Incident, planned: dict[str, int],
                                                              running: set[str], queued: set[str],
                                                              covered: dict[str, str], taken_up: bool) -> None:
    got = unplanned([inc], planned=planned, running=running, queued=queued, covered=covered)
    assert [i.id for i in got] == (["inc-1"] if taken_up else [])


def test_unplanned_are_taken_up_oldest_first() -> None:
    from datetime import timedelta

    late, early = incident("b", first_seen=T0 + timedelta(seconds=5)), incident("a", first_seen=T0)
    assert [i.id for i in unplanned([late, early], planned={}, running=(), queued=(), covered={})] == ["a", "b"]


def test_open_incidents_keeps_open_ones_and_counts_what_does_not_decode() -> None:
    entries = [entry(incident("open")), entry(incident("done", status=IncidentStatus.RESOLVED), ChangeKind.RESOLVED),
               KvEntry("c1.bad", b"{not json", 2), KvEntry("c1.shape", b'{"incident": {"status": "open"}}', 3),
               KvEntry("c1.list", b"[1, 2]", 4), KvEntry("c1.gone", None, 5)]
    found = open_incidents(entries)
    assert [i.id for i in found.incidents] == ["open"]
    assert found.undecodable == 3


def test_an_index_entry_whose_status_or_id_is_no_string_is_counted_never_raised() -> None:
    """One odd entry must not end the whole take-up (its caller gives up on the index when this raises)."""
    entries = [KvEntry("c1.a", b'{"incident": {"status": ["open"], "id": "x"}}', 1),
               KvEntry("c1.b", b'{"incident": {"status": "resolved", "id": ["x"]}}', 2),
               KvEntry("c1.c", b'{"incident": ["not", "a", "map"]}', 3), entry(incident("open"))]
    found = open_incidents(entries)
    assert [i.id for i in found.incidents] == ["open"] and found.undecodable == 3


def test_open_incidents_stops_at_its_limit_and_counts_what_it_left_out() -> None:
    found = open_incidents([entry(incident(f"i{n}")) for n in range(5)], limit=2)
    assert [i.id for i in found.incidents] == ["i0", "i1"] and found.over_limit == 3


@given(st.lists(st.one_of(st.binary(max_size=200), st.builds(
    lambda status: b'{"incident": {"status": "%s"}, "kind": "opened"}' % status.encode(),
    st.sampled_from([s.value for s in IncidentStatus] + ["", "?"])))))
def test_open_incidents_never_raises_on_any_bytes(values: list[bytes]) -> None:
    found = open_incidents(KvEntry(f"k{i}", v, i) for i, v in enumerate(values))
    assert found.incidents == [] and found.undecodable <= len(values)
