"""``decide(incident, cluster_view, policy) -> Plan``: the pure remediation decision.

No I/O and no clock reads. The executor carries out what this returns. The incident
comes from the correlator; the cluster view from the actuator adapter (``ClusterView``).
Safety first: an unknown fault never gets a reset, reboot or reprovision, whatever the
policy says, and an opted-out node only gets an escalation.
"""

from __future__ import annotations

from collections.abc import Collection

from breakfix.remediator.guardspec import GuardsSpec
from breakfix.remediator.policy import FORBIDDEN_FOR_UNKNOWN, Match, Policy, StepSpec
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.schemas.common import Severity
from breakfix.schemas.incident import MIG_SEEN_LABEL, Domain, Incident, IncidentScope, Plan, Rung, Step, StepAction

__all__ = ["CAUTIOUS_RULE", "ClusterView", "NodeView", "cautious_plan", "decide", "matches"]


CAUTIOUS_RULE = "fallback-cautious"
MIG_INCIDENT_LABELS = frozenset({"gpu_i_id", "gpu_i_profile", "mig", "mig_instance"})


def matches(match: Match, incident: Incident, view: ClusterView | None = None) -> bool:
    if match.categories and incident.category not in match.categories:  # the cheap tests first: most rules end here
        return False
    if match.scopes and incident.scope not in match.scopes:
        return False
    if match.domains and incident.domain not in match.domains:
        return False
    if match.codes and not (match.codes & set(incident.codes)):
        return False
    if match.min_severity is not None and incident.severity.rank < match.min_severity.rank:
        return False
    if match.only_codes and not (incident.codes and set(incident.codes) <= match.only_codes):
        return False
    if match.whole_gpu is not None and whole_gpu(incident, view or ClusterView()) is not match.whole_gpu:
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


def fenced_members(incident: Incident, view: ClusterView, spec: GuardsSpec, busy: Collection[str] = ()) -> list[str]:
    """A group (fabric) incident's member nodes that its plan fences, in order: each only while the cluster budget
    and every topology budget it falls under (its rack, switch, nodepool; the group's own key from the incident)
    have room next to the nodes already in operator remediation (``busy``, the guard state's ``active``). A member
    already in remediation is fenced too: it takes no more budget, and the group's hold then reaches it."""
    members = frozenset(incident.nodes)
    own = {**incident.labels, **incident.topology}
    taken = set(busy)
    limit = spec.budget.limit(len(view.nodes) or len(members))
    room: dict[tuple[str, str], list[int]] = {}  # (key, value) -> [nodes in remediation under it, its budget]
    out: list[str] = []
    for name in incident.nodes:
        if name not in taken:
            if len(taken) >= limit:
                continue
            me = view.node(name)
            under = []
            for tb in spec.topology_budgets:
                value = (me.labels.get(tb.key) if me else None) or own.get(tb.key)
                if not value:
                    continue
                if (tb.key, value) not in room:  # each group once: a pass over it per member would be quadratic
                    group = view.members(tb.key, value) | (members if own.get(tb.key) == value else frozenset())
                    room[(tb.key, value)] = [len(taken & group), tb.limit(len(group) or 1)]
                under.append(room[(tb.key, value)])
            if any(used >= cap for used, cap in under):
                continue
            for counts in under:
                counts[0] += 1
            taken.add(name)
        out.append(name)
    return out


def _steps(specs: tuple[StepSpec, ...], incident: Incident, view: ClusterView, fenced: list[str] | None,
           base: dict[str, str | int | bool]) -> tuple[Step, ...]:
    """The steps of one rung for this incident: ``base`` (its ``_target_params``) under each spec's params."""
    out: list[Step] = []
    for spec in specs:
        if not _when(spec, incident):
            continue
        if spec.action in (StepAction.NOTIFY_TENANT, StepAction.RESTART_POD):
            out.extend(_tenant_steps(spec, incident, view, base))
            continue
        if fenced is not None:  # a group (fabric) incident
            if spec.action in _MEMBER_ACTIONS:
                # a group incident reaches its members: one step per fenced member node (issue 11 item 5)
                out.extend(Step(action=spec.action, params={**base, "node": n, **spec.params},
                                timeout_s=spec.timeout(), requires_approval=spec.requires_approval) for n in fenced)
                continue
            if spec.action is StepAction.ESCALATE:  # the page names every member and which ones were fenced
                out.append(Step(action=spec.action, params={**base, "members": ",".join(incident.nodes),
                                                            "fenced": ",".join(fenced), **spec.params},
                                timeout_s=spec.timeout(), requires_approval=spec.requires_approval))
                continue
        out.append(Step(action=spec.action, params={**base, **spec.params}, timeout_s=spec.timeout(),
                        requires_approval=spec.requires_approval))
    return tuple(out)


