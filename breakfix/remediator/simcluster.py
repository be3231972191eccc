"""``SimCluster``: a simulated GPU cluster that implements the ``Actuator`` protocol.

The demo and the end-to-end tests carry plans out against it: cordon, drain, GPU reset
and reboot change the simulated node's state, and every call is kept in ``history`` so a
test can assert exactly what happened. Faulty behaviour (a reset that fails, a diagnostic
that fails) is configured per node/GPU.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from breakfix.remediator.actuator import StepResult
from breakfix.remediator.view import ClusterView, NodeView


@dataclass
class SimNode:
    name: str
    gpus: int = 8
    labels: dict[str, str] = field(default_factory=dict)
    cordoned: bool = False
    cordoned_by: str | None = None
    taints: list[str] = field(default_factory=list)
    drained: bool = False
    drained_gpus: set[int] = field(default_factory=set)
    gpu_resets: dict[int, int] = field(default_factory=dict)
    reboots: int = 0
    reprovisions: int = 0
    pods: dict[str, int] = field(default_factory=dict)  # "ns/pod" -> gpu index
    pod_restarts: dict[str, int] = field(default_factory=dict)


QUARANTINE_TAINT = "breakfix.io/quarantine=true:NoSchedule"


class SimCluster:
    def __init__(self, nodes: dict[str, SimNode] | None = None, *, controller_owned: set[str] | None = None,
                 failing_resets: set[tuple[str, int]] | None = None,
                 failing_validation: set[str] | None = None, lost_reboots: set[str] | None = None,
                 busy_gpus: set[tuple[str, int]] | None = None, hanging: set[str] | None = None) -> None:
        self.nodes = nodes or {}
        self.controller_owned = controller_owned if controller_owned is not None else set()
        self.failing_resets = failing_resets or set()
        self.failing_validation = failing_validation or set()
        self.lost_reboots = lost_reboots or set()      # nodes whose reboot does not come back
        self.busy_gpus = busy_gpus or set()            # GPUs a process holds until the node is drained
        self.hanging = hanging or set()                # actions that never answer (step timeouts)
        self.history: list[tuple[str, ...]] = []
        self.notifications: list[tuple[str, str, str]] = []
        self.escalations: list[tuple[str, str]] = []
        self.done: dict[str, StepResult] = {}

    async def _maybe_hang(self, action: str) -> None:
        if action in self.hanging:
            await asyncio.Event().wait()  # never answers: the executor's timeout must fire

    def _node(self, name: str) -> SimNode:
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = SimNode(name)
        return node

    async def view(self) -> ClusterView:
        return ClusterView(
            nodes={n.name: NodeView(n.name, dict(n.labels), n.cordoned, n.cordoned_by == "breakfix")
                   for n in self.nodes.values()},
            controller_owned_pods=frozenset(self.controller_owned),
        )

    async def cordon(self, node: str, *, incident: str, reason: str) -> StepResult:
        n = self._node(node)
        self.history.append(("cordon", node))
        if QUARANTINE_TAINT not in n.taints:  # as the Kubernetes actuator: the taint fences it whoever cordoned
            n.taints.append(QUARANTINE_TAINT)
        if n.cordoned and n.cordoned_by != "breakfix":
            return StepResult(True, f"{node} already cordoned by {n.cordoned_by or 'someone else'}; left as is and "
                                    f"tainted {QUARANTINE_TAINT}")
        n.cordoned, n.cordoned_by = True, "breakfix"
        return StepResult(True, f"cordoned {node} and tainted {QUARANTINE_TAINT}")

    async def drain(self, node: str, *, incident: str) -> StepResult:
        n = self._node(node)
        self.history.append(("drain", node))
        moved = len(n.pods)
        n.pods.clear()
        n.drained = True
        return StepResult(True, f"evicted {moved} pods from {node}")

    async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
        n = self._node(node)
        self.history.append(("drain_gpu", node, str(gpu)))
        victims = [p for p, g in n.pods.items() if g == gpu]
        for p in victims:
            del n.pods[p]
        n.drained_gpus.add(gpu)
        return StepResult(True, f"evicted {len(victims)} pods from {node} gpu{gpu}")

    async def gpu_idle(self, node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
        return not any(g == gpu for g in self._node(node).pods.values())

    async def gpu_pods(self, node: str, gpu: int, *, incident: str) -> StepResult:
        held = sorted(p for p, g in self._node(node).pods.items() if g == gpu)
        return StepResult(True, f"{len(held)} pod(s) hold GPU {gpu}", {"pods": ",".join(held)})

    async def reset_gpu(self, node: str, gpu: int, *, incident: str, key: str = "") -> StepResult:
        if key and key in self.done:  # idempotent: a resumed plan gets the same answer, no second effect
            return self.done[key]
        result = await self._reset_gpu(node, gpu, incident=incident)
        if key:
            self.done[key] = result
        return result

    async def _reset_gpu(self, node: str, gpu: int, *, incident: str) -> StepResult:
        n = self._node(node)
        self.history.append(("reset_gpu", node, str(gpu)))
        await self._maybe_hang("reset_gpu")
        if (node, gpu) in self.busy_gpus and not n.drained:
            return StepResult(False, f"busy: GPU {gpu} on {node} is held by 1 process(es): 4242, python3")
        if (node, gpu) in self.failing_resets:
            return StepResult(False, f"GPU reset of {node} gpu{gpu} failed: GPU is in use or lost")
        n.gpu_resets[gpu] = n.gpu_resets.get(gpu, 0) + 1
        return StepResult(True, f"reset {node} gpu{gpu}")

    async def reboot(self, node: str, *, incident: str, key: str = "") -> StepResult:
        if key and key in self.done:  # idempotent: a resumed plan gets the same answer, no second effect
            return self.done[key]
        result = await self._reboot(node, incident=incident)
        if key:
            self.done[key] = result
        return result

    async def _reboot(self, node: str, *, incident: str) -> StepResult:
        n = self._node(node)
        self.history.append(("reboot", node))
        await self._maybe_hang("reboot")
        if node in self.lost_reboots:
            return StepResult(False, f"{node} did not come back from its reboot")
        n.reboots += 1
        return StepResult(True, f"rebooted {node} (boot #{n.reboots + 1})")

    async def reprovision(self, node: str, *, incident: str, key: str = "") -> StepResult:
        if key and key in self.done:  # idempotent: a resumed plan gets the same answer, no second effect
            return self.done[key]
        result = await self._reprovision(node, incident=incident)
        if key:
            self.done[key] = result
        return result

    async def _reprovision(self, node: str, *, incident: str) -> StepResult:
        n = self._node(node)
        self.history.append(("reprovision", node))
        n.reprovisions += 1
        return StepResult(True, f"reprovisioned {node}")

    async def validate(self, node: str, gpu: int | None, level: int, *, incident: str, key: str = "") -> StepResult:
        if key and key in self.done:  # idempotent: a resumed plan gets the same answer, no second effect
            return self.done[key]
        result = await self._validate(node, gpu, level, incident=incident)
        if key:
            self.done[key] = result
        return result

    async def _validate(self, node: str, gpu: int | None, level: int, *, incident: str) -> StepResult:
        self.history.append(("validate", node, str(level)) if gpu is None else ("validate", node, str(level),
                                                                                  f"gpu{gpu}"))
        await self._maybe_hang("validate")
        if node in self.failing_validation:
            return StepResult(False, f"DCGM diag r{level} failed on {node}", {"memory": "fail"})
        return StepResult(True, f"DCGM diag r{level} passed on {node}", {"software": "pass", "memory": "pass"})

    async def return_to_service(self, node: str, *, incident: str) -> StepResult:
        n = self._node(node)
        self.history.append(("return_to_service", node))
        n.drained = False
        n.drained_gpus.clear()
        n.taints = [t for t in n.taints if t != QUARANTINE_TAINT]
        if n.cordoned and n.cordoned_by == "breakfix":
            n.cordoned, n.cordoned_by = False, None
            return StepResult(True, f"uncordoned {node}")
        if n.cordoned:
            return StepResult(True, f"{node} stays cordoned: cordoned by {n.cordoned_by}, not breakfix")
        return StepResult(True, f"{node} schedulable")

    async def notify_tenant(self, namespace: str, pod: str | None, message: str, *, incident: str) -> StepResult:
        self.history.append(("notify_tenant", namespace, pod or ""))
        self.notifications.append((namespace, pod or "", message))
        return StepResult(True, f"event posted to {namespace}/{pod or '*'}")

    async def restart_pod(self, namespace: str, pod: str, *, incident: str) -> StepResult:
        self.history.append(("restart_pod", namespace, pod))
        for n in self.nodes.values():
            key = f"{namespace}/{pod}"
            if key in n.pods:
                n.pod_restarts[key] = n.pod_restarts.get(key, 0) + 1
        return StepResult(True, f"deleted {namespace}/{pod}; its controller recreates it")

    async def escalate(self, node: str | None, summary: str, *, incident: str) -> StepResult:
        self.history.append(("escalate", node or ""))
        self.escalations.append((node or "", summary))
        return StepResult(True, "escalated (no notification channel configured)")  # the demo has no notify section
