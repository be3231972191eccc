"""A simulated GPU fleet: nodes x 8 GPUs with topology labels and tenant pods on GPUs.

The ``sim`` source uses it to give scenario events realistic identities (UUIDs, PCI bus
ids, rack/switch/NVLink-domain labels, the pod that owns each GPU); the demo gives the
same fleet to the simulated cluster the remediator acts on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from breakfix.schemas.common import GpuRef, TenantRef

# PCI buses of the eight GPUs on an HGX H100 baseboard, in NVML index order.
HGX_BUSES = ("18", "2a", "3a", "5d", "9a", "ab", "ba", "db")
TENANT_NAMESPACES = ("research", "inference")


@dataclass(frozen=True, slots=True)
class SimGpu:
    ref: GpuRef
    tenant: TenantRef | None


@dataclass(frozen=True, slots=True)
class SimNodeSpec:
    name: str
    labels: dict[str, str]
    gpus: tuple[SimGpu, ...]


@dataclass(frozen=True, slots=True)
class Fleet:
    cluster: str
    nodes: tuple[SimNodeSpec, ...]
    controller_owned: frozenset[str] = field(default_factory=frozenset)

    def node(self, index: int) -> SimNodeSpec:
        return self.nodes[index]


def gpu_uuid(cluster: str, node: str, index: int) -> str:
    h = hashlib.sha256(f"{cluster}/{node}/{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def build_fleet(nodes: int, *, cluster: str = "demo", gpus_per_node: int = 8, nodes_per_rack: int = 4,
                nodes_per_switch: int = 8) -> Fleet:
    """Deterministic fleet: node ``gpu-node-007`` always has the same GPUs and pods."""
    out: list[SimNodeSpec] = []
    owned: set[str] = set()
    for i in range(nodes):
        name = f"gpu-node-{i:03d}"
        labels = {
            "rack": f"rack-{i // nodes_per_rack:02d}",
            "switch": f"leaf-{i // nodes_per_switch:02d}",
            "nvlink_domain": f"nvl-{name}",
            "nodepool": "h100-sxm",
        }
        ns = TENANT_NAMESPACES[i % len(TENANT_NAMESPACES)]
        gpus: list[SimGpu] = []
        for g in range(gpus_per_node):
            bus = HGX_BUSES[g % len(HGX_BUSES)]
            ref = GpuRef(index=g, uuid=gpu_uuid(cluster, name, g), pci_bus_id=f"0000:{bus}:00.0")
            pod = f"{ns}-worker-{i:03d}-{g // 4}"
            owned.add(f"{ns}/{pod}")
            gpus.append(SimGpu(ref, TenantRef(namespace=ns, pod=pod, container="main")))
        out.append(SimNodeSpec(name, labels, tuple(gpus)))
    return Fleet(cluster, tuple(out), frozenset(owned))
