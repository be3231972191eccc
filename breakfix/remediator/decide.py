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
    # field values read from the models' ``__dict__``: every rule is matched against every incident decided, and each
    # attribute read of a pydantic model goes through its ``__getattr__`` hook (about a quarter of a decision)
    m, i = match.__dict__, incident.__dict__
    categories, codes, only_codes = m["categories"], m["codes"], m["only_codes"]
    if categories and i["category"] not in categories:  # the cheap tests first: most rules end here
        return False
    if m["scopes"] and i["scope"] not in m["scopes"]:
        return False
    if m["domains"] and i["domain"] not in m["domains"]:
        return False
    if codes and not (codes & set(i["codes"])):
        return False
    if m["min_severity"] is not None and i["severity"].rank < m["min_severity"].rank:
        return False
    if only_codes and not (i["codes"] and set(i["codes"]) <= only_codes):
        return False
    if m["whole_gpu"] is not None and whole_gpu(incident, view or ClusterView()) is not m["whole_gpu"]:
        return False
    labels = i["labels"]
    return all(labels.get(k) == v for k, v in m["labels"].items())


def _target_params(incident: Incident) -> dict[str, str | int | bool]:
    i = incident.__dict__
    params: dict[str, str | int | bool] = {}
    if i["node"]:
        params["node"] = i["node"]
    gpus = i["gpus"]
    g = gpus[0].__dict__ if gpus else None
    if g is not None and g["index"] is not None:
        params["gpu"] = g["index"]
    if g is not None and g["uuid"]:
        params["gpu_uuid"] = g["uuid"]
    pods = [f"{t.namespace}/{t.pod}" for t in i["tenants"] if t.pod]
    if pods and gpus:
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


# A step before it is built: (action, params, timeout_s, requires_approval). ``decide`` assembles, fences and defers
# drafts, then builds each ``Step`` once, rather than building steps and copying them for every later change.
Draft = tuple[StepAction, dict[str, str | int | bool], float, bool]
STEP_TIMEOUT_S: float = Step.model_fields["timeout_s"].default  # a ``Step`` built without one (the fencing steps)


def _steps(specs: tuple[StepSpec, ...], incident: Incident, view: ClusterView, fenced: list[str] | None,
           base: dict[str, str | int | bool]) -> list[Draft]:
    """The steps of one rung for this incident: ``base`` (its ``_target_params``) under each spec's params."""
    out: list[Draft] = []
    for spec in specs:
        sd = spec.__dict__  # its fields without the attribute hook, as in ``matches``
        action = sd["action"]
        if sd["when"] == "tenant_known" and not incident.tenants:
            continue
        if action in (StepAction.NOTIFY_TENANT, StepAction.RESTART_POD):
            out.extend(_tenant_steps(spec, incident, view, base))
            continue
        params, timeout_s, approval = sd["params"], spec.timeout(), sd["requires_approval"]
        if fenced is not None:  # a group (fabric) incident
            if action in _MEMBER_ACTIONS:
                # a group incident reaches its members: one step per fenced member node (issue 11 item 5)
                out.extend((action, {**base, "node": n, **params}, timeout_s, approval) for n in fenced)
                continue
            if action is StepAction.ESCALATE:  # the page names every member and which ones were fenced
                out.append((action, {**base, "members": ",".join(incident.nodes), "fenced": ",".join(fenced),
                                     **params}, timeout_s, approval))
                continue
        out.append((action, {**base, **params}, timeout_s, approval))
    return out


def _tenant_steps(spec: StepSpec, incident: Incident, view: ClusterView,
                  base: dict[str, str | int | bool]) -> list[Draft]:
    steps: list[Draft] = []
    for t in incident.tenants:
        if spec.action is StepAction.RESTART_POD:
            if not t.pod:
                continue
            if spec.when == "controller_owned" and f"{t.namespace}/{t.pod}" not in view.controller_owned_pods:
                continue
        params: dict[str, str | int | bool] = {**base, "namespace": t.namespace, **spec.params}
        if t.pod:
            params["pod"] = t.pod
        steps.append((spec.action, params, spec.timeout(), spec.requires_approval))
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


def _fenced(steps: list[Draft], mig: bool, base: dict[str, str | int | bool]) -> list[Draft]:
    """Single-GPU repair is fenced and scoped, whatever the policy file says: the node is cordoned before a GPU is
    drained or reset (so no new work lands on it), the GPU's pods are drained before the reset, a MIG GPU drains
    every instance, and a validation in a rung that touched only one GPU runs on that GPU only."""
    actions = [s[0] for s in steps]
    if StepAction.RESET_GPU not in actions and StepAction.DRAIN_GPU not in actions:
        return [(a, {**p, "scope": "node"}, t, r) if a is StepAction.VALIDATE else (a, p, t, r) for a, p, t, r in steps]
    node_wide = any(a in (StepAction.DRAIN, StepAction.REBOOT, StepAction.REPROVISION) for a in actions)
    out: list[Draft] = []
    for a, p, t, r in steps:
        if a in (StepAction.DRAIN_GPU, StepAction.RESET_GPU) and all(o[0] is not StepAction.CORDON for o in out):
            out.insert(0, (StepAction.CORDON, base, STEP_TIMEOUT_S, False))
        if a is StepAction.RESET_GPU and not any(o[0] in (StepAction.DRAIN_GPU, StepAction.DRAIN) for o in out):
            out.append((StepAction.DRAIN_GPU, base, t, False))
        if a in (StepAction.DRAIN_GPU, StepAction.RESET_GPU) and mig:
            p = {**p, "mig": True}
        if a is StepAction.VALIDATE:
            p = {**p, "scope": "node" if node_wide else "gpu"}
        out.append((a, p, t, r))
    return out


def _deferred(steps: list[Draft], defer_s: float) -> list[Draft]:
    """The first step that would take the GPU from its job waits for the GPU to go idle (or ``defer_s``)."""
    out, done = [], False
    for a, p, t, r in steps:
        if not done and (a.disruptive or a is StepAction.CORDON):
            p, done = {**p, "defer_s": int(defer_s)}, True
        out.append((a, p, t, r))
    return out


def _built(steps: list[Draft]) -> tuple[Step, ...]:
    return tuple(Step(action=a, params=p, timeout_s=t, requires_approval=r) for a, p, t, r in steps)


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
        rd = rule.__dict__
        if not rd["enabled"] or not matches(rd["match"], incident, view):
            continue
        base, mig = _target_params(incident), is_mig(incident, view)
        specs = rule.rungs()
        drafts = [_fenced(_steps(r.steps, incident, view, fenced, base), mig, base) for r in specs]
        if rule.defer_s is not None and drafts:
            drafts[0] = _deferred(drafts[0], rule.defer_s)
        ladder = tuple(Rung(name=r.name, steps=_built(d), timeout_s=r.timeout())
                       for r, d in zip(specs, drafts, strict=True))
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
