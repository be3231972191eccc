"""decide(incident, cluster_view, policy) -> Plan, and the policy file that feeds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from breakfix.remediator.decide import CAUTIOUS_RULE, ClusterView, NodeView, decide
from breakfix.remediator.policy import Policy, load_policy
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.datafile import DataFileError
from breakfix.schemas.incident import Domain, Incident, IncidentScope, StepAction
from tests.conftest import T0


def incident(category: str, *, domain: Domain = Domain.OPERATOR, tenants: tuple[TenantRef, ...] = (),
             codes: tuple[str, ...] = (), scope: IncidentScope = IncidentScope.GPU) -> Incident:
    return Incident(id="inc-1", cluster="c1", scope=scope, node="n1", nodes=("n1",),
                    gpus=(GpuRef(index=3, uuid="GPU-3"),), tenants=tenants, category=category,
                    severity=Severity.CRITICAL, domain=domain, codes=codes, first_seen=T0, last_seen=T0)


POD = TenantRef(namespace="team-a", pod="train-0")
OWNED = ClusterView(controller_owned_pods=frozenset({"team-a/train-0"}))

DECISIONS = [
    pytest.param(incident("application_fault", domain=Domain.TENANT, tenants=(POD,)), OWNED, "tenant-application-fault",
                 Domain.TENANT, ["notify_tenant", "restart_pod"], id="app-fault-owned-pod-restarts"),
    pytest.param(incident("application_fault", domain=Domain.TENANT, tenants=(POD,)), ClusterView(),
                 "tenant-application-fault", Domain.TENANT, ["notify_tenant"], id="app-fault-bare-pod-notify-only"),
    pytest.param(incident("informational", domain=Domain.TENANT, tenants=(POD,)), OWNED, "tenant-informational",
                 Domain.TENANT, ["notify_tenant"], id="xid43-tells-tenant"),
    pytest.param(incident("informational", domain=Domain.NONE), OWNED, "informational", Domain.NONE, [],
                 id="ignore-bucket-records-only"),
    pytest.param(incident("sympathetic", domain=Domain.NONE), OWNED, "informational", Domain.NONE, [],
                 id="solo-xid45-never-escalates"),
    pytest.param(incident("gpu_reset_required"), OWNED, "gpu-reset", Domain.OPERATOR,
                 ["cordon", "drain_gpu", "reset_gpu", "validate", "return_to_service"], id="reset-gpu-is-fenced"),
    pytest.param(incident("gpu_drain_reset_required"), OWNED, "gpu-drain-reset", Domain.OPERATOR,
                 ["cordon", "drain_gpu", "reset_gpu", "validate", "return_to_service"], id="drain-and-reset"),
    pytest.param(incident("node_reboot_required", scope=IncidentScope.NODE), OWNED, "node-reboot", Domain.OPERATOR,
                 ["cordon", "drain", "reboot", "validate", "return_to_service"], id="reboot-node"),
    pytest.param(incident("hardware_support"), OWNED, "hardware-escalation", Domain.OPERATOR,
                 ["cordon", "drain", "escalate"], id="contact-support"),
    pytest.param(incident("unknown_fault"), OWNED, "unknown-fault", Domain.OPERATOR, ["cordon", "escalate"],
                 id="unknown-cordons-and-escalates"),
    pytest.param(incident("brand_new_category"), OWNED, CAUTIOUS_RULE, Domain.OPERATOR, ["cordon", "escalate"],
                 id="unmatched-takes-cautious-fallback"),
]


class TestDecide:
    @pytest.mark.parametrize(("inc", "view", "rule", "domain", "actions"), DECISIONS)
    def test_plan_for_incident(self, policy: Policy, inc: Incident, view: ClusterView, rule: str, domain: Domain,
                               actions: list[str]) -> None:
        plan = decide(inc, view, policy)
        assert plan.rule == rule
        assert plan.domain == domain
        assert plan.actions() == actions
        assert plan.reason

    def test_steps_carry_their_target(self, policy: Policy) -> None:
        plan = decide(incident("gpu_reset_required"), OWNED, policy)
        assert all(s.params["node"] == "n1" and s.params["gpu"] == 3 for s in plan.steps)
        assert plan.steps[3].params["level"] == 2 and plan.steps[3].params["scope"] == "gpu"

    def test_opted_out_broken_node_is_fenced_and_escalated_never_repaired(self, policy: Policy) -> None:
        view = ClusterView(nodes={"n1": NodeView("n1", {"breakfix.io/opt-out": "true"})})
        plan = decide(incident("node_reboot_required"), view, policy)
        assert plan.actions() == ["cordon", "escalate"]
        assert plan.rule == "node-opt-out"

    def test_dry_run_policy_marks_plan(self, policy: Policy) -> None:
        plan = decide(incident("gpu_reset_required"), OWNED, policy.model_copy(update={"dry_run": True}))
        assert plan.dry_run

    @pytest.mark.parametrize("category", ["unknown_fault", "a_category_nobody_wrote"])
    def test_unknown_never_resets_or_reboots_even_with_a_permissive_policy(self, policy: Policy,
                                                                           category: str) -> None:
        """A policy whose catch-all would reboot cannot load, and decide re-checks anyway."""
        plan = decide(incident(category), OWNED, policy)
        assert not {StepAction.RESET_GPU, StepAction.REBOOT, StepAction.REPROVISION} & {s.action for s in plan.steps}


POLICY_ERRORS = [
    pytest.param("version: 1\nrules:\n  - name: r1\n    domain: operator\n    reason: x\n    match: {categories: [x]}\n"
                 "    steps:\n      - action: format_disk\n", 8, "action", id="unknown-action"),
    pytest.param("version: 1\nrules:\n  - name: catch-all\n    domain: operator\n    reason: x\n    steps:\n"
                 "      - action: reboot\n", 3, "must not reboot", id="catch-all-reboot"),
    pytest.param("version: 1\nrules:\n  - name: r1\n    domain: operator\n   reason: [\n", 5, "invalid YAML",
                 id="yaml-syntax"),
    pytest.param("version: 1\nrules: []\n", 2, "rules", id="no-rules"),
    pytest.param("version: 1\nrules:\n  - name: r1\n    domain: sideways\n    reason: x\n", 4, "domain",
                 id="bad-domain"),
]


class TestPolicyFile:
    def test_default_policy_loads(self) -> None:
        assert load_policy().rules

    @pytest.mark.parametrize(("text", "line", "needle"), POLICY_ERRORS)
    def test_bad_policy_names_file_and_line(self, tmp_path: Path, text: str, line: int, needle: str) -> None:
        p = tmp_path / "policy.yaml"
        p.write_text(text)
        with pytest.raises(DataFileError) as exc:
            load_policy(p)
        assert exc.value.path == str(p)
        assert exc.value.line == line, str(exc.value)
        assert needle in str(exc.value)

    def test_missing_policy_file_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(DataFileError, match="cannot read"):
            load_policy(tmp_path / "nope.yaml")
