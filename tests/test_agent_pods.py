"""Which pods a GPU reset takes with it: the GPU's devices from ``nvidia-smi -L`` (its MIG devices included),
the pods holding any of them from the kubelet's PodResources ``List``, and the node agent's ``gpu_pods`` over a
real gRPC unix socket and a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.agent import NodeAgent, PodLister
from breakfix.collectors.agent_pods import gpu_devices, parse_gpu_list
from breakfix.collectors.podresources import PodResourcesClient, api_pb2, api_pb2_grpc, gpu_holders, gpu_tenants
from breakfix.remediator.nodeagent import NodeAgentClient
from breakfix.schemas.agent import AgentAction
from tests.conftest import T0
from tests.test_collector_sources import fake_kubelet
from tests.test_node_agent import BIN, UUID, cmd, serve_ready

MIG_A = "MIG-c7384736-a75d-5afc-978f-d2f1294409fd"
MIG_B = "MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d"
OTHER = "GPU-0000000b-aaaa-bbbb-cccc-dddddddddddd"

LISTING = f"""GPU 0: NVIDIA A100-SXM4-80GB (UUID: {UUID})
  MIG 3g.40gb     Device  0: (UUID: {MIG_A})
  MIG 3g.40gb     Device  1: (UUID: {MIG_B})
GPU 1: NVIDIA A100-SXM4-80GB (UUID: {OTHER})
"""
LEGACY = """GPU 0: A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
  MIG 1g.5gb Device 0: (UUID: MIG-GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77/7/0)
