"""Who may use the console: the auth config, sessions that expire, CSRF tokens, and logged refusals.

Modes (``--auth FILE``, YAML, validated at start-up):
- ``users``: built-in users with argon2-hashed tokens (``breakfix console-token`` makes one);
- ``proxy``: an authenticating proxy (oauth2-proxy style) sets ``X-Forwarded-User`` and
  ``X-Forwarded-Groups``; headers are trusted only from the configured proxy addresses and the
  groups map to roles;
- ``lab`` (no file): the local user as admin, allowed only when listening on loopback and only for
  requests whose Host is a loopback name, writes only from the console's own pages (``check_lab``).
Roles: viewer reads; operator approves, acks, silences, notes, assigns, releases, cancels; admin
also resets the breaker and flips kill switches. Every refusal is logged (``console_refused``).
User names are single subject tokens (letters, digits, ``-``, ``_``): the remediator acts on a verb only
when its actor is exactly the user its subject names. Tokens are checked with argon2 off the event loop,
a few at a time, and an unknown name costs one verification too, so timing does not tell names apart. An address
with ``MAX_LOGIN_FAILURES`` failed logins within a minute is refused (429) without a check until they age out. The
address is the socket's peer, or, when the peer is one of ``forwarded_by`` (the ingress or reverse proxy in front),
the client that proxy names in ``X-Forwarded-For`` (``client_address``), so one client's guessing does not lock
every user behind the proxy out.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import structlog
import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from breakfix.console.verbs import Identity, Role
from breakfix.schemas import subjects
from breakfix.schemas.datafile import DataFileError

log = structlog.get_logger("breakfix.console.auth")
COOKIE = "bf_session"
MAX_SESSIONS = 10_000
MAX_VERIFYING = 4  # argon2 verifications at once (64 MiB and ~0.1 s of CPU each)
MAX_LOGIN_FAILURES = 20  # failed logins from one address within LOGIN_WINDOW_S; then refused without a check
LOGIN_WINDOW_S = 60.0
MAX_REMOTES = 10_000  # addresses whose failures are remembered (the oldest forgotten first)
MAX_FORWARDED_CHARS = 2048  # an X-Forwarded-For longer than this is read from its last hops only
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HASHER = PasswordHasher()


class UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")  # one subject token
    role: Role
    token_hash: str = Field(pattern=r"^\$argon2")


class ProxySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trusted: list[str] = Field(min_length=1, description="Proxy addresses or networks (CIDR).")
    user_header: str = "X-Forwarded-User"
    groups_header: str = "X-Forwarded-Groups"
    groups: dict[str, Role] = Field(default_factory=dict, description="Group -> role; the highest wins.")
    default_role: Role | None = None

    @field_validator("trusted")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        return _networks(v)


def _networks(v: list[str]) -> list[str]:
    for n in v:
        ipaddress.ip_network(n, strict=False)
    return v


def client_address(peer: str, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The address a request counts as for login limits and logs: ``peer``, unless ``peer`` is one of ``proxies``
    and ``X-Forwarded-For`` names a hop that is not: then the rightmost such hop (the one the nearest trusted proxy
    appended; hops to its left are whatever the client sent, so a client cannot pick its own address). A
    malformed hop where a trusted proxy's would be leaves ``peer``: every client behind it shares one limit, as
    without the setting."""
    if not proxies or not forwarded_for or not _within(peer, proxies):
        return peer
    for hop in reversed(forwarded_for[-MAX_FORWARDED_CHARS:].split(",")):
        hop = hop.strip()
        if not _within(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(addr in n for n in networks)


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["users", "proxy", "lab"]
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0, le=7 * 86400)
    users: list[UserEntry] = Field(default_factory=list)
    proxy: ProxySpec | None = None
    lab_user: str = "lab"
    forwarded_by: list[str] = Field(default_factory=list, description=(
        "Addresses or networks (CIDR) of the ingress or reverse proxy in front of the console: from them, the client "
        "named in X-Forwarded-For is the address login limits and logs count, not the proxy's."))

    @field_validator("forwarded_by")
    @classmethod
    def _forwarders(cls, v: list[str]) -> list[str]:
        return _networks(v)

    def forwarders(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.forwarded_by)

    def model_post_init(self, _ctx: object) -> None:
        if self.mode == "users" and not self.users:
            raise ValueError("mode users needs at least one user")
        if self.mode == "proxy" and self.proxy is None:
            raise ValueError("mode proxy needs a proxy section")


def load_auth(path: Path) -> AuthConfig:
    try:
        data = yaml.safe_load(path.read_text())
        return AuthConfig.model_validate(data)
    except OSError as exc:
        raise DataFileError(str(path), 1, str(exc.strerror)) from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", 0) + 1
        raise DataFileError(str(path), line, f"not YAML: {exc}") from None
    except (ValidationError, ValueError) as exc:
        raise DataFileError(str(path), 1, " ".join(x.strip() for x in str(exc).splitlines()[:3])) from None


def hash_token(token: str) -> str:
    return _HASHER.hash(token)


def new_token() -> str:
    return secrets.token_urlsafe(24)


@functools.cache
def _dummy_hash() -> str:
    """What an unknown name's token is checked against, so that it costs what a known name's does."""
    return _HASHER.hash(secrets.token_urlsafe(24))


def _verify(token_hash: str, token: str) -> bool:
    try:
        return _HASHER.verify(token_hash, token)
    except (VerificationError, InvalidHashError):
        return False


def loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``[::1]`` with or without its brackets)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _authority(url: str) -> str:
    """``host:port`` of an Origin or Referer URL (``null`` and junk: "")."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return ""


def host_of(authority: str) -> str:
    """The host of a ``Host`` header or a URL's authority, without its port (``[::1]:8080`` -> ``::1``)."""
    try:
        return (urlsplit(f"//{authority}").hostname or "").lower()
    except ValueError:
        return ""


@dataclass
class Session:
    sid: str
    who: Identity
    csrf: str
    expires: float


@dataclass
class Refusal(Exception):
    status: int
    reason: str


