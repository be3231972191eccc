"""``breakfix incidents``' rows (breakfix.cli.listing): index values decoded as far as the listing
reads them, agreeing with the full ``Incident`` decode, and the deferred aiohttp import that keeps
the CLI's start-up short."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakfix.bus.codec import encode
from breakfix.cli import listing
from breakfix.schemas.incident import ChangeKind, Incident, IncidentChange, IncidentStatus, WaitingOn
from tests.conftest import T0
from tests.console_fixtures import LADDER, incident

OPEN = incident("inc-a", waiting=WaitingOn.APPROVAL)
PLAN = LADDER


def _value(inc: Incident) -> bytes:
    return encode(IncidentChange(kind=ChangeKind.UPDATED, at=T0, incident=inc))


def test_a_row_reads_the_listed_fields_of_an_index_value() -> None:
    r = listing.row(_value(OPEN))
    assert r is not None
    assert listing.line(r, T0 + timedelta(hours=2, minutes=5)) == [
        "inc-a", "2h05m", "c1/gpu-node-001 gpu gpu2", "gpu_reset_required", "critical", "operator", "open",
        "approval", "team-a/train-0", f"{PLAN.rule}: " + " -> ".join(s.action.value for s in PLAN.steps)]


def test_the_row_the_watch_builds_from_an_incident_equals_the_row_from_its_bytes() -> None:
    assert listing.row_of(OPEN) == listing.row(_value(OPEN))


def test_the_json_format_keeps_the_whole_incident_document() -> None:
    pair = listing.row_and_doc(_value(OPEN))
    assert pair is not None
    r, doc = pair
    assert r == listing.row(_value(OPEN))
    assert doc["evidence"] == list(OPEN.evidence) and doc["title"] == OPEN.title


@pytest.mark.parametrize(("value", "why"), [
    (b"", "empty"),
    (b"{not json", "not JSON"),
    (b"[]", "not an object"),
    (b'{"kind": "updated"}', "no incident"),
    (_value(OPEN).replace(b'"status":"open"', b'"status":"on-fire"'), "an unknown status"),
    (_value(OPEN).replace(b'"severity":"critical"', b'"severity":3'), "a severity that is not a level"),
    (_value(OPEN).replace(b'"first_seen":"2', b'"first_seen":"x2'), "a time that is not RFC 3339"),
    (_value(OPEN).replace(b'"first_seen":"2026', b'"first_seen":"1969'), "a time before the contract's bounds"),
    (_value(OPEN).replace(b'"first_seen":"2026', b'"first_seen":"2201'), "a time after the contract's bounds"),
])
def test_a_broken_index_value_is_not_a_row(value: bytes, why: str) -> None:
    assert b'"status":"open"' in _value(OPEN) and b'"severity":"critical"' in _value(OPEN)
    assert b'"first_seen":"2026' in _value(OPEN)
    assert listing.row(value) is None, why
    assert listing.row_and_doc(value) is None, why


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_row_or_none_without_raising(value: bytes) -> None:
    assert listing.row(value) is None or isinstance(listing.row(value), dict)
    assert listing.row_and_doc(value) is None or isinstance(listing.row_and_doc(value), tuple)


def test_open_incidents_sort_before_closed_the_escalated_last_then_the_oldest_first() -> None:
    rows = {name: listing.row(_value(inc)) for name, inc in {
        "old": incident("old", minutes=0), "new": incident("new", minutes=5),
        "esc": incident("esc", status=IncidentStatus.ESCALATED),
        "done": incident("done", status=IncidentStatus.RESOLVED)}.items()}
    ordered = sorted((r for r in rows.values() if r is not None), key=listing.sort_key)
    assert [r["id"] for r in ordered] == ["old", "new", "esc", "done"]
    assert [listing.shown(r, False) for r in ordered] == [True, True, True, False]
    assert listing.shown(ordered[-1], True)


def test_a_folded_incident_is_listed_only_with_all() -> None:
    folded = listing.row(_value(incident("member").model_copy(update={"parent": "inc-root"})))
    assert folded is not None and not listing.shown(folded, False) and listing.shown(folded, True)


def test_the_cli_defers_aiohttp_until_it_is_used() -> None:
    code = ("import sys, breakfix.cli.main, nats.aio.transport as t\n"
            "assert 'aiohttp.connector' not in sys.modules, 'aiohttp loaded at start-up'\n"
            "from aiohttp import web\n"
            "assert web.Application and t.aiohttp.ClientSession and t.aiohttp.WSMsgType.BINARY\n"
            "import aiohttp, aiohttp.web_runner\n"
            "assert sys.modules['aiohttp'] is aiohttp and aiohttp.ClientTimeout(total=1).total == 1\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_json_lines_round_trip_through_orjson() -> None:
    pair = listing.row_and_doc(_value(OPEN))
    assert pair is not None and orjson.loads(orjson.dumps(pair[1]))["id"] == "inc-a"
