"""Reading a stream's history from a start time: what ``JetStreamBus.read_stream`` does for the console and CLI.

On a secured bus a reader may not create consumers freely (``bus.permissions``: an anonymous create
could name any consumer, a service's durable included), so ``read_direct`` reads with batched direct
gets (``$JS.API.DIRECT.GET.<stream>``, streams created with ``allow_direct``): no server-side state, so
any number of reads by one identity run at once and none touches a consumer. Each batch answers up to
``BATCH`` messages of the filter from a start time, or from just past the last sequence, and ends with
an end-of-batch status that says how many are still pending. On an open bus (no identity)
``read_ordered`` uses nats-py's ordered consumer. Either way at most ``limit`` messages, and every wait
is bounded by ``idle_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from breakfix.schemas.common import format_rfc3339

BATCH = 1000


class DirectGetUnavailable(RuntimeError):
    """The server did not serve a direct get: the stream lacks ``allow_direct`` (503), the identity may not
    (no answer: an account issued before readers got direct gets), or another status."""


async def read_direct(nc: Client, stream: str, subject: str, *, since: datetime | None, idle_s: float,
                      limit: int) -> list[bytes]:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        queue.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    out: list[bytes] = []
    start: dict[str, object] = {"start_time": format_rfc3339(since)} if since else {"seq": 1}
    try:
        while len(out) < limit:
            request = {"batch": min(BATCH, limit - len(out)), "next_by_subj": subject, **start}
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request), reply=inbox)
            last, pending = None, 0
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=idle_s + 1.0)
                except TimeoutError:
                    if not out:
                        raise DirectGetUnavailable(f"no answer to a direct get on {stream}") from None
                    raise TimeoutError(f"direct get on {stream} stopped answering after {len(out)} messages") \
                        from None  # never a silently partial history
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is None:
                    out.append(msg.data)
                    last = _int(headers.get("Nats-Sequence"))
                    continue
                if status == "204":  # end of this batch
                    pending = _int(headers.get("Nats-Num-Pending")) or 0
                    break
                if status == "404":  # nothing (more) matches
                    break
                raise DirectGetUnavailable(f"direct get on {stream}: status {status} "
                                           f"{headers.get('Description', '')}".strip())
            if not pending or last is None:
                return out[:limit]
            start = {"seq": last + 1}
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
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


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


__all__ = ["DirectGetUnavailable", "read_direct", "read_ordered"]
