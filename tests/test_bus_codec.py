"""The decoders are total: any bytes give a contract model or a DecodeError, never another exception.

Hypothesis drives arbitrary bytes, arbitrary JSON and valid documents with one field replaced by
arbitrary JSON through every decoder a daemon runs on peer input (signal, incident change, action
record, agent command and reply, correlator checkpoint), with a fixed example budget.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from breakfix.bus.codec import DecodeError, decoder, signal_subject_mismatch
from breakfix.correlator.checkpoint import Checkpoint, CheckpointError
from breakfix.schemas.agent import AgentCommand, AgentReply
from breakfix.schemas.incident import ActionRecord, IncidentChange
from breakfix.schemas.signal import Signal
from tests.conftest import sig

BUDGET = settings(max_examples=50, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MODELS: list[type[BaseModel]] = [Signal, IncidentChange, ActionRecord, AgentCommand, AgentReply]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                         st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                          "2026-13-01T00:00:00Z", "1969-12-31T23:59:59Z", "NaN", "-inf",
                                          "2026-11-23T12:00:00Z"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def valid_doc(model: type[BaseModel]) -> dict[str, Any]:
    """One valid wire document per model, to mutate."""
    s = sig()
    docs: dict[type[BaseModel], dict[str, Any]] = {
        Signal: json.loads(s.model_dump_json(by_alias=True)),
        AgentCommand: {"id": "inc-1/0/reset_gpu", "node": "n1", "action": "reset_gpu", "incident": "inc-1",
                       "gpu_index": 0, "issued_at": "2026-11-23T12:00:00Z"},
        AgentReply: {"id": "cmd-1", "node": "n1", "action": "reset_gpu", "ok": True, "detail": "done",
                     "at": "2026-11-23T12:00:00Z"},
        ActionRecord: {"id": "act-1", "incident_id": "inc-1", "cluster": "c1", "kind": "step", "action": "cordon",
                       "outcome": "started", "actor": "remediator", "at": "2026-11-23T12:00:00Z"},
    }
    if model is IncidentChange:
        return {"kind": "opened", "at": "2026-11-23T12:00:00Z", "incident": {
            "id": "inc-1", "cluster": "c1", "scope": "gpu", "node": "n1", "category": "gpu_reset_required",
            "severity": "critical", "first_seen": "2026-11-23T12:00:00Z", "last_seen": "2026-11-23T12:00:00Z"}}
    return docs[model]


def _total(model: type[BaseModel], data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        assert isinstance(decoder(model)(data), model)


class TestValidDocuments:
    @pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
    def test_the_sample_document_decodes(self, model: type[BaseModel]) -> None:
        assert isinstance(decoder(model)(_dumps(valid_doc(model))), model)


class TestPoison:
    @pytest.mark.parametrize(("model", "key"), [
        (Signal, "observed_at"), (AgentCommand, "issued_at"), (AgentReply, "at"), (ActionRecord, "at"),
        (IncidentChange, "first_seen"), (Signal, "value"), (Signal, "threshold"), (IncidentChange, "time_to_repair_s"),
    ], ids=lambda v: v.__name__ if isinstance(v, type) else v)
    @pytest.mark.parametrize("value", [
        "0001-01-01T00:00:00+01:00",  # OverflowError in astimezone before the fix
        "9999-12-31T23:59:59-01:00", "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z",
        float("nan"), float("inf"), float("-inf"), "Infinity",
    ])
    def test_out_of_range_times_and_non_finite_numbers_are_decode_errors(self, model: type[BaseModel], key: str,
                                                                         value: Any) -> None:
        doc = valid_doc(model)
        inner = doc["incident"] if model is IncidentChange else doc
        inner[key] = value
        with pytest.raises(DecodeError):
            decoder(model)(_dumps(doc))

    @pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
    @pytest.mark.parametrize("data", [
        b"", b"null", b"[]", b"\xff\xfe{}", b'{"id": "\xc3\x28"}', b"{" * 100_000, b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000, b"NaN", b"1e999", b'"x"' * 10,
    ], ids=["empty", "null", "list", "bom", "bad-utf8", "open-braces", "deep-list", "deep-object", "nan",
            "huge-number", "garbage"])
    def test_malformed_bytes_are_decode_errors(self, model: type[BaseModel], data: bytes) -> None:
        with pytest.raises(DecodeError):
            decoder(model)(data)

    def test_an_oversized_message_is_refused_before_parsing(self) -> None:
        with pytest.raises(DecodeError, match="bytes is over"):
            decoder(Signal)(b" " * (8 * 1024 * 1024 + 1))


class TestProperties:
    @pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
    @BUDGET
    @given(data=st.binary(max_size=300))
    def test_any_bytes_decode_or_raise_decode_error(self, model: type[BaseModel], data: bytes) -> None:
        _total(model, data)

    @pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
    @BUDGET
    @given(value=json_values)
    def test_any_json_decodes_or_raises_decode_error(self, model: type[BaseModel], value: Any) -> None:
        _total(model, _dumps(value))

    @pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
    @BUDGET
    @given(data=st.data())
    def test_a_valid_document_with_one_field_replaced_decodes_or_raises_decode_error(
            self, model: type[BaseModel], data: st.DataObject) -> None:
        doc = valid_doc(model)
        inner = doc["incident"] if model is IncidentChange and data.draw(st.booleans()) else doc
        key = data.draw(st.sampled_from([*sorted(inner), "extra"]))
        inner[key] = data.draw(json_values)
        _total(model, _dumps(doc))

    @BUDGET
    @given(when=st.datetimes(timezones=st.timezones()))
    def test_any_aware_timestamp_is_in_range_utc_or_a_decode_error(self, when: datetime) -> None:
        doc = valid_doc(Signal)
        doc["observed_at"] = when.isoformat()
        try:
            got = decoder(Signal)(_dumps(doc))
        except DecodeError:
            return
        assert got.observed_at.tzinfo is UTC
        assert datetime(1970, 1, 1, tzinfo=UTC) <= got.observed_at < datetime(2200, 1, 1, tzinfo=UTC)

    @BUDGET
    @given(value=json_values)
    def test_any_checkpoint_document_loads_or_raises_checkpoint_error(self, value: Any) -> None:
        doc = {"format": "breakfix.correlator.checkpoint/v1", "positions": value, "state": value}
        for blob in (zlib.compress(_dumps(value)), zlib.compress(_dumps(doc))):
            with contextlib.suppress(CheckpointError):
                Checkpoint.decode(blob)

    @BUDGET
    @given(blob=st.binary(max_size=200))
    def test_any_checkpoint_bytes_load_or_raise_checkpoint_error(self, blob: bytes) -> None:
        with contextlib.suppress(CheckpointError):
            Checkpoint.decode(blob)


class TestSignalSubject:
    @pytest.mark.parametrize(("subject", "ok"), [
        ("breakfix.signals.c1.n1", True),
        ("breakfix.signals.c1.n1.3", True),  # partitioned stream: the server appends the partition
        ("breakfix.signals.c1.n2", False),  # node A's body on node B's subject, or the reverse
        ("breakfix.signals.c2.n1", False),
        ("breakfix.incidents.c1", False),
    ])
    def test_the_subject_must_name_the_bodys_cluster_and_node(self, subject: str, ok: bool) -> None:
        assert (signal_subject_mismatch(sig(node="n1"), subject) is None) is ok

    def test_a_forged_signal_is_a_decode_error_only_when_the_subject_is_known(self) -> None:
        data = sig(node="n1").model_dump_json(by_alias=True).encode()
        decode: Any = decoder(Signal)
        assert decode(data).node == "n1"
        with pytest.raises(DecodeError, match="forged Signal"):
            decode.with_subject(data, "breakfix.signals.c1.victim")
