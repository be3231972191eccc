"""Running the console: connect to NATS, load and follow the state, serve the app under uvicorn.

``breakfix console`` (``breakfix.cli.cli_console``) and ``breakfix demo --console`` call ``serve``;
the tests call ``start`` to get a running console on a free port and stop it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import uvicorn

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.options import NatsOptions
from breakfix.console import verbs
from breakfix.console.app import Console
from breakfix.console.auth import Auth, AuthConfig, loopback
from breakfix.console.oncall import Oncall, connect
from breakfix.console.state import ConsoleState, follow
from breakfix.schemas.catalog import load_catalog

log = structlog.get_logger("breakfix.console")


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: use HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Running:
    url: str
    state: ConsoleState
    console: Console
    server: uvicorn.Server
    bus: JetStreamBus
    stop: asyncio.Event
    tasks: list[asyncio.Task[Any]]

    async def close(self) -> None:
        self.stop.set()
        self.server.should_exit = True
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.bus.close()


async def start(nats: str | NatsOptions, *, listen: str = "127.0.0.1:0", auth: AuthConfig,
                records_days: float = 7.0, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                monotonic: Callable[[], float] = time.monotonic, bus: JetStreamBus | None = None) -> Running:
    host, port = parse_listen(listen)
    if auth.mode == "lab" and not loopback(host):
        raise ValueError("lab mode (no --auth) listens on loopback only; give --auth FILE to listen on " + host)
    bus = bus or await connect(nats, name="breakfix-console")
    state = ConsoleState()
    stop = asyncio.Event()

    async def publish(verb: str, who: verbs.Identity, rec: Any) -> Any:
        return await Oncall(bus, who, clock).publish(verb, rec)

    console = Console(state, Auth(auth, monotonic), publish, clock, load_catalog())
    # proxy_headers off: uvicorn would otherwise take the client address from X-Forwarded-For (any
    # loopback peer could claim to be the trusted proxy); auth checks the proxy against the socket's peer
    config = uvicorn.Config(console.app(), host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=1, proxy_headers=False)
    server = uvicorn.Server(config)
    loader = asyncio.create_task(follow(state, bus, clock, records_days=records_days, stop=stop),
                                 name="console-follow")
    await asyncio.wait_for(state.ready.wait(), timeout=60)
    serving = asyncio.create_task(server.serve(), name="console-http")
    while not server.started:
        if serving.done():
            await serving
            raise RuntimeError(f"console could not listen on {listen}")
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
    log.info("console_listening", url=url, mode=auth.mode, incidents=len(state.incidents))
    return Running(url, state, console, server, bus, stop, [loader, serving])


async def serve(nats: str | NatsOptions, *, listen: str, auth: AuthConfig, stop: asyncio.Event,
                announce: Callable[[str], None] = lambda _u: None, records_days: float = 7.0) -> None:
    running = await start(nats, listen=listen, auth=auth, records_days=records_days)
    announce(running.url)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await running.close()
