"""The consume loop every stage uses: pull, decode, handle, then ack.

A message is acked only after ``handle`` returns, so its effect is done before JetStream
forgets it. A message that cannot be decoded goes to ``breakfix.dlq.<stream>`` with the
reason in headers, is acked, and the loop keeps running. A handler error naks the message
with a delay so it is retried; nothing is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from breakfix.bus.protocol import Bus, Delivery
from breakfix.schemas.subjects import HDR_DLQ_CONSUMER, HDR_DLQ_REASON, HDR_DLQ_SUBJECT, dead_letter_subject

T = TypeVar("T")

log = structlog.get_logger("breakfix.bus")


class DecodeError(ValueError):
    """Raised by a decoder for a message that can never be processed."""


def decode_message(decode: Callable[[bytes], T], msg: Delivery) -> T:
    """Decode a delivered message. A ``bus.codec.decoder`` also sees the subject it arrived on
    (a signal whose body names another node than its subject is a forgery)."""
    with_subject = getattr(decode, "with_subject", None)
    if with_subject is not None:
        return with_subject(msg.data, msg.subject)  # type: ignore[no-any-return]
    return decode(msg.data)


@dataclass(frozen=True, slots=True)
class ConsumerSpec(Generic[T]):
    stream: str
    durable: str
    filter_subject: str
    decode: Callable[[bytes], T]
    handle: Callable[[T, Delivery], Awaitable[None]]
    batch: int = 256
    fetch_timeout_s: float = 0.5
    retry_delay_s: float = 1.0
    ack_wait_s: float = 30.0


@dataclass
class ConsumerStats:
    handled: int = 0
    dead_lettered: int = 0
    failed: int = 0


async def dead_letter(bus: Bus, msg: Delivery, *, stream: str, consumer: str, reason: str) -> None:
    """Copy a message to the dead-letter subject with the reason, then ack it."""
    headers = {
        HDR_DLQ_REASON: reason[:1000],
        HDR_DLQ_SUBJECT: msg.subject,
        HDR_DLQ_CONSUMER: consumer,
    }
    await bus.publish(dead_letter_subject(stream), msg.data, headers=headers)
    await msg.ack()


async def _settle(ack: Awaitable[None], clog: Any) -> None:
    """Ack or nak; if the connection is gone JetStream redelivers after ack_wait, so log and go on."""
    try:
        await ack
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        clog.warning("ack_failed", error=repr(exc))


class Redeliver(Exception):  # an instruction to the consumer loop, not an error
    """Raised by a handler that must not take this message now (e.g. a replica that just lost its lease):
    the message is nak'd for redelivery, not counted as a failure."""


async def run_consumer(bus: Bus, spec: ConsumerSpec[T], *, stop: asyncio.Event,
                       stats: ConsumerStats | None = None) -> ConsumerStats:
    """Consume until ``stop`` is set. Never raises on bad messages or handler errors."""
    stats = stats or ConsumerStats()
    await bus.ensure_consumer(stream=spec.stream, durable=spec.durable, filter_subject=spec.filter_subject,
                              ack_wait_s=spec.ack_wait_s)
    clog = log.bind(stream=spec.stream, consumer=spec.durable)
    while not stop.is_set():
        try:
            batch = await bus.pull(stream=spec.stream, durable=spec.durable, batch=spec.batch,
                                   timeout_s=spec.fetch_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection trouble: back off, keep running
            clog.warning("pull_failed", error=repr(exc))
            await asyncio.sleep(spec.retry_delay_s)
            continue
        for n, msg in enumerate(batch):
            try:
                item = decode_message(spec.decode, msg)
            except DecodeError as exc:
                try:
                    await dead_letter(bus, msg, stream=spec.stream, consumer=spec.durable, reason=str(exc))
                except asyncio.CancelledError:
                    raise
                except Exception as dlq_exc:  # the dead-letter stream is unreachable: try again later
                    clog.error("dead_letter_failed", subject=msg.subject, reason=str(exc), error=repr(dlq_exc))
                    await _settle(msg.nak(delay=spec.retry_delay_s), clog)
                    continue
                stats.dead_lettered += 1
                clog.warning("dead_lettered", subject=msg.subject, reason=str(exc))
                continue
            try:
                await spec.handle(item, msg)
            except asyncio.CancelledError:
                raise
            except Redeliver:  # this one and the rest of the batch go back; pause before pulling again
                for rest in batch[n:]:
                    await _settle(rest.nak(delay=spec.retry_delay_s), clog)
                await asyncio.sleep(spec.retry_delay_s)
                break
            except Exception as exc:
                stats.failed += 1
                clog.error("handler_failed", subject=msg.subject, error=repr(exc), delivered=msg.num_delivered)
                await _settle(msg.nak(delay=spec.retry_delay_s), clog)
                continue
            await _settle(msg.ack(), clog)
            stats.handled += 1
    return stats
