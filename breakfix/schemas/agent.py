"""Node-agent commands (``breakfix.agent-command/v1``) and replies, over NATS request/reply.

The remediator's node-agent adapter (``remediator.nodeagent``) sends an ``AgentCommand`` to
``breakfix.agent.<cluster>.<node>``; the agent inside the node's collector daemon
(``collectors.agent``) answers with an ``AgentReply``. ``id`` is the idempotency key: the agent
never runs the same id twice and answers a repeat of the same command with the stored reply
(``replayed``); the same id with another action or arguments is refused. A reply's ``digest``
binds it to its request, and its ``error`` prefix (``busy:``, ``refused:``, ``failed:``) says
why it is not ok.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from breakfix.schemas.common import UtcDatetime

AGENT_COMMAND_SCHEMA: Literal["breakfix.agent-command/v1"] = "breakfix.agent-command/v1"
_FROZEN = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)  # finite numbers only


class AgentAction(StrEnum):
    RESET_GPU = "reset_gpu"
    VALIDATE = "validate"
    REBOOT = "reboot"
    GPU_PODS = "gpu_pods"  # read-only: the pods that hold a GPU or any of its MIG instances (kubelet PodResources)


class AgentCommand(BaseModel):
    model_config = _FROZEN

    schema_: Literal["breakfix.agent-command/v1"] = Field(default=AGENT_COMMAND_SCHEMA, alias="schema")
    id: str = Field(min_length=8, max_length=200, description="Idempotency key: one step of one plan.")
    node: str = Field(min_length=1, max_length=253)
    action: AgentAction
    incident: str = Field(default="", max_length=200)
    gpu_uuid: str | None = Field(default=None, max_length=100, description="NVML form: GPU-xxxxxxxx-xxxx-...")
    gpu_index: int | None = Field(default=None, ge=0, le=1024)
    level: int = Field(default=2, ge=1, le=4, description="DCGM diag run level for validate.")
    issued_at: UtcDatetime


class DiagTest(BaseModel):
    model_config = _FROZEN

    category: str = ""
    name: str
    status: str = Field(description="pass | fail | warn | skip, as DCGM reports it (lower case).")
    info: str = ""


class AgentReply(BaseModel):
    model_config = _FROZEN

    id: str
    node: str
    action: AgentAction
    ok: bool
    detail: str
    error: str = Field(default="", description="Why not ok, machine-readable by its prefix: 'busy:' (processes hold "
                                               "the GPU: drain first), 'refused:' (the agent will not do this), "
                                               "'failed:' (tried and failed), 'unknown:'.")
    digest: str = Field(default="", description="The request this answers: its id and the fingerprint of its action "
                                                "and arguments (collectors.agent_checks.fingerprint).")
    evidence: dict[str, str] = Field(default_factory=dict)
    tests: tuple[DiagTest, ...] = ()
    replayed: bool = False
    at: UtcDatetime
