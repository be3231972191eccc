"""The guards' configuration: the ``guards:`` section of the remediation policy file.

Validated at start-up with bounds (finite, positive where needed) as part of ``policy.load_policy``;
read by the pure checks in ``remediator.guards`` and by the service's waits (``remediator.service``).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from breakfix.schemas.incident import StepAction

_STRICT = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BudgetSpec(BaseModel):
    model_config = _STRICT
    max_nodes: int = Field(1, ge=0)
    max_percent: float = Field(5.0, ge=0, le=100)

    def limit(self, pool: int) -> int:
        """The larger of the absolute count and the percentage, so small pools can still heal."""
        return max(self.max_nodes, math.floor(pool * self.max_percent / 100))


class TopologyBudgetSpec(BudgetSpec):
    key: str


class BreakerSpec(BaseModel):
    model_config = _STRICT
    max_percent: float = Field(10.0, gt=0, le=100)
    min_nodes: int = Field(3, ge=1)
    window_s: float = Field(600.0, gt=0)


class KillSwitchSpec(BaseModel):
    model_config = _STRICT
    rules: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()


class GuardsSpec(BaseModel):
    model_config = _STRICT
    budget: BudgetSpec = BudgetSpec(max_nodes=2, max_percent=5.0)
    topology_budgets: tuple[TopologyBudgetSpec, ...] = ()
    breaker: BreakerSpec = BreakerSpec()
    cooldown_s: float = Field(1800.0, ge=0, description="Damps recurrences of the same fault on a node.")
    retry_caps: dict[StepAction, int] = Field(default_factory=lambda: {StepAction.REBOOT: 1, StepAction.RESET_GPU: 2,
                                                                       StepAction.REPROVISION: 1})
    retry_window_s: float = Field(86400.0, gt=0)
    kill_switch: KillSwitchSpec = KillSwitchSpec()
    soak_s: float = Field(300.0, ge=0, description="Quiet time with no new fault before capacity returns.")
    budget_wait_s: float = Field(3600.0, gt=0, description="A plan waiting this long for budget goes to a human.")
    idle_poll_s: float = Field(30.0, gt=0, description="How often a deferred repair looks whether the GPU is idle.")
    retention_s: float = Field(86400.0, gt=0, description="Finished incidents are forgotten after this.")
