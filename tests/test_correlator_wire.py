"""The hot-path incident JSON (``change_json``) is the same contract as the pydantic model."""

from __future__ import annotations

import json

import pytest

from breakfix.bus.codec import encode
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.model import FIELDS, Change
from breakfix.correlator.wire import change_json
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    ActionRecord,
    ChangeKind,
    Domain,
    IncidentChange,
    Plan,
    Step,
    StepAction,
)
from tests.conftest import T0, make_rules
from tests.test_correlator_rules import RULE_CASES, ib_down
from tests.test_correlator_service import workload


def incidents(catalog: Catalog) -> list[Change]:
    core = Correlator(catalog)
    signals = [s for case in RULE_CASES for s in case.values[0]] + workload(nodes=16, rounds=8)
    signals += [ib_down(f"sw{i}", "leaf-09", at=i) for i in range(4)]
    for s in signals:
        core.ingest(s, s.observed_at)
    first = next(iter(core.incidents))
    plan = Plan(domain=Domain.OPERATOR, rule="gpu-reset", reason="r", steps=(Step(action=StepAction.RESET_GPU),))
    core.apply_action(ActionRecord(id="a1", cluster="c1", incident_id=first, kind=ActionKind.PLAN,
                                   outcome=ActionOutcome.PLANNED, actor="t", plan=plan, at=T0), T0)
    return [Change(ChangeKind.UPDATED, inc) for inc in core.incidents.values()]


def test_change_json_decodes_to_the_validated_model(catalog: Catalog) -> None:
    changes = incidents(catalog)
    assert len(changes) > 20 and any(c.incident.plan for c in changes) and any(c.incident.members for c in changes)
    for ch in changes:
        fast = change_json(ch.kind, ch.incident, T0)
        reference = IncidentChange.model_validate_json(encode(ch.to_wire(T0)))
        assert IncidentChange.model_validate_json(fast) == reference
        assert json.loads(fast) == json.loads(encode(reference))


def test_change_json_writes_every_wire_field_in_the_field_maps_order(catalog: Catalog) -> None:
    """``change_json``'s written-out body against ``FIELDS``: a wire field added to the map and not to the body
    (or the other way round) fails here, before any decode."""
    body = json.loads(change_json(ChangeKind.UPDATED, incidents(catalog)[0].incident, T0))["incident"]
    assert list(body) == [f.wire_name for f in FIELDS if f.wire_name] + ["schema"]


@pytest.mark.parametrize("kind", list(ChangeKind))
def test_every_change_kind_round_trips(catalog: Catalog, kind: ChangeKind) -> None:
    ch = incidents(catalog)[0]
    assert IncidentChange.model_validate_json(change_json(kind, ch.incident, T0)).kind is kind


def test_checkpoint_round_trip_keeps_sources_overflow_and_the_gpu_index(catalog: Catalog) -> None:
    """One field map for wire and checkpoint: a restored core has the same incidents, and XID 154 still joins
    the GPU's incident after a restart (NVIDIA Xid catalog, XID_154)."""
    from breakfix.correlator.app import CorrelatorConfig, build_core
    from breakfix.correlator.checkpoint import Checkpoint
    from tests.conftest import sig

    core = build_core(CorrelatorConfig(catalog=catalog, rules=make_rules(caps={"codes": 2})))
    for s in [sig(code="94", pod="api-7d9f8c6b5-x2k4p"), sig(code="173", gpu_index=1), sig(code="174", gpu_index=1),
              sig(code="175", gpu_index=1)]:
        core.ingest(s, s.observed_at)
    restored = build_core(CorrelatorConfig(catalog=catalog, rules=core.rules))
    restored.load_state(Checkpoint.decode(Checkpoint(core.to_state()).encode()).state)
    before = {i: t.snapshot() for i, t in core.incidents.items()}
    assert {i: t.snapshot() for i, t in restored.incidents.items()} == before
    assert any(t.overflow for t in restored.incidents.values()) and all(t.source for t in restored.incidents.values())
    late = sig(code="154", at=5, message="GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)")
    restored.ingest(late, late.observed_at)
    assert sorted(t.category for t in restored.incidents.values()) == ["gpu_reset_required", "unknown_fault"]
