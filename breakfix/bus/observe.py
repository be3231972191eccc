"""One HTTP endpoint per daemon: ``/metrics`` (prometheus-client), ``/healthz`` and ``/readyz``.

Every breakfix daemon (correlator, fleet stage, remediator, node collector with its agent, fleet
collector) starts one ``ObserveServer`` on its ``--metrics-port``. The stage's ``metrics.py`` owns
the metric families in its own ``CollectorRegistry``; the daemon registers refresh callbacks
(gauges read from live state just before a scrape), liveness checks (``/healthz``: the process
works; a failure makes Kubernetes restart it) and readiness checks (``/readyz``: it is caught up
and may take traffic). Checks are plain callables returning ``(ok, detail)``; a check that raises
counts as failing and the error is reported, never propagated. Prometheus scrapes ``/metrics``;
the kubelet probes the other two (``deploy/*.yaml``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = structlog.get_logger("breakfix.observe")

# Default ports (Prometheus' default port allocation page lists nothing at 9471-9474).
CORRELATOR_PORT = 9471
FLEET_STAGE_PORT = 9472
REMEDIATOR_PORT = 9473
FLEET_COLLECTOR_PORT = 9474
NODE_COLLECTOR_PORT = 9410  # the node collector's long-standing ``http_listen`` port (its agent shares it)

Check = Callable[[], "tuple[bool, str]"]


@dataclass
class Probes:
    """Named checks: every one must pass for the probe to answer 200."""

    checks: dict[str, Check] = field(default_factory=dict)

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def run(self) -> tuple[bool, dict[str, str]]:
        ok, detail = True, {}
        for name, check in self.checks.items():
            try:
                good, why = check()
            except Exception as exc:  # a broken check fails the probe; it never breaks the server
                good, why = False, f"check raised {exc!r}"
            ok = ok and good
            detail[name] = "ok" if good else (why or "failing")
        return ok, detail


class ObserveServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on ``host:port`` (port 0 picks a free one: see ``port``)."""

    def __init__(self, registry: CollectorRegistry, *, port: int, host: str = "0.0.0.0",
                 name: str = "breakfix") -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port = port
        self.name = name
        self.health = Probes()
        self.readiness = Probes()
        self.refreshers: list[Callable[[], None]] = []
        self.describe: Callable[[], dict[str, object]] | None = None  # extra keys for the probe bodies
        self._runner: web.AppRunner | None = None

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Run ``refresh`` before each scrape (set gauges from live state)."""
        self.refreshers.append(refresh)

    def render(self) -> bytes:
        for refresh in self.refreshers:
            try:
                refresh()
            except Exception as exc:  # stale gauges beat a failed scrape
                log.warning("metrics_refresh_failed", daemon=self.name, error=repr(exc))
        return generate_latest(self.registry)

    def _app(self) -> web.Application:
        async def metrics(_req: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        def probe(probes: Probes) -> Callable[[web.Request], object]:
            async def handler(_req: web.Request) -> web.Response:
                ok, detail = probes.run()
                body: dict[str, object] = {"daemon": self.name, "ok": ok, "checks": detail}
                if self.describe is not None:
                    try:
                        body = {**self.describe(), **body}
                    except Exception as exc:
                        body["describe_error"] = repr(exc)
                return web.json_response(body, status=200 if ok else 503)
            return handler

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", probe(self.health))  # type: ignore[arg-type]
        app.router.add_get("/readyz", probe(self.readiness))  # type: ignore[arg-type]
        return app

    async def start(self) -> int:
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port)
        await site.start()
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.requested_port
        log.info("observe_listening", daemon=self.name, host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (run it as a named task beside the daemon)."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


class LabelCap:
    """Keeps a label's distinct values bounded: the first ``limit`` values pass, later ones read ``other``.

    Label values come from messages (a signal's ``check``, a dead letter's reason); a buggy or hostile
    producer must not grow a daemon's metric series without bound."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(value)
        return value


async def consumer_pending(bus: object, stream: str, durable: str) -> int | None:
    """JetStream's ``num_pending`` for a durable consumer (its lag, from ``StreamAdmin.consumer_state``), or None
    on a bus without it, for a consumer that does not exist yet, or when NATS does not answer."""
    state_of = getattr(bus, "consumer_state", None)
    if state_of is None:
        return None
    try:
        state = await asyncio.wait_for(state_of(stream, durable), timeout=5.0)
    except Exception as exc:  # lag is best effort: a slow server is not fatal
        log.debug("consumer_state_failed", stream=stream, durable=durable, error=repr(exc))
        return None
    return None if state is None else int(state.num_pending)


__all__ = ["CORRELATOR_PORT", "FLEET_COLLECTOR_PORT", "FLEET_STAGE_PORT", "NODE_COLLECTOR_PORT", "REMEDIATOR_PORT",
           "LabelCap", "ObserveServer", "Probes", "consumer_pending"]
