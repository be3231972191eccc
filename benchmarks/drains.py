"""Concurrent node drains against kmock, beside the same evictions sent as raw HTTP POSTs.

Both sides run in one process against one kmock server, one after the other: first N drains at
once through ``KubernetesActuator`` (the official client: one pod list per drain, bounded-parallel
evictions on the client's thread pool), then the same number of eviction POSTs from a minimal
aiohttp client at the same parallelism. The ratio is what the adapter costs over the wire format;
kmock (a Python server) sets the absolute rate on this machine.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import kmock
from kubernetes import client

from breakfix.remediator.k8s import DrainPolicy, KubernetesActuator, api_for


async def bench_drains(nodes: int = 50, pods: int = 20, parallel: int = 32) -> dict[str, float]:
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
        # kmock has no eviction subresource: after seeding, every POST is an eviction, and succeeds
        ok = kmock.Response(status=201, payload={"kind": "Status", "code": 201})  # type: ignore[attr-defined]
        k["post"] << (lambda req: ok)
        act = KubernetesActuator(api, drain=DrainPolicy(parallel=parallel))
        start = time.perf_counter()
        results = await asyncio.gather(*(act.drain(f"n{n}", incident=f"inc-{n}") for n in range(nodes)))
        elapsed = time.perf_counter() - start

        sem = asyncio.Semaphore(parallel)
        total = nodes * pods
        async with aiohttp.ClientSession() as http:
            async def post(i: int) -> None:
                body = {"apiVersion": "policy/v1", "kind": "Eviction",
                        "metadata": {"name": f"n{i // pods}-p{i % pods}", "namespace": "ml"}}
                async with sem, http.post(f"{url}/api/v1/namespaces/ml/pods/n{i // pods}-p{i % pods}/eviction",
                                          json=body) as resp:
                    await resp.read()

            t0 = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(total)))
            raw = time.perf_counter() - t0
        rate = act.evictions / elapsed
        raw_rate = total / raw
        return {"concurrent_drains": nodes, "pods_per_node": pods, "drains_ok": sum(r.ok for r in results),
                "evictions": act.evictions, "seconds": round(elapsed, 2), "evictions_per_s": round(rate, 1),
                "raw_post_evictions_per_s": round(raw_rate, 1), "ratio_to_raw": round(rate / raw_rate, 2)}


if __name__ == "__main__":
    print(asyncio.run(bench_drains()))
