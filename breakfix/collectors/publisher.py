"""Publish signals on the bus with their deterministic id as ``Nats-Msg-Id``.

Every source hands its signals here; JetStream drops a re-sent signal inside the
stream's duplicate window, so a restarted collector can safely resend.
"""

from __future__ import annotations

from breakfix.bus.codec import encode
from breakfix.bus.protocol import Bus, PublishAck
from breakfix.schemas import subjects
from breakfix.schemas.signal import Signal


class SignalPublisher:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.published = 0
        self.duplicates = 0

    async def publish(self, signal: Signal) -> PublishAck:
        ack = await self.bus.publish(subjects.signal_subject(signal.cluster, signal.node), encode(signal),
                                     msg_id=signal.id)
        if ack.duplicate:
            self.duplicates += 1
        else:
            self.published += 1
        return ack