"""


@pytest.mark.parametrize(("text", "want"), [
    (LISTING, {0: (UUID, (MIG_A, MIG_B)), 1: (OTHER, ())}),
    (LEGACY, {0: ("GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77",
                  ("MIG-GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77/7/0",))}),
    ("No devices were found\n", {}),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", {}),
    (f"  MIG 1g.5gb     Device  0: (UUID: {MIG_A})\nGPU 3: X (UUID: {OTHER})\n", {3: (OTHER, ())}),
], ids=["mig-devices-under-their-gpu", "pre-r470-mig-uuids", "no-gpus", "driver-down", "mig-line-before-any-gpu"])
def test_nvidia_smi_list_names_each_gpu_and_its_mig_devices(text: str, want: dict[int, object]) -> None:
    assert parse_gpu_list(text) == want


def test_a_gpu_is_found_by_index_or_uuid_with_its_mig_devices() -> None:
    listing = parse_gpu_list(LISTING)
    assert gpu_devices(listing, index=0) == gpu_devices(listing, uuid=UUID) == {UUID, MIG_A, MIG_B}
    assert gpu_devices(listing, index=1) == {OTHER}
    assert gpu_devices(listing, index=7) == frozenset()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000))
def test_the_listing_parser_is_total(text: str) -> None:
    for index, (uuid, migs) in parse_gpu_list(text).items():
        assert isinstance(index, int) and uuid and all(migs)


def pod(name: str, ns: str, *devices: tuple[str, list[str]]) -> api_pb2.PodResources:
    return api_pb2.PodResources(name=name, namespace=ns, containers=[api_pb2.ContainerResources(
        name="main", devices=[api_pb2.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in devices])])


KUBELET = api_pb2.ListPodResourcesResponse(pod_resources=[
    pod("infer-a", "serve", ("nvidia.com/gpu", [MIG_A])),  # single strategy: MIG devices as nvidia.com/gpu
    pod("infer-b", "serve", ("nvidia.com/mig-3g.40gb", [MIG_B])),  # mixed strategy
    pod("train-0", "ml", ("nvidia.com/gpu", [OTHER]), ("rdma/ib", ["mlx5_0"])),
    pod("share-1", "lab", ("nvidia.com/gpu", [f"{OTHER}::1"])),  # time-slicing replicas of one GPU
    pod("share-2", "lab", ("nvidia.com/gpu", [f"{OTHER}::2"])),
    pod("nic-only", "net", ("rdma/ib", [UUID])),  # not a GPU resource, whatever its id
    api_pb2.PodResources(name="dra-0", namespace="serve", containers=[api_pb2.ContainerResources(
        name="c", dynamic_resources=[api_pb2.DynamicResource(claim_name="g", claim_resources=[
            api_pb2.ClaimResource(driver_name="gpu.nvidia.com", device_name=MIG_A)])])]),
])


@pytest.mark.parametrize(("devices", "pods"), [
    ({UUID, MIG_A, MIG_B}, ("serve/dra-0", "serve/infer-a", "serve/infer-b")),
    ({OTHER}, ("lab/share-1", "lab/share-2", "ml/train-0")),
    ({"GPU-nothing"}, ()),
], ids=["every-mig-device-of-the-gpu", "every-time-sliced-replica", "an-idle-gpu"])
def test_the_pods_holding_a_gpu_are_those_on_any_of_its_devices(devices: set[str], pods: tuple[str, ...]) -> None:
    assert gpu_holders(KUBELET, frozenset(devices)) == pods


def test_tenants_include_mig_devices_of_the_mixed_strategy() -> None:
    assert gpu_tenants(KUBELET)[MIG_B].pod == "infer-b"


class _Kubelet(api_pb2_grpc.PodResourcesListerServicer):
    async def List(self, request, context):  # type: ignore[no-untyped-def]
        return KUBELET


@pytest.fixture
async def kubelet(tmp_path: Path) -> AsyncIterator[PodLister]:
    sock = tmp_path / "kubelet.sock"
    server = await fake_kubelet(_Kubelet(), sock)
    client = PodResourcesClient(sock)

    async def holding(devices: frozenset[str]) -> tuple[str, ...]:
        return gpu_holders(await client.list(), devices)

    yield holding
    await client.close()
    await server.stop(None)


def agent(tmp_path: Path, **kw: object) -> NodeAgent:
    return NodeAgent("n1", tmp_path / "state", nvidia_smi=str(BIN / "nvidia-smi"), reboot_cmd=("true",),
                     boot_id=lambda: "boot-1", **kw)  # type: ignore[arg-type]


class TestGpuPods:
    async def test_the_agent_names_the_pods_on_every_mig_device_of_the_gpu(self, tmp_path: Path,
                                                                            kubelet: PodLister) -> None:
        a = agent(tmp_path, pods=kubelet)
        reply = await a.handle(cmd(AgentAction.GPU_PODS, gpu_uuid=None, gpu_index=0))
        assert reply.ok and reply.evidence["pods"] == "serve/dra-0,serve/infer-a,serve/infer-b"
        assert "its 2 MIG device(s)" in reply.detail
        again = await a.handle(cmd(AgentAction.GPU_PODS, gpu_uuid=None, gpu_index=1))
        assert again.ok and again.evidence["pods"] == "lab/share-1,lab/share-2,ml/train-0"

    async def test_the_answer_is_fresh_every_time_never_a_stored_reply(self, tmp_path: Path, kubelet: PodLister,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        a = agent(tmp_path, pods=kubelet)
        first = await a.handle(cmd(AgentAction.GPU_PODS, key="inc-1:pods:0:1", gpu_uuid=None, gpu_index=0))
        monkeypatch.setenv("FAKE_NVSMI_MIG", "0")  # the GPU was reconfigured without MIG devices
        second = await a.handle(cmd(AgentAction.GPU_PODS, key="inc-1:pods:0:1", gpu_uuid=None, gpu_index=0))
        assert first.evidence["pods"] != second.evidence["pods"] and not second.replayed
        assert second.evidence["pods"] == "" and a.done == {}, "nothing recorded under the read-only id"

    @pytest.mark.parametrize(("pods", "words"), [(None, "agent.podresources_socket is unset"),
                                                 ("broken", "kubelet PodResources did not answer")],
                             ids=["no-kubelet-socket-configured", "kubelet-away"])
    async def test_when_the_agent_cannot_say_the_reply_fails_with_the_reason(self, tmp_path: Path, pods: str | None,
                                                                            words: str) -> None:
        async def away(devices: frozenset[str]) -> tuple[str, ...]:
            raise OSError("connect: no such file")

        reply = await agent(tmp_path, pods=away if pods else None).handle(
            cmd(AgentAction.GPU_PODS, gpu_uuid=None, gpu_index=0))
        assert not reply.ok and words in reply.detail and reply.error.startswith("failed:")

    async def test_a_gpu_nvidia_smi_does_not_list_fails(self, tmp_path: Path, kubelet: PodLister) -> None:
        reply = await agent(tmp_path, pods=kubelet).handle(cmd(AgentAction.GPU_PODS, gpu_uuid=None, gpu_index=5))
        assert not reply.ok and "does not list GPU 5" in reply.detail

    @pytest.mark.nats
    async def test_the_remediator_asks_over_request_reply(self, tmp_path: Path, kubelet: PodLister,
                                                          nats_server: EmbeddedNats) -> None:
        node_bus = await JetStreamBus.connect(nats_server.url)
        remediator_bus = await JetStreamBus.connect(nats_server.url)
        try:
            await serve_ready(node_bus, remediator_bus, agent(tmp_path, pods=kubelet))
            got = await NodeAgentClient(remediator_bus, "c1", lambda: T0).call(
                "n1", AgentAction.GPU_PODS, key="inc-7:pods:0:1", incident="inc-7", gpu_index=0)
        finally:
            await node_bus.close()
            await remediator_bus.close()
        assert got.ok and got.evidence["pods"] == "serve/dra-0,serve/infer-a,serve/infer-b"
