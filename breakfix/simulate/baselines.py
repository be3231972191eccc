"""What fleets do without breakfix, expressed as policies the same engine runs.

- ``naive-reboot``: any XID cordons, drains and reboots the node, then returns it (no diagnostics,
  no guards) - the script many fleets start with.
- ``cordon-and-wait``: any fault cordons and drains the node and pages a human, who repairs it
  after the model's human response time (roughly the manual NVSentinel default).
- ``none``: nothing happens; tenants restart their own jobs.

Built from the catalog's categories so that a new category is covered without editing this file.
"""

from __future__ import annotations

from breakfix.remediator.guards import BreakerSpec, BudgetSpec, GuardsSpec
from breakfix.remediator.policy import Match, Policy, Rule, StepSpec
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import Domain, StepAction
from breakfix.simulate.engine import Contender

BASELINES = ("naive-reboot", "cordon-and-wait", "none")

# Categories that an XID can land in; naive-reboot reboots for all of them. Non-XID checks
# (fabric links, thermal, endpoint SLOs) are left alone, and unknown faults may never be rebooted
# by any policy (``remediator.policy``), baselines included.
_NON_XID = frozenset({"fabric_link", "thermal_power", "endpoint_slo", "unknown_fault"})

_OPEN_GUARDS = GuardsSpec(budget=BudgetSpec(max_nodes=1_000_000, max_percent=100.0),
                          breaker=BreakerSpec(max_percent=100.0, min_nodes=1_000_000, window_s=1.0),
                          cooldown_s=0.0, retry_caps={}, soak_s=0.0)


def _steps(*actions: StepAction) -> tuple[StepSpec, ...]:
    return tuple(StepSpec(action=a) for a in actions)


def baseline(name: str, catalog: Catalog) -> Contender:
    """The named baseline as a ``Contender``. Raises ``ValueError`` for an unknown name."""
    if name == "none":
        return Contender(name, None, kind="baseline")
    if name == "naive-reboot":
        cats = frozenset(catalog.classes.categories) - _NON_XID
        rule = Rule(name="naive-reboot", match=Match(categories=cats), domain=Domain.OPERATOR,
                    reason="Any XID: cordon, drain and reboot the node.",
                    steps=_steps(StepAction.CORDON, StepAction.DRAIN, StepAction.REBOOT,
                                 StepAction.RETURN_TO_SERVICE))
        return Contender(name, Policy(version=1, settle_s=0.0, guards=_OPEN_GUARDS, rules=(rule,)), kind="baseline")
    if name == "cordon-and-wait":
        rule = Rule(name="cordon-and-wait", match=Match(), domain=Domain.OPERATOR,
                    reason="Any fault: cordon, drain and page a human, who repairs it.",
                    steps=_steps(StepAction.CORDON, StepAction.DRAIN, StepAction.ESCALATE))
        return Contender(name, Policy(version=1, settle_s=0.0, guards=_OPEN_GUARDS, rules=(rule,)), kind="baseline")
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
