"""GPU UUID -> device minor from the driver's ``/proc/driver/nvidia/gpus/*/information``, and the pods NVIDIA's DRA
driver gave a GPU under its ``gpu-<minor>`` names: which pods a reset takes, and which tenant a GPU's faults name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakfix.collectors.agent import PodLister
from breakfix.collectors.gpuinfo import dra_parent, parse_information, read_minors
from breakfix.collectors.podresources import api_pb2, gpu_holders, gpu_tenants
from breakfix.schemas.agent import AgentAction
from tests.test_agent_pods import OTHER, agent
from tests.test_node_agent import UUID, cmd

# As the driver writes it (tab-aligned), and as nvidia-container-cli info prints the same fields.
INFORMATION = f"""Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 475
GPU UUID: \t {UUID}
Video BIOS: \t 96.00.99.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t 0000:18:00.0
Device Minor: \t 3
GPU Excluded:\t No
"""


@pytest.mark.parametrize(("text", "want"), [
    (INFORMATION, (UUID, 3)),
    (f"GPU UUID: {UUID}\n", (UUID, None)),
    ("Device Minor: 7\n", (None, 7)),
    (f"GPU UUID: {UUID}\nDevice Minor: x\n", (UUID, None)),
    ("GPU UUID: not-a-uuid\nDevice Minor: 1\n", (None, 1)),
    ("", (None, None)),
], ids=["driver-file", "no-minor", "no-uuid", "minor-not-a-number", "uuid-not-a-gpu-uuid", "empty"])
def test_the_information_file_gives_the_gpu_uuid_and_its_device_minor(text: str, want: tuple[object, object]) -> None:
    assert parse_information(text) == want


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000))
def test_the_information_parser_is_total(text: str) -> None:
    uuid, minor = parse_information(text)
    assert uuid is None or uuid.startswith("GPU-")
    assert minor is None or 0 <= minor < 100_000


def gpus_dir(root: Path, *gpus: tuple[str, str, int]) -> Path:
    for pci, uuid, minor in gpus:
        (root / pci).mkdir(parents=True)
        (root / pci / "information").write_text(f"GPU UUID: \t {uuid}\nDevice Minor: \t {minor}\n")
    return root


def test_minors_are_read_per_gpu_and_an_unreadable_gpu_is_skipped(tmp_path: Path) -> None:
    root = gpus_dir(tmp_path / "gpus", ("0000:18:00.0", UUID, 1), ("0000:28:00.0", OTHER, 0))
    (root / "0000:38:00.0").mkdir()  # no information file
    assert read_minors(root) == {UUID: 1, OTHER: 0}, "the minor follows the driver, not the PCI order"
    assert read_minors(tmp_path / "absent") == {}, "no driver loaded: no GPUs, no error"


@pytest.mark.parametrize(("name", "parent"), [
    ("gpu-0", "gpu-0"), ("gpu-12", "gpu-12"), ("gpu-3-mig-9-0-1", "gpu-3"), ("gpu-3-mig-19-4-1", "gpu-3"),
    ("gpu-2-mig-1g24gb-19-0", "gpu-2"), ("gpu-0-mig-1g10gb-me-20-0", "gpu-0"),  # driver v25.12 on: profile names
    ("vgpu-0", None), ("gpu-", None), ("gpu-1-mig-", None), ("gpu-1-mig-X", None), ("GPU-0000", None),
    ("channel-0", None),
])
def test_a_dra_device_name_counts_as_its_gpu(name: str, parent: str | None) -> None:
    assert dra_parent(name) == parent


def dra_pod(name: str, *devices: str) -> api_pb2.PodResources:
    return api_pb2.PodResources(name=name, namespace="serve", containers=[api_pb2.ContainerResources(
        name="c", dynamic_resources=[api_pb2.DynamicResource(claim_name="g", claim_resources=[
            api_pb2.ClaimResource(driver_name="gpu.nvidia.com", device_name=d) for d in devices])])])


DRA = api_pb2.ListPodResourcesResponse(pod_resources=[
    dra_pod("whole-3", "gpu-3"), dra_pod("slice-3", "gpu-3-mig-9-0-1"), dra_pod("whole-13", "gpu-13"),
    dra_pod("whole-0", "gpu-0"),
    api_pb2.PodResources(name="other-driver", namespace="x", containers=[api_pb2.ContainerResources(
        name="c", dynamic_resources=[api_pb2.DynamicResource(claim_name="n", claim_resources=[
            api_pb2.ClaimResource(driver_name="net.example.com", device_name="gpu-3")])])]),
])


def test_the_pods_dra_gave_a_gpu_or_a_mig_device_on_it_hold_that_gpu() -> None:
    assert gpu_holders(DRA, frozenset({"gpu-3"})) == ("serve/slice-3", "serve/whole-3"), "not gpu-13, not a NIC"


def test_a_dra_gpu_tenant_is_keyed_by_the_uuid_its_minor_names() -> None:
    tenants = gpu_tenants(DRA, minors={UUID: 3, OTHER: 0})
    assert tenants[UUID].pod in ("whole-3", "slice-3") and tenants[OTHER].pod == "whole-0"
    assert UUID not in gpu_tenants(DRA), "without the minors the UUID is unknown"


async def test_the_agent_names_the_pods_dra_gave_the_gpu_by_its_minor(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    gpus_dir(proc / "driver" / "nvidia" / "gpus", ("0000:18:00.0", UUID, 3), ("0000:28:00.0", OTHER, 0))

    async def kubelet(devices: frozenset[str]) -> tuple[str, ...]:
        return gpu_holders(DRA, devices)

    lister: PodLister = kubelet
    a = agent(tmp_path, pods=lister, proc=proc)
    reply = await a.handle(cmd(AgentAction.GPU_PODS, gpu_uuid=None, gpu_index=0))  # GPU 0 is minor 3
    assert reply.ok and reply.evidence["pods"] == "serve/slice-3,serve/whole-3"
    other = await a.handle(cmd(AgentAction.GPU_PODS, gpu_uuid=None, gpu_index=1))
    assert other.ok and other.evidence["pods"] == "serve/whole-0"


async def test_a_refused_reset_names_first_the_processes_holding_the_gpus_own_minor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU UUID is /dev/nvidia1 on this node, not /dev/nvidia0 as its index would suggest."""
    proc = tmp_path / "proc"
    gpus_dir(proc / "driver" / "nvidia" / "gpus", ("0000:18:00.0", UUID, 1), ("0000:28:00.0", OTHER, 0))
    for pid, comm, dev in ((40, "holds-minor-0", "/dev/nvidia0"), (41, "holds-minor-1", "/dev/nvidia1")):
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "fd" / "3").symlink_to(dev)
        (proc / str(pid) / "comm").write_text(comm + "\n")
    monkeypatch.setenv("FAKE_NVSMI_LOG", str(tmp_path / "nvidia-smi.log"))
    monkeypatch.setenv("FAKE_NVSMI_MODE", "fail")
    reply = await agent(tmp_path, proc=proc).handle(cmd(AgentAction.RESET_GPU))
    assert not reply.ok and reply.evidence["gpu_clients"].startswith("holds-minor-1 (pid 41")
