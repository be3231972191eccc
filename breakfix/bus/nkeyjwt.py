"""NATS decentralized-auth JWTs and .creds files, built with ``nkeys`` only.

The ``nats-jwt`` package writes account JWTs nats-server 2.15 rejects (signing keys as an object,
``memory_storage``); the claims here follow the server's own schema (nats-io/jwt v2): header
``{"typ":"JWT","alg":"ed25519-nkey"}``, base64url without padding, an ed25519 signature by the
issuer's nkey, and a ``nats`` object typed operator, account or user. Measured recipe:
``shared/reference/platform_facts.md`` section 1 (copied here, not read at run time).
Used by ``bus.authinit`` (``breakfix bus init`` / ``breakfix bus user``); read by ``bus.connect``
(the user name in a .creds file sets the client's private inbox prefix).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}

PREFIXES = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
            "user": nkeys.PREFIX_BYTE_USER}


class CredsError(ValueError):
    """A .creds file or JWT that cannot be read."""


@dataclass(frozen=True, slots=True)
class Key:
    """One nkey: ``seed`` is the secret (``S…``), ``public`` the identity (``O…``, ``A…``, ``U…``)."""

    seed: str
    public: str

    @classmethod
    def new(cls, kind: str) -> Key:
        seed = nkeys.encode_seed(os.urandom(32), PREFIXES[kind])
        return cls.from_seed(seed.decode())

    @classmethod
    def from_seed(cls, seed: str) -> Key:
        kp = nkeys.from_seed(seed.strip().encode())
        return cls(seed=seed.strip(), public=kp.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(self.seed.encode()).sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], signer: Key) -> str:
    """Sign ``claims`` (``iat`` and ``jti`` added) with ``signer``; ``iss`` is the signer's public key."""
    body = {**claims, "iss": signer.public, "iat": int(time.time())}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode()
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    sig = _b64(signer.sign(f"{head}.{payload}".encode()))
    return f"{head}.{payload}.{sig}"


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies; we only read names)."""
    try:
        claims = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError) as exc:
        raise CredsError(f"not a JWT: {exc}") from None
    if not isinstance(claims, dict):
        raise CredsError("JWT claims are not an object")
    return claims


def operator_jwt(operator: Key, name: str, *, system_account: str) -> str:
    return encode_jwt({"sub": operator.public, "name": name,
                       "nats": {"type": "operator", "version": 2, "system_account": system_account}}, operator)


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
             "leaf": -1}
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def account_jwt(account: Key, name: str, operator: Key, *, signing_keys: list[dict[str, Any]] | None = None,
                jetstream: bool = True) -> str:
    """An account; ``signing_keys`` are scoped ``user_scope`` entries (``role`` + permission ``template``)."""
    nats: dict[str, Any] = {"type": "account", "version": 2,
                            "limits": {**UNLIMITED, **(JETSTREAM if jetstream else {})}}
    if signing_keys:
        nats["signing_keys"] = signing_keys
    return encode_jwt({"sub": account.public, "name": name, "nats": nats}, operator)


def scoped_signing_key(key: Key, role: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "user_scope", "key": key.public, "role": role, "template": template}


def user_jwt(user: Key, name: str, *, account: Key, signer: Key, tags: list[str] | None = None,
             permissions: dict[str, Any] | None = None, expires_at: int | None = None) -> str:
    """A user. Signed by a scoped signing key it must carry no permissions (the key's template
    applies); signed by the account key itself it carries ``permissions``. ``expires_at`` (seconds since
    the epoch) is the standard ``exp`` claim: nats-server refuses the JWT from then on and closes a
    connection made with it when it passes; None: no ``exp``, the JWT never expires."""
    nats: dict[str, Any] = {"type": "user", "version": 2, "tags": tags or []}
    if signer.public != account.public:
        nats["issuer_account"] = account.public
    if permissions:
        nats.update(permissions)
    claims: dict[str, Any] = {"sub": user.public, "name": name, "nats": nats}
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    return encode_jwt(claims, signer)


def creds_text(jwt: str, user: Key) -> str:
    """The .creds layout nats-py reads: 5 dashes on BEGIN lines, 6 on END lines."""
    return ("-----BEGIN NATS USER JWT-----\n" f"{jwt}\n" "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n" f"{user.seed}\n" "------END USER NKEY SEED------\n")


def creds_user_name(path: Path) -> str:
    """The user name in a .creds file's JWT (``CredsError`` when unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1].strip()
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise CredsError(f"{path}: not a NATS .creds file ({type(exc).__name__})") from None
    name = jwt_claims(token).get("name")
    if not isinstance(name, str) or not name:
        raise CredsError(f"{path}: the user JWT has no name")
    return name
