"""Set up a secured bus in one directory (``breakfix bus init``) and issue identities (``breakfix bus user``).

Why decentralized JWT auth with scoped signing keys: the server config names one operator and its
accounts, never a user. Each role (``bus.permissions``) is a signing key of the cluster's account
whose permission template names the user (``{{name()}}``); a node's credentials are a user JWT signed
by the ``node`` key. Adding the 10,001st node is ``breakfix bus user --node N``, with no server
config change and no reload. Revoking one is a new account JWT (``nats.revocations``).

Layout of the directory (secrets 0600 under ``keys/``):
``bus.json`` (cluster, public keys, each name's current user key and expiry under ``users``, the expiry of
revoked keys under ``revoked``), ``operator.jwt``, ``keys/*.nk`` (operator, accounts, role signing
keys), ``tls/ca.crt|ca.key|server.crt|server.key``, ``nats-server.conf`` (TLS with client
certificates required, operator mode with a preloaded MEMORY resolver, JetStream, monitor port on
loopback), and ``users/<name>.creds|.crt|.key`` written by ``issue_user``.

Expiry: a human's credentials (roles in ``HUMAN_ROLES``) carry a JWT ``exp``, 24 h by default; a service's
or a node's carry none (they are rotated by re-issue). Revocations would otherwise only grow: each rewrite of
the account JWT (a revocation, a re-issue, ``refresh_roles``) drops every revoked key whose JWT has expired
(``prune_revocations``), since the server refuses an expired JWT anyway. A revoked key whose expiry is not on
record (a service identity, or one revoked before expiries were recorded) stays revoked for ever.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import nkeys

from breakfix.bus import tls
from breakfix.bus.durable import replace_file
from breakfix.bus.nkeyjwt import (
    CredsError,
    Key,
    account_jwt,
    creds_text,
    encode_jwt,
    jwt_claims,
    operator_jwt,
    scoped_signing_key,
    user_jwt,
)
from breakfix.bus.permissions import ROLES, role_template
from breakfix.schemas import subjects

META = "bus.json"

HUMAN_ROLES: Final = ("operator", "admin", "viewer")  # people: short-lived credentials by default
HUMAN_EXPIRY_S: Final = 24 * 3600.0
PRUNE_MARGIN: Final = dt.timedelta(minutes=5)  # clock skew between this host and nats-server


class _Default(enum.Enum):
    ROLE = "role"


ROLE_DEFAULT: Final = _Default.ROLE  # ``issue_user(expires_s=...)``: the role's default expiry


def default_expiry_s(role: str) -> float | None:
    """How long credentials issued for ``role`` last by default: a day for a person, for ever for a service or
    a node (rotated by re-issue)."""
    return HUMAN_EXPIRY_S if role in HUMAN_ROLES else None


class BusAuthError(ValueError):
    """A refusal with one line for the operator (exists already, unknown role, bad name)."""


@dataclass(frozen=True, slots=True)
class UserFiles:
    creds: Path
    cert: Path
    key: Path
    ca: Path
    revoked: str = ""  # the user key of the credentials this issue replaced and revoked
    expires: dt.datetime | None = None  # when the credentials stop connecting (None: never)


def _secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def _conf_str(value: str) -> str:
    return json.dumps(value)  # nats-server's config accepts JSON strings


def server_config(root: Path, *, operator_jwt_path: Path, system: str, preload: dict[str, str], listen: str,
                  monitor_port: int, store_dir: Path, server_name: str) -> str:
    lines = [
        "# Written by 'breakfix bus init'. Users are not listed here: their JWTs are signed by the",
        "# account's scoped signing keys, so adding a node needs no change to this file.",
        f"server_name: {_conf_str(server_name)}",
        f"listen: {_conf_str(listen)}",
    ]
    if monitor_port:
        lines.append(f"http: {_conf_str(f'127.0.0.1:{monitor_port}')}  # monitoring on loopback only")
    lines += [
        f"operator: {_conf_str(str(operator_jwt_path))}",
        f"system_account: {system}",
        "resolver: MEMORY",
        "resolver_preload: {",
        *[f"  {pub}: {_conf_str(token)}" for pub, token in preload.items()],
        "}",
        f"jetstream: {{ store_dir: {_conf_str(str(store_dir))}, max_memory_store: 256MB, max_file_store: 50GB }}",
        "tls {",
        f"  cert_file: {_conf_str(str(root / 'tls' / 'server.crt'))}",
        f"  key_file: {_conf_str(str(root / 'tls' / 'server.key'))}",
        f"  ca_file: {_conf_str(str(root / 'tls' / 'ca.crt'))}",
        "  verify: true  # every client presents a certificate from this CA",
        "  timeout: 2",
        "}",
        "max_payload: 1MB",
    ]
    return "\n".join(lines) + "\n"


def _cluster_account(account: Key, cluster: str, operator: Key, signers: dict[str, Key]) -> str:
    """The cluster's account JWT: one scoped signing key per role, with this version's permission template."""
    return account_jwt(account, cluster, operator, signing_keys=[
        scoped_signing_key(signers[role], role, role_template(role, cluster)) for role in ROLES])


def init_bus(root: Path, *, cluster: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
             listen: str = "0.0.0.0:4222", monitor_port: int = 8222, store_dir: Path | None = None,
             force: bool = False, now: dt.datetime) -> Path:
    """Create operator, accounts, role signing keys, CA and server certificate, and the server config;
    returns the config's path. Refuses to overwrite an existing set unless ``force``."""
    if subjects.token(cluster) != cluster:
        raise BusAuthError(f"cluster {cluster!r} is not a subject token (letters, digits, '-', '_')")
    root = root.resolve()
    if (root / META).exists() and not force:
        raise BusAuthError(f"{root / META} exists; use --force to replace every key (all credentials change)")
    operator, system, account = Key.new("operator"), Key.new("account"), Key.new("account")
    signers = {role: Key.new("account") for role in ROLES}
    op_jwt = operator_jwt(operator, f"breakfix-{cluster}", system_account=system.public)
    sys_jwt = account_jwt(system, "SYS", operator, jetstream=False)
    app_jwt = _cluster_account(account, cluster, operator, signers)
    root.mkdir(parents=True, exist_ok=True)
    (root / "operator.jwt").write_text(op_jwt + "\n")
    for name, key in [("operator", operator), ("system", system), ("account", account),
                      *[(f"role-{r}", k) for r, k in signers.items()]]:
        _secret(root / "keys" / f"{name}.nk", key.seed + "\n")
    (root / "tls").mkdir(exist_ok=True)
    ca = tls.new_ca(f"breakfix {cluster} bus CA", now=now)
    tls.write(ca, root / "tls" / "ca.crt", root / "tls" / "ca.key")
    tls.write(tls.issue(ca, f"nats.{cluster}", server=True, hosts=hosts, now=now),
              root / "tls" / "server.crt", root / "tls" / "server.key")
    conf = root / "nats-server.conf"
    conf.write_text(server_config(root, operator_jwt_path=root / "operator.jwt", system=system.public,
                                  preload={system.public: sys_jwt, account.public: app_jwt}, listen=listen,
                                  monitor_port=monitor_port, store_dir=store_dir or root / "jetstream",
                                  server_name=f"breakfix-{cluster}"))
    (root / META).write_text(json.dumps({
        "cluster": cluster, "operator": operator.public, "system_account": system.public,
        "account": account.public, "signing_keys": {r: k.public for r, k in signers.items()},
        "hosts": list(hosts)}, indent=2) + "\n")
    return conf


def _atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole and durably (``bus.durable``), its permission bits kept."""
    replace_file(path, text, mode=path.stat().st_mode & 0o777)


@dataclass(frozen=True)
class _Account:
    """A bus directory's account, as ``nats-server.conf`` preloads it: what re-signing it needs."""

    root: Path
    conf: Path
    cluster: str
    meta: dict[str, Any]
    operator: Key
    account: Key
    lines: list[str]
    at: int  # the account's line in ``resolver_preload``
    claims: dict[str, Any]  # its current JWT's claims

    def write(self, nats: dict[str, Any]) -> None:
        """Re-sign the account with these ``nats`` claims (name kept) and replace its preload entry atomically."""
        token = encode_jwt({"sub": self.account.public, "name": self.claims.get("name", self.cluster),
                            "nats": nats}, self.operator)
        lines = list(self.lines)
        lines[self.at] = f"  {self.account.public}: {_conf_str(token)}\n"
        _atomic(self.conf, "".join(lines))


def _load_account(root: Path) -> _Account:
    root = root.resolve()
    conf = root / "nats-server.conf"
    if not (root / META).is_file() or not conf.is_file():
        raise BusAuthError(f"{root / META} or {conf} not found; run 'breakfix bus init --dir {root}' first")
    keys = root / "keys"
    try:
        meta = json.loads((root / META).read_text())
        cluster, account_pub, operator_pub = str(meta["cluster"]), meta["account"], meta["operator"]
        operator = Key.from_seed((keys / "operator.nk").read_text())
        account = Key.from_seed((keys / "account.nk").read_text())
    except (ValueError, KeyError, TypeError, nkeys.NkeysError) as exc:
        raise BusAuthError(f"{root}: not a bus written by 'breakfix bus init' ({type(exc).__name__}: {exc})") from None
    if (operator.public, account.public) != (operator_pub, account_pub):
        raise BusAuthError(f"{keys}: the operator or account key is not the one {root / META} names")
    entry = f"  {account.public}: "
    lines = conf.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.startswith(entry)]
    if len(at) != 1:
        raise BusAuthError(f"{conf}: no single resolver_preload entry for account {account.public}")
    try:
        current = jwt_claims(json.loads(lines[at[0]][len(entry):]))
    except (ValueError, CredsError) as exc:
        raise BusAuthError(f"{conf}: the account's entry is not a JWT: {exc}") from None
    return _Account(root, conf, cluster, meta, operator, account, lines, at[0], current)


