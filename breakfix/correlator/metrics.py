"""The correlator's and the fleet stage's Prometheus metrics (``/metrics`` on ``--metrics-port``).

Fed by the service (``correlator.service``, ``correlator.fleet``) through a few calls: every decoded
message (``consumed``), every dead letter (``dead_lettered``), every published incident change
(``published``), every stored checkpoint (``checkpointed``), and consumer lag polled from JetStream
(``lag``). Served by ``bus.observe.ObserveServer``; read by Prometheus, the alert rules in
``deploy/prometheus/breakfix-rules.yaml`` and the dashboards in ``deploy/grafana/``.

Labels stay bounded: sources, checks (capped), reason classes, categories, severities, domains,
statuses, waiting states and change kinds; never incident ids, nodes or pods.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from breakfix.bus.observe import LabelCap
from breakfix.schemas.common import Severity
from breakfix.schemas.incident import ChangeKind, Domain, IncidentStatus, WaitingOn
from breakfix.schemas.signal import Signal


class IncidentLike(Protocol):
    """A published ``Incident`` or the correlator's own ``TrackedIncident``: what the gauge reads."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> IncidentStatus: ...
    @property
    def parent(self) -> str | None: ...
    @property
    def category(self) -> str: ...
    @property
    def severity(self) -> Severity: ...
    @property
    def domain(self) -> Domain: ...
    @property
    def waiting(self) -> WaitingOn | None: ...


class ChangeLike(Protocol):
    @property
    def kind(self) -> ChangeKind: ...
    @property
    def incident(self) -> IncidentLike: ...


class Counts(Collector):
    """A counter family fed by plain dict increments (the per-signal hot path: no lock, no label lookup)."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], n: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + n

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, v in sorted(self.values.items()):
            fam.add_metric(list(key), v)
        yield fam

OPEN_LABELS = ("category", "severity", "domain", "status", "waiting")
MAX_TRACKED = 200_000  # open incidents tracked for the gauge; beyond it they are counted as overflow
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# dead-letter reasons as the bus and the service write them -> a bounded class
# (bus.codec: "undecodable <Model>: ..." for bad JSON, "invalid <Model>: ..." for a valid JSON of the wrong shape)
_REASON_CLASSES = (("correlator error", "handler_error"), ("publish failed", "publish_failed"),
                   ("too large", "oversize"), ("oversize", "oversize"), ("undecodable", "invalid_json"),
                   ("json", "invalid_json"), ("invalid ", "schema"), ("validation", "schema"), ("schema", "schema"))


def reason_class(reason: str) -> str:
    low = reason.lower()
    for needle, cls in _REASON_CLASSES:
        if needle in low:
            return cls
    return "other"


class OpenIncidents(Collector):
    """The open-incident gauge, computed at scrape time from the last change seen per incident.

    Folded incidents are left out (their parent stands for them); resolved ones drop out; escalated
    ones stay (they are open work for a human)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_id: dict[str, tuple[str, ...]] = {}
        self.overflow = 0

    def apply(self, inc: IncidentLike) -> None:
        if inc.status.value == "resolved" or inc.parent is not None:
            self.by_id.pop(inc.id, None)
            return
        labels = (inc.category, inc.severity.value, inc.domain.value, inc.status.value,
                  inc.waiting.value if inc.waiting else "none")
        if inc.id not in self.by_id and len(self.by_id) >= MAX_TRACKED:
            self.overflow += 1
            return
        self.by_id[inc.id] = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily(self.name, "Incidents not resolved (folded members excluded), by category, severity, "
                                           "domain, status and what the plan waits on", labels=list(OPEN_LABELS))
        for labels, n in sorted(Tally(self.by_id.values()).items()):
            fam.add_metric(list(labels), n)
        yield fam


