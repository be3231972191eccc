"""The console's two probes, as the kubelet uses them (deploy/components/console): ``/healthz`` is liveness
and answers 200 whenever the process serves, NATS up or not, so an outage never restarts the console that
keeps showing the last state received; ``/readyz`` is readiness and says 503 while loading and while NATS does
not answer. Neither needs a login, and neither is a logged refusal.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from breakfix.bus.server import EmbeddedNats
from breakfix.console.app import Console
from breakfix.console.auth import Auth, AuthConfig
from breakfix.console.state import ConsoleState
from breakfix.schemas.catalog import load_catalog
from tests.conftest import wait_until
from tests.console_fixtures import auth_config
from tests.test_console import NOW, PROXY, console, refusals


def _asgi_console(state: ConsoleState, auth: AuthConfig) -> httpx.AsyncClient:
    """The console app on a state the test controls (no NATS), as the kubelet reaches it: the pod's address."""
    async def publish(_verb: str, _who: Any, _rec: Any) -> Any:
        raise AssertionError("a probe published")

    app = Console(state, Auth(auth, time.monotonic), publish, lambda: NOW, load_catalog()).app()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.244.1.1", 41000)),
                             base_url="http://10.244.3.7:8080")


async def _probe(c: httpx.AsyncClient, path: str) -> tuple[int, str]:
    r = await c.get(path)
    return r.status_code, r.text


async def test_readyz_says_loading_until_the_state_is_loaded_while_healthz_is_already_200() -> None:
    state = ConsoleState()
    async with _asgi_console(state, auth_config()) as c:
        assert await _probe(c, "/healthz") == (200, "ok")
        assert await _probe(c, "/readyz") == (503, "loading")
        state.ready.set()
        assert await _probe(c, "/readyz") == (200, "ok")
        state.bus_up = False  # what the bus probe (state.watch_bus) sets when NATS stops answering
        assert await _probe(c, "/readyz") == (503, "NATS unreachable")
        assert await _probe(c, "/healthz") == (200, "ok")


@pytest.mark.parametrize("auth", [auth_config(), AuthConfig.model_validate(PROXY)], ids=["users", "proxy"])
async def test_probes_answer_without_a_login_or_a_logged_refusal(auth: AuthConfig) -> None:
    state = ConsoleState()
    state.ready.set()
    async with _asgi_console(state, auth) as c:
        with capture_logs() as logs:
            assert await _probe(c, "/healthz") == (200, "ok")
            assert await _probe(c, "/readyz") == (200, "ok")
            assert (await c.get("/incidents")).status_code in (303, 401)  # a page does need one
        assert refusals(logs) == (["no user from the proxy"] if auth.mode == "proxy" else [])


@pytest.mark.nats
async def test_healthz_stays_200_and_readyz_says_503_while_nats_is_unreachable_then_both_200_again(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url, timeout=30) as c:
        assert await _probe(c, "/healthz") == (200, "ok")  # loaded, NATS answers: both ready
        assert await _probe(c, "/readyz") == (200, "ok")
        nats_server.stop()

        async def unready() -> bool:
            return (await c.get("/readyz")).status_code == 503

        await wait_until(unready, 15, "/readyz to say NATS is unreachable")
        assert await _probe(c, "/readyz") == (503, "NATS unreachable")
        assert await _probe(c, "/healthz") == (200, "ok")  # liveness: no restart for a NATS outage
        nats_server.start()

        async def ready() -> bool:
            return (await c.get("/readyz")).status_code == 200

        await wait_until(ready, 15, "/readyz to say NATS is back")
        assert await _probe(c, "/healthz") == (200, "ok")
