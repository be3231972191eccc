"""Opening a NATS connection: bounded, stop-aware, logged. Used by ``JetStreamBus.connect``.

One attempt is bounded by ``attempt_timeout_s``; a CLI command makes one attempt and fails with a
one-line ``BusConnectError``. A daemon passes its stop event: transient failures are retried with
backoff by ``bus.retry.retry_connect`` (one log line per attempt) and SIGTERM ends the wait at once
(``ConnectAborted``). Once connected, nats-py reconnects by itself for ever; its ``error_cb``,
``disconnected_cb`` and ``reconnected_cb`` log through structlog (``breakfix.bus``), which is also
where a server-side permission violation shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable
from typing import Any, TypeVar

import nats.errors
import structlog
from nats.aio.client import Client

from breakfix.bus.nkeyjwt import CredsError, creds_user_name
from breakfix.bus.options import NatsOptions
from breakfix.bus.retry import ConnectAborted, retry_connect, transient_connect_error

log = structlog.get_logger("breakfix.bus")
T = TypeVar("T")

ATTEMPT_TIMEOUT_S = 4.0
RECONNECT_WAIT_S = 0.5


class BusConnectError(Exception):
    """Could not connect; ``str()`` is one line for an operator."""


class BusUnavailable(BusConnectError, ConnectionError):
    """The server did not answer (down, unreachable, slow): worth retrying."""


class BusRefused(BusConnectError):
    """The server or our own files refused the connection (credentials, TLS): retrying cannot help."""


# What talking to NATS can raise once connected or while connecting, for callers that turn any of it into
# one line for a human (the on-call CLI, the console); nothing outside breakfix.bus imports nats for this.
BUS_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, nats.errors.Error, BusConnectError)


class ConnectionEvents:
    """nats-py's callbacks: silent while connecting (the caller reports the failure), logged after."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url
        self.nc: Client | None = None
        self.connected = False
        self.last_error: BaseException | None = None
        self.violations: set[str] = set()  # subjects the server refused us, lower case as it reports them
        self.user: str | None = None  # the identity's name from its .creds (None on an open bus)

    def denied(self, subject: str) -> bool:
        """Whether the server refused us ``subject`` (a permissions violation: retrying cannot help)."""
        return subject.lower() in self.violations

    async def error(self, exc: Exception) -> None:
        self.last_error = exc
        text = str(exc)
        if "permissions violation" in text and '"' in text and len(self.violations) < 1000:
            self.violations.add(text.split('"')[1].lower())
        if self.connected:
            log.warning("nats_error", client=self.name, url=self.url, error=str(exc) or repr(exc))

    async def disconnected(self) -> None:
        if self.connected and not (self.nc is not None and self.nc.is_closed):  # not our own close()
            log.warning("nats_disconnected", client=self.name, url=self.url)

    async def reconnected(self) -> None:
        log.info("nats_reconnected", client=self.name, url=self.url)


def _one_line(exc: BaseException) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text[:300]


async def open_client(opts: NatsOptions, *, name: str,
                      attempt_timeout_s: float = ATTEMPT_TIMEOUT_S) -> tuple[Client, ConnectionEvents]:
    """One bounded connect attempt; raises ``BusUnavailable`` or ``BusRefused``. The events object
    logs what happens to the connection and remembers which subjects the server refused."""
    if opts.creds is not None and not opts.creds.is_file():
        raise BusRefused(f"NATS credentials file {opts.creds} does not exist")
    try:
        tls = opts.tls_context()
    except (OSError, ssl.SSLError) as exc:
        raise BusRefused(f"NATS TLS files: {_one_line(exc)}") from None
    cb = ConnectionEvents(name, opts.url)
    kwargs: dict[str, Any] = {
        "servers": opts.servers, "name": name, "connect_timeout": min(2.0, attempt_timeout_s),
        # one pass over the servers, no reconnect loop inside nats-py while connecting
        "allow_reconnect": False, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.1,
        "error_cb": cb.error, "disconnected_cb": cb.disconnected, "reconnected_cb": cb.reconnected,
    }
    if opts.creds is not None:
        try:  # a private inbox per identity: the server lets each user subscribe only to _INBOX.<name>.>
            cb.user = creds_user_name(opts.creds)
            kwargs["inbox_prefix"] = f"_INBOX.{cb.user}"
        except CredsError as exc:
            raise BusRefused(str(exc)) from None
        kwargs["user_credentials"] = str(opts.creds)
    if tls is not None:
        kwargs["tls"] = tls
    nc = Client()
    cb.nc = nc
    try:
        async with asyncio.timeout(attempt_timeout_s):  # no inner task: a cancel reaches the socket read at once
            await nc.connect(**kwargs)
    except asyncio.CancelledError:  # stopping: closing a half-open client can wait out connect_timeout, so don't
        raise
    except Exception as exc:
        await _close_quietly(nc)
        cause = cb.last_error if isinstance(exc, nats.errors.NoServersError) and cb.last_error else exc
        if isinstance(cause, TimeoutError | asyncio.TimeoutError):
            cause = TimeoutError("the server did not answer in time")
        kind = BusUnavailable if transient_connect_error(cause) else BusRefused
        raise kind(f"cannot connect to {opts.url}: {_one_line(cause)}") from None
    # connected: from now on nats-py reconnects by itself, for ever, and we log what happens
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = RECONNECT_WAIT_S
    cb.connected = True
    return nc, cb


async def _close_quietly(nc: Client) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(nc.close(), timeout=1.0)


async def until_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``aw`` unless ``stop`` is set first; then cancel it and raise ``ConnectAborted``."""
    work = asyncio.ensure_future(aw)
    stopping = asyncio.create_task(stop.wait(), name="bus-connect-stop")
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not work.done():
        # Python 3.11's wait_for (inside nats-py) can swallow a cancel that lands as a socket connects, and
        # then sits out connect_timeout; cancel again until the attempt is really gone.
        while not work.done():
            work.cancel()
            await asyncio.wait({work}, timeout=0.05)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            work.result()
        raise ConnectAborted("stopped while connecting")
    return work.result()


async def connect_client(opts: NatsOptions, *, name: str, stop: asyncio.Event | None = None,
                         attempt_timeout_s: float = ATTEMPT_TIMEOUT_S,
                         max_wait_s: float = 15.0) -> tuple[Client, ConnectionEvents]:
    """Without ``stop``: one attempt (CLI). With ``stop``: retry transient failures until connected
    or stopped (daemon), one ``nats_connect_retry`` log line per failed attempt."""
    if stop is None:
        return await open_client(opts, name=name, attempt_timeout_s=attempt_timeout_s)
    stopping = stop

    def on_retry(attempt: int, exc: BaseException, wait_s: float) -> None:
        log.warning("nats_connect_retry", client=name, url=opts.url, attempt=attempt, error=str(exc),
                    retry_in_s=round(wait_s, 2))

    async def attempt() -> tuple[Client, ConnectionEvents]:
        return await until_stopped(open_client(opts, name=name, attempt_timeout_s=attempt_timeout_s), stopping)

    return await retry_connect(attempt, stop=stop, on_retry=on_retry, max_wait_s=max_wait_s)
