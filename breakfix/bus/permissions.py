"""Who may publish and subscribe to what on a secured bus: one permission template per role.

Each role is a scoped signing key of the cluster's account (``bus.authinit``); a user JWT signed by
that key gets the template, with ``{{name()}}`` replaced by the user's name: a node's name, an
operator's login. nats-server enforces these; breakfix checks nothing here at run time. Subjects
come from ``breakfix.schemas.subjects``; the JetStream API subjects are nats-server's
(``$JS.API.STREAM.INFO.<stream>``, ``$JS.API.CONSUMER.*.<stream>.<durable>``, ``$JS.ACK.<stream>.>``,
``$KV.<bucket>.>``, ``$O.<bucket>.>``). Every identity gets a private inbox ``_INBOX.<name>.>``
(``bus.connect`` sets the client's inbox prefix from its .creds), so no one reads another's replies.

Roles:
- ``node``: publish its own ``breakfix.signals.<cluster>.<node>`` (JetStream, acked) and read the
  streams' info (the collector's ``ensure_streams`` at connect); receive only requests on
  ``breakfix.agent.<cluster>.<node>`` and reply only to those (``resp``).
- ``fleet``: the fleet collector publishes signals for any node of its cluster.
- ``correlator``: reads signals and action records, publishes incidents and dead letters, keeps its
  checkpoint in object store ``breakfix-correlator`` and the incident index in KV ``breakfix-incidents``.
- ``remediator``: reads incidents and action records, publishes action records and dead letters,
  keeps plans in KV ``breakfix-remediator``, reads the incident index at start-up (no writes); the
  only identity that may call ``breakfix.agent.>``.
- ``operator``: publishes only ``breakfix.actions.<cluster>.oncall.<their name>.>``; reads incidents
  and actions, the dead letters and the incident index. ``admin``: also ``...admin.<their name>.>``.
  ``viewer``: reads only. Readers read history with direct gets (``bus.streamread``) and may keep one
  durable per stream named after themselves; the services' durables are beyond their reach. They may
  subscribe to the action records as they are written (the console's live audit trail).
- ``console``: the web console reads like a viewer and publishes on-call and admin verbs on behalf of the
  users it authenticated itself (``breakfix console --auth``), on their own subjects.
"""

from __future__ import annotations

from typing import Any

from breakfix.schemas import subjects

NAME = "{{name()}}"
INBOX = f"_INBOX.{NAME}.>"
ROLES = ("node", "fleet", "correlator", "remediator", "operator", "admin", "viewer", "console")
STREAM_NAMES = tuple(s.name for s in subjects.STREAMS)
CORRELATOR_BUCKET = "breakfix-correlator"
REMEDIATOR_BUCKET = "breakfix-remediator"
INDEX_BUCKET = subjects.INCIDENT_INDEX_BUCKET


def _stream_info() -> list[str]:
    return [f"$JS.API.STREAM.INFO.{name}" for name in STREAM_NAMES]


def _manage_streams() -> list[str]:
    """Create and update the breakfix streams (the services' ``ensure_streams``)."""
    return [f"$JS.API.STREAM.{verb}.{name}" for name in STREAM_NAMES for verb in ("INFO", "CREATE", "UPDATE")]


def _consume(stream: str) -> list[str]:
    """Durable pull consumers on ``stream``: create/info/delete, fetch, ack."""
    return [f"$JS.API.CONSUMER.*.{stream}", f"$JS.API.CONSUMER.*.{stream}.>", f"$JS.ACK.{stream}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.*"]


def _read_consume(stream: str) -> list[str]:
    """A reader on ``stream``: direct gets (history reads, ``bus.streamread``), consumer info, and one durable
    named after the user (create, pull, ack, delete). No anonymous create (``$JS.API.CONSUMER.CREATE.<stream>``):
    its request body may name any consumer, a service's durable included. So a reader can neither delete,
    pull from, ack on nor redefine the remediator's or the correlator's consumer."""
    mine = f"{stream}.{NAME}"
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.NAMES.{stream}", f"$JS.API.CONSUMER.LIST.{stream}",
            f"$JS.API.CONSUMER.CREATE.{mine}", f"$JS.API.CONSUMER.CREATE.{mine}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{mine}", f"$JS.API.CONSUMER.DELETE.{mine}",
            f"$JS.API.CONSUMER.MSG.NEXT.{mine}", f"$JS.ACK.{mine}.>"]


