"""Plans that follow their incident, as tables (``remediator.follow``): a plan in flight whose incident turns into an
unknown fault (or a category whose plan never resets, reboots or reprovisions) is replaced whatever it ran, at its
next step; a deferred repair's wait for an idle GPU ends when another plan fits the incident."""

from __future__ import annotations

from typing import Any

import pytest

from breakfix.remediator.decide import decide
from breakfix.remediator.follow import redecision, turns_cautious, wait_ends
from breakfix.remediator.policy import Policy
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.common import GpuRef, Severity
from breakfix.schemas.incident import Incident, IncidentScope
from tests.conftest import T0


def inc(category: str = "gpu_reset_required", codes: tuple[str, ...] = ("xid:48",),
        severity: Severity = Severity.CRITICAL, **kw: Any) -> Incident:
    return Incident(id="inc-1", cluster="c1", scope=IncidentScope.GPU, node="n1", nodes=("n1",),
                    gpus=(GpuRef(index=2),), category=category, severity=severity, codes=codes, first_seen=T0,
                    last_seen=T0, **kw)


VIEW = ClusterView(nodes={f"n{i}": NodeView(f"n{i}", {}) for i in range(1, 11)})
XID48 = inc()
REMAP = inc(codes=("row_remap.pending",), severity=Severity.WARNING)
XID94 = inc("application_fault", ("xid:94",), Severity.WARNING)
SUSPECT = inc("gpu_suspect", ("xid:13",))
UNKNOWN = inc("unknown_fault", ("xid:48", "xid:173"))


class TestAPlanInFlightTurnsCautious:
    @pytest.mark.parametrize(("old", "new", "acted", "cautious", "replaced"), [
        (XID48, UNKNOWN, True, True, True),
        (XID48, UNKNOWN, False, True, True),
        (SUSPECT, inc("unknown_fault", ("xid:13", "xid:173")), True, True, True),
        (XID48, inc("hardware_support", ("xid:48", "row_remap.failure")), True, True, True),
        (XID94, inc("gpu_monitor", ("xid:94", "dcgm:DCGM_FR_SXID_ERROR")), True, True, True),
        (XID48, inc("node_reboot_required", ("xid:48", "xid:154")), True, False, True),
        (XID48, inc("gpu_drain_reset_required", ("xid:48", "xid:63")), True, False, False),
        (XID48, inc(codes=("xid:48", "xid:31")), True, False, False),
    ], ids=["unknown-after-the-drain-started-is-replaced", "unknown-before-anything-ran-is-replaced",
            "unknown-replaces-a-plan-that-would-return-the-node", "rma-category-stops-a-reset",
            "monitor-only-category-stops-a-deferred-reset", "reboot-needed-stops-at-once-as-before",
            "drain-reset-companion-after-the-reset-runs-on", "same-category-runs-on"])
    def test_an_unknown_or_never_reset_category_replaces_the_plan_whatever_it_ran(
            self, policy: Policy, old: Incident, new: Incident, acted: bool, cautious: bool, replaced: bool) -> None:
        before, after = decide(old, VIEW, policy), decide(new, VIEW, policy)
        assert turns_cautious(before, old.category, after, new) is cautious
        why = redecision(before, old.category, after, new, acted)
        assert (why is not None) is replaced
        if cautious:
            assert why is not None and "never resets, reboots or reprovisions" in why
            assert f"{old.category} -> {new.category}" in why

    def test_the_cautious_plan_itself_is_not_replaced_again(self, policy: Policy) -> None:
        plan = decide(UNKNOWN, VIEW, policy)
        later = UNKNOWN.model_copy(update={"codes": ("xid:48", "xid:173", "xid:174"), "version": 3})
        assert redecision(plan, "unknown_fault", decide(later, VIEW, policy), later, True) is None


class TestADeferredWaitEndsWhenAnotherPlanFits:
    @pytest.mark.parametrize(("old", "new", "rule", "ends"), [
        (REMAP, inc("node_reboot_required", ("row_remap.pending", "xid:154"), Severity.FATAL), "node-reboot", True),
        (REMAP, inc(codes=("row_remap.pending", "xid:48")), "gpu-reset", True),
        (REMAP, inc("hardware_support", ("row_remap.pending", "row_remap.failure")), "hardware-escalation", True),
        (XID94, inc("gpu_reset_required", ("xid:94", "xid:48")), "gpu-reset", True),
        (XID94, inc("unknown_fault", ("xid:94", "xid:173")), "unknown-fault", True),
        (XID94, inc("application_fault", ("xid:94", "xid:45"), Severity.WARNING), "gpu-reset-when-idle", False),
        (REMAP, inc(codes=("row_remap.pending", "retired_pages.pending"), severity=Severity.WARNING),
         "gpu-reset-when-idle", False),
    ], ids=["xid154-joins-a-pending-remap", "xid48-joins-a-pending-remap", "failed-remap-joins-a-pending-remap",
            "xid48-joins-xid94", "unknown-code-joins-xid94", "sympathetic-xid45-keeps-waiting",
            "another-pending-repair-keeps-waiting"])
    def test_a_change_that_fits_another_plan_ends_the_wait(self, policy: Policy, old: Incident, new: Incident,
                                                           rule: str, ends: bool) -> None:
        waiting, now = decide(old, VIEW, policy), decide(new, VIEW, policy)
        assert waiting.rule == "gpu-reset-when-idle" and now.rule == rule
        why = wait_ends(waiting, old.category, now, new)
        assert (why is not None) is ends
        if why is not None:
            assert why.startswith(f"re-decided: {rule}")
