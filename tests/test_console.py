"""The console over HTTP on a real nats-server: pages, on-call writes and who may make them.

Security: writes without a CSRF token, forged proxy headers from an untrusted address, expired
sessions and viewer-role writes are refused, and each refusal is logged (``console_refused``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.console.auth import AuthConfig
from breakfix.console.oncall import read_records
from breakfix.console.server import Running, start
from breakfix.schemas.incident import ActionKind, ActionOutcome, IncidentStatus, WaitingOn
from tests.conftest import T0, wait_until
from tests.console_fixtures import TOKENS, auth_config, awaiting, incident, seed

pytestmark = pytest.mark.nats
NOW = T0.replace(hour=13)


@asynccontextmanager
async def console(url: str, auth: AuthConfig | None = None, clock: list[float] | None = None
                  ) -> AsyncIterator[tuple[Running, JetStreamBus]]:
    bus = await JetStreamBus.connect(url)
    a = incident("inc-a", waiting=WaitingOn.APPROVAL)
    await seed(bus, [a, incident("inc-b", node="gpu-node-002", status=IncidentStatus.ESCALATED, minutes=5),
                     incident("inc-old", node="gpu-node-003", status=IncidentStatus.RESOLVED)], [awaiting(a)])
    kw: dict[str, Any] = {"monotonic": (lambda: clock[0])} if clock is not None else {}
    run = await start(url, auth=auth or auth_config(), clock=lambda: NOW, **kw)
    try:
        yield run, bus
    finally:
        await run.close()
        await bus.close()


async def login(c: httpx.AsyncClient, name: str) -> str:
    r = await c.post("/login", data={"name": name, "token": TOKENS[name]})
    assert r.status_code == 303 and r.headers["location"] == "/incidents", r.text
    page = await c.get("/incidents")
    return page.text.split('data-csrf="', 1)[1].split('"', 1)[0]


def refusals(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "console_refused"]


async def test_pages_render_open_incidents_first_and_hide_resolved_ones(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        assert (await c.get("/incidents")).status_code == 303  # log in first
        await login(c, "vera")
        page = (await c.get("/incidents")).text
        assert page.index("inc-a") < page.index("inc-b") and "inc-old" not in page
        assert "approval" in page and "team-a/train-0" in page and "2 incidents" in page
        assert "inc-old" in (await c.get("/incidents", params={"status": "all"})).text
        detail = (await c.get("/incidents/inc-a")).text
        assert "XID 48" in detail and "reprovision" in detail and 'aria-current="step"' in detail
        assert "awaiting approval" in detail and "docs.nvidia.com" in detail and "<h1>" in detail.split("runbook")[-1]
        assert "approve" not in detail.split("Plan</h2>")[0].split("actions")[-1]  # a viewer gets no buttons
        for path in ("/fleet", "/history?days=90", "/silences", "/history/rma.csv"):
            assert (await c.get(path)).status_code == 200, path
        assert "inc-b" in (await c.get("/history/rma.csv", params={"days": 90})).text


async def test_operator_approval_publishes_the_audited_record(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "olga")
        r = await c.post("/incidents/inc-a/approve", data={"csrf": csrf, "cluster": "c1", "step": "1",
                                                          "reason": "spare GPU on site"})
        assert r.status_code == 303
        wrong = await c.post("/incidents/inc-a/approve", data={"csrf": csrf, "cluster": "c2"},
                             headers={"hx-request": "true"})
        assert wrong.status_code == 400 and "belongs to cluster c1, not c2" in wrong.text
        missing = await c.post("/incidents/inc-zz/ack", data={"csrf": csrf}, headers={"hx-request": "true"})
        assert missing.status_code == 400 and "no incident inc-zz" in missing.text
        recs = await read_records(bus, cluster="c1")
        (approval,) = [x for x in recs if x.kind is ActionKind.APPROVAL]
        assert (approval.actor, approval.outcome, approval.step_index, approval.reason) == (
            "olga", ActionOutcome.APPROVED, 1, "spare GPU on site")


async def test_writes_without_csrf_token_are_refused_and_logged(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        await login(c, "olga")
        with capture_logs() as logs:
            r = await c.post("/incidents/inc-a/ack", data={"cluster": "c1"})
            bad = await c.post("/incidents/inc-a/ack", data={"cluster": "c1", "csrf": "guess"})
        assert r.status_code == bad.status_code == 403
        assert refusals(logs) == ["missing or wrong CSRF token"] * 2


async def test_viewer_writes_are_refused_and_logged(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "vera")
        with capture_logs() as logs:
            r = await c.post("/incidents/inc-a/approve", data={"csrf": csrf, "cluster": "c1"})
        assert r.status_code == 403 and "viewer may not approve" in r.text
        assert refusals(logs) == ["role viewer may not approve"]
        assert [x for x in await read_records(bus, cluster="c1") if x.kind is ActionKind.APPROVAL] == []
        olga_csrf = await login(c, "olga")
        with capture_logs() as logs:
            r = await c.post("/admin/breaker_reset", data={"csrf": olga_csrf, "cluster": "c1", "reason": "x"})
        assert r.status_code == 403 and refusals(logs) == ["role operator may not breaker_reset"]


async def test_expired_sessions_are_refused_and_logged(nats_server: EmbeddedNats) -> None:
    clock = [1000.0]
    async with console(nats_server.url, auth_config(ttl_s=60), clock) as (run, _bus), \
            httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "olga")
        clock[0] += 61
        with capture_logs() as logs:
            r = await c.post("/incidents/inc-a/ack", data={"csrf": csrf, "cluster": "c1"})
            page = await c.get("/incidents")
        assert r.status_code == 401 and page.status_code == 303
        assert refusals(logs)[0] == "session expired" and "not logged in" in refusals(logs)


async def test_bad_tokens_do_not_log_in(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        with capture_logs() as logs:
            r = await c.post("/login", data={"name": "olga", "token": TOKENS["vera"]})
        assert r.headers["location"] == "/login?error=1" and refusals(logs) == ["bad name or token"]


PROXY = {"mode": "proxy", "proxy": {"trusted": ["10.0.0.0/8"], "groups": {"sre": "operator", "eng": "viewer"}}}


async def test_forged_proxy_headers_from_an_untrusted_address_are_refused_and_logged(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url, AuthConfig.model_validate(PROXY)) as (run, _bus), \
            httpx.AsyncClient(base_url=run.url) as c:
        with capture_logs() as logs:
            r = await c.get("/incidents", headers={"X-Forwarded-User": "mallory", "X-Forwarded-Groups": "sre"})
        assert r.status_code == 403 and refusals(logs) == ["proxy headers from an untrusted address"]


async def test_a_trusted_proxy_maps_groups_to_roles(nats_server: EmbeddedNats) -> None:
    trusted = {**PROXY, "proxy": {**PROXY["proxy"], "trusted": ["127.0.0.1/32"]}}  # type: ignore[dict-item]
    async with console(nats_server.url, AuthConfig.model_validate(trusted)) as (run, bus), \
            httpx.AsyncClient(base_url=run.url) as c:
        hdr = {"X-Forwarded-User": "pat", "X-Forwarded-Groups": "eng, sre"}
        page = await c.get("/incidents", headers=hdr)
        assert page.status_code == 200 and "pat (operator)" in page.text
        csrf = page.text.split('data-csrf="', 1)[1].split('"', 1)[0]
        r = await c.post("/incidents/inc-b/note", data={"csrf": csrf, "reason": "vendor ticket 4711"}, headers=hdr)
        assert r.status_code == 303
        await wait_until(lambda: _has_note(bus), 5, "the note in the audit trail")


async def _has_note(bus: JetStreamBus) -> bool:
    return any(r.kind is ActionKind.NOTE and r.actor == "pat" for r in await read_records(bus, cluster="c1"))


async def test_events_stream_announces_a_new_incident(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        await login(c, "vera")
        async with c.stream("GET", "/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            await seed(bus, [incident("inc-new", node="gpu-node-009")], [])
            got = ""
            while "inc-new" not in got:
                got += await asyncio.wait_for(anext(lines), 10)
        assert "inc-new" in (await c.get("/incidents")).text


def test_console_refuses_bad_auth_files_and_lab_mode_off_loopback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from breakfix.cli.main import app

    runner = CliRunner()
    bad = tmp_path / "auth.yaml"
    bad.write_text("mode: users\nusers: []\n")
    r = runner.invoke(app, ["console", "--auth", str(bad), "--nats", "nats://127.0.0.1:1"])
    assert r.exit_code == 2 and f"{bad}:1:" in r.output and "Traceback" not in r.output
    bad.write_text("mode: proxy\nproxy: {trusted: [not-an-address]}\n")
    assert runner.invoke(app, ["console", "--auth", str(bad)]).exit_code == 2
    r = runner.invoke(app, ["console", "--listen", "0.0.0.0:0", "--nats", "nats://127.0.0.1:1"])
    assert r.exit_code == 2 and "loopback only" in r.output


def test_console_token_prints_a_token_and_its_argon2_entry() -> None:
    from argon2 import PasswordHasher
    from typer.testing import CliRunner

    from breakfix.cli.main import app

    r = CliRunner().invoke(app, ["console-token", "olga", "--role", "operator"])
    token = r.stdout.split("not stored): ", 1)[1].split()[0]
    entry = r.stdout.split("token_hash: '", 1)[1].split("'", 1)[0]
    assert r.exit_code == 0 and "role: operator" in r.stdout and PasswordHasher().verify(entry, token)
    cfg = AuthConfig.model_validate({"mode": "users", "users": [{"name": "olga", "role": "operator",
                                                                 "token_hash": entry}]})
    assert cfg.users[0].name == "olga"
