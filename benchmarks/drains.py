"""Concurrent node drains against kmock, beside the same evictions sent as raw HTTP POSTs.

Both sides run in one process against one kmock server, in alternating rounds: N drains at once
through ``KubernetesActuator`` (the official client: one pod list per drain, bounded-parallel
evictions on the client's thread pool), then the same number of eviction POSTs from a minimal
aiohttp client at the same parallelism; the medians are compared. The ratio is what the adapter
costs over the wire format (the drain side also lists each node's pods); kmock (a Python server,
about 15 ms of CPU a request here) sets the absolute rate on this machine. Pod lists are answered
with the node's pods only, as an API server answers ``fieldSelector=spec.nodeName``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
import kmock
from kubernetes import client

from breakfix.remediator.k8s import DrainPolicy, KubernetesActuator, api_for


def honour_node_selector(k: kmock.KubernetesEmulator) -> None:
    """Answer pod lists with ``fieldSelector=spec.nodeName=N`` as an API server does: only N's pods.

    kmock ignores field selectors and returns every pod to every per-node list (with 50 drains of 20
    pods each, 40 % of the drain side's time went to listing pods no real server would send).
    """
    def pods(req: Any) -> dict[str, Any]:
        selector = str(req.params.get("fieldSelector") or "")
        node = selector.removeprefix("spec.nodeName=") if selector.startswith("spec.nodeName=") else None
        items = [obj.raw for (res, _ns, _name), obj in k.objects.items()
                 if res == req.resource and not obj.deleted
                 and (node is None or (obj.raw.get("spec") or {}).get("nodeName") == node)]
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}

    k["list", kmock.resource("", "v1", "pods")] << pods


async def bench_drains(nodes: int = 25, pods: int = 20, parallel: int = 32, rounds: int = 3) -> dict[str, Any]:
    async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
        for res, namespaced, kind in (("v1/nodes", False, "Node"), ("v1/pods", True, "Pod")):
            k.resources[res] = kmock.ResourceInfo(namespaced=namespaced, kind=kind)
        url = str(srv.url).rstrip("/")
        api = api_for(url)
        core = client.CoreV1Api(api)

        def seed() -> None:
            for n in range(nodes):
                core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=f"n{n}")))
                for p in range(pods):
                    core.create_namespaced_pod("ml", client.V1Pod(
                        metadata=client.V1ObjectMeta(name=f"n{n}-p{p}", namespace="ml"),
                        spec=client.V1PodSpec(node_name=f"n{n}", containers=[client.V1Container(name="c")])))

        await asyncio.to_thread(seed)
        honour_node_selector(k)
        # kmock has no eviction subresource: after seeding, every POST is an eviction, and succeeds
        # (the pods stay, so every round drains the same nodes)
        ok = kmock.Response(status=201, payload={"kind": "Status", "code": 201})  # type: ignore[attr-defined]
        k["post"] << (lambda req: ok)
        total = nodes * pods
        sem = asyncio.Semaphore(parallel)
        drain_rates: list[float] = []
        raw_rates: list[float] = []
        drains_ok = evictions = 0
        async with aiohttp.ClientSession() as http:
            async def post(i: int) -> None:
                body = {"apiVersion": "policy/v1", "kind": "Eviction",
                        "metadata": {"name": f"n{i // pods}-p{i % pods}", "namespace": "ml"}}
                async with sem, http.post(f"{url}/api/v1/namespaces/ml/pods/n{i // pods}-p{i % pods}/eviction",
                                          json=body) as resp:
                    await resp.read()

            for _ in range(rounds):  # alternating, so a load change on the machine hits both sides
                # eviction throughput: kmock keeps the pods (see above), so the wait for them to end is off here
                act = KubernetesActuator(api, drain=DrainPolicy(parallel=parallel, gone_timeout_s=0))
                start = time.perf_counter()
                results = await asyncio.gather(*(act.drain(f"n{n}", incident=f"inc-{n}") for n in range(nodes)))
                drain_rates.append(act.evictions / (time.perf_counter() - start))
                drains_ok += sum(r.ok for r in results)
                evictions += act.evictions
                t0 = time.perf_counter()
                await asyncio.gather(*(post(i) for i in range(total)))
                raw_rates.append(total / (time.perf_counter() - t0))
        rate, raw_rate = statistics.median(drain_rates), statistics.median(raw_rates)
        return {"concurrent_drains": nodes, "pods_per_node": pods, "rounds": rounds,
                "drains_ok": f"{drains_ok}/{nodes * rounds}", "evictions": evictions,
                "evictions_per_s": round(rate, 1), "raw_post_evictions_per_s": round(raw_rate, 1),
                "ratio_to_raw": round(rate / raw_rate, 2),
                "ratio_per_round": [round(d / r, 2) for d, r in zip(drain_rates, raw_rates, strict=True)]}


if __name__ == "__main__":
    print(asyncio.run(bench_drains()))
