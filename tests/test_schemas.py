"""The wire contracts: PCI normalisation, signal validation and ids, JSON Schema freshness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from breakfix.schemas.common import EARLIEST, LATEST, UtcDatetime, format_rfc3339, normalize_pci_bus_id
from breakfix.schemas.export import stale
from breakfix.schemas.incident import IncidentChange
from breakfix.schemas.signal import Signal
from breakfix.schemas.subjects import signal_subject, token
from tests.conftest import sig


class TestPciBusId:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("PCI:0000:3b:00", "0000:3b:00.0"),
            ("00000000:3B:00.0", "0000:3b:00.0"),
            ("0000:D8:00", "0000:d8:00.0"),
            ("PCI:0018:01:00", "0018:01:00.0"),
            ("3b:00.0", "0000:3b:00.0"),
            ("0000:10:1c", "0000:10:1c.0"),
        ],
        ids=["kernel", "nvml", "kernel-upper", "gb200-domain", "short", "device-1c"],
    )
    def test_kernel_and_nvml_forms_normalise_to_one_form(self, raw: str, expected: str) -> None:
        assert normalize_pci_bus_id(raw) == expected

    @pytest.mark.parametrize("raw", ["", "PCI:", "zz:00.0", "0000:3b", "100000000:3b:00.0"])
    def test_garbage_is_rejected(self, raw: str) -> None:
        with pytest.raises(ValueError):
            normalize_pci_bus_id(raw)


class TestSignal:
    def test_same_observation_gets_same_id(self) -> None:
        """Re-sends dedupe because the id depends only on the observation."""
        assert sig(at=1).id == sig(at=1).id
        assert sig(at=1).id != sig(at=2).id
        assert sig(at=1).id != sig(at=1, healthy=True).id

    def test_round_trip_uses_schema_tag(self) -> None:
        s = sig()
        data = s.model_dump_json(by_alias=True)
        assert '"schema":"breakfix.signal/v1"' in data
        assert Signal.model_validate_json(data) == s

    def test_observed_at_is_rfc3339_utc(self) -> None:
        assert '"observed_at":"2026-11-23T12:00:00Z"' in sig().model_dump_json(by_alias=True)


class _Stamped(BaseModel):
    at: UtcDatetime


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
       st.integers(min_value=-23 * 60, max_value=23 * 60), st.booleans())
def test_rfc3339_text_is_strftimes_for_any_instant_and_offset(naive: datetime, offset_min: int, whole: bool) -> None:
    """``format_rfc3339`` writes ``isoformat``'s text; it must stay byte for byte what ``strftime`` writes (signal ids
    are hashed over it), including years before 1000, which ``strftime`` leaves unpadded."""
    value = (naive.replace(microsecond=0) if whole else naive).replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    utc = value.astimezone(UTC)
    expected = utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if utc.microsecond else "%Y-%m-%dT%H:%M:%SZ")
    assert format_rfc3339(value) == expected


@given(st.datetimes(min_value=EARLIEST.replace(tzinfo=None) + timedelta(days=1),
                    max_value=LATEST.replace(tzinfo=None) - timedelta(days=1)),
       st.integers(min_value=-23 * 60, max_value=23 * 60))
def test_any_offset_is_written_as_utc_rfc3339_with_z_and_microseconds_only_when_present(
        naive: datetime, offset_min: int) -> None:
    """Whatever offset a timestamp arrives with, the contracts write it in UTC as ``format_rfc3339`` does
    (pydantic-core's serializer, once the validator has moved the value to UTC), and read the same instant back."""
    value = naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    stamped = _Stamped(at=value)
    assert stamped.model_dump_json() == f'{{"at":"{format_rfc3339(value)}"}}'
    assert stamped.model_dump(mode="json") == {"at": format_rfc3339(value)}
    assert stamped.at.tzinfo is UTC
    assert _Stamped.model_validate_json(stamped.model_dump_json()).at == value

    @pytest.mark.parametrize(
        ("field", "value"),
        [("check", "XID"), ("check", "ecc..dbe"), ("source", "syslog"), ("severity", "panic"),
         ("observed_at", "2026-11-23T12:00:00")],
        ids=["upper-check", "empty-token", "bad-source", "bad-severity", "naive-time"],
    )
    def test_invalid_fields_are_rejected(self, field: str, value: str) -> None:
        data = sig().model_dump(by_alias=True, mode="json")
        data[field] = value
        with pytest.raises(ValidationError):
            Signal.model_validate(data)

    def test_gpu_pci_is_normalised_on_input(self) -> None:
        data = sig().model_dump(by_alias=True, mode="json")
        data["gpu"]["pci_bus_id"] = "00000000:3B:00.0"
        assert Signal.model_validate(data).gpu.pci_bus_id == "0000:3b:00.0"  # type: ignore[union-attr]

    def test_unknown_fields_are_rejected(self) -> None:
        data = sig().model_dump(by_alias=True, mode="json")
        data["surprise"] = 1
        with pytest.raises(ValidationError):
            Signal.model_validate(data)


class TestSubjects:
    def test_node_names_with_dots_become_one_token(self) -> None:
        assert signal_subject("prod.eu", "node-1.rack.example") == "breakfix.signals.prod_eu.node-1_rack_example"
        assert token("*>") == "__"


class TestJsonSchema:
    def test_committed_json_schemas_match_the_models(self) -> None:
        """Fails when a model changed without `breakfix schema export`."""
        assert stale() == []

    def test_incident_change_schema_names_the_contract(self) -> None:
        schema = IncidentChange.model_json_schema(by_alias=True)
        assert "incident" in schema["properties"]
