"""Pipelined JetStream publishing: send many messages now, collect their acks later.

Each message goes out as a core NATS publish whose reply subject is a token under one inbox
subscription; the server's PubAck (or error) for that token resolves a future. This is what
nats-py's ``publish_async`` does, without a timer task per message. A bounded number of acks
may be outstanding (``max_pending``); past it, ``send`` waits for the oldest. Used by
``bus.jetstream.JetStreamBus.publish_start``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from breakfix.bus.protocol import PublishAck


class PublishError(RuntimeError):
    """The server refused a publish (no stream, wrong sequence, ...): its ``err_code`` (JetStream's, e.g. 10071
    for a wrong last sequence) or ``status`` (503: no stream answers) say which."""

    def __init__(self, message: str, *, err_code: int | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code
        self.status = status


class PipelinedPublisher:
    def __init__(self, nc: Client, *, max_pending: int = 20_000) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._sub: Subscription | None = None
        self._futures: dict[str, asyncio.Future[PublishAck]] = {}
        self._order: deque[asyncio.Future[PublishAck]] = deque()
        self._next = 0
        self._max = max_pending

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._futures.pop(msg.subject[len(self._prefix):], None)
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(PublishError("no stream answers this subject", status="503"))
            return
        try:
            resp = orjson.loads(msg.data)
        except orjson.JSONDecodeError as exc:
            fut.set_exception(PublishError(f"unreadable publish ack: {exc}"))
            return
        if not isinstance(resp, dict):
            fut.set_exception(PublishError(f"unreadable publish ack: {msg.data[:80]!r}"))
            return
        if "error" in resp:
            err = resp["error"]
            if not isinstance(err, dict):
                fut.set_exception(PublishError(str(err)))
                return
            fut.set_exception(PublishError(str(err.get("description", err)), err_code=err.get("err_code")))
            return
        try:
            ack = PublishAck(stream=str(resp.get("stream", "")), seq=int(resp.get("seq", 0)),
                             duplicate=bool(resp.get("duplicate", False)))
        except (TypeError, ValueError, OverflowError) as exc:
            fut.set_exception(PublishError(f"unreadable publish ack: {exc}"))
            return
        fut.set_result(ack)

    async def send(self, subject: str, data: bytes, headers: dict[str, str] | None) -> asyncio.Future[PublishAck]:
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        while len(self._futures) >= self._max and self._order:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._order.popleft()), timeout=30.0)
        self._next += 1
        token = str(self._next)
        fut: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        while self._order and self._order[0].done():
            self._order.popleft()  # acked already: nothing to wait for, nothing to keep alive
        self._order.append(fut)
        if len(self._order) > 2 * self._max:
            self._order = deque(f for f in self._order if not f.done())
        await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        return fut

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()
