"""The hot-path incident JSON (``change_json``) is the same contract as the pydantic model."""

from __future__ import annotations

import json

import pytest

from breakfix.bus.codec import encode
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.model import Change, change_json
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
from tests.conftest import T0
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


@pytest.mark.parametrize("kind", list(ChangeKind))
def test_every_change_kind_round_trips(catalog: Catalog, kind: ChangeKind) -> None:
    ch = incidents(catalog)[0]
    assert IncidentChange.model_validate_json(change_json(kind, ch.incident, T0)).kind is kind
