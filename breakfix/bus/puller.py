"""A lean JetStream pull loop: one inbox subscription per consumer, batched pull requests.

nats-py's ``fetch`` waits on each message with its own timer, which costs more than the
correlator's own work per message. ``BatchPuller`` sends the JetStream pull request
(``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``, ``{"batch": n, "expires": ns}``) itself,
lets the subscription callback append the replies to a buffer, and hands out whatever has
arrived. At most one request is outstanding; the server ends it by filling the batch or with
a status message (404/408/409). Messages are ordinary ``nats.aio.msg.Msg``s, so ack and metadata
work as usual. Used by ``bus.jetstream.JetStreamBus.pull``.

A status lost with the connection (the server restarted, or the client reconnected while a request
was out) would leave the request outstanding forever and the consumer wedged: every later pull
would wait for messages nobody asked for. So the request's own expiry bounds it too: past it, plus a
grace for the server's answer, a new request goes out. Each request has its own reply subject
(``<inbox>.<n>``), where the server also sends its status, so a status that arrives late (the loop was
busy past the deadline) cannot end the request sent after it; messages are taken from any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_STATUS = "Status"
EXPIRY_GRACE_S = 0.5  # after a request's expiry, how long its status may take to arrive


class BatchPuller:
    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._requests = 0
        self._reply = ""  # the outstanding (or last) request's reply subject: only its status ends it
        self._sub: Subscription | None = None
        self._buffer: deque[Msg] = deque()
        self._remaining = 0  # messages the outstanding request may still bring
        self._deadline = 0.0  # monotonic: past it the outstanding request is over, answered or not
        self._arrived = asyncio.Event()

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is not None and not msg.data:
            if status != "100" and msg.subject == self._reply:  # 404 no messages, 408 expired, 409 limits
                self._remaining = 0  # the request is over (a late status of an earlier request is not)
        else:
            self._buffer.append(msg)
            self._remaining = max(0, self._remaining - 1)
        self._arrived.set()

    def _take(self, batch: int) -> list[Msg]:
        n = min(batch, len(self._buffer))
        return [self._buffer.popleft() for _ in range(n)]

    def _outstanding(self) -> bool:
        if self._remaining and time.monotonic() > self._deadline:
            self._remaining = 0  # expired and its status never came: lost with the connection
        return self._remaining > 0

    async def pull(self, batch: int, timeout_s: float) -> list[Msg]:
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg, pending_msgs_limit=1_000_000)
        if self._buffer:
            return self._take(batch)
        if not self._outstanding():
            self._arrived.clear()
            req = {"batch": batch, "expires": max(1_000_000, int(timeout_s * 1e9))}  # 0 would never expire
            self._requests += 1
            self._reply = f"{self._inbox}.{self._requests}"
            self._remaining = batch
            self._deadline = time.monotonic() + timeout_s + EXPIRY_GRACE_S
            await self._nc.publish(self._subject, json.dumps(req).encode(), reply=self._reply)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout=timeout_s + EXPIRY_GRACE_S)
        self._arrived.clear()
        await asyncio.sleep(0)  # let the rest of a burst land in the buffer
        return self._take(batch)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
