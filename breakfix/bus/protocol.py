"""The small ``Bus`` protocol every stage talks to, and NATS subject matching.

Implemented by ``bus.jetstream.JetStreamBus`` (real NATS JetStream) and
``bus.memory.MemoryBus`` (in-process fake with the same semantics: msg-id dedupe,
durable pull consumers, explicit ack, redelivery after nak).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from breakfix.schemas.subjects import StreamSpec


@dataclass(frozen=True, slots=True)
class PublishAck:
    stream: str
    seq: int
    duplicate: bool


class Delivery(Protocol):
    """One message handed to a consumer; ack only after its effect is durable."""

    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def num_delivered(self) -> int: ...
    @property
    def stream_seq(self) -> int:
        """The message's sequence number in its stream (0 when not known)."""
        ...

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...
    async def term(self) -> None: ...


class Bus(Protocol):
    async def ensure_streams(self, specs: Sequence[StreamSpec]) -> None:
        """Create or update streams; safe to call any number of times."""

    async def ensure_consumer(self, *, stream: str, durable: str, filter_subject: str,
                              ack_wait_s: float = 30.0, max_deliver: int = 20) -> None:
        """Create a durable pull consumer if it does not exist."""

    async def reset_consumer(self, *, stream: str, durable: str, filter_subject: str, start_seq: int,
                             ack_all: bool = True, max_ack_pending: int = 200_000,
                             ack_wait_s: float = 60.0) -> None:
        """(Re)create a durable pull consumer that starts at ``start_seq``.

        For stages whose checkpoint, not the consumer, is the source of truth: at start-up
        they point the cursor just past what their checkpoint covers. With ``ack_all`` one
        ack covers every earlier message, so a stage acks once per checkpoint.
        """

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> PublishAck:
        """Publish to a stream subject; a repeated ``msg_id`` is dropped as a duplicate."""

    async def publish_many(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[PublishAck]:
        """Publish ``(subject, data, msg_id)`` items; acks in the same order."""

    async def publish_start(self, items: Sequence[tuple[str, bytes, str | None]]) -> Awaitable[list[PublishAck]]:
        """Send ``items`` in order now; await the returned object for their acks later (pipelining)."""

    async def pull(self, *, stream: str, durable: str, batch: int, timeout_s: float) -> list[Delivery]:
        """Fetch up to ``batch`` messages; an empty list when none arrive within the timeout."""

    async def close(self) -> None: ...


class Requester(Protocol):
    """Core NATS request/reply (the node agent): no stream, a reply or a timeout."""

    async def request(self, subject: str, data: bytes, *, timeout_s: float) -> bytes: ...
    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> None: ...


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """Where a durable consumer stands: what it has not been sent yet, what awaits its ack."""

    num_pending: int
    num_ack_pending: int
    ack_floor: int  # highest stream sequence acked with everything before it
    delivered: int  # highest stream sequence delivered


class StreamAdmin(Protocol):
    """Read-mostly stream administration for operators' commands, tests and readiness checks."""

    async def stream_messages(self, stream: str) -> int:
        """Messages the stream holds now."""
        ...

    async def consumer_state(self, stream: str, durable: str) -> ConsumerState | None:
        """None when the consumer does not exist."""
        ...

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        """True when it existed."""
        ...

    async def read_stream(self, stream: str, subject: str, *, since: datetime | None = None, idle_s: float = 1.0,
                          limit: int = 500_000) -> list[bytes]:
        """The messages of ``stream`` on ``subject`` (wildcards allowed) stored at or after ``since``, oldest
        first, read by an ephemeral ordered consumer; stops at the end, after ``idle_s`` without a
        message, or at ``limit``. An audit trail's history, without a durable consumer."""
        ...


Unsubscribe = Callable[[], Awaitable[None]]


class CorePubSub(Protocol):
    """Core NATS publish/subscribe (no stream ack): watchers and load generators."""

    async def publish_core(self, subject: str, data: bytes) -> None: ...
    async def flush(self) -> None: ...
    async def subscribe(self, subject: str, handler: Callable[[str, bytes], Awaitable[None]]) -> Unsubscribe: ...


class BlobStore(Protocol):
    """Named blobs that outlive a process (checkpoints). JetStream Object Store, or memory."""

    async def put_blob(self, bucket: str, name: str, data: bytes) -> None: ...
    async def get_blob(self, bucket: str, name: str) -> bytes | None: ...


class KvConflict(RuntimeError):
    """A conditional key-value write lost: the key exists (create) or moved on (update)."""


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One key's latest value. ``value`` is None for a deleted key (watch only)."""

    key: str
    value: bytes | None
    revision: int


class KeyValue(Protocol):
    """Latest-value buckets (JetStream KV, or memory): plan progress, guard state, the incident index.

    Conditional writes give optimistic concurrency: ``kv_create`` fails if the key exists,
    ``kv_update`` fails unless the key is still at ``revision``; both raise ``KvConflict``.
    """

    async def ensure_kv(self, bucket: str, *, history: int = 1, max_age_s: float | None = None) -> None: ...
    async def kv_exists(self, bucket: str) -> bool:
        """True when the bucket is there; never creates it (a reader of another service's bucket)."""
        ...

    async def kv_get(self, bucket: str, key: str) -> KvEntry | None: ...
    async def kv_put(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_create(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int: ...
    async def kv_delete(self, bucket: str, key: str) -> None: ...
    async def kv_keys(self, bucket: str, prefix: str = "") -> list[str]: ...
    async def kv_snapshot(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0,
                          limit: int = 1_000_000) -> list[KvEntry]:
        """Every current value under ``prefix`` (deleted keys left out), read in one pass; at most ``limit``.
        Raises ``TimeoutError`` when the read stalls for ``timeout_s``."""
        ...

    def kv_scan(self, bucket: str, prefix: str = "", *, timeout_s: float = 10.0) -> AsyncIterator[KvEntry]:
        """``kv_snapshot`` one entry at a time, for a reader that keeps only some (deleted keys left out).
        Raises ``TimeoutError`` when the read stalls for ``timeout_s``."""
        ...

    async def kv_put_many(self, bucket: str, values: Mapping[str, bytes]) -> None:
        """Put many keys at once (pipelined where the store allows); unconditional, like ``kv_put``."""
        ...

    async def kv_put_start(self, bucket: str, values: Mapping[str, bytes]) -> Awaitable[object]:
        """``kv_put_many`` in two halves: the puts are sent now, in order; awaiting the result waits for the
        store to take them (and raises if it did not). A store without pipelining puts them before returning."""
        ...

    def kv_watch(self, bucket: str, prefix: str = "") -> AsyncIterator[KvEntry]:
        """Every current value, then each change as it happens (deletes have ``value`` None)."""
        ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, ``>`` is one or more trailing tokens."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(p) == len(s)
