"""What a notification says: ``breakfix.notification/v1``, the generic webhook's documented JSON body.

Built by the pure ``notify.core.NotifyCore`` from incident changes and audit records; every channel
(``notify.channels``: Alertmanager, PagerDuty, Slack, the generic webhook) formats this one model,
so what on-call reads is the same everywhere. ``dedup_key`` is the incident id (the breaker's own
key for a breaker trip): every channel uses it to make re-sends idempotent.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from breakfix.schemas.common import UtcDatetime

NOTIFICATION_SCHEMA: Literal["breakfix.notification/v1"] = "breakfix.notification/v1"


class NotifyEvent(StrEnum):
    """Why on-call hears from breakfix."""

    ESCALATED = "escalated"      # a human must act (ladder exhausted: carries the RMA summary; unknown fault; ...)
    APPROVAL = "approval"        # a step waits for 'breakfix approve'
    BREAKER = "breaker"          # the circuit breaker tripped: automated operator actions stopped
    WAITING = "waiting"          # a budget or guard wait ran past its limit
    ACKNOWLEDGED = "acknowledged"  # someone acked it in breakfix (PagerDuty gets an acknowledge)
    RESOLVED = "resolved"        # something paged is over


class NotifyAction(StrEnum):
    """The PagerDuty Events v2 ``event_action`` each notification maps to (and the Alertmanager state)."""

    TRIGGER = "trigger"
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"


class Notification(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["breakfix.notification/v1"] = Field(default=NOTIFICATION_SCHEMA, alias="schema")
    id: str = Field(description="Deterministic: dedup key, event and a sequence; a re-send repeats it.")
    dedup_key: str = Field(description="The incident id (or breaker-<cluster>): one page per root cause.")
    event: NotifyEvent
    action: NotifyAction
    title: str
    summary: str = Field(description="One line for a phone screen.")
    cluster: str
    incident: str
    node: str | None = None
    nodes: tuple[str, ...] = Field(default=(), description="Fabric incidents and breaker trips: every node involved.")
    gpus: tuple[str, ...] = Field(default=(), description="GPU index:uuid pairs.")
    category: str = ""
    severity: str = "critical"
    domain: str = "operator"
    topology: dict[str, str] = Field(default_factory=dict)
    tenants: tuple[str, ...] = Field(default=(), description="Blast radius: namespace/workload affected.")
    pods: tuple[str, ...] = Field(default=(), description="Blast radius: namespace/pod affected (capped).")
    done: tuple[str, ...] = Field(default=(), description="What breakfix did, oldest first.")
    next: str = Field(default="", description="What breakfix does next, or what the plan waits on.")
    waiting: str | None = None
    rma: str = Field(default="", description="The one-line RMA summary when the ladder is exhausted.")
    held: tuple[str, ...] = Field(default=(), description="Breaker trips: the incidents the breaker holds.")
    runbook_url: str = ""
    console_url: str = ""
    at: UtcDatetime


__all__ = ["NOTIFICATION_SCHEMA", "Notification", "NotifyAction", "NotifyEvent"]
