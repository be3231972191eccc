"""Tenant attribution: which pod holds which GPU, from the kubelet PodResources API (v1 ``List``).

``PodResourcesClient`` talks gRPC to the kubelet's unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``) with stubs generated from the upstream
proto (``api.proto``, ``make proto``). ``gpu_tenants`` is pure: it turns a
``ListPodResourcesResponse`` into GPU UUID -> ``TenantRef`` (namespace, pod, container),
stripping the time-slicing replica suffix (``GPU-...::3``) and keeping MIG device UUIDs. The
daemon refreshes the map into the ``NodeContext`` so every GPU signal carries its tenant.
``gpu_holders`` (also pure) names every pod holding any of a GPU's devices (its UUID, its MIG
devices): what the node agent's ``gpu_pods`` answers, so a MIG GPU's reset moves only its pods.

GPU devices are ``nvidia.com/gpu`` (whole GPUs, time-slicing replicas, or MIG devices under the
device plugin's ``single`` strategy) and ``nvidia.com/mig-<profile>`` (``mixed`` strategy), and
``gpu.nvidia.com`` DRA claims (reference: kubelet PodResources API, NVIDIA k8s-device-plugin). NVIDIA's DRA
driver names a claim's device by the GPU's device minor (``gpu-0``, ``gpu-0-mig-9-0-1``;
``collectors.gpuinfo``): a MIG device there also counts as its GPU's ``gpu-<minor>``, and ``gpu_tenants``
maps ``gpu-<minor>`` to the GPU's UUID when it is given the node's minors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc

from breakfix.collectors.gpuinfo import dra_name, dra_parent
from breakfix.collectors.podresources import api_pb2, api_pb2_grpc
from breakfix.schemas.common import TenantRef

GPU_RESOURCE = "nvidia.com/gpu"
DRA_DRIVER = "gpu.nvidia.com"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"  # the device plugin's mixed strategy: nvidia.com/mig-1g.10gb, ...


def _devices(c: api_pb2.ContainerResources, resource: str) -> list[str]:
    """The GPU and MIG device UUIDs one container holds (replica suffixes stripped)."""
    out = [device_id.split("::", 1)[0] for dev in c.devices
           if dev.resource_name == resource or dev.resource_name.startswith(MIG_RESOURCE_PREFIX)
           for device_id in dev.device_ids]
    for dyn in c.dynamic_resources:
        for claim in dyn.claim_resources:
            name = claim.device_name
            if claim.driver_name != DRA_DRIVER:
                continue
            if name.startswith(("GPU-", "MIG-")):
                out.append(name)
            elif (parent := dra_parent(name)) is not None:  # gpu-<minor>, or a MIG device on it
                out += [name] if parent == name else [name, parent]
    return out


def gpu_tenants(resp: api_pb2.ListPodResourcesResponse, resource: str = GPU_RESOURCE, *,
                minors: Mapping[str, int] | None = None) -> dict[str, TenantRef]:
    """Device id -> the container holding it. With ``minors`` (GPU UUID -> device minor, ``gpuinfo.read_minors``)
    a GPU that a DRA claim names ``gpu-<minor>`` is also keyed by its UUID, as signals name GPUs."""
    out: dict[str, TenantRef] = {}
    for pod in resp.pod_resources:
        for c in pod.containers:
            tenant = TenantRef(namespace=pod.namespace, pod=pod.name, container=c.name)
            for device in _devices(c, resource):
                out[device] = tenant
    for uuid, minor in (minors or {}).items():
        holder = out.get(dra_name(minor))
        if holder is not None:
            out.setdefault(uuid, holder)
    return out


def gpu_holders(resp: api_pb2.ListPodResourcesResponse, devices: frozenset[str],
                resource: str = GPU_RESOURCE) -> tuple[str, ...]:
    """Every pod (``namespace/pod``, sorted) with a container holding one of ``devices``: a GPU's UUID and its
    MIG devices' UUIDs. Time-sliced replicas of one GPU are all named, not only the last."""
    return tuple(sorted({f"{pod.namespace}/{pod.name}" for pod in resp.pod_resources for c in pod.containers
                         if not devices.isdisjoint(_devices(c, resource))}))


class PodResourcesClient:
    """The adapter: one ``List`` call per refresh over the kubelet's unix socket."""

    def __init__(self, socket: Path, *, timeout_s: float = 5.0) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    async def list(self) -> api_pb2.ListPodResourcesResponse:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        stub = api_pb2_grpc.PodResourcesListerStub(self._channel)  # type: ignore[no-untyped-call]
        resp: api_pb2.ListPodResourcesResponse = await stub.List(api_pb2.ListPodResourcesRequest(),
                                                                 timeout=self.timeout_s)
        return resp

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
