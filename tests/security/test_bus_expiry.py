"""Short-lived credentials for people, and revocations that do not grow for ever: a human's user JWT carries
``exp`` (24 h by default), a service's or a node's none; nats-server itself refuses an expired JWT and closes the
connection made with it; every rewrite of the account JWT drops the revocations of keys whose JWTs expired."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from breakfix.bus.authinit import (
    HUMAN_EXPIRY_S,
    PRUNE_MARGIN,
    BusAuthError,
    init_bus,
    issue_user,
    prune_revocations,
    refresh_roles,
    revoke_user,
)
from breakfix.bus.connect import BusRefused
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.nkeyjwt import jwt_claims
from breakfix.bus.options import NatsOptions
from tests.conftest import wait_until
from tests.security.conftest import SecureBus

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def creds_claims(path: Path) -> dict[str, Any]:
    return jwt_claims(path.read_text().splitlines()[1])


def account_nats(root: Path) -> dict[str, Any]:
    """The ``nats`` claims of the account JWT nats-server.conf preloads."""
    meta = json.loads((root / "bus.json").read_text())
    entry = f"  {meta['account']}: "
    line = next(x for x in (root / "nats-server.conf").read_text().splitlines() if x.startswith(entry))
    nats: dict[str, Any] = jwt_claims(json.loads(line[len(entry):]))["nats"]
    return nats


def bus_json(root: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((root / "bus.json").read_text())
    return meta


@pytest.fixture
def bus(tmp_path: Path) -> Path:
    init_bus(tmp_path / "bus", cluster="c1", monitor_port=0, now=T0)
    return tmp_path / "bus"


class TestExpiryClaim:
    @pytest.mark.parametrize("role", ["operator", "admin", "viewer"])
    def test_a_persons_credentials_expire_24h_after_issue_by_default(self, bus: Path, role: str) -> None:
        files = issue_user(bus, role=role, name="alice", now=T0)
        assert HUMAN_EXPIRY_S == 24 * 3600
        assert creds_claims(files.creds)["exp"] == int(T0.timestamp()) + 24 * 3600
        assert files.expires == T0 + timedelta(hours=24)
        assert bus_json(bus)["users"]["alice"]["expires"] == (T0 + timedelta(hours=24)).isoformat()

    @pytest.mark.parametrize(("role", "name"), [("node", "gpu-node-7"), ("fleet", "fleet-collector"),
                                                ("correlator", "correlator"), ("remediator", "remediator"),
                                                ("console", "console")])
    def test_a_service_or_node_credential_never_expires_by_default(self, bus: Path, role: str, name: str) -> None:
        files = issue_user(bus, role=role, name=name, now=T0)
        assert "exp" not in creds_claims(files.creds) and files.expires is None
        assert "expires" not in bus_json(bus)["users"][name]

    def test_an_explicit_expiry_overrides_the_roles_default_either_way(self, bus: Path) -> None:
        human = issue_user(bus, role="operator", name="alice", now=T0, expires_s=None)
        node = issue_user(bus, role="node", name="n1", now=T0, expires_s=7 * 86400)
        assert "exp" not in creds_claims(human.creds)
        assert creds_claims(node.creds)["exp"] == int(T0.timestamp()) + 7 * 86400

    @pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf")])
    def test_a_non_positive_or_non_finite_expiry_is_refused(self, bus: Path, bad: float) -> None:
        with pytest.raises(BusAuthError, match="positive"):
            issue_user(bus, role="operator", name="alice", now=T0, expires_s=bad)


H = 3600


class TestPruneTable:
    """``prune_revocations`` (pure): which revocations a rewrite of the account JWT keeps."""

    @pytest.mark.parametrize(("expires", "kept"), [
        (T0 - timedelta(days=1), False),                        # expired long ago: dropped
        (T0 - PRUNE_MARGIN - timedelta(seconds=1), False),      # expired, past the clock-skew margin: dropped
        (T0 - PRUNE_MARGIN + timedelta(seconds=1), True),       # expired, but within the margin: kept
        (T0, True),                                             # expiring now: kept
        (T0 + timedelta(hours=1), True),                        # not yet expired: kept
        (None, True),                                           # no expiry on record (a service): kept for ever
    ])
    def test_a_revoked_key_is_dropped_only_once_its_jwt_expired(self, expires: datetime | None, kept: bool) -> None:
        revocations = {"UKEY": int(T0.timestamp()) - 2 * 86400, "USERVICE": 1}
        revoked = {} if expires is None else {"UKEY": expires.isoformat()}
        got_revocations, got_revoked = prune_revocations(revocations, revoked, T0)
        assert ("UKEY" in got_revocations) is kept and ("UKEY" in got_revoked) is (kept and expires is not None)
        assert got_revocations["USERVICE"] == 1, "a key without a recorded expiry is never pruned"

    @pytest.mark.parametrize("unreadable", ["", "tomorrow", "2026-01-01T00:00:00"])  # naive: whose clock?
    def test_an_unreadable_expiry_is_never_pruned(self, unreadable: str) -> None:
        got, record = prune_revocations({"UKEY": 1}, {"UKEY": unreadable}, T0 + timedelta(days=3650))
        assert got == {"UKEY": 1} and record == {"UKEY": unreadable}


class TestPruneOnRewrite:
    def test_revoking_records_the_revoked_keys_expiry_and_a_later_rewrite_drops_it_once_expired(
            self, bus: Path) -> None:
        alice = issue_user(bus, role="operator", name="alice", now=T0, expires_s=H)
        key = creds_claims(alice.creds)["sub"]
        revoke_user(bus, name="alice", now=T0 + timedelta(minutes=1))
        assert key in account_nats(bus)["revocations"]
        assert bus_json(bus)["revoked"] == {key: (T0 + timedelta(hours=1)).isoformat()}
        issue_user(bus, role="node", name="n1", now=T0 + timedelta(minutes=2))
        revoke_user(bus, name="n1", now=T0 + timedelta(minutes=30))  # a rewrite before alice's JWT expired
        assert key in account_nats(bus)["revocations"], "not yet expired: still revoked"
        issue_user(bus, role="node", name="n2", now=T0 + timedelta(hours=2))
        issue_user(bus, role="node", name="n2", now=T0 + timedelta(hours=2))  # a re-issue rewrites the account
        revocations = account_nats(bus)["revocations"]
        assert key not in revocations and key not in bus_json(bus).get("revoked", {})
        assert len(revocations) == 2, "the nodes' revocations (no expiry) stay"

    def test_bus_roles_prunes_expired_revocations_too(self, bus: Path) -> None:
        issue_user(bus, role="viewer", name="vera", now=T0)
        issue_user(bus, role="viewer", name="vera", now=T0 + timedelta(minutes=1))  # the first key revoked
        first = next(iter(account_nats(bus)["revocations"]))
        refresh_roles(bus, now=T0 + timedelta(hours=23))
        assert first in account_nats(bus)["revocations"]
        refresh_roles(bus, now=T0 + timedelta(hours=25))
        assert first not in account_nats(bus)["revocations"] and first not in bus_json(bus).get("revoked", {})
        assert creds_claims(bus / "users" / "vera.creds")["sub"] == bus_json(bus)["users"]["vera"]["key"]

    def test_a_key_revoked_before_expiries_were_recorded_is_never_pruned(self, bus: Path) -> None:
        issue_user(bus, role="operator", name="alice", now=T0)
        meta = bus_json(bus)
        del meta["users"]["alice"]["expires"]  # as an older version wrote it
        (bus / "bus.json").write_text(json.dumps(meta))
        revoke_user(bus, name="alice", now=T0)
        refresh_roles(bus, now=T0 + timedelta(days=3650))
        assert meta["users"]["alice"]["key"] in account_nats(bus)["revocations"]


def _opts(secure: SecureBus, files: Any) -> NatsOptions:
    return NatsOptions(url=secure.server.url, creds=files.creds, tls_ca=files.ca, tls_cert=files.cert,
                       tls_key=files.key)


@pytest.mark.nats
async def test_the_server_closes_a_connection_when_its_jwt_expires_and_refuses_it_from_then_on(
        secure: SecureBus) -> None:
    files = issue_user(secure.root, role="operator", name="temp", now=datetime.now(UTC), expires_s=3)
    expires = files.expires
    assert expires is not None
    bus = await JetStreamBus.connect(_opts(secure, files), name="temp")  # valid until then
    ended: list[datetime] = []
    try:
        await bus.flush()

        async def closed_by_server() -> bool:
            # nats-py closes on the server's -ERR 'User Authentication Expired', or sees the socket end first
            if not bus._nc.is_connected:
                ended.append(datetime.now(UTC))
            return bool(ended)

        await wait_until(closed_by_server, 10, "the server to end the connection when its JWT expires")
    finally:
        await bus.close()
    # exp is whole seconds and the server's timer rounds to them: "at expiry" is within a second of it
    assert ended[0] >= expires - timedelta(seconds=1), f"ended at {ended[0]}, before the expiry {expires}"
    # the server's connect check is "now > exp" in whole seconds
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.1)
    with pytest.raises(BusRefused, match=r"(?i)authorization violation|authentication expired"):
        await JetStreamBus.connect(_opts(secure, files), name="temp")


@pytest.mark.nats
async def test_after_a_prune_the_server_still_refuses_a_revoked_key_that_has_not_expired(
        secure: SecureBus) -> None:
    now = datetime.now(UTC)
    # long expired: issued two days ago for an hour, revoked then (its revocation sits in the account JWT)
    issue_user(secure.root, role="viewer", name="old", now=now - timedelta(days=2), expires_s=H)
    revoke_user(secure.root, name="old", now=now - timedelta(days=2) + timedelta(minutes=1))
    old_key = next(iter(account_nats(secure.root)["revocations"]))
    stolen = issue_user(secure.root, role="operator", name="alice", now=now)  # 24 h: far from expired
    stolen_key = creds_claims(stolen.creds)["sub"]
    for path in (stolen.creds, stolen.cert, stolen.key):  # the thief's copy
        path.with_name("stolen-" + path.name).write_bytes(path.read_bytes())
    stolen_opts = _opts(secure, stolen).model_copy(update={
        "creds": stolen.creds.with_name("stolen-alice.creds"), "tls_cert": stolen.cert.with_name("stolen-alice.crt"),
        "tls_key": stolen.key.with_name("stolen-alice.key")})
    await (await JetStreamBus.connect(stolen_opts, name="alice")).close()
    fresh = issue_user(secure.root, role="operator", name="alice", now=datetime.now(UTC))  # rotation: a rewrite
    revocations = account_nats(secure.root)["revocations"]
    assert old_key not in revocations, "the expired key's revocation was pruned"
    assert stolen_key in revocations
    secure.server.reload()
    with pytest.raises(BusRefused, match=r"(?i)authorization violation"):
        await JetStreamBus.connect(stolen_opts, name="alice")
    await (await JetStreamBus.connect(_opts(secure, fresh), name="alice")).close()
