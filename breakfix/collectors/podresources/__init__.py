"""Tenant attribution: which pod holds which GPU, from the kubelet PodResources API (v1 ``List``).

``PodResourcesClient`` talks gRPC to the kubelet's unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``) with stubs generated from the upstream
proto (``api.proto``, ``make proto``). ``gpu_tenants`` is pure: it turns a
``ListPodResourcesResponse`` into GPU UUID -> ``TenantRef`` (namespace, pod, container),
stripping the time-slicing replica suffix (``GPU-...::3``) and keeping MIG device UUIDs. The
daemon refreshes the map into the ``NodeContext`` so every GPU signal carries its tenant.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from breakfix.collectors.podresources import api_pb2, api_pb2_grpc
from breakfix.schemas.common import TenantRef

GPU_RESOURCE = "nvidia.com/gpu"
DRA_DRIVER = "gpu.nvidia.com"


def gpu_tenants(resp: api_pb2.ListPodResourcesResponse, resource: str = GPU_RESOURCE) -> dict[str, TenantRef]:
    out: dict[str, TenantRef] = {}
    for pod in resp.pod_resources:
        for c in pod.containers:
            tenant = TenantRef(namespace=pod.namespace, pod=pod.name, container=c.name)
            for dev in c.devices:
                if dev.resource_name != resource:
                    continue
                for device_id in dev.device_ids:
                    out[device_id.split("::", 1)[0]] = tenant
            for dyn in c.dynamic_resources:
                for claim in dyn.claim_resources:
                    if claim.driver_name == DRA_DRIVER and claim.device_name.startswith(("GPU-", "MIG-")):
                        out[claim.device_name] = tenant
    return out


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
