"""Publishing incident changes on ``breakfix.incidents.<cluster>`` with their msg-ids.

Used by the correlator service (``correlator.service``) and the fleet stage (``correlator.fleet``);
the msg-id rule lives with the change's wire form (``correlator.wire.msg_id``). A lifecycle event that the
stream already held was dropped by JetStream as a duplicate; its (possibly newer) state goes out
again as an update, so consumers always see the latest.
"""

from __future__ import annotations

from breakfix.bus.codec import encode
from breakfix.bus.protocol import Bus, PublishAck
from breakfix.correlator.index import index_for
from breakfix.correlator.wire import LIFECYCLE, change_msg_id
from breakfix.schemas import subjects
from breakfix.schemas.incident import ChangeKind, IncidentChange

Item = tuple[str, bytes, str | None]


def items_of(wire: list[IncidentChange]) -> list[Item]:
    return [(subjects.incident_subject(ch.incident.cluster), encode(ch), change_msg_id(ch)) for ch in wire]


async def settle_publishes(bus: Bus, items: list[Item], acks: list[PublishAck]) -> None:
    """Re-send a lifecycle event that was dropped as a duplicate as an update of its current state."""
    again: list[Item] = []
    for (subject, data, _mid), ack in zip(items, acks, strict=True):
        if not ack.duplicate:
            continue
        ch = IncidentChange.model_validate_json(data)
        if ch.kind in LIFECYCLE:
            again.append((subject, *items_of([ch.model_copy(update={"kind": ChangeKind.UPDATED})])[0][1:]))
    if again:
        await bus.publish_many(again)


async def publish_changes(bus: Bus, wire: list[IncidentChange]) -> None:
    """Publish and wait for the acks (the fleet stage; the correlator pipelines instead)."""
    if wire:
        items = items_of(wire)
        await index_for(bus).write_items(items)  # the incident index (KV bucket): latest versions
        await settle_publishes(bus, items, await bus.publish_many(items))
