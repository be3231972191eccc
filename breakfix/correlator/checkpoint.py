"""Correlator checkpoints: the core's whole state plus the stream positions it covers.

The service (``correlator.service``) saves a ``Checkpoint`` through any ``bus.protocol.BlobStore``
(JetStream Object Store in production, memory in tests) before it acks the messages the
checkpoint covers, and loads it at start-up to continue exactly there. The blob is
zlib-compressed JSON (orjson) with a format tag, so a stranger's blob fails loudly.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from breakfix.bus.protocol import BlobStore
from breakfix.correlator.wire import cached_dump
from breakfix.schemas.common import GpuRef, TenantRef

BUCKET = "breakfix-correlator"
FORMAT = "breakfix.correlator-checkpoint/v1"


def _pydantic(obj: Any) -> Any:
    if isinstance(obj, GpuRef | TenantRef):
        return cached_dump(obj)  # the same refs repeat over every incident and every checkpoint
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot checkpoint {type(obj).__name__}")


MAX_CHECKPOINT_BYTES = 1 << 30  # inflated; a zip bomb is refused, not expanded


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be read; the correlator refuses to start on it."""


@dataclass
class Checkpoint:
    state: dict[str, Any]
    positions: dict[str, int] = field(default_factory=dict)  # consumer durable -> last stream seq covered

    def to_json(self) -> bytes:
        """The uncompressed document; must run where the state is consistent (the event loop)."""
        return orjson.dumps({"format": FORMAT, "positions": self.positions, "state": self.state},
                            default=_pydantic, option=orjson.OPT_UTC_Z)

    def encode(self) -> bytes:
        return zlib.compress(self.to_json(), 1)

    @classmethod
    def decode(cls, blob: bytes) -> Checkpoint:
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(blob, MAX_CHECKPOINT_BYTES)
            if inflate.unconsumed_tail:
                raise CheckpointError(f"checkpoint inflates past {MAX_CHECKPOINT_BYTES} bytes")
            doc = orjson.loads(raw)
        except (zlib.error, orjson.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint is not readable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint format {doc.get('format') if isinstance(doc, dict) else '?'!r}, "
                                  f"expected {FORMAT!r}")
        try:  # total: a wrong shape is a CheckpointError, never another exception
            positions = {str(k): int(v) for k, v in doc["positions"].items()}
            state = doc["state"]
            if not isinstance(state, dict):
                raise TypeError(f"state is {type(state).__name__}")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"checkpoint has a wrong shape: {type(exc).__name__}: {exc}") from None
        return cls(state=state, positions=positions)


class CheckpointStore:
    """Save and load one named checkpoint (one per correlator partition)."""

    def __init__(self, blobs: BlobStore, name: str, *, bucket: str = BUCKET) -> None:
        self.blobs = blobs
        self.name = name
        self.bucket = bucket
        self.saved = 0
        self.last_size = 0

    async def save(self, cp: Checkpoint) -> None:
        await self.save_json(cp.to_json())

    async def save_json(self, body: bytes) -> None:
        """Compress off the event loop (zlib releases the GIL), then store."""
        blob = await asyncio.to_thread(zlib.compress, body, 1)
        await self.blobs.put_blob(self.bucket, self.name, blob)
        self.saved += 1
        self.last_size = len(blob)

    async def load(self) -> Checkpoint | None:
        blob = await self.blobs.get_blob(self.bucket, self.name)
        return None if blob is None else Checkpoint.decode(blob)
