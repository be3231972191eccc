"""What every collector source needs to know about its node, and the one way to build a signal.

The daemon (``collectors.daemon``) builds one ``NodeContext`` from its config: cluster, node,
topology labels, the catalog, the GPU identities that the nvml source enumerates
(``register_gpus``) and the GPU-to-pod map that the PodResources client refreshes
(``set_tenants``). Sources call ``signal(...)``: it fills identity, labels, tenant
attribution and a severity from the catalog, and a deterministic id, so the same observation
always yields the same signal. A source that reads many states per poll (nvml: every check of every GPU
every second) calls ``reading(...)`` instead: the same arguments, the fields the edge filter compares
(fault key, health, code, severity) worked out now, and the ``Signal`` built only when the edge filter
sends it (a transition or a resync), with the very values it would have had when read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.signal import Signal, SignalSource, fault_key_of, make_signal_id


@dataclass
class NodeContext:
    cluster: str
    node: str
    catalog: Catalog
    labels: dict[str, str] = field(default_factory=dict)  # replaced when it changes, never changed in place
    gpus_by_pci: dict[str, GpuRef] = field(default_factory=dict)
    gpus_by_uuid: dict[str, GpuRef] = field(default_factory=dict)
    tenants: dict[str, TenantRef] = field(default_factory=dict)  # GPU UUID -> the pod holding it
    nvml_uuids: set[str] = field(default_factory=set)  # the GPUs NVML enumerated on this node (empty: unknown)

    def register_gpus(self, gpus: list[GpuRef]) -> None:
        for g in gpus:
            if g.pci_bus_id:
                self.gpus_by_pci[g.pci_bus_id] = g
            if g.uuid:
                self.gpus_by_uuid[g.uuid] = g

    def set_tenants(self, by_uuid: dict[str, TenantRef]) -> None:
        self.tenants = dict(by_uuid)

    def gpu(self, *, pci: str | None = None, uuid: str | None = None, index: int | None = None) -> GpuRef:
        """The best identity known for a GPU named by any one of its ids."""
        if uuid and uuid in self.gpus_by_uuid:
            return self.gpus_by_uuid[uuid]
        if pci and pci in self.gpus_by_pci:
            return self.gpus_by_pci[pci]
        return GpuRef(index=index, uuid=uuid, pci_bus_id=pci)

    def signal(self, *, source: SignalSource, check: str, healthy: bool, at: datetime, code: str | None = None,
               gpu: GpuRef | None = None, component: str | None = None, tenant: TenantRef | None = None,
               value: float | None = None, threshold: float | None = None, message: str = "",
               details: dict[str, str] | None = None, severity: Severity | None = None,
               discriminator: str = "") -> Signal:
        if tenant is None:
            tenant = self._tenant(gpu)
        if severity is None:
            severity = self._severity(check, code, healthy, message)
        return _build(self.cluster, self.node, self.labels, source=source, check=check, healthy=healthy, at=at,
                      code=code, gpu=gpu, component=component, tenant=tenant, value=value, threshold=threshold,
                      message=message, details=details, severity=severity, discriminator=discriminator)

    def reading(self, *, source: SignalSource, check: str, healthy: bool, at: datetime, code: str | None = None,
                gpu: GpuRef | None = None, component: str | None = None, value: float | None = None,
                threshold: float | None = None, message: str = "", details: dict[str, str] | None = None) -> Reading:
        """``signal``'s state, its ``Signal`` built on demand (``Reading.build``). A value ``Signal`` would refuse
        (not finite) raises here, where ``signal`` would have."""
        for number in (value, threshold):
            if number is not None and not math.isfinite(number):
                raise ValueError(f"{check}: reading {number!r} is not finite")
        tenant = self._tenant(gpu)
        severity = self._severity(check, code, healthy, message)
        # over the values the Signal will hold: its strings are stripped when it is built
        key = fault_key_of(check=check.strip(), node=self.node.strip(), gpu=gpu,
                           component=component.strip() if component else None, tenant=tenant)
        return Reading(key, check, healthy, code, severity, (self.cluster, self.node, self.labels), {
            "source": source, "check": check, "healthy": healthy, "at": at, "code": code, "gpu": gpu,
            "component": component, "tenant": tenant, "value": value, "threshold": threshold, "message": message,
            "details": details, "severity": severity})


    def _tenant(self, gpu: GpuRef | None) -> TenantRef | None:
        """The pod holding the GPU, if the PodResources client knows one."""
        return self.tenants.get(gpu.uuid) if gpu is not None and gpu.uuid else None

    def _severity(self, check: str, code: str | None, healthy: bool, message: str) -> Severity:
        return Severity.INFO if healthy else self.catalog.classify(check=check, code=code, message=message).severity


class Reading:
    """One state as a source read it: what the edge filter compares, and the ``Signal`` it stands for, built the
    first time it is asked for (``build``) from the arguments, tenant, severity and labels of the moment it was
    read, so it is the signal ``NodeContext.signal`` would have built then."""

    __slots__ = ("_args", "_node", "_signal", "check", "code", "healthy", "key", "severity")

    def __init__(self, key: str, check: str, healthy: bool, code: str | None, severity: Severity,
                 node: tuple[str, str, dict[str, str]], args: dict[str, Any]) -> None:
        self.key, self.check, self.healthy, self.code, self.severity = key, check, healthy, code, severity
        self._node, self._args = node, args
        self._signal: Signal | None = None

    def build(self) -> Signal:
        if self._signal is None:
            cluster, node, labels = self._node
            self._signal = _build(cluster, node, labels, **self._args)
        return self._signal


def _build(cluster: str, node: str, labels: dict[str, str], *, source: SignalSource, check: str, healthy: bool,
           at: datetime, code: str | None, gpu: GpuRef | None, component: str | None, tenant: TenantRef | None,
           value: float | None, threshold: float | None, message: str, details: dict[str, str] | None,
           severity: Severity, discriminator: str = "") -> Signal:
    return Signal(
        id=make_signal_id(cluster=cluster, node=node, source=source.value, check=check, code=code,
                          healthy=healthy, observed_at=at, gpu=gpu, component=component, discriminator=discriminator),
        cluster=cluster, node=node, source=source, check=check, code=code, healthy=healthy,
        severity=severity, gpu=gpu, component=component, tenant=tenant, value=value, threshold=threshold,
        message=message or f"{check} {'ok' if healthy else 'fault'}", details=details or {},
        labels=labels, observed_at=at)