class CorrelatorMetrics:
    """One registry per daemon; ``prefix`` is ``breakfix_correlator`` or ``breakfix_fleet_stage``."""

    def __init__(self, prefix: str = "breakfix_correlator", *, clock: Callable[[], datetime] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.prefix = prefix
        self.clock = clock
        self._check = LabelCap(128)
        self._signal_keys: dict[tuple[str, str], tuple[str, str]] = {}
        self.signals = Counts(f"{prefix}_signals_consumed", "Signals decoded and correlated, by source and check",
                              ("source", "check"))
        self.messages = Counts(f"{prefix}_messages_consumed", "Messages decoded, by stream", ("stream",))
        r.register(self.signals)
        r.register(self.messages)
        self.dead_letters = Counter(f"{prefix}_dead_letters", "Messages dead-lettered, by reason class", ["reason"],
                                    registry=r)
        self.lag_gauge = Gauge(f"{prefix}_consumer_lag", "Messages not yet delivered to the durable consumer "
                                                         "(JetStream num_pending)", ["consumer"], registry=r)
        self.checkpoint_ts = Gauge(f"{prefix}_last_checkpoint_timestamp_seconds",
                                   "Unix time the state was last known durable (checkpoint stored or nothing new)",
                                   registry=r)
        self.checkpoint_age = Gauge(f"{prefix}_checkpoint_age_seconds",
                                    "Seconds since the state was last known durable (since start when never)",
                                    registry=r)
        self.checkpoints = Counter(f"{prefix}_checkpoints", "Checkpoints stored", registry=r)
        self.latency = Histogram(f"{prefix}_ingest_to_publish_seconds",
                                 "From a batch's arrival to its incident changes being published",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.changes = Counter(f"{prefix}_incident_changes", "Incident changes published, by kind", ["kind"],
                               registry=r)
        self._change_counters = {kind: self.changes.labels(kind.value) for kind in ChangeKind}
        self.dead_letters.labels("schema")
        self.open = OpenIncidents(f"{prefix}_open_incidents")
        r.register(self.open)
        self._started = clock() if clock else None
        self._last_checkpoint: float | None = None

    # -- hooks -------------------------------------------------------------------------------------
    def consumed(self, item: object, stream: str = "") -> None:
        """One decoded message (cheap: two dict increments)."""
        if stream:
            self.messages.inc((stream,))
        if isinstance(item, Signal):
            key = self._signal_keys.get((item.source, item.check))
            if key is None:  # (source, capped check) labels, worked out once per pair (bounded like the cap)
                if len(self._signal_keys) >= 4096:
                    self._signal_keys.clear()
                key = self._signal_keys[(item.source, item.check)] = (item.source.value, self._check(item.check))
            self.signals.inc(key)

    def dead_lettered(self, reason: str) -> None:
        self.dead_letters.labels(reason_class(reason)).inc()

    def change(self, ch: ChangeLike) -> None:
        self._change_counters[ch.kind].inc()
        self.open.apply(ch.incident)

    def published(self, changes: Iterable[ChangeLike]) -> None:
        """Changes as published (``IncidentChange``) or as the core returns them (``Change``)."""
        for ch in changes:
            self.changes.labels(ch.kind.value).inc()
            self.open.apply(ch.incident)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(max(0.0, seconds))

    def checkpointed(self, at: datetime, stored: bool = True) -> None:
        """The state is durable as of ``at``: a checkpoint was ``stored``, or there was nothing new to store."""
        if stored:
            self.checkpoints.inc()
        self._last_checkpoint = at.timestamp()
        self.checkpoint_ts.set(self._last_checkpoint)

    def lag(self, consumer: str, pending: int | None) -> None:
        if pending is not None:
            self.lag_gauge.labels(consumer).set(pending)

    def refresh(self) -> None:
        """Before a scrape: the checkpoint's age from the injected clock."""
        if self.clock is None:
            return
        now = self.clock().timestamp()
        last = self._last_checkpoint or (self._started.timestamp() if self._started else now)
        self.checkpoint_age.set(max(0.0, now - last))


__all__ = ["ChangeLike", "CorrelatorMetrics", "Counts", "IncidentLike", "OpenIncidents", "reason_class"]