def refresh_roles(root: Path, *, now: dt.datetime) -> Path:
    """Re-sign the cluster's account with this version's role permissions (``breakfix bus roles``), keeping
    every key, so every issued credential stays valid; a role this version added gets its signing key.

    The account's other claims are carried over from the JWT in ``nats-server.conf`` (revocations, limits an
    operator tuned): only its role signing keys and their templates change, and revocations of keys whose JWTs
    have all expired by ``now`` are dropped (``prune_revocations``). Only the account's entry in
    ``resolver_preload`` is rewritten (listen address, TLS and store stay as written), atomically; returns the
    config's path. nats-server applies it on a reload or restart.
    """
    acct = _load_account(root)
    keys = acct.root / "keys"
    fresh: dict[str, Key] = {}  # roles added since 'bus init': written only once everything else checked out
    signers: dict[str, Key] = {}
    for role in ROLES:
        path = keys / f"role-{role}.nk"
        if path.is_file():
            signers[role] = Key.from_seed(path.read_text())
        else:
            signers[role] = fresh[role] = Key.new("account")
    claims = jwt_claims(_cluster_account(acct.account, acct.cluster, acct.operator, signers))
    raw = acct.claims.get("nats")
    kept: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    revoked = _revoked_record(acct.meta)
    if isinstance(kept.get("revocations"), dict):
        kept["revocations"], revoked = prune_revocations(kept["revocations"], revoked, now)
    for role, key in fresh.items():
        _secret(keys / f"role-{role}.nk", key.seed + "\n")
    acct.write({**claims["nats"], **kept, "signing_keys": claims["nats"]["signing_keys"]})  # revocations etc. stay
    meta = _with_revoked(dict(acct.meta), revoked)
    meta["signing_keys"] = {r: k.public for r, k in signers.items()}
    _atomic(acct.root / META, json.dumps(meta, indent=2) + "\n")
    return acct.conf


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat()


