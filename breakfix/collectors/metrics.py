"""Metrics of the node agent (inside the node collector) and of the fleet collector.

- ``AgentMetrics``: every command the node agent answers (``breakfix.agent.<cluster>.<node>``),
  counted by action and outcome from the ``AgentReply`` it sends back. ``counted`` wraps the
  agent's bytes-in/bytes-out handler so the agent itself stays unaware of metrics. Registered in
  the node collector's registry, served on its ``http_listen`` port (9410).
- ``FleetCollectorMetrics``: the fleet collector's evaluation cycles, PromQL failures, signals
  sent and the last good cycle, served on ``--metrics-port`` (default 9474) by
  ``bus.observe.ObserveServer``; the "collector silent" alert reads the last-success timestamps.

Labels: agent actions and outcomes (a fixed set), sources. Never nodes, incidents or pods.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from breakfix.schemas.agent import AgentAction, AgentReply

AGENT_OUTCOMES = ("succeeded", "failed", "replayed", "rejected")


def reply_outcome(reply: AgentReply) -> str:
    if reply.replayed:
        return "replayed"
    return "succeeded" if reply.ok else "failed"


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.actions = Counter("breakfix_agent_actions", "Node-agent commands answered, by action and outcome",
                               ["action", "outcome"], registry=r)
        self.duration = Histogram("breakfix_agent_action_duration_seconds", "Time to answer a node-agent command",
                                  ["action"], buckets=(0.1, 1, 5, 15, 60, 300, 900, 1800), registry=r)
        for a in AgentAction:
            for o in AGENT_OUTCOMES:
                self.actions.labels(a.value, o)

    def observe(self, reply: AgentReply, seconds: float | None = None) -> None:
        self.actions.labels(reply.action.value, reply_outcome(reply)).inc()
        if seconds is not None:
            self.duration.labels(reply.action.value).observe(max(0.0, seconds))

    def rejected(self) -> None:
        self.actions.labels("unknown", "rejected").inc()


def counted(handle: Callable[[bytes], Awaitable[bytes]], metrics: AgentMetrics,
            monotonic: Callable[[], float]) -> Callable[[bytes], Awaitable[bytes]]:
    """The agent's request handler, counting each reply it sends (a reply that is not an
    ``AgentReply`` - the agent's answer to an undecodable command - counts as ``rejected``)."""

    async def handler(data: bytes) -> bytes:
        began = monotonic()
        out = await handle(data)
        try:
            reply = AgentReply.model_validate_json(out)
        except ValidationError:
            metrics.rejected()
        else:
            metrics.observe(reply, monotonic() - began)
        return out

    return handler


class FleetCollectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.cycles = Counter("breakfix_collector_cycles", "Completed source cycles", ["source"], registry=r)
        self.errors = Counter("breakfix_collector_source_errors", "Source loop failures", ["source"], registry=r)
        self.last_ok = Gauge("breakfix_collector_source_last_success_timestamp_seconds",
                             "Unix time of the last good cycle", ["source"], registry=r)
        self.signals = Counter("breakfix_collector_signals", "Signals sent on, by source", ["source"], registry=r)
        self.cycles.labels("prometheus")
        self.errors.labels("prometheus")

    def cycle_ok(self, at: datetime, signals: int) -> None:
        self.cycles.labels("prometheus").inc()
        self.last_ok.labels("prometheus").set(at.timestamp())
        self.signals.labels("prometheus").inc(signals)

    def cycle_failed(self) -> None:
        self.errors.labels("prometheus").inc()


__all__ = ["AGENT_OUTCOMES", "AgentMetrics", "FleetCollectorMetrics", "counted", "reply_outcome"]