@dataclass
class Auth:
    """Sessions in memory (a restart logs everyone out); ``clock`` is monotonic seconds."""

    config: AuthConfig
    clock: Callable[[], float]
    sessions: dict[str, Session] = field(default_factory=dict)
    refusals: int = 0
    verifying: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_VERIFYING))
    failures: dict[str, list[float]] = field(default_factory=dict)  # remote -> times of its recent failed logins
    forwarders: tuple[Network, ...] = ()  # config.forwarded_by, parsed once

    def __post_init__(self) -> None:
        self.forwarders = self.config.forwarders()

    def client(self, peer: str, forwarded_for: str | None) -> str:
        """The address login limits and refusal logs count for a request from ``peer`` (``client_address``)."""
        return client_address(peer, forwarded_for, self.forwarders)

    def refuse(self, status: int, reason: str, *, user: str = "-", path: str = "-", remote: str = "-") -> Refusal:
        self.refusals += 1
        log.warning("console_refused", reason=reason, user=user, path=path, remote=remote, status=status)
        return Refusal(status, reason)

    def _new(self, who: Identity) -> Session:
        now = self.clock()
        if len(self.sessions) >= MAX_SESSIONS:
            for sid in [s.sid for s in self.sessions.values() if s.expires <= now] or list(self.sessions)[:100]:
                self.sessions.pop(sid, None)
        s = Session(secrets.token_urlsafe(32), who, secrets.token_urlsafe(32), now + self.config.session_ttl_s)
        self.sessions[s.sid] = s
        return s

    async def login(self, name: str, token: str, *, remote: str) -> Session:
        """Users mode: a session for a name and its token, or a logged refusal. argon2 runs in a thread
        (it would stall every page for ~0.1 s), and an unknown name is checked against a dummy hash."""
        now = self.clock()
        recent = [t for t in self.failures.get(remote, ()) if now - t < LOGIN_WINDOW_S]
        if len(recent) >= MAX_LOGIN_FAILURES:  # guessing, or a script gone wrong: no argon2 check for it (the few
            # checks at once are everyone's logins)
            raise self.refuse(429, "too many failed logins from this address", user=name[:100] or "-", path="/login",
                              remote=remote)
        # counted as failed before the check, with no await in between: attempts from one address that run at once
        # all see each other, so a burst cannot take the checks before its failures are counted; a success clears it
        self.failures.pop(remote, None)  # re-inserted last: the dict stays in order of the latest attempt
        self.failures[remote] = [*recent, now]
        while len(self.failures) > MAX_REMOTES:
            self.failures.pop(next(iter(self.failures)))
        user = next((u for u in self.config.users if secrets.compare_digest(u.name.encode(), name.encode())), None)
        dummy = await asyncio.to_thread(_dummy_hash)  # made once
        token_hash = user.token_hash if user is not None else dummy
        async with self.verifying:
            ok = await asyncio.to_thread(_verify, token_hash, token)
        if user is not None and ok:
            self.failures.pop(remote, None)
            return self._new(Identity(user.name, user.role))
        raise self.refuse(401, "bad name or token", user=name[:100] or "-", path="/login", remote=remote)

    def logout(self, sid: str | None) -> None:
        if sid:
            self.sessions.pop(sid, None)

    def _proxy_identity(self, headers: dict[str, str], remote: str, path: str) -> Identity | None:
        spec = self.config.proxy
        assert spec is not None
        user = headers.get(spec.user_header.lower(), "").strip()
        if not user:
            return None
        try:
            addr = ipaddress.ip_address(remote)
            trusted = any(addr in ipaddress.ip_network(n, strict=False) for n in spec.trusted)
        except ValueError:
            trusted = False
        if not trusted:
            raise self.refuse(403, "proxy headers from an untrusted address", user=user[:100], path=path,
                              remote=remote)
        roles = [spec.groups[g.strip()] for g in headers.get(spec.groups_header.lower(), "").split(",")
                 if g.strip() in spec.groups]
        role = max(roles, key=lambda r: r.rank) if roles else spec.default_role
        if role is None:
            raise self.refuse(403, "no group maps to a role", user=user[:100], path=path, remote=remote)
        if subjects.token(user) != user or len(user) > 100:  # verbs name it on their subject, exactly
            raise self.refuse(403, "proxy user name is not one subject token (letters, digits, '-', '_')",
                              user=user[:100], path=path, remote=remote)
        return Identity(user, role)

    def session(self, sid: str | None, headers: dict[str, str], remote: str, path: str) -> tuple[Session | None, bool]:
        """The request's session (and whether it is new, so the cookie must be set); None: log in first."""
        now = self.clock()
        current = self.sessions.get(sid or "")
        if current is not None and current.expires <= now:
            self.sessions.pop(current.sid, None)
            self.refuse(401, "session expired", user=current.who.user, path=path, remote=remote)
            current = None
        if self.config.mode == "users":
            return current, False
        who = (self._proxy_identity(headers, remote, path) if self.config.mode == "proxy"
               else Identity(subjects.token(self.config.lab_user), Role.ADMIN))
        if who is None:
            raise self.refuse(401, "no user from the proxy", path=path, remote=remote)
        if current is not None and current.who == who:
            return current, False
        return self._new(who), True

    def check_lab(self, *, host: str, origin: str | None, write: bool, path: str, remote: str) -> None:
        """Lab mode: every visitor is the admin, so only the console's own loopback pages may be. A Host
        that is not a loopback name is a DNS-rebound page (its own name resolving to 127.0.0.1), and a
        write whose Origin (else Referer) is not this Host came from another page."""
        if self.config.mode != "lab":
            return
        if not loopback(host_of(host)):
            raise self.refuse(400, "Host is not a loopback name (lab mode)", path=path, remote=remote)
        if write and origin is not None and _authority(origin) != host.lower():
            raise self.refuse(403, "write from another origin (lab mode)", path=path, remote=remote)

    def check_write(self, s: Session | None, csrf: str | None, *, verb: str, path: str, remote: str) -> Session:
        from breakfix.console.verbs import may

        if s is None:
            raise self.refuse(401, "not logged in", path=path, remote=remote)
        if not csrf or not secrets.compare_digest(csrf.encode(), s.csrf.encode()):
            raise self.refuse(403, "missing or wrong CSRF token", user=s.who.user, path=path, remote=remote)
        if not may(s.who.role, verb):
            raise self.refuse(403, f"role {s.who.role.value} may not {verb}", user=s.who.user, path=path,
                              remote=remote)
        return s
