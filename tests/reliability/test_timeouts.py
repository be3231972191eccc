"""Every wait has a timeout: a policy step that hangs (a GPU reset that never answers, a diagnostic that never
ends) times out at its ``timeout_s``, the step fails with the reason in the audit, and the ladder takes its next
rung; a rung's own ``timeout_s`` bounds all of its steps. Through the remediator service on the in-memory bus."""

from __future__ import annotations

import pytest

from breakfix.remediator.policy import Match, Policy, Rule, RungSpec, StepSpec
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas.incident import ActionKind, ActionOutcome, StepAction
from tests.test_remediator_service import Harness, fast, incident


def ladder(reset: StepSpec, rung_timeout: float | None = None) -> Rule:
    return Rule(name="hang-test", match=Match(categories=frozenset({"gpu_reset_required"})), domain="operator",
                reason="test", ladder=(
                    RungSpec(name="reset", steps=(reset, StepSpec(action=StepAction.VALIDATE, timeout_s=30)),
                             timeout_s=rung_timeout),
                    RungSpec(name="reboot", steps=(StepSpec(action=StepAction.CORDON),
                                                   StepSpec(action=StepAction.REBOOT)))))


@pytest.mark.parametrize(("hang", "rule", "why"), [
    ("reset_gpu", ladder(StepSpec(action=StepAction.RESET_GPU, timeout_s=0.05)), "(step timeout_s)"),
    ("validate", ladder(StepSpec(action=StepAction.RESET_GPU), rung_timeout=0.1), "(rung timeout_s)"),
], ids=["hanging-step", "hanging-step-inside-a-rung-budget"])
async def test_a_hanging_step_times_out_and_the_next_rung_runs(policy: Policy, hang: str, rule: Rule,
                                                              why: str) -> None:
    cluster = SimCluster({"n1": SimNode("n1", pods={"ml/p": 2})}, hanging={hang})
    async with Harness(fast(policy).model_copy(update={"rules": (rule,)}), cluster) as h:
        await h.open(incident())
        await h.until(lambda: any(r.kind is ActionKind.PLAN and r.outcome is ActionOutcome.COMPLETED
                                  for r in h.records()))
    failed = next(r for r in h.records() if r.outcome is ActionOutcome.FAILED)
    assert failed.action is StepAction(hang) and "timed out" in failed.reason and why in failed.reason
    skipped = next(r for r in h.records() if r.outcome is ActionOutcome.SKIPPED)
    assert "taking rung reboot" in skipped.reason and cluster.nodes["n1"].reboots == 1
