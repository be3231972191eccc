"""Every NATS subject and JetStream stream name breakfix uses, in one place.

Producers call the ``*_subject`` helpers; the bus adapter creates the streams listed in
``STREAMS``. Subject tokens are sanitised: NATS tokens cannot hold ``.``, ``*``, ``>`` or spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "breakfix"

_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def token(value: str) -> str:
    """Make one safe subject token from a name (dots and wildcards become ``_``)."""
    t = _BAD.sub("_", value)
    return t or "_"


def signal_subject(cluster: str, node: str) -> str:
    """``breakfix.signals.<cluster>.<node>``: collectors publish here."""
    return f"{PREFIX}.signals.{token(cluster)}.{token(node)}"


def incident_subject(cluster: str) -> str:
    """``breakfix.incidents.<cluster>``: the correlator publishes incident changes here."""
    return f"{PREFIX}.incidents.{token(cluster)}"


def action_subject(cluster: str) -> str:
    """``breakfix.actions.<cluster>``: the remediator's audit trail."""
    return f"{PREFIX}.actions.{token(cluster)}"


# Human verbs. The user's name is a subject token, so the server's per-user permissions (a
# template on the user's own name) prove who published: a consumer compares the token with the
# record's ``actor``. Operators may publish only ``oncall`` verbs, admins also ``admin`` verbs.
ONCALL_VERBS = ("approve", "deny", "ack", "silence", "unsilence", "note", "assign", "release", "cancel")
ADMIN_VERBS = ("breaker_reset", "kill_switch")


def oncall_subject(cluster: str, user: str, verb: str) -> str:
    """``breakfix.actions.<cluster>.oncall.<user>.<verb>``: an operator's audited decision."""
    if verb not in ONCALL_VERBS:
        raise ValueError(f"unknown on-call verb {verb!r}")
    return f"{PREFIX}.actions.{token(cluster)}.oncall.{token(user)}.{verb}"


def admin_subject(cluster: str, user: str, verb: str) -> str:
    """``breakfix.actions.<cluster>.admin.<user>.<verb>``: an admin's breaker reset or kill switch."""
    if verb not in ADMIN_VERBS:
        raise ValueError(f"unknown admin verb {verb!r}")
    return f"{PREFIX}.actions.{token(cluster)}.admin.{token(user)}.{verb}"


def human_subject_parts(subject: str) -> tuple[str, str, str, str] | None:
    """``(cluster, role, user, verb)`` of an on-call or admin subject, or None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[0] != PREFIX or parts[1] != "actions" or parts[3] not in ("oncall", "admin"):
        return None
    verbs = ONCALL_VERBS if parts[3] == "oncall" else ADMIN_VERBS
    if parts[5] not in verbs:
        return None
    return parts[2], parts[3], parts[4], parts[5]


def agent_subject(cluster: str, node: str) -> str:
    """``breakfix.agent.<cluster>.<node>``: node-agent commands (core NATS request/reply, no stream)."""
    return f"{PREFIX}.agent.{token(cluster)}.{token(node)}"


def dead_letter_subject(stream: str) -> str:
    """``breakfix.dlq.<stream>``: undecodable messages, with the reason in headers."""
    return f"{PREFIX}.dlq.{token(stream.lower())}"


# JetStream KV bucket with the latest version of every incident (written by the correlator, read by
# the console, ``breakfix incidents`` and on-call tools).
INCIDENT_INDEX_BUCKET = "breakfix-incidents"

SIGNALS_ALL = f"{PREFIX}.signals.>"
INCIDENTS_ALL = f"{PREFIX}.incidents.>"
ACTIONS_ALL = f"{PREFIX}.actions.>"
# Every on-call and admin verb of every cluster (``oncall_subject``, ``admin_subject``: six tokens), and none of
# the remediator's own records (``action_subject``: three); what the remediator's control consumer reads.
HUMAN_ACTIONS_ALL = f"{PREFIX}.actions.*.*.*.*"
DLQ_ALL = f"{PREFIX}.dlq.>"

HDR_MSG_ID = "Nats-Msg-Id"
HDR_DLQ_REASON = "Breakfix-Dead-Letter-Reason"
HDR_DLQ_SUBJECT = "Breakfix-Original-Subject"
HDR_DLQ_CONSUMER = "Breakfix-Consumer"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream: its name, subjects and duplicate-detection window."""

    name: str
    subjects: tuple[str, ...]
    duplicate_window_s: float = 120.0
    max_age_s: float = 7 * 24 * 3600.0
    transform: tuple[str, str] | None = None  # (source, destination) subject transform applied on store


def signals_stream(partitions: int = 1) -> StreamSpec:
    """The signal stream. With ``partitions`` > 1 the server appends a partition token to every
    subject, ``breakfix.signals.<cluster>.<node>.<p>``, hashed on the node, so each correlator
    instance consumes only its nodes (``signal_partition_filter``)."""
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    if partitions == 1:
        return SIGNALS
    dest = f"{PREFIX}.signals.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({partitions},2)}}}}"
    return StreamSpec(SIGNALS.name, SIGNALS.subjects, transform=(f"{PREFIX}.signals.*.*", dest))


def signal_partition_filter(partition: int, partitions: int) -> str:
    """The consumer filter for one partition of ``signals_stream(partitions)``."""
    if partitions == 1:
        return SIGNALS_ALL
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} outside 0..{partitions - 1}")
    return f"{PREFIX}.signals.*.*.{partition}"


def streams(partitions: int = 1) -> tuple[StreamSpec, ...]:
    """Every stream, with the signal stream partitioned ``partitions`` ways."""
    return (signals_stream(partitions), INCIDENTS, ACTIONS, DEAD_LETTERS)


SIGNALS = StreamSpec("BREAKFIX_SIGNALS", (SIGNALS_ALL,))
INCIDENTS = StreamSpec("BREAKFIX_INCIDENTS", (INCIDENTS_ALL,), duplicate_window_s=900.0,
                       max_age_s=90 * 24 * 3600.0)  # the history; current state is the KV index
ACTIONS = StreamSpec("BREAKFIX_ACTIONS", (ACTIONS_ALL,), max_age_s=90 * 24 * 3600.0)
DEAD_LETTERS = StreamSpec("BREAKFIX_DLQ", (DLQ_ALL,), max_age_s=30 * 24 * 3600.0)

STREAMS: tuple[StreamSpec, ...] = (SIGNALS, INCIDENTS, ACTIONS, DEAD_LETTERS)
