"""Store-and-forward: the collector's signals go to NATS, or to the spool while NATS is away.

The daemon (``collectors.daemon``) hands every signal the edge filter lets through to
``Forwarder.send``. While the bus answers and the spool is empty a signal is published
directly (msg-id = the signal id). Otherwise it is appended to the on-disk ``Spool``, and
``drain`` replays the spool in order once the bus answers again, deleting each entry only
after JetStream acked it; a spool file that is not a signal is quarantined on the way
(``Spool.reject``) and the replay goes on. A signal that was in flight when the link broke may reach the
stream twice; its msg-id makes the second copy a duplicate the server drops.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from breakfix.bus.clock import SYSTEM_CLOCK, Clock, first_of
from breakfix.bus.codec import encode
from breakfix.bus.protocol import Bus
from breakfix.collectors.link import pause
from breakfix.collectors.spool import Spool
from breakfix.schemas import subjects
from breakfix.schemas.signal import Signal

log = structlog.get_logger("breakfix.collector.forwarder")


@dataclass
class ForwarderStats:
    published: int = 0
    spooled: int = 0
    replayed: int = 0
    duplicates: int = 0
    publish_failures: int = 0


class Forwarder:
    def __init__(self, spool: Spool, *, publish_timeout_s: float = 2.0, retry_s: float = 1.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.spool = spool
        self.clock = clock
        self.bus: Bus | None = None
        self.publish_timeout_s = publish_timeout_s
        self.retry_s = retry_s
        self.up = False
        self._next_probe = 0.0  # monotonic: when a refused spool write may try the bus again
        self.stats = ForwarderStats()
        self._wake = asyncio.Event()

    def attach(self, bus: Bus) -> None:
        """A connected bus; the drain loop starts replaying the spool."""
        self.bus = bus
        self.up = True
        self._wake.set()

    async def _publish(self, subject: str, data: bytes, msg_id: str) -> bool:
        assert self.bus is not None
        try:
            ack = await asyncio.wait_for(self.bus.publish(subject, data, msg_id=msg_id),
                                         timeout=self.publish_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.up:
                log.warning("nats_unreachable", error=repr(exc), spooled=len(self.spool))
            self.up = False
            self.stats.publish_failures += 1
            return False
        self.stats.duplicates += ack.duplicate
        return True

    async def send(self, signals: list[Signal]) -> None:
        for s in signals:
            direct = self.up and self.bus is not None and not len(self.spool)
            if direct and await self._publish(subjects.signal_subject(s.cluster, s.node), encode(s), s.id):
                self.stats.published += 1
                continue
            if self.spool.append(s):
                self.stats.spooled += 1
            elif not direct and self.bus is not None and not len(self.spool) \
                    and self.clock.monotonic() >= self._next_probe:
                # the spool refused it (disk full) and holds nothing to keep the order of: try the bus rather than
                # drop it (at most once per retry_s while it does not answer, so a cycle never waits on it per
                # signal); an answer means the bus is back, which with an empty spool nothing else would find out
                if await self._publish(subjects.signal_subject(s.cluster, s.node), encode(s), s.id):
                    self.up = True
                    self.stats.published += 1
                    self.spool.dropped[s.severity.value] -= 1  # delivered after all: not a drop
                else:
                    self._next_probe = self.clock.monotonic() + self.retry_s
            self._wake.set()

    async def drain(self, stop: asyncio.Event) -> None:
        """Replay the spool in order whenever the bus answers; runs until ``stop``."""
        while not stop.is_set():
            if not len(self.spool) or self.bus is None:
                self._wake.clear()
                await first_of(self._wake.wait(), stop.wait(), self.clock.sleep(self.retry_s), name="forwarder-wake")
                continue
            batch = self.spool.peek(256)
            done = []
            failed = False
            for entry, data in batch:
                try:
                    signal = Signal.model_validate_json(data)
                except Exception as exc:  # a torn or foreign file (any decode failure): quarantined, replay goes on
                    self.spool.reject(entry, f"not a signal: {str(exc).splitlines()[0][:160]}")
                    continue
                if not await self._publish(subjects.signal_subject(signal.cluster, signal.node), data, signal.id):
                    failed = True
                    break
                done.append(entry)
            self.spool.remove(done)
            self.stats.replayed += len(done)
            if failed:
                await pause(self.clock, stop, self.retry_s)  # still unreachable: back off, keep collecting
            else:
                if not self.up:
                    log.info("nats_reachable_again", remaining=len(self.spool))
                self.up = True
