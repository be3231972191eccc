"""Keep a collector's bus link: connect in the background, retry with backoff, stop on request.

Both collector daemons (``collectors.daemon`` on a node, ``collectors.fleetd`` for the fleet)
run ``keep_connected`` as one named task beside their sources. Until a connection attempt
succeeds (each bounded by ``timeout_s``, each failure logged once with the spool depth), the
sources keep running and their signals wait in the spool (``collectors.forwarder``); once
connected, ``on_connected`` sets the bus up (streams, the node agent's subject) and attaches
it to the forwarder. ``pause`` is the stop-aware wait on the injected clock that every loop
uses between cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from breakfix.bus.clock import Clock, first_of

log = structlog.get_logger("breakfix.collector.link")

B = TypeVar("B")


async def pause(clock: Clock, stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds`` of ``clock`` time, or until ``stop`` is set, whichever comes first."""
    if stop.is_set():
        return
    await first_of(clock.sleep(max(0.0, seconds)), stop.wait(), name="collector-pause")


async def keep_connected(connect: Callable[[], Awaitable[B]], on_connected: Callable[[B], Awaitable[None]],
                         stop: asyncio.Event, clock: Clock, *, retry_s: float, timeout_s: float,
                         what: str, **bind: object) -> B | None:
    """Connect until it works or ``stop``; the connected bus, or None when stopped first.

    A bus that connects but whose set-up fails is closed (when it can be) and tried again."""
    backoff = retry_s
    while not stop.is_set():
        attempt = asyncio.create_task(asyncio.wait_for(connect(), timeout=timeout_s), name=f"{what}-connect")
        stopping = asyncio.create_task(stop.wait(), name=f"{what}-connect-stop")
        await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not attempt.done():
            attempt.cancel()  # a client library that ignores the cancel is left behind, not waited for
            done, _ = await asyncio.wait({attempt}, timeout=2.0)
            if not done:
                log.warning("nats_connect_ignored_cancel", what=what, **bind)
            return None
        bus: B | None = None
        try:
            bus = attempt.result()
            await on_connected(bus)
            log.info("nats_connected", what=what, **bind)
            return bus
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("nats_connect_failed", what=what, error=repr(exc)[:300], retry_s=backoff, **bind)
            close = getattr(bus, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(close(), timeout=2)
            await pause(clock, stop, backoff)
            backoff = min(backoff * 2, 30.0)
    return None
