"""The Kubernetes adapter with the official client against kmock (a Kubernetes API emulator).

kmock keeps objects and serves CRUD; the eviction subresource is scripted here (kmock has no
PodDisruptionBudgets), including the 429 a PDB answers with. This is an emulator, not a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from breakfix.bus.clock import ManualClock
from breakfix.remediator.k8s import (
    OWNER,
    QUARANTINE,
    DrainPolicy,
    KubeConfigError,
    KubernetesActuator,
    api_for,
    load_api,
)
from breakfix.remediator.leader import LeaseElector
from tests.conftest import T0


class Cluster:
    def __init__(self, emulator: kmock.KubernetesEmulator, url: str) -> None:
        self.k = emulator
        self.api = api_for(url)
        self.evictions: list[str] = []
        self.pdb_refusals: dict[str, int] = {}
        self.lingering: set[str] = set()  # pods whose eviction is accepted but that keep terminating
        self.recreated: set[str] = set()  # pods their StatefulSet recreates under the same name once evicted
        self.kubelet: dict[str, dict[str, str]] = {}  # node -> the Ready condition its kubelet reports

    def obj(self, resource: str, ns: str | None, name: str) -> dict[str, Any]:
        return dict(self.k.objects[resource, ns, name])

    async def add_node(self, name: str, *, ready: bool = True, **spec: Any) -> None:
        """A node as the kubelet keeps it: Ready unless told otherwise."""
        from kubernetes import client
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"rack": "r1"}},
                "spec": spec}
        await asyncio.to_thread(client.CoreV1Api(self.api).create_node, node)
        self.set_ready(name, ready)

        def patch_status(req: kmock.Request) -> kmock.Response:
            """kmock has applied the patch replacing the conditions list; a strategic merge on the API server
            merges them on ``type``, so the kubelet's own (Ready) condition stays beside the patched ones."""
            stored = self.k.objects["v1/nodes", None, name]
            conds = {c["type"]: c for c in (stored.raw.get("status") or {}).get("conditions") or []}
            conds.setdefault("Ready", self.kubelet[name])
            stored.patch({"status": {"conditions": list(conds.values())}})
            return kmock.Response(status=200, payload=stored.raw)

        self.k[f"patch /api/v1/nodes/{name}/status"] << patch_status

    def set_ready(self, name: str, ready: bool) -> None:
        """The kubelet's Ready condition on the node (it keeps posting it; a patch of other conditions keeps it)."""
        self.kubelet[name] = {"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady"}
        stored = self.k.objects["v1/nodes", None, name]
        others = [c for c in (stored.raw.get("status") or {}).get("conditions") or [] if c["type"] != "Ready"]
        stored.patch({"status": {"conditions": [*others, self.kubelet[name]]}})

    async def add_pod(self, ns: str, name: str, node: str, *, owner: str | None = "ReplicaSet",
                      refusals: int = 0, grace_s: int | None = None, uid: str | None = None) -> None:
        from kubernetes import client
        meta: dict[str, Any] = {"name": name, "namespace": ns, **({"uid": uid} if uid else {})}
        if owner:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": f"{name}-owner", "uid": "u",
                                        "controller": True}]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}}
        if grace_s is not None:
            pod["spec"]["terminationGracePeriodSeconds"] = grace_s
        await asyncio.to_thread(client.CoreV1Api(self.api).create_namespaced_pod, ns, pod)
        self.pdb_refusals[f"{ns}/{name}"] = refusals

        def evict(req: kmock.Request) -> kmock.Response:
            key = f"{ns}/{name}"
            if self.pdb_refusals[key] > 0:
                self.pdb_refusals[key] -= 1
                return kmock.Response(status=429, payload={
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429, "reason": "TooManyRequests",
                    "message": "Cannot evict pod as it would violate the pod's disruption budget."})
            self.evictions.append(key)
            if key not in self.lingering:  # as the API server does: an accepted eviction deletes the pod
                stored = self.k.objects["v1/pods", ns, name]
                raw = dict(stored.raw)
                stored.delete()
                if key in self.recreated:  # its controller makes a new pod of the same name (a new UID)
                    self.k.objects["v1/pods", ns, name] = {**raw, "metadata": {**raw["metadata"],
                                                                               "uid": f"{uid or name}-again"}}
            return kmock.Response(status=201, payload={"kind": "Status", "apiVersion": "v1", "status": "Success",
                                                       "code": 201})

        self.k[f"post /api/v1/namespaces/{ns}/pods/{name}/eviction"] << evict


RESOURCES = (("v1/nodes", False, "Node"), ("v1/pods", True, "Pod"), ("v1/events", True, "Event"),
             ("v1/namespaces", False, "Namespace"), ("coordination.k8s.io/v1/leases", True, "Lease"))


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    """kmock with the resources breakfix touches declared; yields the emulator and its URL."""
    async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
        for res, namespaced, kind in RESOURCES:
            k.resources[res] = kmock.ResourceInfo(namespaced=namespaced, kind=kind)
        yield k, str(srv.url).rstrip("/")


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulator() as (k, url):
        yield Cluster(k, url)


class RebootingAgent:
    """A node agent that takes a reboot, then answers that the node came back with a new boot id."""

    def __init__(self) -> None:
        self.asks = 0

    async def call(self, node: str, action: Any, **kw: Any) -> Any:
        from breakfix.remediator.actuator import StepResult

        self.asks += 1
        return StepResult(True, "rebooted (new boot id)", {"replayed": "true"}) if self.asks > 1 else \
            StepResult(True, "reboot requested")


class TestCordon:
    async def test_cordon_sets_taint_and_ownership_and_uncordon_reverts(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        act = KubernetesActuator(cluster.api)
        assert (await act.cordon("n1", incident="inc-1", reason="xid 48")).ok
        node = cluster.obj("v1/nodes", None, "n1")
        assert node["spec"]["unschedulable"] is True
        assert {"key": QUARANTINE, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
        assert node["metadata"]["annotations"][OWNER] == "breakfix"
        view = await act.view()
        assert view.nodes["n1"].cordoned and view.nodes["n1"].cordoned_by_breakfix
        assert (await act.uncordon("n1", incident="inc-1")).detail == "uncordoned n1"
        node = cluster.obj("v1/nodes", None, "n1")
        assert node["spec"]["unschedulable"] is False and node["spec"]["taints"] == []

    async def test_node_cordoned_by_someone_else_is_never_touched(self, cluster: Cluster) -> None:
        await cluster.add_node("n1", unschedulable=True)
        act = KubernetesActuator(cluster.api)
        cordon = await act.cordon("n1", incident="inc-1", reason="x")
        taints = cluster.obj("v1/nodes", None, "n1")["spec"]["taints"]
        assert {"key": QUARANTINE, "value": "true", "effect": "NoSchedule"} in taints, \
            "fenced by the taint too, in case they uncordon during the repair"
        uncordon = await act.uncordon("n1", incident="inc-1")
        assert "someone else" in cordon.detail and "stays cordoned" in uncordon.detail
        node = cluster.obj("v1/nodes", None, "n1")
        assert node["spec"]["unschedulable"] is True and node["spec"]["taints"] == [], "their cordon, not our taint"

    async def test_other_taints_keep_their_api_fields(self, cluster: Cluster) -> None:
        unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                       "timeAdded": "2026-11-23T11:00:00Z"}
        await cluster.add_node("n1", taints=[unreachable])
        stored = dict(cluster.obj("v1/nodes", None, "n1")["spec"]["taints"][0])
        act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
        await act.cordon("n1", incident="inc-1", reason="x")
        assert stored in cluster.obj("v1/nodes", None, "n1")["spec"]["taints"] and "timeAdded" in stored
        await act.uncordon("n1", incident="inc-1")
        assert cluster.obj("v1/nodes", None, "n1")["spec"]["taints"] == [stored], "timeAdded survives"

    async def test_a_node_changed_meanwhile_is_read_again_not_overwritten(self, cluster: Cluster,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        from kubernetes.client.exceptions import ApiException

        await cluster.add_node("n1")
        cluster.k.objects["v1/nodes", None, "n1"].patch({"metadata": {"resourceVersion": "7"}})
        act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
        sent: list[dict[str, Any]] = []
        real = act._call

        async def call(fn: Any, *args: Any, **kw: Any) -> Any:
            if fn == act.core.patch_node:
                sent.append(args[1])
                if len(sent) == 1:  # another writer got there first: the server refuses the stale version
                    raise ApiException(status=409, reason="Conflict")
            return await real(fn, *args, **kw)

        monkeypatch.setattr(act, "_call", call)
        assert (await act.cordon("n1", incident="inc-1", reason="x")).ok
        assert [b["metadata"]["resourceVersion"] for b in sent] == ["7", "7"], "each patch names what it read"
        assert cluster.obj("v1/nodes", None, "n1")["spec"]["unschedulable"] is True


class TestDrain:
    async def test_eviction_honours_pdb_429_with_retries_never_force(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "train-0", "n1", refusals=2)
        await cluster.add_pod("ml", "train-1", "n1")
        await cluster.add_pod("kube-system", "gpu-feature-discovery", "n1", owner="DaemonSet")
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.01, timeout_s=30), clock=ManualClock(T0))
        result = await act.drain("n1", incident="inc-1")
        assert result.ok, result.detail
        assert sorted(cluster.evictions) == ["ml/train-0", "ml/train-1"], "DaemonSet pods stay"
        assert cluster.pdb_refusals["ml/train-0"] == 0, "the PDB's two refusals were waited out"
        assert len(cluster.k["delete"]) == 0, "nothing was force-deleted"

    async def test_pdb_that_never_yields_fails_the_drain_cleanly(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "stuck", "n1", refusals=10_000)
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.01, timeout_s=0.3))
        result = await act.drain("n1", incident="inc-1")
        assert not result.ok and "HTTP 429" in result.detail and result.evidence["blocked"] == "1"

    async def test_delete_after_timeout_namespace_mode(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        await cluster.add_pod("scratch", "stuck", "n1", refusals=10_000)
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.01, timeout_s=0.3,
                                                                namespaces={"scratch": "delete-after-timeout"}))
        result = await act.drain("n1", incident="inc-1")
        assert result.ok
        assert ("v1/pods", "scratch", "stuck") not in cluster.k.objects or \
            cluster.k.objects["v1/pods", "scratch", "stuck"].deleted

    async def test_allow_completion_namespace_waits_for_the_pod_to_finish(self, cluster: Cluster) -> None:
        from kubernetes import client
        await cluster.add_node("n1")
        await cluster.add_pod("batch", "job-0", "n1")
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.05, timeout_s=10,
                                                                namespaces={"batch": "allow-completion"}))

        async def finish() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(client.CoreV1Api(cluster.api).patch_namespaced_pod, "job-0", "batch",
                                    {"status": {"phase": "Succeeded"}}, _content_type="application/merge-patch+json")

        done = asyncio.create_task(finish(), name="test-job-finishes")
        result = await act.drain("n1", incident="inc-1")
        await done
        assert result.ok and cluster.evictions == [], "the job finished on its own; nothing was evicted"

    async def test_partial_drain_moves_only_the_gpus_pods(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        for i in range(4):
            await cluster.add_pod("ml", f"w{i}", "n1")
        act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
        result = await act.drain_gpu("n1", 2, incident="inc-1", pods=("ml/w2", "ml/not-here"))
        assert result.ok and cluster.evictions == ["ml/w2"] and "gpu2" in result.detail

    async def test_evictions_run_in_bounded_parallel(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        for i in range(40):
            await cluster.add_pod("ml", f"w{i}", "n1")
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(parallel=8), clock=ManualClock(T0))
        result = await act.drain("n1", incident="inc-1")
        assert result.ok and len(cluster.evictions) == 40 and act.evictions == 40


    async def test_a_drain_waits_for_its_evicted_pods_to_end_before_it_succeeds(self, cluster: Cluster) -> None:
        """An accepted eviction only starts the pod's graceful termination; its processes hold the GPU until it
        ends, so a reset right after the drain would find the GPU busy (kubectl drain waits the same way)."""
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "w0", "n1")
        await cluster.add_pod("ml", "slow", "n1")
        cluster.lingering.add("ml/slow")  # terminating for a while after its eviction
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.05, gone_timeout_s=10))

        async def ends() -> None:
            while "ml/slow" not in cluster.evictions:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            cluster.k.objects["v1/pods", "ml", "slow"].delete()

        ending = asyncio.create_task(ends(), name="test-pod-terminates")
        result = await act.drain_gpu("n1", 2, incident="inc-1", pods=("ml/slow",))
        await ending
        assert result.ok, result.detail
        assert len(cluster.k["list"]) >= 2, "it looked again until the pod was gone"

    async def test_a_pod_recreated_under_the_same_name_is_not_waited_for(self, cluster: Cluster) -> None:
        """A StatefulSet recreates ``train-3`` at once, and on this very node when only a GPU is drained (the node
        stays schedulable): as ``kubectl drain``, the drain tells the new pod from the evicted one by its UID."""
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "train-3", "n1", owner="StatefulSet", uid="uid-1")
        cluster.recreated.add("ml/train-3")
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.05, gone_timeout_s=60),
                                 clock=ManualClock(T0))
        result = await act.drain_gpu("n1", 3, incident="inc-1", pods=("ml/train-3",))
        assert result.ok, result.detail
        assert cluster.evictions == ["ml/train-3"]
        assert cluster.obj("v1/pods", "ml", "train-3")["metadata"]["uid"] == "uid-1-again", "the new pod runs"

    async def test_a_pod_that_outlives_the_wait_fails_the_drain_with_its_name(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "stuck", "n1", grace_s=0)
        cluster.lingering.add("ml/stuck")
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(retry_s=0.05, gone_timeout_s=0.3),
                                 clock=ManualClock(T0))
        result = await act.drain("n1", incident="inc-1")
        assert not result.ok and "still terminating after 30s: ml/stuck" in result.detail, "no grace: 30 s margin"
        assert result.evidence["terminating"] == "1"

    async def test_a_pods_own_grace_period_stretches_the_wait(self, cluster: Cluster) -> None:
        """A trainer given 10 minutes to checkpoint keeps them: the drain waits its grace period plus a margin."""
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "trainer", "n1", grace_s=600)
        cluster.lingering.add("ml/trainer")
        clock = ManualClock(T0)
        act = KubernetesActuator(cluster.api, drain=DrainPolicy(gone_timeout_s=60), clock=clock)
        result = await act.drain("n1", incident="inc-1")
        assert not result.ok and "still terminating after 630s" in result.detail, "its grace period and 30 s"


