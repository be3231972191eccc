"""The failure model ``breakfix simulate`` runs: failure processes, repair durations, fleet shape.

Read from YAML (the bundled ``models/default.yaml``, or ``--failures FILE``) through the shared
data-file loader, so a bad file is one ``file:line: reason`` error. Every number is bounded and
finite. The trace generator (``simulate.trace``) draws faults from these processes; the
simulated fleet (``simulate.fleet``) uses the durations and what each fault's ``fix`` is.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import load_model

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "default.yaml"

_STRICT = ConfigDict(extra="forbid", frozen=True)


class Fix(IntEnum):
    """What actually repairs a fault, weakest first. ``SELF`` clears on its own; ``HUMAN`` needs
    hands on the machine (a cable, a thermal interface) that no automated action replaces."""

    SELF = 0
    APP_RESTART = 1
    GPU_RESET = 2
    REBOOT = 3
    REPROVISION = 4
    HUMAN = 5
    RMA = 6

    @classmethod
    def parse(cls, value: object) -> Fix:
        if isinstance(value, Fix):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(f"fix must be one of {', '.join(m.lower() for m in cls.__members__)}")


class SignalSpec(BaseModel):
    """One signal a fault emits, ``delay_s`` after it starts. ``on: peers`` repeats it on the GPU's
    NVLink peers (the other GPUs of the node)."""

    model_config = _STRICT

    check: str = Field(min_length=1, max_length=64)
    code: str | None = Field(default=None, max_length=64)
    severity: Severity = Severity.WARNING
    delay_s: float = Field(default=0.0, ge=0, le=86400, allow_inf_nan=False)
    message: str = Field(default="", max_length=512)
    component: str | None = Field(default=None, max_length=64)
    on: Literal["gpu", "node", "peers"] = "gpu"


class Process(BaseModel):
    """One failure process: how often (a share of the base rate, or an explicit rate per entity-hour),
    on what (GPU, node or switch), what it emits, and what fixes it."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=64)
    share: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    rate_per_hour: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    per: Literal["gpu", "node", "switch"] = "gpu"
    tenant: bool = False
    signals: tuple[SignalSpec, ...] = Field(default=(), max_length=16)
    fix: Fix
    rma_probability: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    lesser_fail_probability: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    duration_s: float = Field(default=600.0, gt=0, le=30 * 86400, allow_inf_nan=False,
                              description="How long a self-clearing fault lasts.")

    @model_validator(mode="before")
    @classmethod
    def _fix(cls, data: object) -> object:
        if isinstance(data, dict) and "fix" in data:
            data = {**data, "fix": Fix.parse(data["fix"])}
        return data

    @model_validator(mode="after")
    def _rate(self) -> Process:
        if (self.share is None) == (self.rate_per_hour is None):
            raise ValueError("give exactly one of share and rate_per_hour")
        return self


class Durations(BaseModel):
    model_config = _STRICT

    app_restart_s: float = Field(default=180, gt=0, le=86400, allow_inf_nan=False)
    drain_s: float = Field(default=300, ge=0, le=86400, allow_inf_nan=False)
    gpu_reset_s: float = Field(default=120, gt=0, le=86400, allow_inf_nan=False)
    reboot_s: float = Field(default=600, gt=0, le=86400, allow_inf_nan=False)
    reprovision_s: float = Field(default=3600, gt=0, le=7 * 86400, allow_inf_nan=False)
    diag_r2_s: float = Field(default=420, gt=0, le=86400, allow_inf_nan=False)
    diag_r3_s: float = Field(default=1800, gt=0, le=86400, allow_inf_nan=False)
    human_response_s: float = Field(default=14400, ge=0, le=30 * 86400, allow_inf_nan=False)
    human_repair_s: float = Field(default=7200, gt=0, le=30 * 86400, allow_inf_nan=False)
    rma_lead_days: float = Field(default=5, gt=0, le=365, allow_inf_nan=False)
    recurrence_s: float = Field(default=3600, gt=0, le=30 * 86400, allow_inf_nan=False)
    diag_detection: float = Field(default=0.95, ge=0, le=1, allow_inf_nan=False)

    def for_fix(self, fix: Fix) -> float:
        """How long applying ``fix`` takes once someone starts it."""
        return {Fix.SELF: 0.0, Fix.APP_RESTART: self.app_restart_s, Fix.GPU_RESET: self.gpu_reset_s,
                Fix.REBOOT: self.reboot_s, Fix.REPROVISION: self.reprovision_s, Fix.HUMAN: self.human_repair_s,
                Fix.RMA: self.rma_lead_days * 86400}[fix]


class FleetShape(BaseModel):
    model_config = _STRICT

    gpus_per_node: int = Field(default=8, ge=1, le=64)
    nodes_per_switch: int = Field(default=32, ge=1, le=4096)
    utilization: float = Field(default=0.9, ge=0, le=1, allow_inf_nan=False)


class FailureModel(BaseModel):
    model_config = _STRICT

    version: Literal[1] = 1
    base_rate_per_gpu_hour: float = Field(default=1.973e-5, gt=0, le=1, allow_inf_nan=False)
    fleet: FleetShape = FleetShape()
    durations: Durations = Durations()
    processes: tuple[Process, ...] = Field(min_length=1, max_length=256)

    def rate(self, p: Process) -> float:
        """Faults per entity-hour for ``p``."""
        if p.rate_per_hour is not None:
            return p.rate_per_hour
        assert p.share is not None
        per_gpu = self.base_rate_per_gpu_hour * p.share
        return per_gpu * (self.fleet.gpus_per_node if p.per == "node" else 1) * (
            self.fleet.gpus_per_node * self.fleet.nodes_per_switch if p.per == "switch" else 1)


def load_failure_model(path: str | Path | None = None) -> FailureModel:
    """The model at ``path`` (default: the bundled one). Raises ``DataFileError`` (file:line: reason)."""
    return load_model(FailureModel, path or DEFAULT_MODEL)