def _parse_iso(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None  # a naive time is no expiry we can trust


def prune_revocations(revocations: dict[str, Any], revoked: dict[str, str], now: dt.datetime,
                      margin: dt.timedelta = PRUNE_MARGIN) -> tuple[dict[str, Any], dict[str, str]]:
    """The account's ``nats.revocations`` and bus.json's ``revoked`` record (user key -> expiry of its JWT, ISO)
    without the keys whose JWT expired more than ``margin`` before ``now``: nats-server refuses those JWTs
    anyway, so their revocation is dead weight in the account JWT. A key whose expiry is not on record, or
    not readable, is kept (revoked for ever). Pure: nothing read or written."""
    expired = {pub for pub, iso in revoked.items()
               if (when := _parse_iso(iso)) is not None and when + margin < now}
    return ({pub: at for pub, at in revocations.items() if pub not in expired},
            {pub: iso for pub, iso in revoked.items() if pub not in expired})


def _revoked_record(meta: dict[str, Any]) -> dict[str, str]:
    raw = meta.get("revoked")
    return {str(k): v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) else {}


def _with_revoked(meta: dict[str, Any], revoked: dict[str, str]) -> dict[str, Any]:
    meta = {k: v for k, v in meta.items() if k != "revoked"}
    if revoked:
        meta["revoked"] = revoked
    return meta


def _revoke(acct: _Account, pubs: dict[str, str | None], now: dt.datetime) -> dict[str, str]:
    """Add ``nats.revocations`` for these user keys (JWTs issued up to ``now`` no longer connect; a live
    connection is closed when the server applies it), every other claim kept, and drop the revocations whose
    JWTs have all expired (``prune_revocations``). ``pubs`` maps each key to its JWT's expiry (ISO) or None.
    Returns bus.json's new ``revoked`` record for the caller to write."""
    raw = acct.claims.get("nats")
    nats: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    revocations = dict(nats.get("revocations") or {})
    revoked = _revoked_record(acct.meta)
    for pub, expires in pubs.items():
        revocations[pub] = int(now.timestamp()) + 1  # "issued at or before": our JWTs' iat is whole seconds
        if isinstance(expires, str) and expires:
            revoked[pub] = expires
    nats["revocations"], revoked = prune_revocations(revocations, revoked, now)
    acct.write(nats)
    return revoked


def revoke_user(root: Path, *, name: str, now: dt.datetime) -> Path:
    """Revoke the credentials last issued to ``name`` (``breakfix bus revoke``): their user key goes into the
    account's revocations, and ``name`` has no valid credentials until it is issued new ones. Returns the config
    nats-server must reload."""
    acct = _load_account(root)
    users = dict(acct.meta.get("users") or {})
    current = users.pop(name, None)
    if not isinstance(current, dict) or not current.get("key"):
        raise BusAuthError(f"no credentials issued to {name!r} are on record in {acct.root / META}")
    revoked = _revoke(acct, {str(current["key"]): current.get("expires")}, now)
    _atomic(acct.root / META, json.dumps(_with_revoked({**acct.meta, "users": users}, revoked), indent=2) + "\n")
    return acct.conf


def issue_user(root: Path, *, role: str, name: str, now: dt.datetime, out_dir: Path | None = None,
               expires_s: float | Literal[_Default.ROLE] | None = ROLE_DEFAULT) -> UserFiles:
    """Credentials (user JWT + seed) and a client certificate for ``name`` in ``role``. The JWT expires
    ``expires_s`` after ``now`` (the role's default: ``default_expiry_s``; None: never)."""
    if role not in ROLES:
        raise BusAuthError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if expires_s is ROLE_DEFAULT:
        expires_s = default_expiry_s(role)
    if expires_s is not None and not (math.isfinite(expires_s) and expires_s > 0):
        raise BusAuthError(f"expiry {expires_s!r} s: give a positive number of seconds, or none")
    expires = None if expires_s is None else \
        dt.datetime.fromtimestamp(math.ceil(now.timestamp() + expires_s), dt.UTC)
    if not name or subjects.token(name) != name or len(name) > 128:
        raise BusAuthError(f"name {name!r} must be one subject token (letters, digits, '-', '_'), at most 128")
    root = root.resolve()
    if not (root / META).is_file():
        raise BusAuthError(f"{root / META} not found; run 'breakfix bus init --dir {root}' first")
    meta = json.loads((root / META).read_text())
    account = Key.from_seed((root / "keys" / "account.nk").read_text())
    signer = Key.from_seed((root / "keys" / f"role-{role}.nk").read_text())
    user = Key.new("user")
    token = user_jwt(user, name, account=account, signer=signer, tags=[f"role:{role}", f"cluster:{meta['cluster']}"],
                     expires_at=None if expires is None else int(expires.timestamp()))
    out = (out_dir or root / "users").resolve()
    files = UserFiles(out / f"{name}.creds", out / f"{name}.crt", out / f"{name}.key", root / "tls" / "ca.crt",
                      expires=expires)
    _secret(files.creds, creds_text(token, user))
    ca = tls.read(root / "tls" / "ca.crt", root / "tls" / "ca.key")
    tls.write(tls.issue(ca, f"{role}:{name}", server=False, now=now), files.cert, files.key)
    # a re-issue replaces the name's credentials: the old ones are revoked (a rotation after a stolen .creds must
    # actually end it); bus.json keeps each name's current user key for that and for 'breakfix bus revoke'
    users = dict(meta.get("users") or {})
    previous = users.get(name)
    users[name] = {"role": role, "key": user.public, "issued": now.isoformat(),
                   **({"expires": _iso(expires)} if expires is not None else {})}
    if isinstance(previous, dict) and previous.get("key") and previous["key"] != user.public \
            and (root / "nats-server.conf").is_file():
        revoked = _revoke(_load_account(root), {str(previous["key"]): previous.get("expires")}, now)
        meta = _with_revoked(meta, revoked)
        files = replace(files, revoked=str(previous["key"]))
    _atomic(root / META, json.dumps({**meta, "users": users}, indent=2) + "\n")
    return files