class TestPodsEventsConditions:
    async def test_restart_pod_event_and_gpu_condition(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        await cluster.add_pod("ml", "train-0", "n1")
        act = KubernetesActuator(cluster.api)
        assert (await act.restart_pod("ml", "train-0", incident="inc-1")).ok
        assert (await act.notify_tenant("ml", "train-0", "XID 13 on your pod", incident="inc-1")).ok
        events = [o for key, o in cluster.k.objects.items() if key[0] == "v1/events"]
        assert events and events[0]["involvedObject"]["name"] == "train-0" and events[0]["type"] == "Warning"
        assert (await act.set_gpu_condition("n1", False, "XidCritical", "XID 48 on gpu2")).ok
        conds = {c["type"]: c for c in cluster.obj("v1/nodes", None, "n1")["status"]["conditions"]}
        assert {"type": "GPUHealthy", "status": "False", "reason": "XidCritical"}.items() <= conds["GPUHealthy"].items()
        assert conds["Ready"]["status"] == "True", "the kubelet's condition stays beside it"

    async def test_a_reboot_is_done_only_once_the_node_is_ready_again(self, cluster: Cluster) -> None:
        from breakfix.remediator.composite import ClusterActuator

        await cluster.add_node("n1", ready=False)  # rebooting: the kubelet is not back yet
        clock = ManualClock(T0)
        k8s = KubernetesActuator(cluster.api, clock=clock)
        looks: list[bool] = []
        real = k8s.node_state

        async def state(node: str) -> tuple[bool, str]:
            if len(looks) == 3:
                cluster.set_ready("n1", True)  # the kubelet reports Ready a little after the agent is back
            got = await real(node)
            looks.append(got[0])
            return got

        k8s.node_state = state  # type: ignore[method-assign]
        act = ClusterActuator(k8s, RebootingAgent(), clock=clock, poll_s=5.0, reboot_wait_s=60.0)  # type: ignore[arg-type]
        done = await act.reboot("n1", incident="inc-1")
        assert done.ok and "Node is Ready" in done.detail and looks == [False, False, False, True]

    async def test_a_node_still_ready_from_before_its_reboot_is_not_taken_for_back(self, cluster: Cluster) -> None:
        """A Node reads Ready for ~40 s after its kubelet stopped; only the kubelet's new bootID says it is back."""
        from breakfix.remediator.composite import ClusterActuator

        await cluster.add_node("n1")
        cluster.k.objects["v1/nodes", None, "n1"].patch({"status": {"nodeInfo": {"bootID": "boot-1"}}})
        clock = ManualClock(T0)
        k8s = KubernetesActuator(cluster.api, clock=clock)
        seen: list[str] = []
        real = k8s.node_state

        async def state(node: str) -> tuple[bool, str]:
            got = await real(node)
            seen.append(got[1])
            if len(seen) == 3:  # the rebooted kubelet reports in
                cluster.k.objects["v1/nodes", None, "n1"].patch({"status": {"nodeInfo": {"bootID": "boot-2"}}})
            return got

        k8s.node_state = state  # type: ignore[method-assign]
        act = ClusterActuator(k8s, RebootingAgent(), clock=clock, poll_s=5.0, reboot_wait_s=60.0)  # type: ignore[arg-type]
        assert (await act.reboot("n1", incident="inc-1")).ok
        assert seen == ["boot-1", "boot-1", "boot-1", "boot-2"], "waited past the stale Ready for the new boot"

    async def test_a_drain_of_a_node_whose_kubelet_is_gone_does_not_wait_for_pods_to_end(
            self, cluster: Cluster) -> None:
        """No kubelet ends the evicted pods of a NotReady node: they read Running until its reboot."""
        await cluster.add_node("n1", ready=False)
        await cluster.add_pod("ml", "w0", "n1")
        cluster.lingering.add("ml/w0")
        act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
        result = await act.drain("n1", incident="inc-1")
        assert result.ok and cluster.evictions == ["ml/w0"]

    async def test_a_reboot_whose_node_never_gets_ready_fails_in_time(self, cluster: Cluster) -> None:
        from breakfix.remediator.composite import ClusterActuator

        await cluster.add_node("n1", ready=False)
        clock = ManualClock(T0)
        act = ClusterActuator(KubernetesActuator(cluster.api, clock=clock), RebootingAgent(),  # type: ignore[arg-type]
                              clock=clock, poll_s=5.0, reboot_wait_s=30.0)
        done = await act.reboot("n1", incident="inc-1")
        assert not done.ok and "not Ready after 30s" in done.detail

    async def test_gpu_condition_is_one_strategic_merge_entry_beside_the_kubelets(self, cluster: Cluster) -> None:
        """Node conditions merge on ``type``: the patch carries GPUHealthy alone, so the kubelet's conditions are
        never read and written back (their times would have to survive a round trip the API server is strict on)."""
        from kubernetes import client
        await cluster.add_node("n1")
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "lastHeartbeatTime": "2026-11-23T00:00:00Z", "lastTransitionTime": "2026-11-22T00:00:00Z"}
        await asyncio.to_thread(client.CoreV1Api(cluster.api).patch_node_status, "n1",
                                {"status": {"conditions": [ready]}}, _content_type="application/merge-patch+json")
        act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
        assert (await act.set_gpu_condition("n1", True, "Validated", "DCGM diag r2 passed")).ok
        sent = [r for r in cluster.k["patch"] if r.url.path.endswith("/nodes/n1/status")][-1]
        assert sent.headers["Content-Type"] == "application/strategic-merge-patch+json"
        assert [c["type"] for c in sent.data["status"]["conditions"]] == ["GPUHealthy"]
        assert sent.data["status"]["conditions"][0]["lastTransitionTime"] == "2026-11-23T12:00:00Z"
        act.clock.advance(600)  # type: ignore[attr-defined]
        await act.set_gpu_condition("n1", True, "Validated", "soak passed")
        again = [r for r in cluster.k["patch"] if r.url.path.endswith("/nodes/n1/status")][-1]
        cond = again.data["status"]["conditions"][0]
        assert (cond["lastTransitionTime"], cond["lastHeartbeatTime"]) == ("2026-11-23T12:00:00Z",
                                                                          "2026-11-23T12:10:00Z"), "no transition"

    async def test_an_event_about_a_node_is_created_where_the_api_server_takes_it(self, cluster: Cluster) -> None:
        await cluster.add_node("n1")
        act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
        assert (await act.event("breakfix", "Node", "n1", "BreakfixEscalated", "RMA gpu2", incident="inc-1")).ok
        (key, ev), = [(k, o) for k, o in cluster.k.objects.items() if k[0] == "v1/events"]
        assert key[1] == "default"
        assert ev["involvedObject"] == {"kind": "Node", "name": "n1", "namespace": "", "uid": "n1"}, \
            "the uid is the node's name, as the kubelet writes it, so kubectl describe node lists it"


