"""The production actuator: Kubernetes for scheduling and pods, the node agent for the GPU and
the machine, the provider hook for reprovisioning. It implements ``remediator.actuator.Actuator``
so the executor cannot tell it from the simulated cluster.

A reboot succeeds only when the node agent confirms a new boot id (the same idempotency key is
sent again until the agent answers that the node rebooted) and the Node is Ready again, all within
``reboot_wait_s``, so the next step (validation) talks to the rebooted, ready node. Escalation
leaves a Warning event and ``GPUHealthy=False`` on the node for the humans who take over.
"""

from __future__ import annotations

from breakfix.bus.clock import SYSTEM_CLOCK, Clock
from breakfix.remediator.actuator import StepResult
from breakfix.remediator.k8s import KubernetesActuator
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.remediator.provider import ProviderHook
from breakfix.remediator.view import ClusterView
from breakfix.schemas.agent import AgentAction


class ClusterActuator:
    def __init__(self, k8s: KubernetesActuator, agent: NodeAgentClient, provider: ProviderHook | None = None, *,
                 event_namespace: str = "breakfix", reboot_wait_s: float = 1800.0, poll_s: float = 10.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.k8s = k8s
        self.agent = agent
        self.provider = provider
        self.ns = event_namespace
        self.reboot_wait_s = reboot_wait_s
        self.poll_s = poll_s
        self.clock = clock
        self._asks = 0

    async def view(self) -> ClusterView:
        return await self.k8s.view()

    async def cordon(self, node: str, *, incident: str, reason: str) -> StepResult:
        return await self.k8s.cordon(node, incident=incident, reason=reason)

    async def drain(self, node: str, *, incident: str) -> StepResult:
        return await self.k8s.drain(node, incident=incident)

    async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
        return await self.k8s.drain_gpu(node, gpu, incident=incident, pods=pods)

    async def gpu_pods(self, node: str, gpu: int, *, incident: str) -> StepResult:
        """The node agent's answer (kubelet PodResources and nvidia-smi -L on the node); read-only, so each ask
        gets its own key and a fresh answer."""
        self._asks += 1
        return await self.agent.call(node, AgentAction.GPU_PODS, key=f"{incident}:pods:{gpu}:{self._asks}",
                                     incident=incident, gpu_index=gpu)

    async def gpu_idle(self, node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
        """Idle when none of the GPU's known pods still runs on the node (its job ended)."""
        return not await self.k8s.pods_running(node, pods)

    async def reset_gpu(self, node: str, gpu: int, *, incident: str, key: str = "") -> StepResult:
        await self.k8s.set_gpu_condition(node, False, "GPUReset", f"breakfix {incident}: resetting gpu{gpu}")
        return await self.agent.call(node, AgentAction.RESET_GPU, key=key or f"{incident}:reset:{gpu}",
                                     incident=incident, gpu_index=gpu)

    async def reboot(self, node: str, *, incident: str, key: str = "") -> StepResult:
        key = key or f"{incident}:reboot"
        _, booted_as = await self.k8s.node_state(node)
        first = await self.agent.call(node, AgentAction.REBOOT, key=key, incident=incident)
        if not first.ok and "did not answer" not in first.detail:
            return first
        if first.evidence.get("replayed") == "true":  # a resumed plan: the reboot was asked before this read
            booted_as = ""
        deadline = self.clock.monotonic() + self.reboot_wait_s
        while self.clock.monotonic() < deadline:
            await self.clock.sleep(self.poll_s)
            again = await self.agent.call(node, AgentAction.REBOOT, key=key, incident=incident)
            if again.ok and again.evidence.get("replayed") == "true" and "new boot id" in again.detail:
                break
        else:
            return StepResult(False, f"{node} did not come back from its reboot within {self.reboot_wait_s:g}s")
        while True:  # the kubelet (and the device plugin's GPUs) back: what validation needs. A Node keeps its old
            ready, boot = await self.k8s.node_state(node)  # Ready for ~40 s after a reboot: the kubelet's new
            if ready and not (booted_as and boot == booted_as):  # bootID says it is the rebooted one reporting
                break
            if self.clock.monotonic() >= deadline:
                return StepResult(False, f"{node} rebooted but its Node is not Ready after {self.reboot_wait_s:g}s")
            await self.clock.sleep(self.poll_s)
        return StepResult(True, f"{node} rebooted, its agent is back and its Node is Ready", again.evidence)

    async def reprovision(self, node: str, *, incident: str, key: str = "") -> StepResult:
        if self.provider is None:
            return StepResult(False, "no provider hook configured for reprovision")
        return await self.provider.reprovision(node, reason=f"breakfix {incident}", incident=incident)

    async def validate(self, node: str, gpu: int | None, level: int, *, incident: str, key: str = "") -> StepResult:
        return await self.agent.call(node, AgentAction.VALIDATE, key=key or f"{incident}:validate:{level}",
                                     incident=incident, gpu_index=gpu, level=level)

    async def return_to_service(self, node: str, *, incident: str) -> StepResult:
        await self.k8s.set_gpu_condition(node, True, "Validated", f"breakfix {incident}: passed validation")
        return await self.k8s.uncordon(node, incident=incident)

    async def notify_tenant(self, namespace: str, pod: str | None, message: str, *, incident: str) -> StepResult:
        return await self.k8s.notify_tenant(namespace, pod, message, incident=incident)

    async def restart_pod(self, namespace: str, pod: str, *, incident: str) -> StepResult:
        return await self.k8s.restart_pod(namespace, pod, incident=incident)

    async def escalate(self, node: str | None, summary: str, *, incident: str) -> StepResult:
        if node:
            await self.k8s.set_gpu_condition(node, False, "Escalated", summary)
            await self.k8s.event(self.ns, "Node", node, "BreakfixEscalated", summary, incident=incident)
        return StepResult(True, f"escalated: {summary}")
