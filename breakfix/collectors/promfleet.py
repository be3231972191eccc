"""The fleet collector: PromQL health rules over the whole fleet's dcgm-exporter and endpoints.

``breakfix fleet-collector`` evaluates ``collectors/rules/fleet.yaml`` (validated at start-up)
against Prometheus with prometheus-api-client (``PrometheusClient``, the adapter; its blocking
HTTP calls run in a worker thread). The pure ``FleetRules.apply`` turns each rule's query
results into per-node signals: one state per node / GPU / endpoint series that crosses (and a
healthy one when it drops back while still observed), or one event per change for ``event``
rules such as dcgm-exporter's last-XID gauge. Signals go through the same edge filter and
forwarder as a node daemon's.

A MIG instance (labels ``GPU_I_ID`` / ``GPU_I_PROFILE``, dcgm-exporter's per-instance rows) is its own
entity, as in the node's dcgm source: component ``mig<GPU_I_ID>``, both labels in ``details``, so one
instance's unchanged gauge is not a new event because another instance of the GPU reads differently.
One odd series (a ``pci_bus_id`` that is no address, such as ``N/A``, is only dropped from the GPU
reference; a NaN or infinite value, a value no code can be read from, labels no signal takes) is skipped,
counted in ``FleetRules.skipped`` (``breakfix_collector_parse_skipped_total{source="prometheus"}``) and
logged once per rule; every other series of that rule and every other rule are still evaluated.
A series that names a GPU (``gpu`` / ``UUID`` / ``uuid``, or ``gpu_uuid`` on dcgm-exporter's per-link rows) is never an
endpoint's: the ``namespace`` / ``endpoint`` / ``pod`` that Prometheus Operator stamps on every target it scrapes
are the exporter's, not a tenant's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from prometheus_api_client import PrometheusConnect
from pydantic import BaseModel, ConfigDict, Field

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, TenantRef, normalize_pci_bus_id
from breakfix.schemas.datafile import load_model
from breakfix.schemas.signal import Signal, SignalSource

log = structlog.get_logger("breakfix.collector.fleet")

DEFAULT_FLEET_RULES = Path(__file__).resolve().parent / "rules" / "fleet.yaml"
MIG_LABELS = ("GPU_I_ID", "GPU_I_PROFILE")
MAX_CODE = 2.0**31  # a value read as a code (an XID) is a non-negative integer below this
_STRICT = ConfigDict(frozen=True, extra="forbid")


class FleetRule(BaseModel):
    model_config = _STRICT
    name: str
    check: str
    expr: str
    observed: str | None = None
    kind: Literal["state", "event"] = "state"
    code_from_value: bool = False


class FleetRulesFile(BaseModel):
    model_config = _STRICT
    version: int = Field(1, ge=1, le=1)
    node_labels: tuple[str, ...] = ("Hostname", "hostname", "node")
    rules: tuple[FleetRule, ...]


def load_fleet_rules(path: Path | None = None) -> FleetRulesFile:
    return load_model(FleetRulesFile, path or DEFAULT_FLEET_RULES)


@dataclass(frozen=True, slots=True)
class Series:
    labels: dict[str, str]
    value: float


class Prometheus(Protocol):
    def query(self, promql: str) -> list[Series]: ...


class PrometheusClient:
    """prometheus-api-client behind the small ``Prometheus`` protocol."""

    def __init__(self, url: str, *, timeout_s: int = 10) -> None:
        # TLS is verified (system CAs, or the bundle in REQUESTS_CA_BUNDLE: the deploy manifests mount one)
        self._prom = PrometheusConnect(url=url, disable_ssl=False, timeout=timeout_s)

    def query(self, promql: str) -> list[Series]:
        rows: list[dict[str, Any]] = self._prom.custom_query(promql)
        return [Series({str(k): str(v) for k, v in (r.get("metric") or {}).items()}, _number(r["value"]))
                for r in rows if isinstance(r, dict) and "value" in r]


def _number(value: Any) -> float:
    """A sample's ``[time, "value"]``; NaN when it is not one, so that ``FleetRules`` skips and counts the series."""
    try:
        return float(value[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return math.nan


class SkippedSeries(ValueError):
    """One query result that no signal can be made of."""


class FleetRules:
    def __init__(self, spec: FleetRulesFile, *, cluster: str, catalog: Catalog, baseline_events: bool = True) -> None:
        """``baseline_events``: an event rule's first evaluation only records what each series holds (dcgm-exporter's
        last-XID gauge keeps a repaired GPU's old XID until DCGM restarts, so a restarted fleet collector would
        raise every one of them again as new); False judges it too (a one-shot run, tests)."""
        self.spec = spec
        self.baseline_events = baseline_events
        self.judged_rules: set[str] = set()  # event rules evaluated once already (their baseline is set)
        self.cluster = cluster
        self.catalog = catalog
        self.contexts: dict[str, NodeContext] = {}
        self.last_event: dict[str, float] = {}
        self.skipped = 0  # odd series since start: breakfix_collector_parse_skipped_total{source="prometheus"}
        self.logged: set[str] = set()  # rules whose odd series were logged (once each)

    def _ctx(self, node: str) -> NodeContext:
        c = self.contexts.get(node)
        if c is None:
            c = self.contexts[node] = NodeContext(cluster=self.cluster, node=node, catalog=self.catalog)
        return c

    def _entity(self, labels: dict[str, str]) -> tuple[str | None, GpuRef | None, TenantRef | None]:
        node = next((labels[k] for k in self.spec.node_labels if labels.get(k)), None)
        gpu = None
        if "gpu" in labels or "UUID" in labels or "uuid" in labels or "gpu_uuid" in labels:
            pci = labels.get("pci_bus_id")
            try:  # ``N/A`` (seen on a real A800 page): no address, the UUID or index still names the GPU
                pci = normalize_pci_bus_id(pci) if pci else None
            except ValueError:
                pci = None
            idx = labels.get("gpu", "")
            gpu = GpuRef(index=int(idx) if idx.isdigit() and len(idx) <= 6 else None,
                         uuid=labels.get("UUID") or labels.get("uuid") or labels.get("gpu_uuid") or None,
                         pci_bus_id=pci)
        tenant = None
        # A GPU's series is never an endpoint's: Prometheus Operator stamps every target it scrapes through a
        # ServiceMonitor with ``namespace`` / ``endpoint`` (the exporter's own namespace and port name, e.g.
        # ``gpu-operator`` / ``gpu-metrics``), which would make each GPU fault a tenant's.
        if gpu is None and labels.get("namespace") and labels.get("endpoint"):
            tenant = TenantRef(namespace=labels["namespace"], endpoint=labels["endpoint"])
        return node, gpu, tenant

    @staticmethod
    def _mig(labels: dict[str, str]) -> dict[str, str]:
        return {k: labels[k] for k in MIG_LABELS if labels.get(k)}

    def _key(self, rule: FleetRule, node: str | None, gpu: GpuRef | None, tenant: TenantRef | None,
             mig: dict[str, str]) -> str:
        return (f"{rule.name}|{node}|{gpu.key() if gpu else ''}|{tenant.key() if tenant else ''}"
                f"|{mig.get('GPU_I_ID', '')}")

    def _skip(self, rule: FleetRule, s: Series, reason: str) -> None:
        self.skipped += 1
        if rule.name not in self.logged and len(self.logged) < 1000:
            self.logged.add(rule.name)
            log.warning("fleet_series_skipped", rule=rule.name, reason=reason[:300],
                        labels={k: v[:100] for k, v in list(s.labels.items())[:20]})

    def apply(self, rule: FleetRule, faults: list[Series], observed: list[Series] | None, at: datetime) -> Cycle:
        """One rule's query results -> signals. A series that no signal can be made of is skipped and counted
        (``skipped``), never the rule."""
        states: list[Signal] = []
        events: list[Signal] = []
        bad_keys: set[str] = set()
        baseline = self.baseline_events and rule.kind == "event" and rule.name not in self.judged_rules
        for s in faults:
            try:
                self._fault(rule, s, at, bad_keys, states, events, baseline=baseline)
            except (ValueError, TypeError, OverflowError) as exc:  # pydantic's ValidationError is a ValueError
                self._skip(rule, s, str(exc))
        if faults:  # an empty first answer (Prometheus just restarted, nothing scraped yet) sets no baseline: the old
            self.judged_rules.add(rule.name)  # XIDs it did not show yet would all be raised as new at the next one
        for s in observed or ():
            try:
                self._observed(rule, s, at, bad_keys, states)
            except (ValueError, TypeError, OverflowError) as exc:
                self._skip(rule, s, str(exc))
        return Cycle(states=states, events=events)

    def _fault(self, rule: FleetRule, s: Series, at: datetime, bad_keys: set[str], states: list[Signal],
               events: list[Signal], *, baseline: bool = False) -> None:
        node, gpu, tenant = self._entity(s.labels)
        if node is None:
            return
        mig = self._mig(s.labels)
        key = self._key(rule, node, gpu, tenant, mig)
        bad_keys.add(key)  # even when the value is odd: the entity is not reported healthy this cycle
        if not math.isfinite(s.value):
            raise SkippedSeries(f"value {s.value!r} is not a finite number")
        code = None
        if rule.code_from_value:
            if not (s.value.is_integer() and 0 <= s.value < MAX_CODE):
                raise SkippedSeries(f"value {s.value:g} is no code")
            code = str(int(s.value))
        msg = f"{rule.name}: {rule.expr} = {s.value:g}"
        component = f"mig{mig['GPU_I_ID']}" if mig.get("GPU_I_ID") else None
        ctx = self._ctx(node)
        if rule.kind == "event":
            if baseline or self.last_event.get(key) == s.value:  # the first evaluation: what was there before us
                self.last_event[key] = s.value
                return
            signal = ctx.signal(source=SignalSource.PROMETHEUS, check=rule.check, code=code, healthy=False, at=at,
                                gpu=gpu, component=component, tenant=tenant, value=s.value, message=msg,
                                details=self._details(s.labels, tenant), discriminator=f"{rule.name}-{s.value}")
            self.last_event[key] = s.value
            events.append(signal)
            return
        states.append(ctx.signal(source=SignalSource.PROMETHEUS, check=rule.check, code=code, healthy=False, at=at,
                                 gpu=gpu, component=component, tenant=tenant, value=s.value, message=msg,
                                 details=self._details(s.labels, tenant)))

    def _observed(self, rule: FleetRule, s: Series, at: datetime, bad_keys: set[str], states: list[Signal]) -> None:
        node, gpu, tenant = self._entity(s.labels)
        mig = self._mig(s.labels)
        key = self._key(rule, node, gpu, tenant, mig)
        if node is None or key in bad_keys:
            return
        if not math.isfinite(s.value):
            raise SkippedSeries(f"value {s.value!r} is not a finite number")
        states.append(self._ctx(node).signal(source=SignalSource.PROMETHEUS, check=rule.check, healthy=True, at=at,
                                             gpu=gpu, component=f"mig{mig['GPU_I_ID']}" if mig.get("GPU_I_ID")
                                             else None, tenant=tenant, value=s.value,
                                             message=f"{rule.name}: within bounds",
                                             details=self._details(s.labels, tenant)))

    @staticmethod
    def _details(labels: dict[str, str], tenant: TenantRef | None) -> dict[str, str]:
        """MIG labels; for an endpoint's series the nodes and pods that serve it. A GPU series' ``pod`` is the
        scraped exporter's (Prometheus Operator's target label), never a server of anything."""
        d = {k: labels[k] for k in MIG_LABELS if labels.get(k)}
        if tenant is None:
            return d
        if labels.get("node"):
            d["serving_nodes"] = labels["node"]
        if labels.get("pod"):
            d["serving_pods"] = labels["pod"]
        return d

    def evaluate(self, prom: Prometheus, at: datetime) -> Cycle:
        """Every rule once (blocking: the daemon calls this from a worker thread)."""
        states: list[Signal] = []
        events: list[Signal] = []
        for rule in self.spec.rules:
            c = self.apply(rule, prom.query(rule.expr), prom.query(rule.observed) if rule.observed else None, at)
            states.extend(c.states)
            events.extend(c.events)
        return Cycle(states=states, events=events)
