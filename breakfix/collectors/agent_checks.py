"""The node agent's admission rules, pure: what a command may say, and how often it may disrupt.

``collectors.agent`` asks ``refuse`` about every decoded ``AgentCommand`` before it acts, and
``RateLimits`` (state kept on disk by the agent) before a reset or a reboot. Nothing here reads
a clock or a file: ``now`` is a wall-clock timestamp passed in (a reboot window has to outlive
the reboot, so it cannot be monotonic time).

Rules (defence in depth; the remediator has its own caps, these hold even against a forged
command):

- only the allow-listed actions; only this node;
- a GPU is named by an index in range of the node's GPUs or by a GPU UUID of NVML's form
  (``GPU-`` and 32 hex digits in 8-4-4-4-12 groups, as ``nvidia-smi -L`` prints it), never by
  free text, so nothing option-like (``--help``) or list-like (``0,1,2,3``) reaches nvidia-smi;
- the idempotency key and the incident id use a plain charset (no shell metacharacters,
  no leading ``-``); arguments are passed to executables as argv, never through a shell;
- the diag level is 1-4 (``dcgmi diag -r``; the schema bounds it too);
- the idempotency key covers the action and its arguments (``fingerprint``): the same key with a
  different command is refused, never answered with another command's stored reply;
- at most one reboot per node per ``reboot_window_s`` and one reset per GPU per
  ``reset_window_s``, whatever the remediator asks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from breakfix.schemas.agent import AgentAction, AgentCommand

GPU_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@=+/-]{0,199}")
MAX_GPUS = 64  # when the node's GPU count is not known: still a bounded, plain integer


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # short label for the refusal counter: not_allowed, wrong_node, bad_argument, ...
    detail: str


def fingerprint(cmd: AgentCommand) -> str:
    """What the idempotency key stands for: the action and every argument it acts with."""
    body = {"node": cmd.node, "action": cmd.action.value, "gpu_uuid": cmd.gpu_uuid, "gpu_index": cmd.gpu_index,
            "level": cmd.level if cmd.action is AgentAction.VALIDATE else None}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def gpu_target(cmd: AgentCommand) -> str | None:
    """The ``-i`` argument for nvidia-smi: a validated UUID or a decimal index (call after ``refuse``)."""
    if cmd.gpu_uuid is not None:
        return cmd.gpu_uuid
    return str(cmd.gpu_index) if cmd.gpu_index is not None else None


def refuse(cmd: AgentCommand, *, node: str, allow: frozenset[AgentAction], gpu_count: int | None) -> Refusal | None:
    """Why this command must not run here, or None when its form is acceptable."""
    if cmd.node != node:
        return Refusal("wrong_node", f"command for {cmd.node[:100]!r} reached {node}")
    if cmd.action not in allow:
        return Refusal("not_allowed", f"{cmd.action.value} is not allowed on this node")
    if not KEY.fullmatch(cmd.id):
        return Refusal("bad_argument", "id: only letters, digits and ._:@=+/- (no shell metacharacters)")
    if cmd.incident and not KEY.fullmatch(cmd.incident):
        return Refusal("bad_argument", "incident: only letters, digits and ._:@=+/- (no shell metacharacters)")
    if cmd.gpu_uuid is not None and not GPU_UUID.fullmatch(cmd.gpu_uuid):
        return Refusal("bad_argument", f"gpu_uuid {cmd.gpu_uuid[:80]!r} is not a GPU UUID (GPU-xxxxxxxx-...)")
    if cmd.gpu_index is not None:
        limit = gpu_count if gpu_count is not None else MAX_GPUS
        if not 0 <= cmd.gpu_index < limit:
            return Refusal("bad_argument", f"gpu_index {cmd.gpu_index} is outside this node's GPUs 0-{limit - 1}")
    if cmd.gpu_uuid is not None and cmd.gpu_index is not None:
        return Refusal("bad_argument", "name the GPU by index or by UUID, not both")
    if cmd.action in (AgentAction.RESET_GPU, AgentAction.GPU_PODS) and gpu_target(cmd) is None:
        return Refusal("bad_argument", f"{cmd.action.value} needs a GPU UUID or index")
    if not 1 <= cmd.level <= 4:
        return Refusal("bad_argument", f"level {cmd.level} is not a dcgmi diag level (1-4)")
    return None


@dataclass
class RateLimits:
    """When each disruptive action last ran here (wall-clock seconds): ``reboot`` and ``reset:<gpu>``."""

    reboot_window_s: float = 3600.0
    reset_window_s: float = 300.0
    last: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def slot(cmd: AgentCommand) -> str | None:
        if cmd.action is AgentAction.REBOOT:
            return "reboot"
        if cmd.action is AgentAction.RESET_GPU:
            return f"reset:{gpu_target(cmd)}"
        return None

    def check(self, cmd: AgentCommand, now: float) -> Refusal | None:
        slot = self.slot(cmd)
        if slot is None:
            return None
        window = self.reboot_window_s if slot == "reboot" else self.reset_window_s
        last = self.last.get(slot)
        if last is not None and now - last < window:  # a clock that went back is still inside the window
            what = "reboot of this node" if slot == "reboot" else f"reset of GPU {gpu_target(cmd)}"
            return Refusal("rate_limited", f"a {what} ran {now - last:.0f}s ago; at most one per {window:g}s")
        return None

    def record(self, cmd: AgentCommand, now: float) -> None:
        slot = self.slot(cmd)
        if slot is not None:
            self.last[slot] = now
            if len(self.last) > 256:  # bounded: keep the most recent
                for k in sorted(self.last, key=self.last.__getitem__)[:len(self.last) - 256]:
                    del self.last[k]
