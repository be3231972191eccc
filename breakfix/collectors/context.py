"""What every collector source needs to know about its node, and the one way to build a signal.

The daemon (``collectors.daemon``) builds one ``NodeContext`` from its config: cluster, node,
topology labels, the catalog, the GPU identities that the nvml source enumerates
(``register_gpus``) and the GPU-to-pod map that the PodResources client refreshes
(``set_tenants``). Sources call ``signal(...)``: it fills identity, labels, tenant
attribution and a severity from the catalog, and a deterministic id, so the same observation
always yields the same signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, Severity, TenantRef
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id


@dataclass
class NodeContext:
    cluster: str
    node: str
    catalog: Catalog
    labels: dict[str, str] = field(default_factory=dict)
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
        if tenant is None and gpu is not None and gpu.uuid:
            tenant = self.tenants.get(gpu.uuid)
        if severity is None:
            severity = Severity.INFO if healthy else self.catalog.classify(check=check, code=code,
                                                                           message=message).severity
        return Signal(
            id=make_signal_id(cluster=self.cluster, node=self.node, source=source.value, check=check, code=code,
                              healthy=healthy, observed_at=at, gpu=gpu, component=component,
                              discriminator=discriminator),
            cluster=self.cluster, node=self.node, source=source, check=check, code=code, healthy=healthy,
            severity=severity, gpu=gpu, component=component, tenant=tenant, value=value, threshold=threshold,
            message=message or f"{check} {'ok' if healthy else 'fault'}", details=details or {},
            labels=self.labels, observed_at=at)
