"""Reading a stream's history from a start time: what ``JetStreamBus.read_stream`` does for the console.

On a secured bus a reader may create only the consumer that carries its own user name
(``bus.permissions``: no anonymous consumer creation, so no reader can redefine a service's durable
by naming it in a request body). ``read_named`` uses that name: a short-lived pull consumer (no acks,
expiring on its own when idle) filtered and started as asked, read until nothing is pending, then
deleted. On an open bus (no identity) ``read_ordered`` uses nats-py's ordered consumer as before.
Either way at most ``limit`` messages, and every wait is bounded by ``idle_s``.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.client import JetStreamContext

from breakfix.bus.puller import BatchPuller

BATCH = 1000


async def read_named(nc: Client, js: JetStreamContext, stream: str, subject: str, *, name: str,
                     since: datetime | None, idle_s: float, limit: int) -> list[bytes]:
    config = api.ConsumerConfig(
        name=name, ack_policy=api.AckPolicy.NONE, filter_subject=subject,
        deliver_policy=api.DeliverPolicy.BY_START_TIME if since else api.DeliverPolicy.ALL, opt_start_time=since,
        inactive_threshold=max(30.0, 4 * idle_s))  # a reader that dies mid-read leaves nothing behind for long
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(stream, name)  # an earlier read that did not finish
    await js.add_consumer(stream, config=config)
    puller = BatchPuller(nc, stream, name)
    out: list[bytes] = []
    try:
        while len(out) < limit:
            batch = await puller.pull(min(BATCH, limit - len(out)), idle_s)
            if not batch:
                break
            out.extend(m.data for m in batch)
            if _pending(batch[-1]) == 0:
                break
    finally:
        await puller.close()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
    return out[:limit]


async def read_ordered(js: JetStreamContext, stream: str, subject: str, *, since: datetime | None, idle_s: float,
                       limit: int) -> list[bytes]:
    cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=since) if since else None
    sub = await js.subscribe(subject, ordered_consumer=True, config=cfg, stream=stream)
    out: list[bytes] = []
    try:
        while len(out) < limit:
            try:
                msg = await sub.next_msg(timeout=idle_s)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            out.append(msg.data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


def _pending(msg: object) -> int | None:
    """Messages still pending after this one (from its ``$JS.ACK`` reply subject); None when unreadable."""
    try:
        return int(msg.metadata.num_pending)  # type: ignore[attr-defined]
    except Exception:
        return None


__all__ = ["read_named", "read_ordered"]
