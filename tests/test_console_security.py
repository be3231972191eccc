"""The console's defences, over HTTP on a real nats-server: who the proxy is, how much a request may
send, what lab mode lets in, what login costs, which clusters an admin verb may name, what happens
with NATS down, the silence durations, the live streams one user may hold, and the identity a verb
carries to the remediator.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

import breakfix.console.auth as auth_module
from breakfix.bus.codec import encode
from breakfix.bus.server import EmbeddedNats
from breakfix.console import state as state_module
from breakfix.console.auth import Auth, AuthConfig, UserEntry, hash_token
from breakfix.console.oncall import read_records, user_from_creds
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord
from tests.conftest import wait_until
from tests.test_console import NOW, PROXY, console, login, refusals

pytestmark = pytest.mark.nats
FORM = {"content-type": "application/x-www-form-urlencoded"}


def csrf_of(page: httpx.Response) -> str:
    return page.text.split('data-csrf="', 1)[1].split('"', 1)[0]


# -- 1: the trusted proxy is the socket's peer ----------------------------------------------------
async def test_forwarded_for_from_loopback_does_not_make_a_trusted_proxy(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url, AuthConfig.model_validate(PROXY)) as (run, _bus), \
            httpx.AsyncClient(base_url=run.url) as c:
        with capture_logs() as logs:
            r = await c.get("/incidents", headers={"X-Forwarded-User": "mallory", "X-Forwarded-Groups": "sre",
                                                   "X-Forwarded-For": "10.0.0.1"})
        assert r.status_code == 403 and "mallory" not in r.text
        assert refusals(logs) == ["proxy headers from an untrusted address"]
        assert [e["remote"] for e in logs if e["event"] == "console_refused"] == ["127.0.0.1"]


# -- 2: request bodies ------------------------------------------------------------------------------
async def _chunks(total: int, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    """A urlencoded body streamed without a length: fields of ``size`` bytes, each within the form limits."""
    for i in range(total // size):
        yield f"{'&' if i else ''}f{i}=".encode() + b"a" * size


async def test_a_write_without_a_session_is_refused_before_its_body_is_read(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        with capture_logs() as logs:  # read, this streamed megabyte would be over the cap: 413
            r = await c.post("/incidents/inc-a/approve", content=_chunks(1024 * 1024), headers=FORM)
        assert r.status_code == 401 and r.text == "refused: not logged in"
        assert refusals(logs) == ["not logged in"]


async def test_request_bodies_over_the_cap_are_refused_whether_declared_or_streamed(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "olga")
        with capture_logs() as logs:
            declared = await c.post("/incidents/inc-b/note", headers={"hx-request": "true"},
                                    data={"csrf": csrf, "reason": "x" * (100 * 1024)})
            streamed = await c.post("/incidents/inc-b/note", content=_chunks(200 * 1024),
                                    headers={**FORM, "x-csrf-token": csrf})
            fields = await c.post("/incidents/inc-b/note", headers={"hx-request": "true"},
                                  data={"csrf": csrf, "reason": "r", **{f"f{i}": "v" for i in range(50)}})
            upload = await c.post("/incidents/inc-b/note", headers={"hx-request": "true"},
                                  data={"csrf": csrf, "reason": "r"}, files={"f": ("a.bin", b"x" * 10)})
        assert declared.status_code == streamed.status_code == 413
        assert declared.text == streamed.text == "refused: request body too large"
        assert refusals(logs) == ["request body too large"] * 2
        assert fields.status_code == upload.status_code == 400 and "Traceback" not in fields.text + upload.text
        assert [x for x in await read_records(bus, cluster="c1") if x.kind is ActionKind.NOTE] == []


# -- 3: lab mode and DNS rebinding --------------------------------------------------------------------
async def test_lab_mode_refuses_a_foreign_host_and_writes_from_another_origin(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url, AuthConfig(mode="lab", lab_user="sre")) as (run, bus), \
            httpx.AsyncClient(base_url=run.url) as c:
        port = run.url.rsplit(":", 1)[1]
        with capture_logs() as logs:
            rebound = await c.get("/fleet", headers={"Host": f"rebind.attacker.example:{port}"})
        assert rebound.status_code == 400 and "bf_session" not in rebound.headers.get("set-cookie", "")
        assert refusals(logs) == ["Host is not a loopback name (lab mode)"]
        assert (await c.get("/fleet", headers={"Host": f"localhost:{port}"})).status_code == 200
        csrf = csrf_of(await c.get("/fleet"))
        form = {"csrf": csrf, "cluster": "c1", "reason": "storm over"}
        with capture_logs() as logs:
            foreign = await c.post("/admin/breaker_reset", data=form, headers={"Origin": "http://evil.example"})
            referred = await c.post("/admin/breaker_reset", data=form,
                                    headers={"Referer": f"http://localhost:{port}/fleet"})  # not this Host
        assert foreign.status_code == referred.status_code == 403
        assert refusals(logs) == ["write from another origin (lab mode)"] * 2
        assert [x for x in await read_records(bus, cluster="c1") if x.kind is ActionKind.BREAKER] == []
        own = await c.post("/admin/breaker_reset", data=form, headers={"Origin": run.url})
        assert own.status_code == 303


# -- 4: login -------------------------------------------------------------------------------------------
async def test_login_checks_tokens_off_the_event_loop_and_an_unknown_name_costs_a_check_too(
        nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[tuple[bool, str]] = []  # (on the event loop's thread, the hash checked against)

    class Recording:
        def __init__(self, real: Any) -> None:
            self.real = real

        def hash(self, token: str) -> str:
            return str(self.real.hash(token))

        def verify(self, token_hash: str, token: str) -> bool:
            checks.append((threading.current_thread() is threading.main_thread(), token_hash))
            return bool(self.real.verify(token_hash, token))

    monkeypatch.setattr(auth_module, "_HASHER", Recording(auth_module._HASHER))
    cfg = auth_module.AuthConfig.model_validate(
        {"mode": "users", "users": [{"name": "olga", "role": "operator", "token_hash": hash_token("right")}]})
    async with console(nats_server.url, cfg) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        for name in ("olga", "nosuchuser"):
            r = await c.post("/login", data={"name": name, "token": "wrong"})
            assert r.headers["location"] == "/login?error=1"
        assert (await c.post("/login", data={"name": "olga", "token": "right"})).headers["location"] == "/incidents"
    olga = cfg.users[0].token_hash
    assert [on_loop for on_loop, _ in checks] == [False, False, False]
    assert checks[0][1] == checks[2][1] == olga and checks[1][1].startswith("$argon2") and checks[1][1] != olga


async def test_an_address_with_many_failed_logins_is_refused_without_a_check_until_they_age_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []

    class Counting:
        def hash(self, token: str) -> str:
            return "$argon2id$fake"

        def verify(self, token_hash: str, token: str) -> bool:
            checks.append(token)
            return token == "right"

    monkeypatch.setattr(auth_module, "_HASHER", Counting())
    monkeypatch.setattr(auth_module, "_dummy_hash", lambda: "$argon2id$dummy")
    cfg = auth_module.AuthConfig.model_validate(
        {"mode": "users", "users": [{"name": "olga", "role": "operator", "token_hash": "$argon2id$olga"}]})
    now = [1000.0]
    auth = Auth(cfg, clock=lambda: now[0])
    for _ in range(auth_module.MAX_LOGIN_FAILURES):
        with pytest.raises(auth_module.Refusal) as bad:
            await auth.login("olga", "wrong", remote="10.0.0.9")
        assert bad.value.status == 401
    with pytest.raises(auth_module.Refusal) as throttled:
        await auth.login("olga", "right", remote="10.0.0.9")
    assert throttled.value.status == 429 and len(checks) == auth_module.MAX_LOGIN_FAILURES, "no check spent on it"
    assert (await auth.login("olga", "right", remote="10.0.0.10")).who.user == "olga", "other addresses log in"
    now[0] += auth_module.LOGIN_WINDOW_S
    assert (await auth.login("olga", "right", remote="10.0.0.9")).who.user == "olga" and "10.0.0.9" not in auth.failures

    checks.clear()  # a burst from one address at once: only the allowance is checked, the rest refused at once
    results = await asyncio.gather(*(auth.login("olga", "wrong", remote="10.0.0.11") for _ in range(100)),
                                   return_exceptions=True)
    statuses = sorted(r.status for r in results if isinstance(r, auth_module.Refusal))
    assert statuses == [401] * auth_module.MAX_LOGIN_FAILURES + [429] * (100 - auth_module.MAX_LOGIN_FAILURES)
    assert len(checks) == auth_module.MAX_LOGIN_FAILURES


# -- 4b: login limits behind an ingress or reverse proxy ---------------------------------------------------
PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(("peer", "forwarded_for", "expected"), [
    pytest.param("10.1.2.3", "203.0.113.5", "203.0.113.5", id="the-proxy-names-its-client"),
    pytest.param("10.1.2.3", "198.51.100.1, 203.0.113.5", "203.0.113.5", id="hops-the-client-sent-are-not-its-address"),
    pytest.param("10.1.2.3", "203.0.113.5, 10.9.9.9", "203.0.113.5", id="a-chain-of-trusted-proxies-is-walked"),
    pytest.param("192.0.2.7", "203.0.113.5", "192.0.2.7", id="a-peer-that-is-no-proxy-cannot-name-a-client"),
    pytest.param("10.1.2.3", None, "10.1.2.3", id="no-header-counts-the-proxy"),
    pytest.param("10.1.2.3", "203.0.113.5, not-an-address", "10.1.2.3", id="a-malformed-proxy-hop-counts-the-proxy"),
    pytest.param("10.1.2.3", "10.4.4.4, 10.5.5.5", "10.1.2.3", id="only-proxies-counts-the-nearest"),
    pytest.param("fd00::1", " 2001:db8::1 ", "2001:db8::1", id="ipv6"),
    pytest.param("10.1.2.3", "1.1.1.1, " * 2000 + "203.0.113.5", "203.0.113.5", id="a-huge-header-reads-its-last-hops"),
])
def test_the_address_a_login_counts_as_is_the_client_a_trusted_proxy_names(
        peer: str, forwarded_for: str | None, expected: str) -> None:
    assert auth_module.client_address(peer, forwarded_for, PROXIES) == expected
    assert auth_module.client_address(peer, forwarded_for, ()) == peer, "without forwarded_by the header is ignored"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["10.1.2.3", "192.0.2.7", "-"]))
def test_any_forwarded_for_header_gives_the_peer_or_a_client_address_outside_the_proxies(
        header: str, peer: str) -> None:
    got = auth_module.client_address(peer, header, PROXIES)
    assert got == peer or (ipaddress.ip_address(got) and not any(ipaddress.ip_address(got) in n for n in PROXIES))


@pytest.mark.parametrize("behind_proxy", [True, False], ids=["forwarded_by-set", "no-forwarded_by"])
async def test_one_client_guessing_behind_the_ingress_does_not_lock_out_the_others(
        nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, behind_proxy: bool) -> None:
    """The console sits behind an ingress (deploy/base/networkpolicy.yaml): every request's peer is the ingress.
    With ``forwarded_by`` naming it, the limit counts each client; without it, X-Forwarded-For is never believed,
    so rotating it does not escape the limit."""

    class Fake:
        def hash(self, token: str) -> str:
            return "$argon2id$fake"

        def verify(self, token_hash: str, token: str) -> bool:
            return token == "right"

    monkeypatch.setattr(auth_module, "_HASHER", Fake())
    monkeypatch.setattr(auth_module, "_dummy_hash", lambda: "$argon2id$dummy")
    cfg = AuthConfig.model_validate({"mode": "users", "forwarded_by": ["127.0.0.0/8"] if behind_proxy else [],
                                     "users": [{"name": "olga", "role": "operator", "token_hash": "$argon2id$o"}]})
    async with console(nats_server.url, cfg) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        for i in range(auth_module.MAX_LOGIN_FAILURES):
            xff = "203.0.113.5" if behind_proxy else f"198.51.100.{i}"
            r = await c.post("/login", data={"name": "olga", "token": "wrong"}, headers={"X-Forwarded-For": xff})
            assert r.headers["location"] == "/login?error=1"
        with capture_logs() as logs:
            again = await c.post("/login", data={"name": "olga", "token": "right"},
                                 headers={"X-Forwarded-For": "203.0.113.5" if behind_proxy else "198.51.100.99"})
        assert again.headers["location"] == "/login?error=throttled"
        assert [e["remote"] for e in logs if e["event"] == "console_refused"] == [
            "203.0.113.5" if behind_proxy else "127.0.0.1"]
        other = await c.post("/login", data={"name": "olga", "token": "right"},
                             headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.headers["location"] == ("/incidents" if behind_proxy else "/login?error=throttled")


def test_forwarded_by_must_be_addresses_or_networks() -> None:
    with pytest.raises(ValidationError, match="forwarded_by"):
        AuthConfig.model_validate({"mode": "lab", "forwarded_by": ["ingress-nginx"]})


# -- 5: clusters -------------------------------------------------------------------------------------------
async def test_an_admin_verb_for_a_cluster_the_console_does_not_know_is_refused_in_one_line(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "adam")
        form = {"csrf": csrf, "rule": "gpu-reset-ladder", "enabled": "true", "reason": "stop resets now"}
        typo = await c.post("/admin/kill_switch", data={**form, "cluster": "c1x"}, headers={"hx-request": "true"})
        assert typo.status_code == 400 and "unknown cluster 'c1x'; the console knows c1" in html.unescape(typo.text)
        assert "\n" not in typo.text and "recorded" not in typo.text
        assert "<select name=\"cluster\"" in (await c.get("/fleet")).text
        spaced = await c.post("/admin/kill_switch", data={**form, "cluster": " c1 "}, headers={"hx-request": "true"})
        assert spaced.status_code == 200 and "recorded" in spaced.text

        async def switched() -> bool:
            return any(r.kind is ActionKind.KILL_SWITCH for r in await read_records(bus))

        await wait_until(switched, 5, "the kill switch in the audit trail")
        (ks,) = [r for r in await read_records(bus) if r.kind is ActionKind.KILL_SWITCH]
        assert ks.cluster == "c1" and ks.details["rule"] == "gpu-reset-ladder"


async def test_a_cluster_known_only_from_an_audit_record_takes_a_kill_switch_before_its_first_incident(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "adam")
        form = {"csrf": csrf, "rule": "gpu-reset-ladder", "enabled": "true", "reason": "new cluster, hold resets",
                "cluster": "c2"}
        before = await c.post("/admin/kill_switch", data=form, headers={"hx-request": "true"})
        assert before.status_code == 400 and "unknown cluster 'c2'" in html.unescape(before.text)
        refused = ActionRecord(id="c2-refusal", cluster="c2", incident_id="inc-c2", kind=ActionKind.REFUSAL,
                               outcome=ActionOutcome.REFUSED, actor="remediator/test", reason="dry run",
                               at=NOW - timedelta(minutes=1))  # the cluster's remediator, before any incident here
        await bus.publish(subjects.action_subject("c2"), encode(refused), msg_id=refused.id)

        async def listed() -> bool:
            r = await c.post("/admin/kill_switch", data=form, headers={"hx-request": "true"})
            return r.status_code == 200 and "recorded" in r.text

        await wait_until(listed, 5, "the kill switch for a cluster known from its remediator's record")


async def test_the_fleet_shows_each_clusters_breaker_and_kill_switches_apart(nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url) as c:
        at = NOW - timedelta(minutes=5)
        tripped = ActionRecord(id="trip-c2", cluster="c2", incident_id="-", kind=ActionKind.REFUSAL,
                               outcome=ActionOutcome.REFUSED, actor="remediator/c2", reason="breaker open: 5 openings",
                               details={"guard": "breaker"}, at=at)
        switch = ActionRecord(id="ks-c2", cluster="c2", incident_id="-", kind=ActionKind.KILL_SWITCH,
                              outcome=ActionOutcome.REQUESTED, actor="adam", reason="bad driver",
                              details={"rule": "gpu-reset-ladder", "enabled": "true"}, at=at)
        for rec in (tripped, switch):
            await bus.publish(subjects.action_subject("c2"), encode(rec), msg_id=rec.id)

        async def seen() -> bool:
            return {"trip-c2", "ks-c2"} <= {r.id for r in run.state.records}

        await wait_until(seen, 5, "the c2 records in the console")
        await login(c, "vera")
        page = " ".join((await c.get("/fleet")).text.split())
        assert "Circuit breaker of c1: <b>closed</b>" in page and "Circuit breaker of c2: <b>OPEN</b>" in page
        assert "c2 rule:gpu-reset-ladder ON (adam)" in page and "c1 rule:" not in page


# -- 6: NATS down -----------------------------------------------------------------------------------------------
async def test_with_nats_down_an_action_fails_fast_in_one_line_and_readyz_says_so_while_healthz_stays_ok(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, bus), httpx.AsyncClient(base_url=run.url, timeout=30) as c:
        csrf = await login(c, "olga")
        assert (await c.get("/readyz")).text == "ok"
        nats_server.stop()

        async def unready() -> bool:
            return (await c.get("/readyz")).status_code == 503

        await wait_until(unready, 15, "/readyz to say NATS is unreachable")
        assert (await c.get("/readyz")).text == "NATS unreachable"
        healthz = await c.get("/healthz")  # liveness: a NATS outage is no reason to restart the console
        assert (healthz.status_code, healthz.text) == (200, "ok")
        assert "NATS unreachable: live updates paused" in (await c.get("/incidents")).text
        t0 = time.monotonic()
        r = await c.post("/incidents/inc-b/note", data={"csrf": csrf, "reason": "vendor ticket"},
                         headers={"hx-request": "true"})
        assert time.monotonic() - t0 < 3
        assert r.status_code == 503 and "NATS is unreachable" in r.text and "\n" not in r.text.strip()
        nats_server.start()  # and back: readyz says so (and both clients can close)

        async def ready() -> bool:
            return (await c.get("/readyz")).status_code == 200

        await wait_until(ready, 15, "/readyz to say NATS is back")
        await asyncio.wait_for(bus.stream_messages(subjects.ACTIONS.name), 15)  # the test's own client is back


async def test_a_publish_nats_never_confirms_is_bounded_and_says_it_may_not_be_recorded(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url, timeout=10) as c:
        csrf = await login(c, "olga")

        async def hangs(_verb: str, _who: Any, _rec: Any) -> Any:
            await asyncio.Event().wait()

        run.console.publish, run.console.publish_timeout_s = hangs, 0.3
        with capture_logs() as logs:
            r = await c.post("/incidents/inc-b/note", data={"csrf": csrf, "reason": "vendor ticket"},
                             headers={"hx-request": "true"})
        assert r.status_code == 503 and "may not have been recorded; check the audit trail" in r.text
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["console_publish_failed"]


# -- 7: silence durations -----------------------------------------------------------------------------------------
async def test_a_silence_duration_that_is_not_a_finite_number_of_hours_in_range_is_a_one_line_400(
        nats_server: EmbeddedNats) -> None:
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url) as c:
        csrf = await login(c, "olga")
        for hours in ("nan", "inf", "-inf", "1e12", "-1", "721"):
            r = await c.post("/silences", headers={"hx-request": "true"},
                             data={"csrf": csrf, "cluster": "c1", "node": "gpu-node-001", "hours": hours,
                                   "reason": "maintenance"})
            assert r.status_code == 400, hours
            assert "silence duration must be between 0 and 30 days" in r.text, hours


# -- 8: live streams -------------------------------------------------------------------------------------------------
async def test_one_user_cannot_take_every_live_stream(nats_server: EmbeddedNats,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "MAX_LISTENERS", state_module.MAX_LISTENERS_PER_USER + 2)
    async with console(nats_server.url) as (run, _bus), httpx.AsyncClient(base_url=run.url) as vera, \
            httpx.AsyncClient(base_url=run.url) as olga, contextlib.AsyncExitStack() as streams:
        await login(vera, "vera")
        got = [(await streams.enter_async_context(vera.stream("GET", "/events"))).status_code
               for _ in range(state_module.MAX_LISTENERS)]
        assert got == [200] * state_module.MAX_LISTENERS_PER_USER + [429] * 2
        await login(olga, "olga")
        async with olga.stream("GET", "/events") as mine:
            assert mine.status_code == 200


# -- 9: identities are subject tokens ----------------------------------------------------------------------------------
async def test_console_identities_are_single_subject_tokens(nats_server: EmbeddedNats) -> None:
    with pytest.raises(ValidationError):
        UserEntry(name="jane.doe@corp", role="operator", token_hash=hash_token("t"))  # type: ignore[arg-type]
    lab = Auth(AuthConfig(mode="lab", lab_user="john.smith"), time.monotonic)
    s, _new = lab.session(None, {}, "127.0.0.1", "/")
    assert s is not None and s.who.user == "john_smith"
    assert user_from_creds(None, env={"USER": "john.smith"}) == "john_smith"
    trusted = {**PROXY, "proxy": {**PROXY["proxy"], "trusted": ["127.0.0.1/32"]}}  # type: ignore[dict-item]
    async with console(nats_server.url, AuthConfig.model_validate(trusted)) as (run, _bus), \
            httpx.AsyncClient(base_url=run.url) as c:
        with capture_logs() as logs:
            r = await c.get("/incidents", headers={"X-Forwarded-User": "jane.doe@corp", "X-Forwarded-Groups": "sre"})
        assert r.status_code == 403
        assert refusals(logs) == ["proxy user name is not one subject token (letters, digits, '-', '_')"]
