"""The on-call backend's I/O, shared by the console and the CLI: connect, read, check, publish.

Reads the incident index (KV ``breakfix-incidents``, ``breakfix.correlator.index``) and the audit
trail (stream ``BREAKFIX_ACTIONS``, read from a start time through ``bus.read_stream``: direct gets on a
secured bus, an ordered consumer on an open one; nothing a daemon consumes is touched); checks a verb
with ``breakfix.console.verbs`` and publishes its ``ActionRecord`` on the on-call or admin subject that
names the acting user.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from breakfix.bus.codec import encode
from breakfix.bus.connect import BUS_ERRORS as bus_errors
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.options import NatsOptions
from breakfix.console import verbs
from breakfix.correlator.index import IncidentIndex
from breakfix.schemas import subjects
from breakfix.schemas.incident import ActionRecord, Incident

MAX_RECORDS = 500_000  # audit records read in one call at most
_JWT_BEGIN = "-----BEGIN NATS USER JWT-----"


class OncallError(RuntimeError):
    """A one-line reason the CLI prints before exiting 2."""


BUS_ERRORS = bus_errors  # what talking to NATS can raise; the CLI turns each into one line


def user_from_creds(creds: Path | None, *, env: dict[str, str] | None = None) -> str:
    """The acting user: the ``name`` claim of the creds file's user JWT; ``$USER`` only without creds
    (the unauthenticated lab), as a subject token, since the remediator wants the actor to be exactly
    the subject's user."""
    if creds is None:
        environ = os.environ if env is None else env
        return subjects.token(environ.get("USER") or environ.get("LOGNAME") or "unknown")
    try:
        text = creds.read_text()
    except OSError as exc:
        raise OncallError(f"cannot read creds {creds}: {exc.strerror}") from None
    lines = text.splitlines()
    try:
        jwt = next(lines[i + 1].strip() for i, line in enumerate(lines) if line.strip() == _JWT_BEGIN)
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        name = str(claims.get("name") or "").strip()
    except (StopIteration, IndexError, ValueError, binascii.Error, AttributeError):
        raise OncallError(f"{creds}: not a NATS creds file (no readable user JWT)") from None
    if not name:
        raise OncallError(f"{creds}: the user JWT has no name claim")
    return name


async def connect(target: str | NatsOptions, *, name: str = "breakfix-oncall") -> JetStreamBus:
    """A bus for a short-lived command or the console: one bounded attempt (``BusConnectError``)."""
    return await JetStreamBus.connect(target, name=name)


async def read_records(bus: JetStreamBus, *, cluster: str | None = None, since: datetime | None = None,
                       incident: str | None = None, limit: int = MAX_RECORDS,
                       idle_s: float = 1.0) -> list[ActionRecord]:
    """Audit records (oldest first) of one cluster or all, stored at or after ``since``; only one
    incident's with ``incident``. Undecodable records are skipped."""
    filt = f"{subjects.action_subject(cluster)}.>" if cluster else subjects.ACTIONS_ALL
    filters = [subjects.action_subject(cluster), filt] if cluster else [filt]
    out: list[ActionRecord] = []
    for f in filters:
        for data in await bus.read_stream(subjects.ACTIONS.name, f, since=since, idle_s=idle_s,
                                          limit=limit - len(out)):
            with contextlib.suppress(ValidationError):
                rec = ActionRecord.model_validate_json(data)
                if incident is None or rec.incident_id == incident:
                    out.append(rec)
    out.sort(key=lambda r: r.at)
    return out


@dataclass
class Oncall:
    """Check and publish verbs as one identity."""

    bus: JetStreamBus
    who: verbs.Identity
    clock: Callable[[], datetime]

    @property
    def index(self) -> IncidentIndex:
        return IncidentIndex(self.bus)

    async def incident(self, incident_id: str, cluster: str | None) -> Incident:
        idx = self.index
        inc = await (idx.get(cluster, incident_id) if cluster else idx.find(incident_id))
        if inc is None and cluster:
            other = await idx.find(incident_id)
            if other is not None:
                raise verbs.VerbError(f"incident {incident_id} belongs to cluster {other.cluster}, not {cluster}")
        return verbs.check_incident(inc, incident_id, cluster)

    async def publish(self, verb: str, rec: ActionRecord) -> ActionRecord:
        if not verbs.may(self.who.role, verb):
            raise verbs.VerbError(f"{self.who.user} ({self.who.role.value}) may not {verb}")
        await self.bus.ensure_streams(subjects.STREAMS)
        await self.bus.publish(verbs.subject_for(verb, rec.cluster, self.who.user), encode(rec), msg_id=rec.id)
        return rec

    async def decide(self, verb: str, incident_id: str, *, cluster: str | None, step: str | None,
                     reason: str) -> ActionRecord:
        inc = await self.incident(incident_id, cluster)
        records = await read_records(self.bus, cluster=inc.cluster, since=inc.first_seen - timedelta(minutes=5),
                                     incident=inc.id)
        return await self.publish(verb, verbs.decide_step(verb, inc, records, self.who, step=step, reason=reason,
                                                          at=self.clock()))

    async def on_incident(self, verb: str, incident_id: str, *, cluster: str | None, reason: str,
                          skip_validation: bool = False, assignee: str = "") -> ActionRecord:
        inc = await self.incident(incident_id, cluster)
        return await self.publish(verb, verbs.incident_verb(verb, inc, self.who, reason=reason, at=self.clock(),
                                                            skip_validation=skip_validation, assignee=assignee))


def run(coro_fn: Callable[[], object], *, url: str) -> object:
    """Run one CLI action; a connection or verb failure becomes one ``OncallError`` line."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except (verbs.VerbError, OncallError):
        raise
    except BUS_ERRORS as exc:
        raise OncallError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None
