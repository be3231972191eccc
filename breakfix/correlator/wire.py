"""The incident change as it goes on the wire: its JSON, written straight from the tracked state, and its message id.

The correlator service (``correlator.service``) publishes ``change_json`` of each ``model.Change`` the core returns,
with ``msg_id`` as its ``Nats-Msg-Id``, on the incident stream and into the incident index (``correlator.index``);
the fleet stage and re-publication after a restart (``correlator.publish``) name changes the same way. The JSON is
the ``IncidentChange`` contract (``schemas.incident``): ``tests/test_correlator_wire.py`` decodes it to the
validated model and checks its fields against ``model.FIELDS``. Compiled with the rest of the core
(``NATIVE_MODULES``): it reads a ``TrackedIncident``'s attributes natively. ``cached_dump`` also serves the
checkpoint (``correlator.checkpoint``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from breakfix.correlator.model import TrackedIncident
from breakfix.schemas.common import GpuRef, TenantRef
from breakfix.schemas.incident import ChangeKind, IncidentChange

_OPTS = orjson.OPT_UTC_Z


_REFS: dict[int, tuple[GpuRef | TenantRef, dict[str, Any]]] = {}
_REFS_CAP = 65536


def cached_dump(obj: GpuRef | TenantRef) -> dict[str, Any]:
    """Frozen refs repeat across changes; dump each once (callers never mutate the dict). Found by identity:
    the entry holds the ref, so its id is not reused while cached (cheaper than hashing the model)."""
    hit = _REFS.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    if len(_REFS) >= _REFS_CAP:
        _REFS.clear()
    dumped = obj.model_dump(mode="json")
    _REFS[id(obj)] = (obj, dumped)
    return dumped


def change_json(kind: ChangeKind, inc: TrackedIncident, at: datetime, max_bytes: int | None = None) -> bytes:
    """The ``IncidentChange`` JSON for ``inc``, written directly (orjson, ``_json_body``) for the hot path.

    It decodes to the same ``IncidentChange`` as ``Change.to_wire`` (pinned by
    ``tests/test_correlator_wire.py``); timestamps come out as RFC 3339 with ``Z``. Past
    ``max_bytes`` the long lists (signal ids, evidence, timeline) are trimmed and counted in
    ``overflow``, so a change always fits under NATS's ``max_payload``.
    """
    body = _json_body(inc)
    data = orjson.dumps({"kind": kind.value, "at": at, "incident": body}, option=_OPTS)
    if max_bytes is not None and len(data) > max_bytes:
        data = _trimmed(kind, body, at, max_bytes)
    return data


def _json_body(inc: TrackedIncident) -> dict[str, Any]:
    """The incident's wire fields as JSON values, in ``FIELDS`` order (``tests/test_correlator_wire.py`` checks
    the names and order against it). Written out, not driven by the table: the compiled core reads each attribute
    natively and converts it inline, where a table needs a getter and a call per field (half of a change's JSON
    time). Plain values and enums are written as they are: orjson writes a StrEnum member as its value."""
    plan = inc.plan
    return {
        "id": inc.id, "cluster": inc.cluster, "scope": inc.scope, "node": inc.node, "nodes": list(inc.nodes),
        "gpus": [cached_dump(g) for g in inc.gpus.values()],
        "tenants": [cached_dump(t) for t in inc.tenants.values()],
        "category": inc.category, "severity": inc.severity, "domain": inc.domain, "status": inc.status,
        "title": inc.title, "codes": list(inc.counts), "checks": list(inc.checks), "labels": inc.labels,
        "first_seen": inc.first_seen, "last_seen": inc.last_seen, "signal_ids": inc.signal_ids,
        "signal_count": inc.signal_count, "duplicate_count": inc.duplicate_count,
        "counts": [{"key": k, "count": v} for k, v in inc.counts.items()], "flaps": inc.flaps,
        "open_faults": list(inc.open_faults), "evidence": inc.evidence,
        "plan": plan.model_dump(mode="json") if plan is not None else None, "resolved_at": inc.resolved_at,
        "version": inc.version, "timeline": [{"at": a, "event": e, "note": n} for a, e, n in inc.timeline],
        "parent": inc.parent, "members": list(inc.members), "topology": inc.topology,
        "impact": [cached_dump(t) for t in inc.impact.values()], "time_to_repair_s": inc.time_to_repair_s,
        "waiting": inc.waiting, "source": inc.source, "overflow": inc.overflow, "schema": "breakfix.incident/v1",
    }


_TRIM_ORDER = ("signal_ids", "evidence", "timeline", "members", "nodes", "gpus", "tenants", "impact", "counts",
               "codes", "open_faults", "checks")


def _trimmed(kind: ChangeKind, body: dict[str, Any], at: datetime, max_bytes: int) -> bytes:
    """Cut the long lists to their first and last two items (counted in ``overflow``) until it fits."""
    overflow: dict[str, int] = dict(body.get("overflow") or {})
    body["overflow"] = overflow
    data = b""
    for name in _TRIM_ORDER:
        items = body.get(name)
        if isinstance(items, list) and len(items) > 4:
            overflow[name] = overflow.get(name, 0) + len(items) - 4
            body[name] = items[:2] + items[-2:]
        data = orjson.dumps({"kind": kind.value, "at": at, "incident": body}, option=_OPTS)
        if len(data) <= max_bytes:
            return data
    body["title"] = str(body["title"])[:200]
    body["evidence"] = [str(e)[:200] for e in body["evidence"]]
    body["labels"] = dict(list(body["labels"].items())[:16])
    body["topology"] = dict(list(body["topology"].items())[:16])
    return orjson.dumps({"kind": kind.value, "at": at, "incident": body}, option=_OPTS)


LIFECYCLE = (ChangeKind.OPENED, ChangeKind.REOPENED, ChangeKind.RESOLVED)


def msg_id(kind: ChangeKind, incident: str, version: int, flaps: int) -> str:
    """The ``Nats-Msg-Id`` of an incident change. Lifecycle events are named by incident and flap
    count, whatever version a batch reached; other changes by version. Either way a
    re-publication after a restart is a duplicate that JetStream drops."""
    if kind in LIFECYCLE:
        return f"{incident}:{kind.value}:{flaps}"
    return f"{incident}:{version}"


def change_msg_id(ch: IncidentChange) -> str:
    return msg_id(ch.kind, ch.incident.id, ch.incident.version, ch.incident.flaps)


