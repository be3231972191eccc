"""The ``Signal`` contract (``breakfix.signal/v1``): one observed state of one health check.

Collectors create signals from raw readings (NVML, DCGM, kernel log, fabric, endpoints,
the simulator) and publish them on ``breakfix.signals.<cluster>.<node>``. The correlator
consumes them. A signal with ``healthy=True`` clears the fault that the same check raised
on the same entity.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from breakfix.schemas.common import GpuRef, Severity, TenantRef, UtcDatetime, format_rfc3339

SIGNAL_SCHEMA: Literal["breakfix.signal/v1"] = "breakfix.signal/v1"

_CHECK_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")


@lru_cache(maxsize=4096)
def _valid_check(name: str) -> bool:
    return _CHECK_RE.match(name) is not None


class SignalSource(StrEnum):
    """Which collector source produced a signal."""

    NVML = "nvml"
    DCGM = "dcgm"
    KMSG = "kmsg"
    FABRIC = "fabric"
    ENDPOINT = "endpoint"
    PROMETHEUS = "prometheus"
    KUBERNETES = "kubernetes"
    VALIDATION = "validation"
    SIM = "sim"


class Signal(BaseModel):
    """One observation of one check on one entity. Frozen; safe to hash and share."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, str_strip_whitespace=True,
                              allow_inf_nan=False)  # NaN/Infinity readings are invalid, not "very large"

    schema_: Literal["breakfix.signal/v1"] = Field(default=SIGNAL_SCHEMA, alias="schema")
    id: str = Field(min_length=8, max_length=128, description="Deterministic for one observation.")
    cluster: str = Field(min_length=1)
    node: str = Field(min_length=1)
    source: SignalSource
    check: str = Field(description="Dotted lowercase check name, e.g. xid, ecc.dbe, ib.link_down.")
    code: str | None = Field(default=None, description="XID number, DCGM_FR_* code, ...")
    healthy: bool = False
    severity: Severity = Severity.WARNING
    gpu: GpuRef | None = None
    component: str | None = Field(default=None, description="A link, port or endpoint.")
    tenant: TenantRef | None = None
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    details: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict, description="Topology: rack, switch, ...")
    observed_at: UtcDatetime

    @field_validator("check")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _valid_check(v):
            raise ValueError(f"check must be a dotted lowercase name, got {v!r}")
        return v

    def entity_key(self) -> str:
        """The entity this signal speaks about: node, GPU, component, and tenant endpoint."""
        return self.fault_key()[len(self.check) + 1:]

    def fault_key(self) -> str:
        """Check plus entity (``check@entity_key``): what a healthy signal must match to clear a fault. Built here,
        not from ``entity_key``: the correlator works it out for every signal it reads."""
        return fault_key_of(check=self.check, node=self.node, gpu=self.gpu, component=self.component,
                            tenant=self.tenant)


def fault_key_of(*, check: str, node: str, gpu: GpuRef | None, component: str | None, tenant: TenantRef | None) -> str:
    """``Signal.fault_key`` from the values a signal holds (its strings stripped), for a state whose ``Signal`` is
    not built yet (``collectors.context.Reading``)."""
    key = check + "@" + node
    if gpu is not None:
        key += "/" + (gpu.uuid or (f"gpu{gpu.index}" if gpu.index is not None else gpu.pci_bus_id or "gpu?"))
    if component:
        key += "/" + component
    if tenant is not None and tenant.endpoint:
        key += "/" + tenant.key()
    return key


def make_signal_id(
    *,
    cluster: str,
    node: str,
    source: str,
    check: str,
    code: str | None,
    healthy: bool,
    observed_at: datetime,
    gpu: GpuRef | None = None,
    component: str | None = None,
    discriminator: str = "",
) -> str:
    """A deterministic id: the same observation always yields the same id, so re-sends dedupe.

    ``discriminator`` separates distinct observations that share everything else (e.g. a
    kernel-log sequence number).
    """
    gpu_key = gpu.key() if gpu is not None else ""
    raw = "\x1f".join(
        [
            cluster,
            node,
            source,
            check,
            code or "",
            "1" if healthy else "0",
            gpu_key,
            component or "",
            format_rfc3339(observed_at),
            discriminator,
        ]
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:32]
