"""The simulated fleet: ground truth (which faults are where), an ``Actuator`` the real executor
drives, and the capacity ledger the report is built from.

The executor runs a plan at once in wall time; each call here moves the plan's ``cursor``
forward by the action's simulated duration (``model.durations``) and schedules its effects as
timed events on the engine's heap, so the ledger sees every change at its simulated time.
Whether an action repairs a fault comes from the fault itself: ``fix`` and the per-fault rolls
drawn with the trace (``simulate.trace``). Validation catches a fault that is still there with
``diag_detection`` probability (a deterministic roll per fault and attempt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from breakfix.remediator.actuator import StepResult
from breakfix.remediator.view import ClusterView, NodeView
from breakfix.simulate.ledger import Ledger
from breakfix.simulate.model import FailureModel, Fix
from breakfix.simulate.trace import Fault

Schedule = Callable[[float, str, Callable[[], None]], None]


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def node_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


@dataclass(slots=True)
class PlanCursor:
    """Where in simulated time the plan being executed is, and what it touched."""

    at: float
    incident: str
    attempt: int = 0
    actions: list[str] = field(default_factory=list)


class SimFleet:
    """Implements ``remediator.actuator.Actuator`` over simulated nodes."""

    def __init__(self, model: FailureModel, nodes: int, ledger: Ledger, schedule: Schedule) -> None:
        self.model = model
        self.d = model.durations
        self.n_nodes = nodes
        self.gpn = model.fleet.gpus_per_node
        self.ledger = ledger
        self.schedule = schedule
        self.faults: dict[int, list[Fault]] = {}  # node -> active faults (ground truth)
        self.cursor = PlanCursor(0.0, "")
        self.cordoned: set[int] = set()
        self._view: ClusterView | None = None  # rebuilt only when a cordon changes (every decide reads it)
        self.pages: set[str] = set()
        self.escalated: dict[str, int] = {}  # incident -> node, waiting for a human
        self.rma_opened = 0
        self.rma_unneeded = 0
        self.labels = {node_name(i): {"switch": f"sw-{i // model.fleet.nodes_per_switch:04d}"} for i in range(nodes)}
        self.on_human_fix: Callable[[str, int, float], None] | None = None

    # -- ground truth ---------------------------------------------------------------------------
    def add_fault(self, f: Fault, at: float) -> None:
        for n in f.nodes:
            self.faults.setdefault(n, []).append(f)
        self.ledger.fault_started(f, at)

    def cure(self, f: Fault, at: float) -> None:
        for n in f.nodes:
            lst = self.faults.get(n, [])
            if f in lst:
                lst.remove(f)
        self.ledger.fault_cured(f, at)

    def _targets(self, node: int, gpu: int | None) -> list[Fault]:
        return [f for f in self.faults.get(node, []) if gpu is None or f.gpu is None or f.gpu == gpu]

    def _apply(self, node: int, gpu: int | None, strength: Fix, at: float) -> None:
        """An action of ``strength`` on ``node`` (``gpu``: only that GPU) ends at ``at``: cure what it fixes."""
        for f in list(self._targets(node, gpu)):
            fix = f.process.fix
            needed = Fix.RMA if f.needs_rma else fix
            if needed in (Fix.HUMAN, Fix.RMA) or fix is Fix.SELF:
                continue
            ok = strength >= needed or f.lesser_fixes(len(self.cursor.actions))
            if ok:
                self.cure(f, at)

    # -- Actuator ---------------------------------------------------------------------------------
    async def view(self) -> ClusterView:
        if self._view is None:
            self._view = ClusterView(nodes={
                node_name(i): NodeView(node_name(i), self.labels[node_name(i)], i in self.cordoned, i in self.cordoned)
                for i in range(self.n_nodes)})
        return self._view

    def uncordon(self, i: int, at: float) -> None:
        """Node ``i`` schedulable again from ``at`` (a plan's return to service, or a human's)."""
        self.cordoned.discard(i)
        self._view = None
        self.ledger.uncordon(i, at)

    def _advance(self, seconds: float, what: str) -> tuple[float, float]:
        start = self.cursor.at
        self.cursor.at += seconds
        self.cursor.actions.append(what)
        return start, self.cursor.at

    async def cordon(self, node: str, *, incident: str, reason: str) -> StepResult:
        i = node_index(node)
        if i not in self.cordoned:
            self.cordoned.add(i)
            self._view = None
            self.ledger.cordon(i, self.cursor.at)
        return StepResult(True, "cordoned")

    async def drain(self, node: str, *, incident: str) -> StepResult:
        i = node_index(node)
        start, _ = self._advance(self.d.drain_s, "drain")
        self.ledger.interrupt(i, None, start)
        return StepResult(True, "drained")

    async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
        start, _ = self._advance(self.d.drain_s / 2, "drain_gpu")
        self.ledger.interrupt(node_index(node), gpu, start)
        return StepResult(True, "drained GPU")

    async def gpu_idle(self, node: str, gpu: int, *, pods: tuple[str, ...] = ()) -> bool:
        return True  # the simulated fleet's jobs do not wait for deferred repairs

    async def gpu_pods(self, node: str, gpu: int, *, incident: str) -> StepResult:
        return StepResult(True, "one job per GPU", {"pods": ""})  # drain_gpu interrupts the GPU's job

    async def reset_gpu(self, node: str, gpu: int, *, incident: str, key: str = "") -> StepResult:
        i = node_index(node)
        if gpu >= self.gpn:
            return StepResult(False, f"no GPU {gpu}")
        start, end = self._advance(self.d.gpu_reset_s, "reset_gpu")
        self.ledger.disrupt(i, gpu, start, end, faulty=bool(self._targets(i, gpu)))
        self._apply(i, gpu, Fix.GPU_RESET, end)
        return StepResult(True, "reset")

    async def reboot(self, node: str, *, incident: str, key: str = "") -> StepResult:
        i = node_index(node)
        start, end = self._advance(self.d.reboot_s, "reboot")
        for g in range(self.gpn):
            self.ledger.disrupt(i, g, start, end, faulty=bool(self._targets(i, g)))
        self._apply(i, None, Fix.REBOOT, end)
        return StepResult(True, "rebooted")

    async def reprovision(self, node: str, *, incident: str, key: str = "") -> StepResult:
        i = node_index(node)
        start, end = self._advance(self.d.reprovision_s, "reprovision")
        for g in range(self.gpn):
            self.ledger.disrupt(i, g, start, end, faulty=bool(self._targets(i, g)))
        self._apply(i, None, Fix.REPROVISION, end)
        return StepResult(True, "reprovisioned")

    async def validate(self, node: str, gpu: int | None, level: int, *, incident: str, key: str = "") -> StepResult:
        i = node_index(node)
        self._advance(self.d.diag_r3_s if level >= 3 else self.d.diag_r2_s, "validate")
        left = [f for f in self._targets(i, gpu) if f.process.fix is not Fix.SELF and f.process.signals]
        if left and left[0].lesser_rolls and left[0].lesser_rolls[-1] < self.d.diag_detection:
            return StepResult(False, f"dcgmi diag -r {level} failed: {left[0].process.name}")
        return StepResult(True, f"dcgmi diag -r {level} passed")

    async def return_to_service(self, node: str, *, incident: str) -> StepResult:
        self.uncordon(node_index(node), self.cursor.at)
        return StepResult(True, "uncordoned")

    async def notify_tenant(self, namespace: str, pod: str | None, message: str, *, incident: str) -> StepResult:
        return StepResult(True, "notified")

    async def restart_pod(self, namespace: str, pod: str, *, incident: str) -> StepResult:
        self._advance(self.d.app_restart_s, "restart_pod")
        return StepResult(True, "restarted")

    async def escalate(self, node: str | None, summary: str, *, incident: str) -> StepResult:
        """Page a human. They come after ``human_response_s`` and apply the fault's real fix."""
        if incident not in self.pages:
            self.pages.add(incident)
            self.ledger.pages += 1
        if node is None or incident in self.escalated:
            return StepResult(True, "paged")
        i = node_index(node)
        self.escalated[incident] = i
        tried_hard = any(a in ("reboot", "reprovision") for a in self.cursor.actions)
        self.schedule(self.cursor.at + self.d.human_response_s, "human", lambda: self._human(incident, i, tried_hard))
        return StepResult(True, "paged")

    def _human(self, incident: str, i: int, tried_hard: bool) -> None:
        """A human at the node: RMA when the fault needs it (or the ladder already ran out), else the real fix."""
        self.escalated.pop(incident, None)
        faults = [f for f in self.faults.get(i, []) if f.process.fix is not Fix.SELF]
        rma = any(f.needs_rma or f.process.fix is Fix.RMA for f in faults) or (tried_hard and bool(faults))
        if rma:
            self.rma_opened += 1
            self.rma_unneeded += int(not any(f.needs_rma or f.process.fix is Fix.RMA for f in faults))
        took = self.d.rma_lead_days * 86400 if rma else max((self.d.for_fix(f.process.fix) for f in faults), default=0)
        if self.on_human_fix is not None:
            self.on_human_fix(incident, i, took)
