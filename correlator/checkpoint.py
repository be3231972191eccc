"""Correlator checkpoints: the core's whole state plus the stream positions it covers.

The service (``correlator.service``) saves a ``Checkpoint`` through any ``bus.protocol.BlobStore``
(JetStream Object Store in production, memory in tests) before it acks the messages the
checkpoint covers, and loads it at start-up to continue exactly there. The blob is
zlib-compressed JSON (orjson) with a format tag, so a stranger's blob fails loudly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from bus.protocol import BlobStore

BUCKET = "breakfix-correlator"
FORMAT = "breakfix.correlator-checkpoint/v1"


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be read; the correlator refuses to start on it."""


@dataclass
class Checkpoint:
    state: dict[str, Any]
    positions: dict[str, int] = field(default_factory=dict)  # consumer durable -> last stream seq covered

    def encode(self) -> bytes:
        body = orjson.dumps({"format": FORMAT, "positions": self.positions, "state": self.state})
        return zlib.compress(body, 1)

    @classmethod
    def decode(cls, blob: bytes) -> Checkpoint:
        try:
            doc = orjson.loads(zlib.decompress(blob))
        except (zlib.error, orjson.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint is not readable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint format {doc.get('format') if isinstance(doc, dict) else '?'!r}, "
                                  f"expected {FORMAT!r}")
        return cls(state=doc["state"], positions={k: int(v) for k, v in doc["positions"].items()})


class CheckpointStore:
    """Save and load one named checkpoint (one per correlator partition)."""

    def __init__(self, blobs: BlobStore, name: str, *, bucket: str = BUCKET) -> None:
        self.blobs = blobs
        self.name = name
        self.bucket = bucket
        self.saved = 0
        self.last_size = 0

    async def save(self, cp: Checkpoint) -> None:
        blob = cp.encode()
        await self.blobs.put_blob(self.bucket, self.name, blob)
        self.saved += 1
        self.last_size = len(blob)

    async def load(self) -> Checkpoint | None:
        blob = await self.blobs.get_blob(self.bucket, self.name)
        return None if blob is None else Checkpoint.decode(blob)
