"""decide(incident, cluster_view, policy) -> Plan, and the policy file that feeds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from breakfix.remediator.decide import CAUTIOUS_RULE, ClusterView, NodeView, decide, fenced_members
from breakfix.remediator.guardspec import BudgetSpec, GuardsSpec, TopologyBudgetSpec
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
    pytest.param(incident("fabric_config", codes=("fabric.config",)), OWNED, "fabric-configuration",
                 Domain.OPERATOR, ["cordon", "escalate"], id="fabric-configuration-is-a-humans-never-a-reset"),
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


def racks(n: int = 8, labelled: bool = True) -> ClusterView:
    """``n`` nodes, n1..n4 in rack r1 and the rest in rack r2 (unlabelled: racks unknown to the view)."""
    return ClusterView(nodes={f"n{i}": NodeView(f"n{i}", {"rack": "r1" if i <= 4 else "r2"} if labelled else {})
                              for i in range(1, n + 1)})


def group(*nodes: str, topology: dict[str, str] | None = None) -> Incident:
    return Incident(id="fab-1", cluster="c1", scope=IncidentScope.FABRIC, node=None, nodes=nodes,
                    category="fabric_link", severity=Severity.CRITICAL, codes=("ib.link_down",),
                    topology=topology or {}, first_seen=T0, last_seen=T0)


RACK_OF_2 = GuardsSpec(budget=BudgetSpec(max_nodes=3, max_percent=0),
                       topology_budgets=(TopologyBudgetSpec(key="rack", max_nodes=2, max_percent=0),))
R1 = ("n1", "n2", "n3", "n4")


class TestGroupFencing:
    @pytest.mark.parametrize(("members", "busy", "view", "fenced"), [
        (R1, (), racks(), ["n1", "n2"]),
        (("n3", "n4", "n5", "n6"), (), racks(), ["n3", "n4", "n5"]),
        (R1, ("n5", "n6"), racks(), ["n1"]),
        (R1, ("n5", "n6", "n7"), racks(), []),
        (R1, ("n1",), racks(), ["n1", "n2"]),
        (R1, ("n2", "n5"), racks(), ["n1", "n2"]),
        (R1, (), racks(labelled=False), ["n1", "n2", "n3"]),
    ], ids=["the-rack-budget-caps-the-cluster-budget", "each-member-under-its-own-rack",
            "only-what-the-cluster-has-left", "nothing-when-the-budget-is-used",
            "a-member-in-remediation-takes-no-more-budget", "a-busy-member-counts-against-its-rack",
            "unlabelled-nodes-only-the-cluster-budget"])
    def test_a_group_incident_fences_only_what_the_budgets_leave(self, members: tuple[str, ...],
                                                                  busy: tuple[str, ...], view: ClusterView,
                                                                  fenced: list[str]) -> None:
        assert fenced_members(group(*members), view, RACK_OF_2, busy) == fenced

    def test_the_groups_own_topology_key_caps_members_the_view_does_not_label(self) -> None:
        fab = group(*R1, topology={"rack": "r9"})  # the correlator's grouping names the rack; the view does not
        assert fenced_members(fab, racks(labelled=False), RACK_OF_2) == ["n1", "n2"]

    def test_a_group_plan_with_no_budget_left_fences_nothing_and_still_pages(self, policy: Policy) -> None:
        pol = policy.model_copy(update={"guards": RACK_OF_2})
        plan = decide(group(*R1), racks(), pol, busy=("n5", "n6", "n7"))
        assert plan.actions() == ["escalate"] and plan.steps[0].params["fenced"] == ""
        assert plan.steps[0].params["members"] == "n1,n2,n3,n4"


MIG_NODE = ClusterView(nodes={"n1": NodeView("n1", {"nvidia.com/mig.config": "all-1g.10gb"})},
                       controller_owned_pods=frozenset({"team-a/train-0"}))
WHOLE_LABELS = {"nvidia.com/mig.config": "all-disabled", "nvidia.com/mig.config.state": "success",
                "nvidia.com/gpu.replicas": "1", "nvidia.com/gpu.sharing-strategy": "none"}
WHOLE = ClusterView(nodes={"n1": NodeView("n1", WHOLE_LABELS)}, controller_owned_pods=frozenset({"team-a/train-0"}))
MIG_PENDING = ClusterView(nodes={"n1": NodeView("n1", {**WHOLE_LABELS, "nvidia.com/mig.config.state": "pending"})})
NO_GFD = ClusterView(nodes={"n1": NodeView("n1", {"nvidia.com/mig.capable": "false"})})
SHARED = ClusterView(nodes={"n1": NodeView("n1", {"nvidia.com/mig.capable": "false", "nvidia.com/gpu.replicas": "4"})})


class TestDeferredReset:
    @pytest.mark.parametrize(("codes", "view", "rule"), [
        (("xid:94",), OWNED, "gpu-reset-when-idle"),
        (("xid:94", "xid:45"), OWNED, "gpu-reset-when-idle"),
        (("xid:45", "xid:94"), OWNED, "gpu-reset-when-idle"),
        (("xid:94",), MIG_NODE, "gpu-reset-when-idle"),
        (("xid:94",), SHARED, "gpu-reset-when-idle"),
        (("xid:94",), MIG_PENDING, "gpu-reset-when-idle"),
        (("xid:94",), NO_GFD, "gpu-reset-when-idle"),
        (("xid:94",), WHOLE, "contained-error-restart"),
        (("xid:94", "xid:45"), WHOLE, "contained-error-restart"),
        (("xid:94", "xid:13"), OWNED, "tenant-application-fault"),
        (("xid:94", "xid:13"), WHOLE, "tenant-application-fault"),
        (("xid:13", "xid:45"), OWNED, "tenant-application-fault"),
        (("xid:94", "xid:63"), OWNED, "gpu-reset-when-idle"),
        (("xid:94", "xid:63"), WHOLE, "contained-error-restart"),
    ], ids=["xid94-alone", "xid94-with-its-xid45", "xid45-read-first", "mig-waits", "time-sliced-gpu-waits",
            "mig-disable-not-applied-waits", "no-replicas-label-proves-nothing-waits",
            "whole-unshared-gpu-xid94", "whole-unshared-gpu-xid94-with-its-xid45", "xid13-is-worse",
            "whole-gpu-xid13-is-worse", "no-xid94-no-reset", "xid94-with-the-row-remap-it-reports-waits",
            "whole-gpu-xid94-with-its-row-remap"])
    def test_xid94_restarts_now_only_where_the_gpu_is_known_whole_and_unshared_and_otherwise_waits(
            self, policy: Policy, codes: tuple[str, ...], view: ClusterView, rule: str) -> None:
        """NVIDIA Xid catalog, XID 94: "the application that encountered this error must be restarted. All other
        applications running at the time of the Xid are unaffected. It is recommended to reset the GPU when
        convenient"; "Xid 45 will be seen in relation to this error". Where the node's labels prove its GPUs whole and
        unshared the application is the GPU's only one: its pod moves now and the idle GPU is reset; anywhere else
        (MIG, time-slicing or MPS, nothing known) other work may be on the GPU and goes on until it ends."""
        inc = incident("application_fault", domain=Domain.TENANT, tenants=(POD,), codes=codes)
        assert decide(inc, view, policy).rule == rule

    def test_a_whole_gpus_contained_error_moves_the_pod_and_resets_at_once_without_a_wait(self, policy: Policy) -> None:
        plan = decide(incident("application_fault", domain=Domain.TENANT, tenants=(POD,), codes=("xid:94",)), WHOLE,
                      policy)
        assert plan.actions() == ["cordon", "notify_tenant", "drain_gpu", "reset_gpu", "validate", "return_to_service"]
        assert not any("defer_s" in s.params for s in plan.steps), "nothing waits for the GPU to go idle"
        assert plan.domain is Domain.OPERATOR and [r.name for r in plan.ladder] == ["restart-and-reset", "reboot"]

    @pytest.mark.parametrize("view", [OWNED, WHOLE], ids=["any-node", "whole-unshared-gpu"])
    def test_an_xid94_with_its_dbe_gets_the_dbes_reset_now_not_the_deferred_one(self, policy: Policy,
                                                                             view: ClusterView) -> None:
        """The correlator keeps an XID 94 and its DBE in one incident, raised to the DBE's category
        (catalog containment_xids); the DBE's repair (NVIDIA WORKFLOW_XID_48, solo: RESET_GPU) runs, no wait."""
        inc = incident("gpu_reset_required", tenants=(POD,), codes=("xid:94", "xid:48"), scope=IncidentScope.TENANT)
        plan = decide(inc, view, policy)
        assert plan.rule == "gpu-reset" and not any("defer_s" in s.params for s in plan.steps)
        assert "reset_gpu" in plan.actions()

    @pytest.mark.parametrize("label", ["GPU_I_ID", "breakfix.io/mig-instance-seen"])
    def test_a_mig_instance_named_by_the_incident_keeps_the_wait_on_a_node_labelled_whole(self, policy: Policy,
                                                                                        label: str) -> None:
        inc = incident("application_fault", domain=Domain.TENANT, tenants=(POD,), codes=("xid:94",))
        plan = decide(inc.model_copy(update={"labels": {label: "2"}}), WHOLE, policy)
        assert plan.rule == "gpu-reset-when-idle" and any("defer_s" in s.params for s in plan.steps)


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
    # names a rule matches on or the kill switch names must exist in the catalog and the policy: a typo would match
    # nothing (the incident falls to a later rule) or leave a switched-off code acting
    pytest.param("version: 1\nrules:\n  - name: r1\n    domain: operator\n    reason: x\n"
                 "    match: {categories: [gpu_rest_required]}\n", 6,
                 "rules.0.match.categories (rule r1): unknown category 'gpu_rest_required'", id="unknown-category"),
    pytest.param("version: 1\nrules:\n  - name: r0\n    domain: tenant\n    reason: x\n  - name: r1\n"
                 "    domain: tenant\n    reason: x\n    match:\n      categories: [application_fault]\n"
                 "      only_codes: [xid:94, rowremap.pending]\n", 11,
                 "no check 'rowremap.pending'", id="only-codes-typo"),
    pytest.param("version: 1\nrules:\n  - name: r1\n    domain: operator\n    reason: x\n"
                 "    match: {codes: [\"xid:4800\"]}\n", 6, "XID '4800' is not in NVIDIA's Xid catalog",
                 id="codes-unknown-xid"),
    pytest.param("version: 1\nrules:\n  - name: r1\n    domain: operator\n    reason: x\n"
                 "    match: {codes: [\"xid:\"]}\n", 6, "XID '' is not", id="codes-empty-xid"),
    pytest.param("version: 1\nguards:\n  kill_switch:\n    rules: [gpu-rest]\nrules:\n  - name: gpu-reset\n"
                 "    domain: operator\n    reason: x\n", 4, "no rule named 'gpu-rest'", id="kill-switch-rule"),
    pytest.param("version: 1\nguards:\n  kill_switch:\n"
                 "    codes: [\"xid:79\", \"dcgm.health:DCGM_FR_PENDING_ROW_REMAP\"]"
                 "\nrules:\n  - name: r1\n    domain: operator\n    reason: x\n", 4,
                 "is counted as 'row_remap.pending'", id="kill-switch-code-counted-as-another"),
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

    @pytest.mark.parametrize("key", ["xid:48", "xid:94", "sxid:12028", "sxid", "row_remap.pending", "ecc.dbe",
                                     "retired_pages.pending", "dcgm.health:DCGM_FR_PCI_REPLAY_RATE", "dcgm.health",
                                     "nvlink.errors:crc", "fabric.config"])
    def test_every_kind_of_code_key_the_correlator_counts_is_accepted(self, tmp_path: Path, key: str) -> None:
        p = tmp_path / "policy.yaml"
        p.write_text(f"version: 1\nguards:\n  kill_switch:\n    codes: [{key!r}]\nrules:\n  - name: r1\n"
                     f"    domain: operator\n    reason: x\n    match: {{codes: [{key!r}], only_codes: [{key!r}]}}\n")
        assert load_policy(p).guards.kill_switch.codes == {key}

    @pytest.mark.parametrize(("key", "why"), [
        ("xid:079", "not a number as the driver prints it"),
        ("xid:9999", "not in NVIDIA's Xid catalog"),
        ("typo.chk:DCGM_FR_PCI_REPLAY_RATE", "no check 'typo.chk'"),
        ("dcgm.health:DCGM_FR_BRAND_NEW", "not a DCGM failure code in the catalog"),
        ("dcgm.health:DCGM_FR_UNCONTAINED_ERROR", "is counted as 'xid:95'"),
        ("gpu.lost:DCGM_FR_GPU_RECOVERY_REBOOT", "is counted as 'xid:154'"),
        ("dcgm.recovery_action", "always carries its DCGM code"),
    ])
    def test_a_rule_matching_a_code_the_correlator_never_counts_is_refused(self, tmp_path: Path, key: str,
                                                                           why: str) -> None:
        p = tmp_path / "policy.yaml"
        p.write_text(f"version: 1\nrules:\n  - name: r1\n    domain: operator\n    reason: x\n"
                     f"    match: {{codes: [{key!r}]}}\n")
        with pytest.raises(DataFileError, match=why):
            load_policy(p)

    @pytest.mark.parametrize("key", ["xid:9999", "sxid:99999", "dcgm.health:DCGM_FR_BRAND_NEW"])
    def test_a_kill_switch_may_name_a_code_newer_than_the_catalog(self, tmp_path: Path, key: str) -> None:
        """A new driver's XID storm is when a kill switch is needed: a canonical code the catalog does not list yet
        is taken (a rule's match on it is not: such a fault is always unknown_fault)."""
        p = tmp_path / "policy.yaml"
        p.write_text(f"version: 1\nguards:\n  kill_switch:\n    codes: [{key!r}]\nrules:\n  - name: r1\n"
                     f"    domain: operator\n    reason: x\n")
        assert load_policy(p).guards.kill_switch.codes == {key}

    def test_missing_policy_file_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(DataFileError, match="cannot read"):
            load_policy(tmp_path / "nope.yaml")
