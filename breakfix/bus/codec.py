"""Total decoders from wire bytes to contract models: any failure is a ``DecodeError`` with a reason.

Every consumer (correlator, remediator, fleet stage, CLI readers) decodes through ``decoder(model)``;
a ``DecodeError`` sends the message to the dead-letter subject (``bus.consumer``,
``correlator.service``) and the consumer moves on. Nothing a peer sends (an impossible date such as
``0001-01-01T00:00:00+01:00``, NaN or Infinity, deep nesting, invalid UTF-8, wrong types, a huge
payload) may raise anything else: one poison message must never stop a daemon.

A signal decoded together with its subject must name, in its body, the cluster and node its subject
names (``breakfix.signals.<cluster>.<node>[.<partition>]``): with per-node NATS identities a node can
publish only on its own subject, so a body that claims another node is a forgery. An action record
likewise: the remediator's kinds only on ``breakfix.actions.<cluster>``, a human's only on that
human's on-call or admin subject (``action_subject_mismatch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from breakfix.bus.consumer import DecodeError, decode_message
from breakfix.schemas import subjects
from breakfix.schemas.common import first_error
from breakfix.schemas.incident import ActionKind, ActionRecord
from breakfix.schemas.signal import Signal

M = TypeVar("M", bound=BaseModel)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # above NATS's largest max_payload; anything bigger is not ours
_MATCHED_CAP = 65536  # (subject, cluster, node) triples a Signal decoder remembers as matching


class _SubjectAware:
    """A decoder that can also check the subject a message arrived on (``consumer.decode_message``)."""

    def __init__(self, fn: Callable[[bytes, str | None], Any], name: str) -> None:
        self._fn = fn
        self.__name__ = name

    def __call__(self, data: bytes) -> Any:
        return self._fn(data, None)

    def with_subject(self, data: bytes, subject: str) -> Any:
        return self._fn(data, subject)


def _reason(model: type[BaseModel], exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid {model.__name__}: {first_error(exc)}"
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    return f"undecodable {model.__name__}: {type(exc).__name__}: {text}"


def signal_subject_mismatch(signal: Signal, subject: str) -> str | None:
    """Why ``subject`` may not carry ``signal`` (None when it may)."""
    parts = subject.split(".")
    if len(parts) not in (4, 5) or parts[:2] != [subjects.PREFIX, "signals"]:
        return f"signal on {subject!r}, not a signal subject"
    if parts[2] != subjects.token(signal.cluster) or parts[3] != subjects.token(signal.node):
        return (f"signal for {signal.cluster}/{signal.node} published on {subject!r} "
                f"(the subject names {parts[2]}/{parts[3]})")
    return None


# Records only the remediator writes, on ``breakfix.actions.<cluster>`` (its role alone may publish there). A human's
# subject (``...oncall|admin.<user>.<verb>``) carries only the other kinds, and only as that user.
SERVICE_KINDS = frozenset({ActionKind.PLAN, ActionKind.STEP, ActionKind.REFUSAL, ActionKind.NOTIFICATION})


def action_subject_mismatch(rec: ActionRecord, subject: str) -> str | None:
    """Why ``subject`` may not carry ``rec`` (None when it may). nats-server's permissions prove which subjects a
    publisher may use, so a record is believed only where its author may publish: the remediator's kinds on its
    own subject, a human's verb on that human's subject with the actor exactly its user (``subjects.token`` is
    lossy: ``jane.doe@corp`` and ``jane_doe_corp`` share one)."""
    if subject == subjects.action_subject(rec.cluster):
        return None
    parts = subjects.human_subject_parts(subject)
    if parts is None:
        return f"record on {subject!r}, not an action subject"
    s_cluster, _role, user, _verb = parts
    if s_cluster != subjects.token(rec.cluster):
        return f"record for cluster {rec.cluster!r} on {subject!r}"
    if rec.kind in SERVICE_KINDS:
        return f"a {rec.kind.value} record, which only the remediator writes, on {subject!r}"
    if rec.actor != user:
        return f"actor {rec.actor!r} on the subject of user {user!r} ({subject!r})"
    return None


def decoder(model: type[M]) -> Callable[[bytes], M]:
    """A total decoder for ``model``. For ``Signal`` with a subject, the subject must match the body.

    The subject check remembers (bounded) the (subject, cluster, node) triples that matched: a node sends
    on one subject, so the check costs one set lookup after its first signal.
    """
    check_subject = model is Signal
    check_action = model is ActionRecord
    validate_json = model.__pydantic_validator__.validate_json  # what model_validate_json calls, unwrapped
    matched: set[tuple[str, str, str]] = set()

    def decode(data: bytes, subject: str | None = None) -> M:
        if len(data) > MAX_MESSAGE_BYTES:
            raise DecodeError(f"undecodable {model.__name__}: {len(data)} bytes is over {MAX_MESSAGE_BYTES}")
        try:
            item: M = validate_json(data)
        except Exception as exc:  # ValidationError, and anything a validator lets escape: all are poison
            raise DecodeError(_reason(model, exc)) from None
        if check_action and subject is not None:
            why = action_subject_mismatch(item, subject)  # type: ignore[arg-type]
            if why is not None:
                raise DecodeError(f"forged ActionRecord: {why}")
        if check_subject and subject is not None:
            key = (subject, item.cluster, item.node)  # type: ignore[attr-defined]
            if key not in matched:
                why = signal_subject_mismatch(item, subject)  # type: ignore[arg-type]
                if why is not None:
                    raise DecodeError(f"forged Signal: {why}")
                if len(matched) >= _MATCHED_CAP:
                    matched.clear()
                matched.add(key)
        return item

    return _SubjectAware(decode, f"decode_{model.__name__}")


__all__ = ["MAX_MESSAGE_BYTES", "SERVICE_KINDS", "DecodeError", "action_subject_mismatch", "decode_message", "decoder",
           "encode", "signal_subject_mismatch"]


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode()
