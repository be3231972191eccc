"""One plan step turned into actuator calls: what each ``StepAction`` does on the node, the GPU or the pod.

Input: a step of the plan the executor carries out (its action and parameters), the incident, the step's
idempotency key, the ``Actuator`` and the executor's ``holders`` check (``remediator.executor``, which calls
``call_step`` under the step's timeout). Output: the actuator's calls (cordon, drains, reset, reboot,
reprovision, validation, return to service, tenant notice, pod restart, escalation) and one ``StepResult``,
returned to the executor, which records it. A reset the node agent refuses as ``busy:`` moves the pods that hold
the GPU (else every pod on the node) and is tried once more; a MIG GPU's drain moves the pods on all of its
instances; a return to service leaves the node cordoned while another incident still holds it. ``rma_summary``
is the one-line escalation text, used here and by the executor's escalation when the ladder is exhausted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from breakfix.remediator.actuator import Actuator, StepResult
from breakfix.schemas.incident import Incident, Step, StepAction

if TYPE_CHECKING:
    from breakfix.remediator.executor import Holders

BUSY = "busy:"  # the node agent's refusal while processes hold the GPU


def rma_summary(incident: Incident) -> str:
    """One line for the RMA ticket / page."""
    gpus = ",".join(g.label() for g in incident.gpus) or "-"
    codes = ",".join(incident.codes) or "-"
    return (f"{incident.cluster}/{incident.node or '-'} gpus={gpus} category={incident.category} "
            f"codes={codes} signals={incident.signal_count} first_seen={incident.first_seen.isoformat()}")


def _gpu(step: Step) -> int | None:
    g = step.params.get("gpu")
    if isinstance(g, bool):
        return None
    return int(g) if isinstance(g, int | str) and str(g).isdigit() else None


def _pod_list(value: object) -> tuple[str, ...]:
    """``ns/pod,ns/pod`` (a step's ``pods`` parameter, the node agent's ``gpu_pods`` evidence) as a tuple."""
    return tuple(x for x in str(value or "").split(",") if x)


def _busy(result: StepResult) -> bool:
    """The node agent refused a reset because processes hold the GPU (its error starts with ``busy:``)."""
    return result.evidence.get("error", result.detail).startswith(BUSY)


async def _drain_mig(actuator: Actuator, incident: Incident, node: str, gpu: int, named: tuple[str, ...]) -> StepResult:
    """A MIG GPU's reset destroys all its instances: move the pods on every one of them (the node agent
    names them), not only the incident's tenants. When the agent cannot say, drain the whole node."""
    a, iid = actuator, incident.id
    held = await a.gpu_pods(node, gpu, incident=iid)
    if held.ok and held.evidence.get("mig_devices") == "0":  # the agent saw no MIG device on a MIG GPU
        held = StepResult(False, f"the node agent lists no MIG device on gpu{gpu} ({held.detail})")
    if not held.ok:
        drained = await a.drain(node, incident=iid)
        return StepResult(drained.ok, f"{drained.detail}: the pods on gpu{gpu}'s MIG instances are not known "
                                      f"({held.detail})", drained.evidence)
    pods = tuple(dict.fromkeys([*named, *_pod_list(held.evidence.get("pods"))]))
    moved = await a.drain_gpu(node, gpu, incident=iid, pods=pods)
    return StepResult(moved.ok, f"{moved.detail} (every pod on its MIG instances: {len(pods)})",
                      {**moved.evidence, "mig_pods": str(len(pods))})


async def _reset(actuator: Actuator, incident: Incident, step: Step, node: str, gpu: int, key: str) -> StepResult:
    a, iid = actuator, incident.id
    first = await a.reset_gpu(node, gpu, incident=iid, key=key)
    if first.ok or not _busy(first):
        return first
    # processes still hold the GPU (pods the incident did not name, a job that landed while the repair waited):
    # the node is fenced; move the pods the node agent says hold this GPU and try again, and only when that is
    # not known or not enough, move every pod on the node
    held = await a.gpu_pods(node, gpu, incident=iid)
    pods = _pod_list(held.evidence.get("pods")) if held.ok else ()
    if pods and (moved := await a.drain_gpu(node, gpu, incident=iid, pods=pods)).ok:
        again = await a.reset_gpu(node, gpu, incident=iid, key=f"{key}:after-gpu-drain")
        if again.ok or not _busy(again):
            return StepResult(again.ok, f"{first.detail}; moved the pods holding gpu{gpu} ({moved.detail}); "
                                        f"{again.detail}", {**again.evidence, "drained_gpu_for_busy": "true"})
    drained = await a.drain(node, incident=iid)
    if not drained.ok:
        return StepResult(False, f"{first.detail}; draining {node} to free it failed: {drained.detail}",
                          first.evidence)
    again = await a.reset_gpu(node, gpu, incident=iid, key=f"{key}:after-drain")
    return StepResult(again.ok, f"{first.detail}; drained {node} ({drained.detail}); {again.detail}",
                      {**again.evidence, "drained_for_busy": "true"})


async def call_step(actuator: Actuator, incident: Incident, step: Step, key: str, climbed: str = "", *,
                    holders: Holders | None) -> StepResult:
    """Carry one step out on ``actuator`` (the executor bounds it with the step's and the rung's timeout)."""
    a, p, iid = actuator, step.params, incident.id
    node = str(p.get("node", incident.node or ""))
    gpu_i = _gpu(step)
    match step.action:
        case StepAction.CORDON:
            return await a.cordon(node, incident=iid, reason=f"breakfix {iid}: {incident.category}")
        case StepAction.DRAIN:
            return await a.drain(node, incident=iid)
        case StepAction.DRAIN_GPU | StepAction.RESET_GPU if gpu_i is None:
            return StepResult(False, f"{step.action.value} needs a GPU index and the incident has none")
        case StepAction.DRAIN_GPU:
            assert gpu_i is not None
            pods = _pod_list(p.get("pods"))
            if p.get("mig") is True:  # every MIG instance on the physical GPU goes with the reset
                return await _drain_mig(actuator, incident, node, gpu_i, pods)
            return await a.drain_gpu(node, gpu_i, incident=iid, pods=pods)
        case StepAction.RESET_GPU:
            assert gpu_i is not None
            return await _reset(actuator, incident, step, node, gpu_i, key)
        case StepAction.REBOOT:
            return await a.reboot(node, incident=iid, key=key)
        case StepAction.REPROVISION:
            return await a.reprovision(node, incident=iid, key=key)
        case StepAction.VALIDATE:
            scoped = gpu_i if p.get("scope", "gpu") == "gpu" else None
            return await a.validate(node, scoped, int(p.get("level", 2)), incident=iid, key=key)
        case StepAction.RETURN_TO_SERVICE:
            others = holders(incident, node) if holders is not None else None
            if others:
                return StepResult(True, f"{node} stays cordoned: still held by {others}", {"held_by": others})
            return await a.return_to_service(node, incident=iid)
        case StepAction.NOTIFY_TENANT:
            pod = p.get("pod")
            msg = f"breakfix {iid}: {incident.title}"
            return await a.notify_tenant(str(p.get("namespace", "")), str(pod) if pod else None, msg,
                                         incident=iid)
        case StepAction.RESTART_POD:
            return await a.restart_pod(str(p.get("namespace", "")), str(p.get("pod", "")), incident=iid)
        case StepAction.ESCALATE:
            why = p.get("reason") or climbed
            summary = f"{why}; {rma_summary(incident)}" if why else rma_summary(incident)
            return await a.escalate(incident.node, summary, incident=iid)
    return StepResult(False, f"no actuator for {step.action.value}")  # pragma: no cover
