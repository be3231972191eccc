"""The reprovision hook: a generic webhook for whatever rebuilds a node (Metal3, NICo, a cloud
API, Cluster API, an in-house tool behind a small HTTP shim).

``POST {url}`` with ``{"node", "reason", "incident"}`` must answer 200/201/202 with
``{"id": "..."}``; then ``GET {url}/{id}`` is polled until ``{"state": "done"}`` or
``{"state": "failed", "message": "..."}``, within the step's timeout. The remediator validates
the node afterwards like after any other rung.
"""

from __future__ import annotations

import aiohttp

from breakfix.bus.clock import SYSTEM_CLOCK, Clock
from breakfix.remediator.actuator import StepResult


class ProviderHook:
    def __init__(self, url: str, *, token: str | None = None, poll_s: float = 15.0, timeout_s: float = 7200.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.clock = clock

    async def reprovision(self, node: str, *, reason: str, incident: str) -> StepResult:
        deadline = self.clock.monotonic() + self.timeout_s
        try:
            async with aiohttp.ClientSession(headers=self.headers) as http:
                async with http.post(self.url, json={"node": node, "reason": reason, "incident": incident}) as r:
                    if r.status not in (200, 201, 202):
                        return StepResult(False, f"provider refused reprovision of {node}: HTTP {r.status}")
                    job = str((await r.json()).get("id", ""))
                while self.clock.monotonic() < deadline:
                    async with http.get(f"{self.url}/{job}") as r:
                        body = await r.json() if r.status == 200 else {}
                    state = str(body.get("state", ""))
                    if state == "done":
                        return StepResult(True, f"{node} reprovisioned (provider job {job})", {"provider_job": job})
                    if state == "failed":
                        return StepResult(False, f"provider job {job} failed: {body.get('message', '')}",
                                          {"provider_job": job})
                    await self.clock.sleep(self.poll_s)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return StepResult(False, f"provider unreachable: {type(exc).__name__}: {exc}")
        return StepResult(False, f"provider job for {node} did not finish within {self.timeout_s:g}s")
