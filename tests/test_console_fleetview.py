"""The console's budget-use figure: nodes in operator remediation now, per cluster and topology key."""

from __future__ import annotations

from breakfix.console.fleetview import budget_use
from breakfix.schemas.incident import IncidentStatus
from tests.console_fixtures import incident


def test_a_node_with_two_incidents_in_remediation_counts_once() -> None:
    both = [incident("inc-reboot", status=IncidentStatus.MITIGATING),
            incident("inc-link", status=IncidentStatus.VALIDATING),
            incident("inc-other", node="gpu-node-002", status=IncidentStatus.MITIGATING, rack="rack-2")]
    assert budget_use(both) == {"cluster=c1": 2, "rack=rack-1": 1, "rack=rack-2": 1}


def test_open_escalated_and_resolved_incidents_use_no_budget() -> None:
    idle = [incident("a", status=IncidentStatus.OPEN), incident("b", status=IncidentStatus.ESCALATED),
            incident("c", status=IncidentStatus.RESOLVED)]
    assert budget_use(idle) == {}