def _when(spec: StepSpec, incident: Incident) -> bool:
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
        steps.append(Step(action=spec.action, params=params, timeout_s=spec.timeout(),
                          requires_approval=spec.requires_approval))
    return steps


def is_mig(incident: Incident, view: ClusterView) -> bool:
    """MIG on the failing GPU: the GPU operator labels the node as MIG-enabled (``nvidia.com/mig.config`` other than
    ``all-disabled``; NVIDIA GPU operator MIG manager), or the incident carries a MIG label a producer or policy set
    (``MIG_INCIDENT_LABELS``; the correlator's own ``MIG_SEEN_LABEL`` only vetoes ``whole_gpu``, since it is
    incident-wide and would mark another GPU of the incident MIG)."""
    if any(k.lower() in MIG_INCIDENT_LABELS for k in incident.labels):
        return True
    node = view.node(incident.node)
    mig = node.labels.get("nvidia.com/mig.config", "") if node else ""
    return bool(mig) and mig != "all-disabled"


# GPU feature discovery's and the MIG manager's node labels (NVIDIA GPU operator) say whether a node's GPUs are whole

def whole_gpu(incident: Incident, view: ClusterView) -> bool:
    """The node's labels prove its GPUs whole and unshared: MIG not capable (GPU feature discovery), or disabled by
    the MIG manager and applied (``nvidia.com/mig.config.state=success``), and GPU feature discovery's replicas label
    says no time-slicing or MPS sharing; no signal of the incident named a GPU instance. Anything less proves nothing
    (False): other work may then be on the GPU, and the policy rule ``contained-error-restart`` (restart the pod and
    reset at once) must not evict it."""
    node = view.node(incident.node)
    if node is None or is_mig(incident, view) or incident.labels.get(MIG_SEEN_LABEL):
        return False
    labels = node.labels
    not_mig = labels.get("nvidia.com/mig.capable") == "false" or (  # a MIG configuration being applied, or one that
        labels.get("nvidia.com/mig.config") == "all-disabled"    # failed, may leave instances behind
        and labels.get("nvidia.com/mig.config.state") == "success")
    unshared = labels.get("nvidia.com/gpu.replicas") in ("0", "1") and \
        labels.get("nvidia.com/gpu.sharing-strategy", "none") == "none"
    return not_mig and unshared


def _fenced(steps: tuple[Step, ...], mig: bool, base: dict[str, str | int | bool]) -> tuple[Step, ...]:
    """Single-GPU repair is fenced and scoped, whatever the policy file says: the node is cordoned before a GPU is
    drained or reset (so no new work lands on it), the GPU's pods are drained before the reset, a MIG GPU drains
    every instance, and a validation in a rung that touched only one GPU runs on that GPU only."""
    actions = [s.action for s in steps]
    if StepAction.RESET_GPU not in actions and StepAction.DRAIN_GPU not in actions:
        return tuple(s.model_copy(update={"params": {**s.params, "scope": "node"}})
                     if s.action is StepAction.VALIDATE else s for s in steps)
    node_wide = any(a in (StepAction.DRAIN, StepAction.REBOOT, StepAction.REPROVISION) for a in actions)
    out: list[Step] = []
    for s in steps:
        if s.action in (StepAction.DRAIN_GPU, StepAction.RESET_GPU) and all(o.action is not StepAction.CORDON
                                                                             for o in out):
            out.insert(0, Step(action=StepAction.CORDON, params=base))
        if s.action is StepAction.RESET_GPU and not any(o.action in (StepAction.DRAIN_GPU, StepAction.DRAIN)
                                                        for o in out):
            out.append(Step(action=StepAction.DRAIN_GPU, params=base, timeout_s=s.timeout_s))
        if s.action in (StepAction.DRAIN_GPU, StepAction.RESET_GPU) and mig:
            s = s.model_copy(update={"params": {**s.params, "mig": True}})
        if s.action is StepAction.VALIDATE:
            s = s.model_copy(update={"params": {**s.params, "scope": "node" if node_wide else "gpu"}})
        out.append(s)
    return tuple(out)


