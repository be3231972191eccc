"""What breakfix asks of an existing JetStream stream, and the update that asks for no more.

Input: the ``StreamConfig`` breakfix wants (``bus.jetstream.JetStreamBus.ensure_streams``, from
``schemas.subjects``) and the one the server has (``stream_info``). Output: whether the stream
already serves breakfix, and else the config to send back, which is the server's own with only
breakfix's fields changed, so what an operator tuned (replicas, limits, placement, compression,
description) survives every daemon start.

Retention only grows here: a ``max_age`` or duplicate window an operator set longer (or unlimited)
is kept, because shortening either on a restart would delete stored history or re-admit duplicates.
Shortening a stream's retention is an operator's act (``nats stream edit``), never a side effect.
"""

from __future__ import annotations

import dataclasses

from nats.js import api

_EPS = 1e-3


def transform(c: api.StreamConfig) -> tuple[str, str] | None:
    t = c.subject_transform
    return (t.src or "", t.dest or "") if t is not None else None


def _covers(have: float | None, want: float | None, *, zero_is_unlimited: bool) -> bool:
    h, w = have or 0.0, want or 0.0
    if zero_is_unlimited and h == 0.0:
        return True
    if zero_is_unlimited and w == 0.0:
        return False
    return h >= w - _EPS


def _longest(have: float | None, want: float | None) -> float:
    h, w = have or 0.0, want or 0.0
    return 0.0 if 0.0 in (h, w) else max(h, w)


def serves(want: api.StreamConfig, have: api.StreamConfig) -> bool:
    """Whether ``have`` already gives breakfix what ``want`` asks for (``allow_direct`` aside): the same
    subjects, storage, retention policy and subject transform, and at least the age and duplicate window."""
    return (sorted(want.subjects or []) == sorted(have.subjects or [])
            and _covers(have.duplicate_window, want.duplicate_window, zero_is_unlimited=False)
            and _covers(have.max_age, want.max_age, zero_is_unlimited=True)
            and want.storage == have.storage and want.retention == have.retention
            and transform(want) == transform(have))


def updated(want: api.StreamConfig, have: api.StreamConfig) -> api.StreamConfig:
    """``have`` with breakfix's fields set: its subjects, storage, retention policy and transform; the
    longer of the two ages (unlimited wins) and duplicate windows; direct gets on if either has them."""
    return dataclasses.replace(
        have, subjects=list(want.subjects or []), storage=want.storage, retention=want.retention,
        subject_transform=want.subject_transform, max_age=_longest(have.max_age, want.max_age),
        duplicate_window=max(have.duplicate_window or 0.0, want.duplicate_window or 0.0),
        allow_direct=bool(want.allow_direct or have.allow_direct))
