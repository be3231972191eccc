"""The node-agent adapter: reset a GPU, run DCGM diagnostics, reboot, list a GPU's pods, through the node's agent.

Sends ``schemas.agent.AgentCommand`` to ``breakfix.agent.<cluster>.<node>`` over NATS
request/reply (``bus.protocol.Requester``) and turns the ``AgentReply`` into a ``StepResult``.
The step's idempotency key is the command id, so a resumed plan that sends the same step
again gets the agent's stored answer instead of a second reset or reboot. A node that does
not answer (down, rebooting, partitioned) is a failed step with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pydantic import ValidationError

from breakfix.bus.protocol import Requester
from breakfix.remediator.actuator import StepResult
from breakfix.schemas import subjects
from breakfix.schemas.agent import AgentAction, AgentCommand, AgentReply
from breakfix.schemas.common import first_error


class NodeAgentClient:
    def __init__(self, bus: Requester, cluster: str, clock: Callable[[], datetime], *,
                 timeouts: dict[AgentAction, float] | None = None) -> None:
        self.bus = bus
        self.cluster = cluster
        self.clock = clock
        # validate: the agent's diag (3600 s) after its engine and fabric waits (300 s together, each last call up to
        # 60 s more), and a minute of margin
        self.timeouts = {AgentAction.RESET_GPU: 300.0, AgentAction.VALIDATE: 4080.0, AgentAction.REBOOT: 120.0,
                         AgentAction.GPU_PODS: 45.0, **(timeouts or {})}

    async def call(self, node: str, action: AgentAction, *, key: str, incident: str, gpu_uuid: str | None = None,
                   gpu_index: int | None = None, level: int = 2) -> StepResult:
        cmd = AgentCommand(id=key, node=node, action=action, incident=incident, gpu_uuid=gpu_uuid,
                           gpu_index=gpu_index, level=level, issued_at=self.clock())
        try:
            raw = await self.bus.request(subjects.agent_subject(self.cluster, node),
                                         cmd.model_dump_json(by_alias=True).encode(), timeout_s=self.timeouts[action])
        except Exception as exc:  # no responder, timeout, connection: the step failed, say why
            return StepResult(False, f"node agent on {node} did not answer {action.value}: {type(exc).__name__}")
        try:
            reply = AgentReply.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            return StepResult(False, f"node agent on {node} answered unreadably: {first_error(exc)} ({raw[:200]!r})")
        evidence = dict(reply.evidence)
        if reply.replayed:
            evidence["replayed"] = "true"
        if reply.error:
            evidence["error"] = reply.error  # machine-readable by its prefix: busy:, refused:, failed:
        return StepResult(reply.ok, reply.detail, evidence)
