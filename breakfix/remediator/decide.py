"""``decide(incident, cluster_view, policy) -> Plan``: the pure remediation decision.

No I/O and no clock reads. The executor carries out what this returns. The incident
comes from the correlator; the cluster view from the actuator adapter (``ClusterView``).
Safety first: an unknown fault never gets a reset, reboot or reprovision, whatever the
policy says, and an opted-out node only gets an escalation.
"""

from __future__ import annotations

from breakfix.remediator.policy import FORBIDDEN_FOR_UNKNOWN, Match, Policy, StepSpec
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.incident import Domain, Incident, IncidentScope, Plan, Rung, Step, StepAction

__all__ = ["CAUTIOUS_RULE", "ClusterView", "NodeView", "cautious_plan", "decide", "matches"]


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
    pods = [f"{t.namespace}/{t.pod}" for t in incident.tenants if t.pod]
    if pods and incident.gpus:
        params["pods"] = ",".join(pods)  # the pods holding the GPU, for a partial drain
    return params


_MEMBER_ACTIONS = (StepAction.CORDON, StepAction.DRAIN)


def fenced_members(incident: Incident, view: ClusterView, budget: int) -> list[str]:
    """A group (fabric) incident's member nodes that its plan fences: at most ``budget`` of them, in order."""
    return list(incident.nodes)[:max(budget, 0)]


def _steps(specs: tuple[StepSpec, ...], incident: Incident, view: ClusterView,
           budget: int = 0) -> tuple[Step, ...]:
    base = _target_params(incident)
    out: list[Step] = []
    for spec in specs:
        if not _when(spec, incident, view):
            continue
        if spec.action in (StepAction.NOTIFY_TENANT, StepAction.RESTART_POD):
            out.extend(_tenant_steps(spec, incident, view, base))
            continue
        if incident.scope is IncidentScope.FABRIC and not incident.node:
            fenced = fenced_members(incident, view, budget)
            if spec.action in _MEMBER_ACTIONS:
                # a group incident reaches its members: one step per fenced member node (issue 11 item 5)
                out.extend(Step(action=spec.action, params={**base, "node": n, **spec.params},
                                timeout_s=spec.timeout_s, requires_approval=spec.requires_approval) for n in fenced)
                continue
            if spec.action is StepAction.ESCALATE:  # the page names every member and which ones were fenced
                out.append(Step(action=spec.action, params={**base, "members": ",".join(incident.nodes),
                                                            "fenced": ",".join(fenced), **spec.params},
                                timeout_s=spec.timeout_s, requires_approval=spec.requires_approval))
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
    budget = policy.guards.budget.limit(len(view.nodes) or len(incident.nodes))
    for rule in policy.rules:
        if not rule.enabled or not matches(rule.match, incident):
            continue
        ladder = tuple(Rung(name=r.name, steps=_steps(r.steps, incident, view, budget), timeout_s=r.timeout_s)
                       for r in rule.rungs())
        every = [s for r in ladder for s in r.steps]
        if incident.category == "unknown_fault" and any(s.action in FORBIDDEN_FOR_UNKNOWN for s in every):
            break
        return Plan(domain=rule.domain, rule=rule.name, reason=rule.reason, steps=ladder[0].steps if ladder else (),
                    ladder=ladder if len(ladder) > 1 else (), dry_run=policy.dry_run, shadow=rule.shadow)
    plan = cautious_plan(incident, "No policy rule fits this incident safely; cordon and escalate to a human.")
    return plan.model_copy(update={"dry_run": policy.dry_run})