class TestLeaderElection:
    async def test_one_leader_until_its_lease_expires(self, cluster: Cluster) -> None:
        now = [datetime(2026, 11, 23, tzinfo=UTC)]
        a = LeaseElector(cluster.api, name="breakfix-remediator", namespace="breakfix", identity="a", lease_s=15,
                         clock=lambda: now[0])
        b = LeaseElector(cluster.api, name="breakfix-remediator", namespace="breakfix", identity="b", lease_s=15,
                         clock=lambda: now[0])
        assert await a.try_acquire() and not await b.try_acquire()
        now[0] += timedelta(seconds=10)
        assert await a.try_acquire() and not await b.try_acquire(), "renewals keep the lease"
        now[0] += timedelta(seconds=30)
        assert await b.try_acquire(), "an expired lease is taken over"
        assert not await a.try_acquire()
        lease = cluster.obj("coordination.k8s.io/v1/leases", "breakfix", "breakfix-remediator")
        assert lease["spec"]["holderIdentity"] == "b"


class TestCollectorTopologyFromNode:
    async def test_node_labels_become_signal_topology(self, cluster: Cluster) -> None:
        """The collector reads its Node's labels (one ConfigMap serves every node of a DaemonSet)."""
        from kubernetes import client

        from breakfix.collectors.nodelabels import node_topology

        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-node-7", "labels": {
            "topology.breakfix.io/rack": "rack-03", "nvidia.com/gpu.clique": "clique-9", "other": "x"}}}
        await asyncio.to_thread(client.CoreV1Api(cluster.api).create_node, node)
        mapping = {"rack": "topology.breakfix.io/rack", "switch": "topology.breakfix.io/switch",
                   "nvlink_domain": "nvidia.com/gpu.clique"}
        got = await asyncio.to_thread(node_topology, "gpu-node-7", mapping, host=cluster.api.configuration.host)
        assert got == {"rack": "rack-03", "nvlink_domain": "clique-9"}


