"""The remediation policy: a validated YAML file of rules that map incidents to steps.

Loaded once at start-up by ``load_policy`` (file and line in every error). ``decide``
matches rules in order; the first match wins. The shipped default is
``remediator/policies/default.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.remediator.guardspec import GuardsSpec
from breakfix.schemas.catalog import Catalog, default_catalog
from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import DataFileError, LineMap, line_for, parse_yaml, read_text, validate
from breakfix.schemas.incident import Domain, IncidentScope, StepAction

POLICY_DIR = Path(__file__).resolve().parent / "policies"
DEFAULT_POLICY = POLICY_DIR / "default.yaml"

# Actions an unknown fault may never take automatically.
FORBIDDEN_FOR_UNKNOWN = frozenset({StepAction.RESET_GPU, StepAction.REBOOT, StepAction.REPROVISION})

_STRICT = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

# How long a step may take when the policy does not say (the executor enforces it; a timed-out step
# fails and the ladder takes its next rung). A reboot waits for the node agent's new boot id; a
# level-3 DCGM diagnostic runs for tens of minutes (NVIDIA DCGM diagnostics guide: r3 ~ 30 min).
ACTION_TIMEOUT_S: dict[StepAction, float] = {
    StepAction.DRAIN: 1800.0, StepAction.DRAIN_GPU: 1800.0, StepAction.RESET_GPU: 900.0,
    StepAction.REBOOT: 2700.0, StepAction.REPROVISION: 14400.0, StepAction.VALIDATE: 5400.0,
}
DEFAULT_STEP_TIMEOUT_S = 600.0


class Match(BaseModel):
    """All given fields must match; an empty match matches every incident."""

    model_config = _STRICT

    categories: frozenset[str] = frozenset()
    scopes: frozenset[IncidentScope] = frozenset()
    domains: frozenset[Domain] = frozenset()
    codes: frozenset[str] = Field(default=frozenset(), description="Any of these codes, e.g. xid:48.")
    only_codes: frozenset[str] = Field(default=frozenset(), description="Every code of the incident is one of these.")
    min_severity: Severity | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    whole_gpu: bool | None = Field(default=None, description="True: only where the node's labels prove whole, "
                                   "unshared GPUs (decide.whole_gpu); false: only where they do not; unset: either.")


class StepSpec(BaseModel):
    model_config = _STRICT

    action: StepAction
    params: dict[str, str | int | bool] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, description="Default: ACTION_TIMEOUT_S for the action.")
    requires_approval: bool = False
    when: str | None = Field(default=None, pattern=r"^(controller_owned|tenant_known)$")

    def timeout(self) -> float:
        return self.timeout_s or ACTION_TIMEOUT_S.get(self.action, DEFAULT_STEP_TIMEOUT_S)


class RungSpec(BaseModel):
    """One rung of a ladder; when a step fails (a validation included) the next rung runs."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    steps: tuple[StepSpec, ...] = Field(min_length=1)
    timeout_s: float | None = Field(default=None, gt=0, description="Default: the sum of its steps' timeouts.")

    def timeout(self) -> float:
        return self.timeout_s or sum(s.timeout() for s in self.steps)


class Rule(BaseModel):
    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    match: Match = Field(default_factory=Match)
    domain: Domain
    reason: str = Field(min_length=1)
    steps: tuple[StepSpec, ...] = ()
    ladder: tuple[RungSpec, ...] = ()
    enabled: bool = True
    shadow: bool = Field(default=False, description="Record what would happen; never act.")
    defer_s: float | None = Field(
        default=None, gt=0, description="Deferred repair: the first disruptive step waits until the GPU is idle "
        "(its job ended), at most this long; NVIDIA says work may continue (pending row remap, XID 94).")

    def rungs(self) -> tuple[RungSpec, ...]:
        if self.ladder:
            return self.ladder
        return (RungSpec(name="main", steps=self.steps),) if self.steps else ()

    @model_validator(mode="after")
    def _unknown_is_cautious(self) -> Rule:
        if self.steps and self.ladder:
            raise ValueError(f"rule {self.name!r}: give either steps or a ladder, not both")
        may_match_unknown = not self.match.categories or "unknown_fault" in self.match.categories
        every = [s for r in self.rungs() for s in r.steps]
        bad = sorted({s.action.value for s in every if s.action in FORBIDDEN_FOR_UNKNOWN})
        if may_match_unknown and bad:
            raise ValueError(
                f"rule {self.name!r} can match unknown faults and must not {', '.join(bad)}; "
                "list its categories explicitly"
            )
        return self


class Policy(BaseModel):
    model_config = _STRICT

    version: int = Field(ge=1, le=1)
    dry_run: bool = False
    settle_s: float = Field(default=2.0, ge=0, description="Wait for companion signals before deciding.")
    opt_out_label: str = "breakfix.io/opt-out"
    guards: GuardsSpec = GuardsSpec()
    rules: tuple[Rule, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                raise ValueError(f"duplicate rule name {r.name!r}")
            seen.add(r.name)
        return self


def load_policy(path: str | Path | None = None, catalog: Catalog | None = None) -> Policy:
    """Load and validate a policy file (the shipped default when ``path`` is None) against the catalog
    (the shipped one when ``catalog`` is None): see ``check_names``."""
    p = Path(path or DEFAULT_POLICY)
    data, lines = parse_yaml(read_text(p), p)
    policy = validate(Policy, data, p, lines)
    check_names(policy, catalog or default_catalog(), p, lines)
    return policy


def check_names(policy: Policy, catalog: Catalog, path: str | Path, lines: LineMap) -> None:
    """Every category and code a rule matches on, and every code and rule the kill switch names, must exist: a typo
    would make a rule match nothing (its incidents fall to a later rule) or leave a switched-off code acting, with
    nothing said. ``DataFileError`` (``file:line: reason``) on the first unknown name."""
    cats = catalog.classes.categories
    for i, rule in enumerate(policy.rules):
        m = rule.match
        for field, names in (("categories", m.categories), ("codes", m.codes), ("only_codes", m.only_codes)):
            for name in sorted(names):
                why = (None if name in cats else f"unknown category {name!r} (not in the catalog)") \
                    if field == "categories" else catalog.unknown_code_key(name)
                if why is not None:
                    raise DataFileError(path, line_for(lines, ("rules", i, "match", field)),
                                        f"rules.{i}.match.{field} (rule {rule.name}): {why}")
    ks = policy.guards.kill_switch
    for name in sorted(ks.rules - {r.name for r in policy.rules}):
        raise DataFileError(path, line_for(lines, ("guards", "kill_switch", "rules")),
                            f"guards.kill_switch.rules: no rule named {name!r} in this policy")
    for code in sorted(ks.codes):
        why = catalog.unknown_code_key(code, listed_only=False)
        if why is not None:
            raise DataFileError(path, line_for(lines, ("guards", "kill_switch", "codes")),
                                f"guards.kill_switch.codes: {why}")
