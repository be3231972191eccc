"""The one place breakfix retries: transient errors only, with bounded backoff.

Publishing and stream set-up call ``transient_retry``; a daemon's first connect calls
``retry_connect`` (backoff, one log line per attempt, stops when told); Kubernetes calls
``retry_when``. Permanent errors (bad stream config, authorisation, a certificate that does
not verify, our own bugs) are raised at once.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
)

T = TypeVar("T")

TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    ConnectionError,
)


class PermissionDenied(RuntimeError):
    """The server refused this subject to our identity: permanent, never retried."""


async def transient_retry(fn: Callable[[], Awaitable[T]], *, attempts: int = 5, max_wait_s: float = 2.0,
                          give_up: Callable[[], bool] | None = None) -> T:
    """Call ``fn`` and retry it on transient errors only; re-raise the last error. ``give_up`` says the
    timeout was the server refusing the subject (a permissions violation): ``PermissionDenied`` at once."""
    def worth_retrying(exc: BaseException) -> bool:
        return isinstance(exc, TRANSIENT) and not (give_up is not None and give_up())

    try:
        return await _retry(fn, worth_retrying, attempts, max_wait_s)
    except TRANSIENT as exc:
        if give_up is not None and give_up():
            raise PermissionDenied(f"the server refused this identity: {exc!r}") from None
        raise


async def _retry(fn: Callable[[], Awaitable[T]], worth: Callable[[BaseException], bool], attempts: int,
                 max_wait_s: float) -> T:
    # The first attempt runs bare: nearly every call succeeds, and tenacity's machinery costs more than
    # a publish. Only an error worth retrying enters the backoff loop, for the attempts left.
    try:
        return await fn()
    except BaseException as exc:
        if attempts <= 1 or not worth(exc):
            raise
    wait = wait_exponential(multiplier=0.05, max=max_wait_s) + wait_random(0, 0.05)
    await asyncio.sleep(0.05)
    async for attempt in AsyncRetrying(retry=retry_if_exception(worth), stop=stop_after_attempt(attempts - 1),
                                       wait=wait, reraise=True):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


async def retry_when(fn: Callable[[], Awaitable[T]], predicate: Callable[[BaseException], bool], *,
                     wait_s: float = 1.0, max_wait_s: float = 60.0, attempts: int | None = None,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """Retry ``fn`` while ``predicate`` says its error is worth waiting out (a PDB's 429, say), with
    exponential backoff; the predicate owns the deadline. Any other error is raised at once."""
    try:  # the first attempt bare, as in ``_retry``
        return await fn()
    except BaseException as exc:
        if attempts == 1 or not predicate(exc):
            raise
    await sleep(wait_s)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(predicate),
        stop=stop_after_attempt(attempts - 1) if attempts else stop_never,
        wait=wait_exponential(multiplier=wait_s, max=max_wait_s),
        sleep=sleep,
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


class ConnectAborted(Exception):
    """The process was asked to stop while it was still connecting."""


def transient_connect_error(exc: BaseException) -> bool:
    """Worth another connect attempt: the server is down, unreachable or slow. Refused credentials,
    a certificate that does not verify and a missing creds file are permanent: retrying cannot help."""
    if isinstance(exc, ssl.SSLError | FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    text = str(exc).lower()
    if isinstance(exc, nats.errors.Error) and ("authorization" in text or "authentication" in text):
        return False
    return isinstance(exc, nats.errors.Error | OSError | asyncio.TimeoutError)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return
    raise ConnectAborted("stopped while waiting to reconnect")


async def retry_connect(fn: Callable[[], Awaitable[T]], *, stop: asyncio.Event,
                        on_retry: Callable[[int, BaseException, float], None],
                        initial_s: float = 0.5, max_wait_s: float = 15.0) -> T:
    """Connect until it works, backing off exponentially (``initial_s`` doubling up to ``max_wait_s``,
    with jitter) while the error is transient; ``on_retry(attempt, error, wait_s)`` logs each failed
    attempt. Raises ``ConnectAborted`` as soon as ``stop`` is set, a permanent error at once."""
    wait = wait_exponential(multiplier=initial_s, max=max_wait_s) + wait_random(0, initial_s / 2)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            on_retry(state.attempt_number, exc, state.upcoming_sleep)

    async for attempt in AsyncRetrying(
        retry=retry_if_exception(transient_connect_error),
        stop=stop_never,
        wait=wait,
        sleep=lambda s: _sleep_or_stop(stop, s),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            if stop.is_set():
                raise ConnectAborted("stopped before connecting")
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover
