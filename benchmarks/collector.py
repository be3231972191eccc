"""Collector overhead: one ``breakfix collector`` process with every source on, for 60 s.

Fake NVML with 8 GPUs polled every second (with its XID event wait), kmsg following a file
that gets a few kernel lines a second, dcgm-exporter and one vLLM-style endpoint served from
this process, an InfiniBand sysfs tree, and a real nats-server. Reports the collector's CPU
time as a share of one core (from /proc/<pid>/stat) and its peak RSS (VmHWM).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from aiohttp import web

from benchmarks.measure import cpu_seconds, peak_rss_mb, spawn_breakfix
from breakfix.bus.server import EmbeddedNats

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
VLLM = ('# TYPE vllm:time_to_first_token_seconds histogram\n'
        'vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="m"}} {n}\n'
        'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {n}\n'
        'vllm:time_to_first_token_seconds_count{{model_name="m"}} {n}\n'
        'vllm:time_to_first_token_seconds_sum{{model_name="m"}} {n}\n'
        '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name="m"}} 0.4\n')


async def bench_collector(seconds: float = 60.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="breakfix-collector-bench-") as d:
        tmp = Path(d)
        server = EmbeddedNats(tmp / "nats").start()
        scrapes = {"n": 0}

        async def dcgm(_r: web.Request) -> web.Response:
            return web.Response(text=(DATA / "dcgm_exporter_sample.txt").read_text())

        async def metrics(_r: web.Request) -> web.Response:
            scrapes["n"] += 1
            return web.Response(text=VLLM.format(n=scrapes["n"] * 10))

        async def ok(_r: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "m"}]})

        app = web.Application()
        app.add_routes([web.get("/dcgm", dcgm), web.get("/metrics", metrics), web.get("/health", ok),
                        web.get("/v1/models", ok)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        kern = tmp / "kern.log"
        kern.write_text("")
        shutil.copytree(DATA / "ib_sysfs", tmp / "ib")
        cfg = tmp / "collector.yaml"
        cfg.write_text(yaml.safe_dump({
            "cluster": "bench", "node": "gpu-node-000", "state_dir": str(tmp / "state"), "http_listen": "127.0.0.1:0",
            "nats": {"url": server.url}, "spool": {"dir": str(tmp / "spool")},
            "sources": {
                "nvml": {"fake_gpus": 8, "interval_s": 1.0, "expected_gpus": 8},
                "kmsg": {"path": str(kern), "poll_s": 0.5},
                "dcgm": {"enabled": True, "url": f"http://127.0.0.1:{port}/dcgm", "interval_s": 10},
                "fabric": {"sysfs": str(tmp / "ib"), "interval_s": 10},
                "endpoint": {"enabled": True, "interval_s": 15, "endpoints": [
                    {"name": "chat", "namespace": "bench", "url": f"http://127.0.0.1:{port}"}]},
            }}))
        proc = spawn_breakfix("collector", "--config", str(cfg))
        try:
            await asyncio.sleep(5)  # imports and first cycles are start-up, not steady state
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            lines = 0
            while time.monotonic() - t0 < seconds:
                with kern.open("a") as fh:  # a chatty kernel: noise plus an occasional XID
                    fh.write("[ 100.000000] eth0: link up\n[ 100.100000] NVRM: loading module\n")
                    lines += 2
                    if lines % 40 == 0:
                        fh.write(f"[ 101.{lines:06d}] NVRM: Xid (PCI:0000:18:00): 13, pid=1, name=python3, x\n")
                await asyncio.sleep(1.0)
            cpu = cpu_seconds(proc.pid) - cpu0
            wall = time.monotonic() - t0
            rss = peak_rss_mb(proc.pid)
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(10)
            await runner.cleanup()
            server.stop()
        return {"seconds": round(wall, 1), "cpu_percent_of_one_core": round(100 * cpu / wall, 2),
                "peak_rss_mb": rss, "kernel_lines_written": lines, "still_running": alive}


if __name__ == "__main__":
    print(asyncio.run(bench_collector()))
