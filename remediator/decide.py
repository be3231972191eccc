"""``decide(incident, cluster_view, policy) -> Plan``: the pure remediation decision.

No I/O and no clock reads. The executor carries out what this returns. The incident
comes from the correlator; the cluster view from the actuator adapter (``ClusterView``).
Safety first: an unknown fault never gets a reset, reboot or reprovision, whatever the
policy says, and an opted-out node only gets an escalation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from remediator.policy import FORBIDDEN_FOR_UNKNOWN, Match, Policy, Rule, StepSpec
from schemas.incident import Domain, Incident, Plan, Step, StepAction


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    cordoned: bool = False
    cordoned_by_breakfix: bool = False


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What the decision may know about the cluster, read before deciding."""

    nodes: dict[str, NodeView] = field(default_factory=dict)
    controller_owned_pods: frozenset[str] = frozenset()  # "namespace/pod"

    def node(self, name: str | None) -> NodeView | None:
        return self.nodes.get(name) if name else None


CAUTIOUS_RULE = "fallback-cautious"


def matches(match: Match, incident: Incident) -> bool:
    if match.categories and incident.category not in match.categories:
        return False
    if match.scopes and incident.scope not in match.scopes:
        return False
    if match.domains and incident.domain not in match.domains:
        return False
    if match.codes and not (match.codes & set(incident.codes)):
        return False
    if match.min_severity is not None and incident.severity.rank < match.min_severity.rank:
        return False
    return all(incident.labels.get(k) == v for k, v in match.labels.items())


def _target_params(incident: Incident) -> dict[str, str | int | bool]:
    params: dict[str, str | int | bool] = {}
    if incident.node:
        params["node"] = incident.node
    if incident.gpus and incident.gpus[0].index is not None:
        params["gpu"] = incident.gpus[0].index
    if incident.gpus and incident.gpus[0].uuid:
        params["gpu_uuid"] = incident.gpus[0].uuid
    return params


def _steps(rule: Rule, incident: Incident, view: ClusterView) -> tuple[Step, ...]:
    base = _target_params(incident)
    out: list[Step] = []
    for spec in rule.steps:
        if not _when(spec, incident, view):
            continue
        if spec.action in (StepAction.NOTIFY_TENANT, StepAction.RESTART_POD):
            out.extend(_tenant_steps(spec, incident, view, base))
            continue
        out.append(Step(action=spec.action, params={**base, **spec.params}, timeout_s=spec.timeout_s,
                        requires_approval=spec.requires_approval))
    return tuple(out)


def _when(spec: StepSpec, incident: Incident, view: ClusterView) -> bool:
    if spec.when == "tenant_known":
        return bool(incident.tenants)
    return True


def _tenant_steps(spec: StepSpec, incident: Incident, view: ClusterView,
                  base: dict[str, str | int | bool]) -> list[Step]:
    steps: list[Step] = []
    for t in incident.tenants:
        if spec.action is StepAction.RESTART_POD:
            if not t.pod:
                continue
            if spec.when == "controller_owned" and f"{t.namespace}/{t.pod}" not in view.controller_owned_pods:
                continue
        params: dict[str, str | int | bool] = {**base, "namespace": t.namespace, **spec.params}
        if t.pod:
            params["pod"] = t.pod
        steps.append(Step(action=spec.action, params=params, timeout_s=spec.timeout_s,
                          requires_approval=spec.requires_approval))
    return steps


def cautious_plan(incident: Incident, reason: str, rule: str = CAUTIOUS_RULE) -> Plan:
    base = _target_params(incident)
    steps: list[Step] = []
    if incident.node:
        steps.append(Step(action=StepAction.CORDON, params=base))
    steps.append(Step(action=StepAction.ESCALATE, params=base))
    return Plan(domain=Domain.OPERATOR, rule=rule, reason=reason, steps=tuple(steps))


def decide(incident: Incident, view: ClusterView, policy: Policy) -> Plan:
    """The plan for one incident. First matching enabled rule wins; otherwise cordon and escalate."""
    node = view.node(incident.node)
    if node is not None and node.labels.get(policy.opt_out_label) == "true":
        return Plan(domain=Domain.OPERATOR, rule="node-opt-out", dry_run=policy.dry_run,
                    reason=f"Node {node.name} carries {policy.opt_out_label}=true; breakfix only escalates.",
                    steps=(Step(action=StepAction.ESCALATE, params=_target_params(incident)),))
    for rule in policy.rules:
        if not rule.enabled or not matches(rule.match, incident):
            continue
        steps = _steps(rule, incident, view)
        if incident.category == "unknown_fault" and any(s.action in FORBIDDEN_FOR_UNKNOWN for s in steps):
            break
        return Plan(domain=rule.domain, rule=rule.name, reason=rule.reason, steps=steps, dry_run=policy.dry_run)
    plan = cautious_plan(incident, "No policy rule fits this incident safely; cordon and escalate to a human.")
    return plan.model_copy(update={"dry_run": policy.dry_run})
