"""Pipelined JetStream publishing: send many messages now, collect their acks later.

Each message goes out as a core NATS publish whose reply subject is a token under one inbox
subscription; the server's PubAck (or error) for that token resolves a future. This is what
nats-py's ``publish_async`` does, without a timer task per message. A bounded number of acks
may be outstanding (``max_pending``); past it, ``send`` waits for the oldest. Used by
``bus.jetstream.JetStreamBus.publish_start``.

``send_many`` frames a whole batch (``HPUB``/``PUB`` commands, as nats-py's ``publish`` writes them) and
hands it to the client's outbound buffer in 64 KiB pieces: nats-py's ``publish`` costs about 8 us a message
(subject and header validation, a bytearray per header, a command, a buffer check), the framing here
about 1. Its acks resolve one future for the batch. It reaches into nats-py's internals (``_FRAMING``:
the outbound buffer, its size and limit, and its flusher); a client without them, a subject or msg-id
that is not a plain printable token, or a payload over the server's limit goes through ``publish`` one
by one instead, which validates and raises as before. The checks ``publish`` makes on the connection
(closed, draining, over the reconnect buffer) are made here once there is room, just before writing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from breakfix.bus.protocol import PublishAck
from breakfix.schemas.subjects import HDR_MSG_ID


class PublishError(RuntimeError):
    """The server refused a publish (no stream, wrong sequence, ...): its ``err_code`` (JetStream's, e.g. 10071
    for a wrong last sequence) or ``status`` (503: no stream answers) say which."""

    def __init__(self, message: str, *, err_code: int | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code
        self.status = status


_CHUNK = 64 * 1024
_FRAMING = ("_send_command", "_flush_pending", "_flush_queue", "_pending_data_size", "_max_pending_size")


def _token_ok(text: str) -> bool:
    """A subject or header value the server reads as one token: printable (no CR/LF/tab) and no space."""
    return bool(text) and text.isprintable() and " " not in text


def decode_ack(msg: Msg) -> PublishAck | PublishError:
    """What the server answered a publish: its ``PublishAck``, or why it was not stored (total: any reply)."""
    if msg.headers and msg.headers.get("Status") == "503":
        return PublishError("no stream answers this subject", status="503")
    try:
        resp = orjson.loads(msg.data)
    except orjson.JSONDecodeError as exc:
        return PublishError(f"unreadable publish ack: {exc}")
    if not isinstance(resp, dict):
        return PublishError(f"unreadable publish ack: {msg.data[:80]!r}")
    if "error" in resp:
        err = resp["error"]
        if not isinstance(err, dict):
            return PublishError(str(err))
        return PublishError(str(err.get("description", err)), err_code=err.get("err_code"))
    try:
        return PublishAck(stream=str(resp.get("stream", "")), seq=int(resp.get("seq", 0)),
                          duplicate=bool(resp.get("duplicate", False)))
    except (TypeError, ValueError, OverflowError) as exc:
        return PublishError(f"unreadable publish ack: {exc}")


class _Batch:
    """The acks of one framed batch, in order: its future resolves when the last arrives, or fails at the first
    refusal (as ``asyncio.gather`` of one future each would, without a future and a callback per message)."""

    __slots__ = ("acks", "done", "left", "tokens")

    def __init__(self, n: int, done: asyncio.Future[list[PublishAck]]) -> None:
        self.acks: list[Any] = [None] * n
        self.left = n
        self.done = done
        self.tokens: list[str] = []  # its reply tokens, dropped from the publisher's map if it is given up

    def take(self, i: int, result: PublishAck | PublishError) -> None:
        if self.done.done():
            return
        if isinstance(result, PublishError):
            self.done.set_exception(result)
            return
        self.acks[i] = result
        self.left -= 1
        if not self.left:
            self.done.set_result(self.acks)


class PipelinedPublisher:
    def __init__(self, nc: Client, *, max_pending: int = 20_000) -> None:
        self._nc = nc
        self._framing = all(hasattr(nc, name) for name in _FRAMING)
        self._prefix = nc.new_inbox() + "."
        self._sub: Subscription | None = None
        self._futures: dict[str, asyncio.Future[PublishAck]] = {}  # reply token -> one publish's ack
        self._batched: dict[str, tuple[_Batch, int]] = {}  # reply token -> its framed batch and place in it
        self._order: deque[asyncio.Future[Any]] = deque()
        self._next = 0
        self._max = max_pending

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix):]
        batched = self._batched.pop(token, None)
        if batched is not None:
            batch, i = batched
            batch.take(i, decode_ack(msg))
            return
        fut = self._futures.pop(token, None)
        if fut is None or fut.done():
            return
        result = decode_ack(msg)
        if isinstance(result, PublishError):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    async def _room(self, n: int) -> None:
        """Subscribe the ack inbox once; wait (for the oldest acks) until ``n`` more may be outstanding."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        while len(self._futures) + len(self._batched) + n > self._max and self._order:
            oldest = self._order.popleft()
            if not oldest.done():  # resolved, failed or given up (cancelled) by its caller: nothing to wait for
                await asyncio.wait({oldest}, timeout=30.0)  # never raises the future's own outcome

    def _token(self) -> str:
        self._next += 1
        return str(self._next)

    def _track(self, fut: asyncio.Future[Any]) -> None:
        """Keep ``fut`` in the oldest-first order ``_room`` waits on."""
        while self._order and self._order[0].done():
            self._order.popleft()  # acked already: nothing to wait for, nothing to keep alive
        self._order.append(fut)
        if len(self._order) > 2 * self._max:
            self._order = deque(f for f in self._order if not f.done())

    async def send(self, subject: str, data: bytes, headers: dict[str, str] | None) -> asyncio.Future[PublishAck]:
        await self._room(1)
        token = self._token()
        fut: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        fut.add_done_callback(lambda f: self._futures.pop(token, None) if f.cancelled() else None)
        self._track(fut)
        await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        return fut

    def _framable(self, items: Sequence[tuple[str, bytes, str | None]]) -> bool:
        if not self._framing or len(items) < 2:
            return False
        limit = self._nc.max_payload
        return all(_token_ok(subject) and len(data) <= limit and (mid is None or _token_ok(mid))
                   for subject, data, mid in items)

    async def send_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> asyncio.Future[list[PublishAck]]:
        """Send ``(subject, data, msg_id)`` items in order, framed as one write; the future of their acks, in order
        (it fails with the first ``PublishError``)."""
        if not self._framable(items):
            return asyncio.gather(*[await self.send(subject, data, {HDR_MSG_ID: mid} if mid else None)
                                    for subject, data, mid in items])
        nc: Any = self._nc  # the framing internals (``_FRAMING``), checked at construction
        await self._room(len(items))  # may wait: the connection is checked after it, just before writing
        if nc.is_closed:
            raise nats_errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats_errors.ConnectionDrainingError
        payload = sum(len(data) for _, data, _ in items)
        if not nc.is_connected and (nc._max_pending_size <= 0
                                    or payload + nc._pending_data_size > nc._max_pending_size):
            raise nats_errors.OutboundBufferLimitError  # reconnecting, and its buffer cannot take the batch
        done: asyncio.Future[list[PublishAck]] = asyncio.get_running_loop().create_future()
        batch = _Batch(len(items), done)
        # given up or refused: later acks have no one to tell (run by the loop, soon after the future is done)
        done.add_done_callback(lambda f: self._forget(batch) if f.cancelled() or f.exception() else None)
        self._track(done)
        try:
            await self._write(nc, batch, items, payload)
        except BaseException:
            done.cancel()  # not (all) sent: no ack is awaited for it, and its tokens go now
            self._forget(batch)
            raise
        return done

    def _forget(self, batch: _Batch) -> None:
        for t in batch.tokens:
            self._batched.pop(t, None)

    async def _write(self, nc: Any, batch: _Batch, items: Sequence[tuple[str, bytes, str | None]],
                     payload: int) -> None:
        """Frame ``items`` (each under a new token of ``batch``) and hand them to the client, in pieces."""
        batched = self._batched
        frames: list[bytes] = []
        prefix = self._prefix
        size = 0
        for i, (subject, data, mid) in enumerate(items):
            token = self._token()
            batched[token] = (batch, i)
            batch.tokens.append(token)
            if mid is None:
                frames.append(f"PUB {subject} {prefix}{token} {len(data)}\r\n".encode())
            else:
                hdr = f"NATS/1.0\r\n{HDR_MSG_ID}: {mid}\r\n\r\n".encode()
                frames.append(f"HPUB {subject} {prefix}{token} {len(hdr)} {len(hdr) + len(data)}\r\n".encode())
                frames.append(hdr)
            frames.append(data)
            frames.append(b"\r\n")
            size += len(data)
            if size >= _CHUNK:  # joined in pieces: one large join costs more than its copy (fresh pages)
                await nc._send_command(b"".join(frames))
                frames, size = [], 0
        nc.stats["out_msgs"] += len(items)
        nc.stats["out_bytes"] += payload
        if frames:
            await nc._send_command(b"".join(frames))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()
        for batch, _ in self._batched.values():
            if not batch.done.done():
                batch.done.cancel()
        self._batched.clear()
