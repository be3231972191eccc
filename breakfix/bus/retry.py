"""The one place breakfix retries: transient errors only, with bounded backoff.

Publishing and stream set-up call ``transient_retry``; permanent errors (bad stream
config, authorisation, our own bugs) are raised at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
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


async def transient_retry(fn: Callable[[], Awaitable[T]], *, attempts: int = 5, max_wait_s: float = 2.0) -> T:
    """Call ``fn`` and retry it on transient errors only; re-raise the last error."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.05, max=max_wait_s) + wait_random(0, 0.05),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


async def retry_when(fn: Callable[[], Awaitable[T]], predicate: Callable[[BaseException], bool], *,
                     wait_s: float = 1.0, max_wait_s: float = 60.0, attempts: int | None = None,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """Retry ``fn`` while ``predicate`` says its error is worth waiting out (a PDB's 429, say), with
    exponential backoff; the predicate owns the deadline. Any other error is raised at once."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(predicate),
        stop=stop_after_attempt(attempts) if attempts else stop_never,
        wait=wait_exponential(multiplier=wait_s, max=max_wait_s),
        sleep=sleep,
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover
