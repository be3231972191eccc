"""The remediator's record ids and step idempotency keys: deterministic, so a repeat is recognised as one.

Input: where a record or step sits in a plan (incident, attempt, rung, step index, kind, action, outcome) and,
for the ids, the key ``record_key`` derives from the remediator's own secret (its NATS credentials, handed in by
``remediator.app``). Output: ``record_id`` gives the executor's ``ActionRecord.id`` (its ``Nats-Msg-Id``, so
JetStream drops a re-publication after a restart), ``keyed_digest`` the HMAC behind it and behind the service's
own records (``RemediatorService.record``), and ``step_key`` the idempotency key every node-side step carries to
the node agent (``remediator.executor``, ``remediator.planrun``), so a repeated key is answered without acting again.
"""

from __future__ import annotations

import hashlib
import hmac


def record_id(incident: str, attempt: int, kind: str, index: int | None, action: str, outcome: str,
              rung: int = 0, *, key: bytes = b"") -> str:
    """The record's id, its ``Nats-Msg-Id``: the same record always gets the same id, so a re-publication after a
    restart is dropped by JetStream as a duplicate. With ``key`` (the remediator's secret, ``record_key``) it is
    an HMAC: JetStream de-duplicates ids whoever publishes them, and the actions stream also takes on-call
    verbs, so an id anyone could compute could be published first by an operator and the record dropped."""
    raw = f"{incident}\x1f{attempt}\x1f{rung}\x1f{kind}\x1f{index}\x1f{action}\x1f{outcome}".encode()
    return "act-" + (keyed_digest(key, raw) if key else hashlib.sha256(raw).hexdigest())[:20]


def keyed_digest(key: bytes, raw: bytes) -> str:
    """HMAC-SHA256 of ``raw`` under ``key``, hex: the remediator's record ids (``record_id``, ``service.record``)."""
    return hmac.new(key, raw, hashlib.sha256).hexdigest()


def record_key(secret: bytes) -> bytes:
    """The key of the remediator's record ids, from a secret only it holds (its NATS credentials); b"" (ids
    anyone can compute) without one, as on an unauthenticated lab bus where anyone may publish anything."""
    return hashlib.sha256(b"breakfix record ids\x00" + secret).digest() if secret else b""


def step_key(incident: str, attempt: int, rung: int, index: int) -> str:
    """The idempotency key of one step: the same step of the same plan always has the same key."""
    return f"{incident}:{attempt}:{rung}:{index}"
