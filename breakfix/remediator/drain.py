"""The drain evaluator: what to do with one pod when its node (or GPU) is drained. Pure, no I/O.

As NVIDIA NVSentinel's node-drainer evaluator does, the choice is a typed action computed from
the pod's facts and the configured drain policy (``kubernetes.drain_default`` and
``kubernetes.drain_namespaces`` in the remediator config); the Kubernetes adapter
(``remediator.k8s``) only carries it out:

- ``skip``: DaemonSet pods and static (mirror) pods stay, as ``kubectl drain`` leaves them;
  finished pods (Succeeded/Failed) need nothing;
- ``evict``: the Eviction API, which honours PodDisruptionBudgets (a 429 is retried, never forced);
- ``wait_for_completion``: the namespace asked to let its pods finish (batch jobs);
- ``evict_then_delete``: evict, and delete only after ``timeout_s`` of PDB refusals (the namespace
  owner's explicit choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

DrainMode = Literal["immediate", "allow-completion", "delete-after-timeout"]
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class EvictAction(StrEnum):
    SKIP = "skip"
    EVICT = "evict"
    WAIT_FOR_COMPLETION = "wait_for_completion"
    EVICT_THEN_DELETE = "evict_then_delete"


@dataclass(frozen=True)
class DrainPolicy:
    default: DrainMode = "immediate"
    namespaces: dict[str, DrainMode] = field(default_factory=dict)
    timeout_s: float = 600.0
    parallel: int = 16
    retry_s: float = 5.0
    gone_timeout_s: float = 300.0  # then wait for the evicted pods to be gone (their grace period); 0: do not wait


@dataclass(frozen=True, slots=True)
class PodFacts:
    namespace: str
    name: str
    phase: str = "Running"
    owner_kinds: tuple[str, ...] = ()
    annotations: frozenset[str] = frozenset()
    uid: str = ""  # the API's metadata.uid: a pod recreated under the same name is another pod


@dataclass(frozen=True, slots=True)
class DrainDecision:
    action: EvictAction
    reason: str


_MODES: dict[str, EvictAction] = {"immediate": EvictAction.EVICT, "allow-completion": EvictAction.WAIT_FOR_COMPLETION,
                                  "delete-after-timeout": EvictAction.EVICT_THEN_DELETE}


def drain_action(pod: PodFacts, policy: DrainPolicy) -> DrainDecision:
    """What the drain does with ``pod``, and why (the reason goes into the audit detail)."""
    if "DaemonSet" in pod.owner_kinds:
        return DrainDecision(EvictAction.SKIP, "DaemonSet pod stays on its node")
    if MIRROR_ANNOTATION in pod.annotations:
        return DrainDecision(EvictAction.SKIP, "static (mirror) pod stays on its node")
    if pod.phase in ("Succeeded", "Failed"):
        return DrainDecision(EvictAction.SKIP, f"pod already {pod.phase}")
    mode = policy.namespaces.get(pod.namespace, policy.default)
    return DrainDecision(_MODES[mode], f"namespace {pod.namespace} drain mode {mode}")
