"""The incident index: the latest version of every incident in the JetStream KV bucket ``breakfix-incidents``.

Written by the correlator with the changes it publishes (``CorrelatorService._flush_index``: each incident's
latest change once its consumers have caught up, at most ``ServiceConfig.index_interval_s`` after it was
published while they have not, and always before a checkpoint), read by ``breakfix incidents``, the console
and the remediator, so the current state loads in time proportional to the incidents kept, never to the history: the
history stays in the ``BREAKFIX_INCIDENTS`` stream. One key per incident, ``<cluster>.<incident>``
(subject-safe tokens), so one cluster's incidents are a key prefix. The value is the last
``IncidentChange`` JSON the correlator published for it, the very bytes it sent on the stream
(no second encoding on the hot path). Entries expire with the bucket's ``max_age`` (the retention).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field

import structlog
from pydantic import ValidationError

from breakfix.bus.protocol import KeyValue, KvEntry
from breakfix.schemas import subjects
from breakfix.schemas.incident import ChangeKind, Incident, IncidentChange
from breakfix.schemas.subjects import token

BUCKET = subjects.INCIDENT_INDEX_BUCKET
RETENTION_S = 90 * 24 * 3600.0  # as long as the incident stream keeps the history
MAX_SNAPSHOT = 1_000_000  # a bucket larger than this is read only up to it
log = structlog.get_logger("breakfix.correlator.index")


def index_key(cluster: str, incident_id: str) -> str:
    """``<cluster>.<incident>``: a cluster's incidents share the key prefix ``<cluster>.``."""
    return f"{token(cluster)}.{token(incident_id)}"


def cluster_prefix(cluster: str | None) -> str:
    return f"{token(cluster)}." if cluster else ""


def decode(entry: KvEntry) -> Incident | None:
    """The incident in an entry; None for a deleted key or a value that does not decode (logged)."""
    if entry.value is None:
        return None
    try:
        return IncidentChange.model_validate_json(entry.value).incident
    except ValidationError as exc:
        log.warning("index_entry_undecodable", key=entry.key, error=str(exc).splitlines()[0])
        return None


@dataclass
class IncidentIndex:
    """Writer and reader of the bucket over the bus's ``KeyValue`` protocol."""

    kv: KeyValue
    bucket: str = BUCKET
    retention_s: float = RETENTION_S
    _ready: bool = field(default=False, init=False)
    written: int = field(default=0, init=False)

    async def ensure(self) -> None:
        if not self._ready:
            await self.kv.ensure_kv(self.bucket, history=1, max_age_s=self.retention_s)
            self._ready = True

    async def write_items(self, items: Iterable[tuple[str, bytes, str | None]]) -> None:
        """Index what the correlator publishes: ``(subject, IncidentChange JSON, msg-id)`` items.

        The cluster is the subject's last token (``breakfix.incidents.<cluster>``), the incident
        the msg-id's first part (``<incident>:<version>`` or ``<incident>:<event>:<flaps>``).
        Items come one per incident per batch, latest last; a later item for a key wins.
        """
        await self._put(_latest(items))

    async def write_items_start(self, items: Iterable[tuple[str, bytes, str | None]]) -> Awaitable[object]:
        """``write_items`` in two halves (the correlator service): the puts go out now, in order, and the
        returned awaitable waits for the store to take them (raising if it did not; ``KeyValue.kv_put_start``)."""
        latest = _latest(items)
        if not latest:
            return _done()
        await self.ensure()
        self.written += len(latest)
        return await self.kv.kv_put_start(self.bucket, latest)

    async def write(self, incidents: Iterable[Incident]) -> None:
        """Put incidents as they are now (the highest version wins when an id repeats)."""
        best: dict[str, Incident] = {}
        for inc in incidents:
            prev = best.get(inc.id)
            if prev is None or inc.version >= prev.version:
                best[inc.id] = inc
        await self._put({index_key(i.cluster, i.id): IncidentChange(kind=ChangeKind.UPDATED, incident=i,
                                                                    at=i.last_seen).model_dump_json(by_alias=True)
                         .encode() for i in best.values()})

    async def _put(self, values: dict[str, bytes]) -> None:
        if not values:
            return
        await self.ensure()
        await self.kv.kv_put_many(self.bucket, values)  # pipelined on JetStream: one round trip per batch
        self.written += len(values)

    async def get(self, cluster: str, incident_id: str) -> Incident | None:
        await self.ensure()
        entry = await self.kv.kv_get(self.bucket, index_key(cluster, incident_id))
        return None if entry is None else decode(entry)

    async def find(self, incident_id: str) -> Incident | None:
        """An incident by id alone, in whichever cluster holds it."""
        await self.ensure()
        suffix = "." + token(incident_id)
        for key in await self.kv.kv_keys(self.bucket):
            if key.endswith(suffix):
                entry = await self.kv.kv_get(self.bucket, key)
                if entry is not None:
                    return decode(entry)
        # nats.py's key listing (a watcher it ends by itself) can come back short on a busy server: one full read of
        # the bucket, up to its end-of-values marker, before a verb is told the incident does not exist
        for entry in await self.kv.kv_snapshot(self.bucket):
            if entry.key.endswith(suffix) and entry.value is not None:
                return decode(entry)
        return None

    async def snapshot(self, cluster: str | None = None, *, timeout_s: float = 10.0) -> dict[str, Incident]:
        """Every incident now in the bucket (one cluster's with ``cluster``), by id, decoded.

        On JetStream: one watch of the bucket (server-side prefix filter) up to the end-of-values
        marker. Elsewhere: the keys, then one watch until each key has been seen (a key deleted in
        between arrives as a delete marker). Waits time out after ``timeout_s`` without progress.
        """
        out: dict[str, Incident] = {}
        for entry in await self.entries(cluster, timeout_s=timeout_s):
            inc = decode(entry)
            if inc is not None:
                out[inc.id] = inc
        return out

    async def entries(self, cluster: str | None = None, *, timeout_s: float = 10.0) -> list[KvEntry]:
        """Every current entry, undecoded (for readers that decode only what they show)."""
        await self.ensure()
        return await self.kv.kv_snapshot(self.bucket, cluster_prefix(cluster), timeout_s=timeout_s,
                                         limit=MAX_SNAPSHOT)

    async def watch(self, cluster: str | None = None) -> AsyncIterator[tuple[str, Incident | None]]:
        """``(key, incident)`` for every current entry, then for each change (None: deleted)."""
        await self.ensure()
        it = self.kv.kv_watch(self.bucket, cluster_prefix(cluster))
        try:
            async for entry in it:
                yield entry.key, decode(entry)
        finally:
            await _close(it)


def _latest(items: Iterable[tuple[str, bytes, str | None]]) -> dict[str, bytes]:
    latest: dict[str, bytes] = {}
    for subject, data, msg_id in items:
        if msg_id:
            latest[f"{subject.rsplit('.', 1)[-1]}.{token(msg_id.split(':', 1)[0])}"] = data
    return latest


async def _done() -> None:
    return None


async def _close(it: AsyncIterator[KvEntry]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


_INDEXES: weakref.WeakKeyDictionary[object, IncidentIndex] = weakref.WeakKeyDictionary()


class _NoIndex:
    """For a bus without key-value support (test fakes): nothing is written."""

    async def write(self, incidents: Iterable[Incident]) -> None:
        del incidents

    async def write_items(self, items: Iterable[tuple[str, bytes, str | None]]) -> None:
        del items

    async def write_items_start(self, items: Iterable[tuple[str, bytes, str | None]]) -> Awaitable[object]:
        del items
        return _done()


def index_for(bus: object) -> IncidentIndex | _NoIndex:
    """The index writer of this bus (one per bus); a no-op when the bus has no key-value store."""
    if not all(hasattr(bus, m) for m in ("ensure_kv", "kv_put", "kv_watch")):
        return _NoIndex()
    idx = _INDEXES.get(bus)
    if idx is None:  # the writer reaches its bus through a proxy: a strong reference from the value would keep the
        # key alive, and with it every bus (and its last acks) a process ever indexed through
        idx = _INDEXES[bus] = IncidentIndex(weakref.proxy(bus))
    return idx


__all__ = ["BUCKET", "IncidentIndex", "cluster_prefix", "decode", "index_for", "index_key"]
