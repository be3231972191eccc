"""What breakfix asks of an existing stream (``bus.streamconfig``): retention only grows, tuning stays."""

from __future__ import annotations

import pytest
from nats.js import api

from breakfix.bus.streamconfig import serves, updated

DAY = 24 * 3600.0


def cfg(**kw: object) -> api.StreamConfig:
    base: dict[str, object] = {"name": "S", "subjects": ["a.>"], "duplicate_window": 120.0, "max_age": 7 * DAY,
                               "storage": api.StorageType.FILE, "retention": api.RetentionPolicy.LIMITS,
                               "allow_direct": True}
    base.update(kw)
    return api.StreamConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("have", "ok"), [
    (cfg(), True),
    (cfg(max_age=30 * DAY), True),  # an operator kept more history
    (cfg(max_age=0.0), True),  # unlimited
    (cfg(max_age=1 * DAY), False),  # less than breakfix needs: raised
    (cfg(duplicate_window=900.0), True),
    (cfg(duplicate_window=60.0), False),
    (cfg(subjects=["a.>", "b.>"]), False),
    (cfg(storage=api.StorageType.MEMORY), False),
    (cfg(max_msgs=5000, num_replicas=3, description="tuned"), True),  # fields breakfix does not set
    (cfg(allow_direct=False), True),  # opened separately, tolerating identities that may not update
])
def test_a_stream_serves_breakfix_when_it_keeps_at_least_what_breakfix_asks(have: api.StreamConfig,
                                                                            ok: bool) -> None:
    assert serves(cfg(), have) is ok


def test_an_unlimited_want_is_not_served_by_a_bounded_stream() -> None:
    assert not serves(cfg(max_age=0.0), cfg(max_age=90 * DAY))
    assert updated(cfg(max_age=0.0), cfg(max_age=90 * DAY)).max_age == 0.0


@pytest.mark.parametrize(("have_age", "want_age", "kept"), [
    (30 * DAY, 7 * DAY, 30 * DAY),  # never shortened: that would delete stored history
    (1 * DAY, 7 * DAY, 7 * DAY),
    (0.0, 7 * DAY, 0.0),
])
def test_an_update_keeps_the_longer_retention(have_age: float, want_age: float, kept: float) -> None:
    assert updated(cfg(max_age=want_age), cfg(max_age=have_age)).max_age == kept


def test_an_update_sets_breakfix_fields_and_keeps_what_an_operator_tuned() -> None:
    have = cfg(subjects=["a.old"], duplicate_window=900.0, max_msgs=5000, num_replicas=3, description="tuned",
               allow_direct=False, compression=api.StoreCompression.S2)
    out = updated(cfg(subjects=["a.>", "a.new"]), have)
    assert out.subjects == ["a.>", "a.new"]
    assert (out.max_msgs, out.num_replicas, out.description, out.compression) == (5000, 3, "tuned",
                                                                                 api.StoreCompression.S2)
    assert out.duplicate_window == 900.0 and out.allow_direct
    assert have.subjects == ["a.old"], "the server's config object is not changed in place"
