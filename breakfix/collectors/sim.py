"""The ``sim`` source: replay a YAML fault scenario over a simulated fleet as signals.

Scenario files live in ``collectors/scenarios/`` (or any path) and are validated with
file:line errors. ``timeline`` is pure (scenario + fleet + start time -> timed signals);
``run_scenario`` sleeps between them and hands each to the ``SignalPublisher``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.collectors.fleet import Fleet
from breakfix.collectors.publisher import SignalPublisher
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import DataFileError, load_model
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

# Text the driver prints after "<xid>, pid=..., name=..., " for common XIDs (see runbooks).
XID_TEXT = {
    "13": "Graphics SM Warp Exception on (GPC 7, TPC 7, SM 0): Illegal Instruction Parameter",
    "31": "Ch 00000010, intr 00000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f29_5b8c9000. "
          "Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ",
    "43": "Ch 00000008",
    "45": "Ch 00000008",
    "48": "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at physAddr "
          "0x7fffa8860 partition 7, subpartition 1.",
    "63": "Row Remapper: New row marked for remapping, reset gpu to activate.",
    "64": "Row Remapper: Failed to remap row.",
    "74": "NVLink: fatal error detected on link 14(0x100000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)",
    "79": "GPU has fallen off the bus.",
    "94": "Contained ECC error",
    "95": "Uncontained ECC error",
    "119": "Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 76 (GSP_RM_CONTROL).",
}


class ScenarioEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    at: float = Field(ge=0, description="Seconds after the scenario starts.")
    node: int = Field(ge=0, description="Node index in the fleet.")
    gpu: int | None = Field(default=None, ge=0)
    check: str = "xid"
    code: str | None = None
    healthy: bool = False
    severity: Severity | None = None
    message: str | None = None
    tenant: bool = Field(default=True, description="Attach the pod that owns the GPU.")
    repeat: int = Field(default=1, ge=1, le=100_000)
    every: float = Field(default=1.0, ge=0)
    duplicate: bool = Field(default=False, description="Send the same signal twice (a re-send).")
    note: str = ""


class Scenario(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    nodes: int = Field(default=16, ge=1, le=100_000, description="Smallest fleet this scenario needs.")
    events: tuple[ScenarioEvent, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _nodes_in_range(self) -> Scenario:
        for i, ev in enumerate(self.events):
            if ev.node >= self.nodes:
                raise ValueError(f"events[{i}].node {ev.node} is outside the scenario's {self.nodes} nodes")
            if ev.gpu is not None and ev.gpu >= 8:
                raise ValueError(f"events[{i}].gpu {ev.gpu} is outside 0-7")
        return self

    @property
    def duration_s(self) -> float:
        return max(ev.at + ev.every * (ev.repeat - 1) for ev in self.events)


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A scenario by bundled name (``mixed``) or by file path."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            names = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.yaml")))
            raise DataFileError(name_or_path, None, f"no such scenario; bundled scenarios: {names}")
    return load_model(Scenario, p)


def kernel_line(code: str, pci: str, pid: str = "'<unknown>'", name: str = "<unknown>") -> str:
    """A kernel-log XID line as the NVIDIA driver prints it (``PCI:dddd:bb:dd``)."""
    text = XID_TEXT.get(code, "Unrecognised error reported by the driver")
    return f"NVRM: Xid (PCI:{pci[:-2]}): {code}, pid={pid}, name={name}, {text}"


def timeline(scenario: Scenario, fleet: Fleet, start: datetime, catalog: Catalog) -> list[tuple[float, Signal]]:
    """Every signal the scenario produces, with its offset in seconds, in time order."""
    out: list[tuple[float, Signal]] = []
    for ei, ev in enumerate(scenario.events):
        node = fleet.node(ev.node)
        sim_gpu = node.gpus[ev.gpu] if ev.gpu is not None else None
        gpu = sim_gpu.ref if sim_gpu else None
        tenant = sim_gpu.tenant if (sim_gpu and ev.tenant) else None
        fc = catalog.classify(check=ev.check, code=ev.code)
        for r in range(ev.repeat):
            offset = ev.at + r * ev.every
            observed = start + timedelta(seconds=offset)
            message = ev.message
            if message is None and ev.check == "xid" and ev.code and gpu and gpu.pci_bus_id:
                pid = "4242" if tenant else "'<unknown>'"
                message = kernel_line(ev.code, gpu.pci_bus_id, pid, "python3" if tenant else "<unknown>")
            details = {"scenario": scenario.name, "event": str(ei)}
            if ev.note:
                details["note"] = ev.note
            sig = Signal(
                id=make_signal_id(cluster=fleet.cluster, node=node.name, source="sim", check=ev.check,
                                  code=ev.code, healthy=ev.healthy, observed_at=observed, gpu=gpu,
                                  discriminator=f"{scenario.name}:{ei}:{r}"),
                cluster=fleet.cluster, node=node.name, source=SignalSource.SIM, check=ev.check, code=ev.code,
                healthy=ev.healthy, severity=Severity.INFO if ev.healthy else (ev.severity or fc.severity),
                gpu=gpu, tenant=tenant, message=message or f"{ev.check} {'healthy' if ev.healthy else 'fault'}",
                details=details, labels=dict(node.labels), observed_at=observed,
            )
            out.append((offset, sig))
            if ev.duplicate:
                out.append((offset, sig))
    out.sort(key=lambda x: x[0])
    return out


async def run_scenario(publisher: SignalPublisher, timed: list[tuple[float, Signal]], *,
                       speed: float = 1.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> int:
    """Publish a timeline, keeping its spacing (divided by ``speed``). Returns signals sent."""
    elapsed = 0.0
    for offset, sig in timed:
        wait = (offset - elapsed) / speed
        if wait > 0:
            await sleep(wait)
            elapsed = offset
        await publisher.publish(sig)
    return len(timed)
