"""Edge behaviour: turn each source's readings into the few signals worth publishing. Pure.

Sources (``collectors.nvml``, ``dcgm``, ``fabric``, ``endpoint``, ``kmsg``, ...) hand the daemon a
``Cycle``: *states* (the current health of every check/entity they observed this cycle, healthy
or not; as built signals, or as ``context.Reading``s whose signal is built only if it is sent) and
*events* (occurrences such as an XID line). ``EdgeFilter.apply`` returns what goes
to the forwarder (``collectors.forwarder``):

- states: only transitions per (check, entity): fault, a changed fault code or severity (a garbled port
  reading's warning that becomes a critical link-down, a thermal warning that turns critical), then healthy. A
  first healthy reading is not news, unless the fault was open when the previous process stopped
  (``faulted``, kept on disk by the daemon): then it is the clearing. A carried fault is forgotten once its
  check has been read for three resync periods without it (the entity is gone), or after a day when the
  check is never read again. An entity missing from a cycle is never cleared.
- every ``resync_s`` the current faults, and the healthy state of every entity that was ever
  faulted, are sent again (``details.resync``) so the correlator can reconcile after a loss;
- events: the same (check, entity, code, workload, severity, and for a code whose class comes from its line the
  class) again within ``repeat_window_s`` is counted, not sent; the next one sent carries
  ``details.suppressed_repeats``. Severity and class are the catalog's for the whole line, so a repeat it rates
  differently (an XID 154 whose recovery action went from None to a reset, an
  NVLink5 XID whose decode turned from IGNORE to RESET_GPU, an SXid turned fatal) is news and goes at once; it
  is never replaced by a milder repeat inside the window. A window that closes with
  repeats counted and none sent sends its latest repeat then (the trailing edge), so a fault that
  recurs always reaches the correlator within one window: the remediator's soak (longer than the
  window) sees a recurrence however the collector rate-limits it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from breakfix.collectors.context import Reading
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal


@dataclass(frozen=True, slots=True)
class Cycle:
    states: list[Signal] = field(default_factory=list)
    events: list[Signal] = field(default_factory=list)
    readings: list[Reading] = field(default_factory=list)  # states too, after ``states``, built only when sent


@dataclass(slots=True)
class _State:
    healthy: bool
    code: str | None
    severity: Severity
    signal: Signal | Reading  # the latest reading, sent again at a resync
    ever_faulted: bool


@dataclass
class EdgeStats:
    transitions: int = 0
    suppressed_states: int = 0
    suppressed_events: int = 0
    resyncs: int = 0
    unbuildable: int = 0  # readings whose signal could not be built (dropped; none are expected)


CARRY_MAX_S = 24 * 3600.0  # a carried fault whose check is never read again (its source off) is kept this long
_CHECKS_CAP = 4096  # check names are a source's own: bounded however many arrive


def _built(s: Signal | Reading) -> Signal | None:
    """The signal a state stands for; None for a reading whose signal cannot be built (a source checks what a
    ``Signal`` refuses when it reads, so this is never expected; it must not stop the other sources' cycles)."""
    if isinstance(s, Signal):
        return s
    try:
        return s.build()
    except Exception:
        return None


def _with(s: Signal, **details: str) -> Signal:
    return s.model_copy(update={"details": {**s.details, **details}})


class EdgeFilter:
    def __init__(self, *, resync_s: float = 300.0, repeat_window_s: float = 60.0,
                 faulted: Iterable[str] = (), catalog: Catalog | None = None) -> None:
        """``faulted``: the fault keys that were open when the previous process stopped (``faulted_keys``, kept
        by the daemon): their first reading here counts against that, so a fault fixed while the collector
        was down is cleared (a first healthy reading is otherwise not news). ``catalog``: classes the events
        whose class comes from their own line (``Catalog.message_dependent``) for their repeat key."""
        self.catalog = catalog
        self.carried: set[str] = set(faulted)  # bounded by its file (collectors.keyfile.MAX_KEYS)
        self.checks_seen: dict[str, datetime] = {}  # check -> first cycle that read it here (its source is up)
        self.resync_s = resync_s
        self.repeat_window_s = repeat_window_s
        self.states: dict[str, _State] = {}
        self.events: dict[str, tuple[datetime, int]] = {}  # key -> (last sent, suppressed since)
        self.pending: dict[str, Signal] = {}  # key -> the latest suppressed repeat, sent when its window closes
        self.last_resync: datetime | None = None
        self.started: datetime | None = None
        self.stats = EdgeStats()

    def apply(self, cycle: Cycle, now: datetime) -> list[Signal]:
        out: list[Signal] = []
        if self.carried:
            for c in (*(s.check for s in cycle.states), *(r.check for r in cycle.readings)):
                if c not in self.checks_seen and len(self.checks_seen) < _CHECKS_CAP:
                    self.checks_seen[c] = now
        for s in cycle.states:
            self._state(s.fault_key(), s, s.healthy, s.code, s.severity, out)
        for r in cycle.readings:
            self._state(r.key, r, r.healthy, r.code, r.severity, out)
        for s in cycle.events:
            out.extend(self._event(s))
        if self.pending:
            out.extend(self._trailing(now))
        if self.carried and self.started is not None:
            self._expire_carried(now)
        if self.started is None:
            self.started = now
        if self.last_resync is None:
            self.last_resync = now
        elif (now - self.last_resync).total_seconds() >= self.resync_s:
            self.last_resync = now
            sent = {s.fault_key() for s in out}
            for key, st in self.states.items():
                if key not in sent and (not st.healthy or st.ever_faulted):
                    sig = _built(st.signal)  # an unchanged fault keeps its latest reading, never built: one that
                    # does not build is skipped and counted (under the source whose cycle ran the resync)
                    if sig is None:
                        self.stats.unbuildable += 1
                        continue
                    out.append(_with(sig.model_copy(update={"observed_at": max(now, sig.observed_at),
                                                            "id": f"{sig.id[:24]}r{int(now.timestamp())}"}),
                                     resync="true"))
                    self.stats.resyncs += 1
        return out

    def _state(self, key: str, s: Signal | Reading, healthy: bool, code: str | None, severity: Severity,
               out: list[Signal]) -> None:
        """One state: sent when it is a transition (a ``Reading`` built then), remembered either way. A reading
        whose signal cannot be built changes nothing here (counted in ``unbuildable``): the next poll tries again."""
        prev = self.states.get(key)
        if prev is None and key in self.carried:  # open before the restart: compare with that
            self.carried.discard(key)
            prev = self.states[key] = _State(False, None if healthy else code, severity, s, True)
        if prev is None:
            if healthy or self._send(s, out):
                self.states[key] = _State(healthy, code, severity, s, not healthy)
            return
        if not (prev.healthy != healthy or (not healthy and (prev.code != code or prev.severity != severity))):
            self.stats.suppressed_states += 1
        elif not self._send(s, out):
            return
        prev.healthy, prev.code, prev.severity, prev.signal = healthy, code, severity, s
        prev.ever_faulted |= not healthy

    def _send(self, s: Signal | Reading, out: list[Signal]) -> bool:
        """A transition goes out; False (counted) when its reading's signal cannot be built."""
        sig = _built(s)
        if sig is None:
            self.stats.unbuildable += 1
            return False
        out.append(sig)
        self.stats.transitions += 1
        return True

    def _expire_carried(self, now: datetime) -> None:
        """Forget a carried fault whose check has been read for three resync periods without its entity (the entity
        is gone): only then, so a source that comes up late after a reboot (a driver still loading) still clears
        what it fixed. A check never read again (its source turned off) is forgotten after ``CARRY_MAX_S``."""
        window = 3 * self.resync_s
        assert self.started is not None
        if (now - self.started).total_seconds() > CARRY_MAX_S:
            self.carried.clear()
            return
        gone = {k for k in self.carried if (seen := self.checks_seen.get(k.partition("@")[0])) is not None
                and (now - seen).total_seconds() > window}
        self.carried -= gone

    def faulted_keys(self) -> list[str]:
        """The faults open now (and those carried over a restart not read again yet): what a restart carries."""
        return sorted({k for k, st in self.states.items() if not st.healthy} | self.carried)

    def _trailing(self, now: datetime) -> list[Signal]:
        """Send the latest repeat of every window that has closed with repeats counted and none sent."""
        out: list[Signal] = []
        for key, s in list(self.pending.items()):
            start, count = self.events.get(key, (s.observed_at, 1))
            if (now - start).total_seconds() < self.repeat_window_s:
                continue
            del self.pending[key]
            self.events[key] = (s.observed_at, 0)
            out.append(_with(s, suppressed_repeats=str(count - 1)) if count > 1 else s)
        return out

    def _event(self, s: Signal) -> list[Signal]:
        key = f"{s.fault_key()}#{s.code or ''}#{s.tenant.key() if s.tenant else ''}#{s.severity.value}"
        cat = self.catalog
        if cat is not None and cat.message_dependent(s.check, s.code):  # XID 154 Reset, Drain and Reset: both critical
            key += "#" + cat.classify(check=s.check, code=s.code, message=s.message, details=s.details).category
        last = self.events.get(key)
        if last is not None and (s.observed_at - last[0]).total_seconds() < self.repeat_window_s:
            self.events[key] = (last[0], last[1] + 1)
            self.pending[key] = s
            self.stats.suppressed_events += 1
            return []
        self.events[key] = (s.observed_at, 0)
        self.pending.pop(key, None)
        if len(self.events) > 50_000:  # forget the oldest half; bounded whatever a log throws at us
            for k in sorted(self.events, key=lambda k: self.events[k][0])[:25_000]:
                del self.events[k]
                self.pending.pop(k, None)
        if last is not None and last[1]:
            return [_with(s, suppressed_repeats=str(last[1]))]
        return [s]