class TestKubeConfig:
    """The remediator's Kubernetes configuration: kubeconfig, explicit host or in-cluster; anything missing or
    unusable is one line (``KubeConfigError``), and the CLI prints it with exit 2, never a traceback."""

    @pytest.mark.parametrize(("content", "words"), [
        (None, "no such kubeconfig file"),
        ("not: [a kubeconfig", "not a usable kubeconfig"),
        ("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n", "not a usable kubeconfig"),
    ], ids=["missing", "not-yaml", "no-context"])
    def test_a_bad_kubeconfig_is_one_line(self, tmp_path: Path, content: str | None, words: str) -> None:
        path = tmp_path / "kubeconfig"
        if content is not None:
            path.write_text(content)
        with pytest.raises(KubeConfigError) as exc:
            load_api(kubeconfig=path)
        assert words in str(exc.value) and "\n" not in str(exc.value) and str(path) in str(exc.value)

    def test_outside_a_pod_without_any_configuration_the_error_says_what_to_give(self, monkeypatch:
                                                                                  pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with pytest.raises(KubeConfigError, match="--kubeconfig FILE"):
            load_api(in_cluster=True)

    async def test_a_kubeconfig_reaches_the_api_server_it_names(self, tmp_path: Path, cluster: Cluster) -> None:
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": cluster.api.configuration.host}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "me"}}],
            "users": [{"name": "me", "user": {"token": "t"}}]}))
        await cluster.add_node("gpu-node-9")
        act = KubernetesActuator(load_api(kubeconfig=path), clock=ManualClock(T0))
        assert "gpu-node-9" in (await act.view()).nodes

    def test_the_cli_prints_one_line_and_exits_2_for_the_shipped_example_outside_a_cluster(
            self, tmp_path: Path) -> None:
        example = Path(__file__).resolve().parents[1] / "breakfix/remediator/examples/remediator.yaml"
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
        for extra in ([], ["--kubeconfig", str(tmp_path / "nope")]):
            proc = subprocess.run([sys.executable, "-c", "from breakfix.cli.main import app; app()", "remediator",
                                   "--config", str(example), *extra], capture_output=True, text=True, timeout=60,
                                  env={**env, "COLUMNS": "300"})
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert "kubeconfig" in proc.stderr


async def test_deferred_repair_sees_the_gpu_idle_once_its_pods_are_gone(cluster: Cluster) -> None:
    from kubernetes import client

    await cluster.add_node("n1")
    await cluster.add_pod("ml", "train-0", "n1")
    await cluster.add_pod("ml", "serve-0", "n1")
    act = KubernetesActuator(cluster.api, clock=ManualClock(T0))
    assert await act.pods_running("n1", ("ml/train-0",)), "the job holding the GPU still runs"
    await asyncio.to_thread(client.CoreV1Api(cluster.api).delete_namespaced_pod, "train-0", "ml")
    assert not await act.pods_running("n1", ("ml/train-0",)), "its job ended: the GPU may be reset"
    assert await act.pods_running("n1", ("ml/serve-0",))