def _deferred(steps: tuple[Step, ...], defer_s: float) -> tuple[Step, ...]:
    """The first step that would take the GPU from its job waits for the GPU to go idle (or ``defer_s``)."""
    out, done = [], False
    for s in steps:
        if not done and (s.action.disruptive or s.action is StepAction.CORDON):
            s, done = s.model_copy(update={"params": {**s.params, "defer_s": int(defer_s)}}), True
        out.append(s)
    return tuple(out)


def cautious_plan(incident: Incident, reason: str, rule: str = CAUTIOUS_RULE) -> Plan:
    base = _target_params(incident)
    steps: list[Step] = []
    if incident.node:
        steps.append(Step(action=StepAction.CORDON, params=base))
    steps.append(Step(action=StepAction.ESCALATE, params=base))
    return Plan(domain=Domain.OPERATOR, rule=rule, reason=reason, steps=tuple(steps))


def decide(incident: Incident, view: ClusterView, policy: Policy, *, busy: Collection[str] = ()) -> Plan:
    """The plan for one incident. First matching enabled rule wins; otherwise cordon and escalate. ``busy``: the
    nodes already in operator remediation, which a group incident's fenced members must fit beside."""
    node = view.node(incident.node)
    if node is not None and node.labels.get(policy.opt_out_label) == "true":
        fence = incident.domain is Domain.OPERATOR and incident.severity.rank >= Severity.CRITICAL.rank
        return Plan(domain=Domain.OPERATOR, rule="node-opt-out", dry_run=policy.dry_run,
                    reason=f"Node {node.name} carries {policy.opt_out_label}=true; breakfix does not repair it"
                           + ("; the broken node is fenced (cordon + taint) and a human decides." if fence else
                              " and only escalates."),
                    steps=((Step(action=StepAction.CORDON, params=_target_params(incident)),) if fence else ())
                    + (Step(action=StepAction.ESCALATE, params=_target_params(incident)),))
    group = incident.scope is IncidentScope.FABRIC and not incident.node
    fenced = fenced_members(incident, view, policy.guards, busy) if group else None
    for rule in policy.rules:
        if not rule.enabled or not matches(rule.match, incident, view):
            continue
        base, mig = _target_params(incident), is_mig(incident, view)
        ladder = tuple(Rung(name=r.name, steps=_fenced(_steps(r.steps, incident, view, fenced, base), mig, base),
                            timeout_s=r.timeout())
                       for r in rule.rungs())
        if rule.defer_s is not None and ladder:
            ladder = (ladder[0].model_copy(update={"steps": _deferred(ladder[0].steps, rule.defer_s)}), *ladder[1:])
        every = [s for r in ladder for s in r.steps]
        if incident.category == "unknown_fault" and any(s.action in FORBIDDEN_FOR_UNKNOWN for s in every):
            break
        reason = rule.reason
        if mig and any(s.params.get("mig") for r in ladder for s in r.steps):
            reason += " MIG: the reset destroys every instance on this GPU; they must be recreated afterwards."
        return Plan(domain=rule.domain, rule=rule.name, reason=reason, steps=ladder[0].steps if ladder else (),
                    ladder=ladder if len(ladder) > 1 else (), dry_run=policy.dry_run, shadow=rule.shadow)
    plan = cautious_plan(incident, "No policy rule fits this incident safely; cordon and escalate to a human.")
    return plan.model_copy(update={"dry_run": policy.dry_run})