def _store(stream: str, data_prefix: str) -> list[str]:
    """A KV bucket or object store: its backing stream's API, direct gets, and its data subjects."""
    return [f"$JS.API.*.*.{stream}", f"$JS.API.*.*.{stream}.>", f"$JS.API.STREAM.MSG.*.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"{data_prefix}.>", f"$JS.ACK.{stream}.>", "$JS.FC.>", "$JS.API.STREAM.NAMES"]


def _read_store(stream: str) -> list[str]:
    """Read a KV bucket: its info, direct gets, and an ordered consumer to watch it (no writes)."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>", f"$JS.API.CONSUMER.INFO.{stream}.>", "$JS.FC.>",
            "$JS.API.STREAM.NAMES"]


def _perm(pub: list[str], sub: list[str], *, responses: bool = False) -> dict[str, Any]:
    perm: dict[str, Any] = {"pub": {"allow": pub}, "sub": {"allow": [*sub, INBOX]},
                            "subs": -1, "data": -1, "payload": -1}
    if responses:
        perm["resp"] = {"max": 1, "ttl": 0}
    return perm


def role_template(role: str, cluster: str) -> dict[str, Any]:
    """The permission template of ``role`` in ``cluster`` (``{{name()}}`` is the user's name)."""
    c = subjects.token(cluster)
    signals = f"{subjects.PREFIX}.signals.{c}"
    actions = f"{subjects.PREFIX}.actions.{c}"
    dlq = f"{subjects.PREFIX}.dlq.>"
    readers = [*_stream_info(), *_read_consume(subjects.INCIDENTS.name), *_read_consume(subjects.ACTIONS.name),
               *_read_consume(subjects.DEAD_LETTERS.name), *_read_store(f"KV_{INDEX_BUCKET}")]
    if role == "node":
        return _perm([f"{signals}.{NAME}", *_stream_info()], [f"{subjects.PREFIX}.agent.{c}.{NAME}"],
                     responses=True)
    if role == "fleet":
        return _perm([f"{signals}.*", *_stream_info()], [])
    if role == "correlator":
        return _perm([subjects.incident_subject(cluster), dlq, *_manage_streams(),
                      *_consume(subjects.SIGNALS.name), *_consume(subjects.ACTIONS.name),
                      *_consume(subjects.INCIDENTS.name),
                      *_store(f"OBJ_{CORRELATOR_BUCKET}", f"$O.{CORRELATOR_BUCKET}"),
                      *_store(f"KV_{INDEX_BUCKET}", f"$KV.{INDEX_BUCKET}")], [])
    if role == "remediator":
        return _perm([actions, dlq, f"{subjects.PREFIX}.agent.{c}.*", *_manage_streams(),
                      *_consume(subjects.INCIDENTS.name), *_consume(subjects.ACTIONS.name),
                      *_store(f"KV_{REMEDIATOR_BUCKET}", f"$KV.{REMEDIATOR_BUCKET}"),
                      *_read_store(f"KV_{INDEX_BUCKET}")], [])
    live = [subjects.ACTIONS_ALL]  # the audit trail as it is written (console.state.follow); the stream has it all
    if role == "operator":
        return _perm([f"{actions}.oncall.{NAME}.>", *readers], live)
    if role == "admin":
        return _perm([f"{actions}.oncall.{NAME}.>", f"{actions}.admin.{NAME}.>", *readers], live)
    if role == "viewer":
        return _perm(readers, live)
    if role == "console":  # authenticates its own users (proxy or tokens) and publishes on their subjects
        return _perm([f"{actions}.oncall.*.>", f"{actions}.admin.*.>", *readers], live)
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
