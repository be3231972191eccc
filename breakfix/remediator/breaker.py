"""Pages that are not plan steps, published as ``NOTIFICATION`` records on ``breakfix.actions.<cluster>`` (plus
the actuator's escalation), so no incident is marked escalated by them.

- the circuit breaker: when ``guards.GuardState.observe_open`` trips it, on-call gets one page listing every
  incident it now holds; ``breakfix breaker reset`` (``remediator.human``) re-drives them;
- a stale hold: an incident the correlator closed as stale still holds its node, and on-call is told to release
  it by hand.

``fence`` is the plan a refusal that needs a human gets (retry cap, kill switch, a budget wait too long): the
node is cordoned and tainted and a human is paged with the reason, through the service's executor.
``return_plan`` is its way back: validate and return each node (a human's release, or a node the cooldown
kept cordoned whose incident resolved).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from breakfix.remediator.policy import ACTION_TIMEOUT_S
from breakfix.schemas.incident import (
    ActionKind,
    ActionOutcome,
    Domain,
    Incident,
    IncidentScope,
    Plan,
    Rung,
    Step,
    StepAction,
    WaitingOn,
)

if TYPE_CHECKING:
    from breakfix.remediator.guards import Refusal
    from breakfix.remediator.service import RemediatorService

log = structlog.get_logger("breakfix.remediator")

# The DCGM diagnostic a node proves itself with before it returns (NVIDIA DCGM diagnostics, dcgmi diag run levels;
# /work/shared/reference/dcgm_health_and_diag.md section 2): r2 (medium: memory, PCIe/NVLink) is NVIDIA's
# epilogue after a failed job; r3 (long: adds the SM stress diagnostic, targeted_stress and targeted_power) is for
# post-mortem and pre-RMA, which is what a node back from these faults (hardware, mechanics, thermal or power, several
# GPUs, a fatal NVSwitch error, a reboot-class fault) is.
DEEP_VALIDATION = frozenset({"hardware_support", "mechanical_inspection", "thermal_power", "multi_gpu_failure",
                             "nvswitch_fatal", "node_reboot_required"})


async def page_breaker(svc: RemediatorService, inc: Incident) -> None:
    reason = svc.guards.breaker_reason
    log.error("breaker_tripped", reason=reason)
    svc.keeper.save()
    counted = {n for n, _ in svc.guards.opens}  # what the breaker counted: plans that act on the node, any domain
    held = sorted(i.id for i in svc.latest.values() if not i.status.terminal
                  and (i.domain is Domain.OPERATOR or i.node in counted))
    why = (f"circuit breaker tripped, automated operator actions stopped: {reason}; held incidents: "
           f"{', '.join(held)}; reset with 'breakfix breaker reset' to re-drive them")
    await svc.actuator.escalate(None, why, incident=inc.id)
    await svc.publish(svc.record(inc, ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, why, tag="breaker",
                                 waiting=WaitingOn.BREAKER, details={"guard": "breaker", "held": ",".join(held)}))


async def page_stale_hold(svc: RemediatorService, inc: Incident) -> None:
    """The correlator closed an incident as stale: a node it holds stays held (never released silently) and
    on-call is told which node to release by hand."""
    nodes = sorted(n for n, holders in svc.guards.holds.items() if inc.id in holders)
    if not nodes:
        return
    why = (f"{inc.id} closed as stale, but {', '.join(nodes)} stays cordoned for it; check the node and run "
           f"'breakfix release {inc.id} --reason ...' to return it")
    log.warning("stale_hold", incident=inc.id, nodes=nodes)
    await svc.actuator.escalate(nodes[0], why, incident=inc.id)
    await svc.publish(svc.record(inc, ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, why, tag="stale-hold",
                                 waiting=WaitingOn.HUMAN, details={"held": ",".join(nodes)}))


async def fence(svc: RemediatorService, inc: Incident, refusal: Refusal, attempt: int) -> None:
    """Cordon + taint the node and page a human with the refusal's reason; the incident keeps its hold."""
    params: dict[str, str | int | bool] = {"node": inc.node or ""}
    plan = Plan(domain=Domain.OPERATOR, rule=f"fence-{refusal.guard}", reason=refusal.reason,
                steps=(Step(action=StepAction.CORDON, params=params),
                       Step(action=StepAction.ESCALATE, params={**params, "reason": refusal.reason})))
    assert inc.node is not None
    svc.guards.hold(inc.node, inc.id, f"fenced: {refusal.reason}")
    svc.keeper.save()
    await svc.executor.run(inc, plan, attempt=attempt + 50)


def return_plan(inc: Incident, nodes: Sequence[str], why: str, *, rule: str, validate: bool = True) -> Plan:
    """Validate (unless ``validate`` is False) and return each of ``nodes`` to service, in one rung: a failed
    validation stops there and escalates, the node cordoned. The validation runs on the incident's GPU only when it
    is a GPU-scope incident that names one GPU, else on the whole node (several GPUs, a node-scope fault, an
    NVSwitch error with its GPUs folded in); at level 3 after the categories in ``DEEP_VALIDATION``, else 2."""
    one_gpu = inc.gpus[0].index if inc.scope is IncidentScope.GPU and len(inc.gpus) == 1 else None
    level = 3 if inc.category in DEEP_VALIDATION else 2
    steps: list[Step] = []
    for node in nodes:
        params: dict[str, str | int | bool] = {"node": node}
        if inc.node == node and one_gpu is not None:
            params["gpu"] = one_gpu
        if validate:  # r3 runs for tens of minutes: the validate action's own timeout, not a step's default
            steps.append(Step(action=StepAction.VALIDATE, params={**params, "level": level,
                                                                  "scope": "gpu" if "gpu" in params else "node"},
                              timeout_s=ACTION_TIMEOUT_S[StepAction.VALIDATE]))
        steps.append(Step(action=StepAction.RETURN_TO_SERVICE, params={**params, "soak": False}))
    rung = Rung(name="return", steps=tuple(steps), timeout_s=sum(s.timeout_s for s in steps))
    return Plan(domain=Domain.OPERATOR, rule=rule, reason=why, steps=rung.steps, ladder=(rung,))
