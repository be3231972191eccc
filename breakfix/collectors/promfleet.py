"""The fleet collector: PromQL health rules over the whole fleet's dcgm-exporter and endpoints.

``breakfix fleet-collector`` evaluates ``collectors/rules/fleet.yaml`` (validated at start-up)
against Prometheus with prometheus-api-client (``PrometheusClient``, the adapter; its blocking
HTTP calls run in a worker thread). The pure ``FleetRules.apply`` turns each rule's query
results into per-node signals: one state per node / GPU / endpoint series that crosses (and a
healthy one when it drops back while still observed), or one event per change for ``event``
rules such as dcgm-exporter's last-XID gauge. Signals go through the same edge filter and
forwarder as a node daemon's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_api_client import PrometheusConnect
from pydantic import BaseModel, ConfigDict, Field

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, TenantRef, normalize_pci_bus_id
from breakfix.schemas.datafile import load_model
from breakfix.schemas.signal import Signal, SignalSource

DEFAULT_FLEET_RULES = Path(__file__).resolve().parent / "rules" / "fleet.yaml"
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
        return [Series(dict(r.get("metric", {})), float(r["value"][1])) for r in rows if "value" in r]


class FleetRules:
    def __init__(self, spec: FleetRulesFile, *, cluster: str, catalog: Catalog) -> None:
        self.spec = spec
        self.cluster = cluster
        self.catalog = catalog
        self.contexts: dict[str, NodeContext] = {}
        self.last_event: dict[str, float] = {}

    def _ctx(self, node: str) -> NodeContext:
        c = self.contexts.get(node)
        if c is None:
            c = self.contexts[node] = NodeContext(cluster=self.cluster, node=node, catalog=self.catalog)
        return c

    def _entity(self, labels: dict[str, str]) -> tuple[str | None, GpuRef | None, TenantRef | None]:
        node = next((labels[k] for k in self.spec.node_labels if labels.get(k)), None)
        gpu = None
        if "gpu" in labels or "UUID" in labels or "uuid" in labels:
            pci = labels.get("pci_bus_id")
            idx = labels.get("gpu", "")
            gpu = GpuRef(index=int(idx) if idx.isdigit() else None, uuid=labels.get("UUID") or labels.get("uuid"),
                         pci_bus_id=normalize_pci_bus_id(pci) if pci else None)
        tenant = None
        if labels.get("namespace") and labels.get("endpoint"):
            tenant = TenantRef(namespace=labels["namespace"], endpoint=labels["endpoint"])
        return node, gpu, tenant

    def apply(self, rule: FleetRule, faults: list[Series], observed: list[Series] | None, at: datetime) -> Cycle:
        states: list[Signal] = []
        events: list[Signal] = []
        bad_keys = set()
        for s in faults:
            node, gpu, tenant = self._entity(s.labels)
            if node is None:
                continue
            key = f"{rule.name}|{node}|{gpu.key() if gpu else ''}|{tenant.key() if tenant else ''}"
            bad_keys.add(key)
            code = str(int(s.value)) if rule.code_from_value else None
            msg = f"{rule.name}: {rule.expr} = {s.value:g}"
            if rule.kind == "event":
                if self.last_event.get(key) == s.value:
                    continue
                self.last_event[key] = s.value
                events.append(self._ctx(node).signal(source=SignalSource.PROMETHEUS, check=rule.check, code=code,
                                                     healthy=False, at=at, gpu=gpu, tenant=tenant, value=s.value,
                                                     message=msg, discriminator=f"{rule.name}-{s.value}"))
                continue
            states.append(self._ctx(node).signal(source=SignalSource.PROMETHEUS, check=rule.check, code=code,
                                                 healthy=False, at=at, gpu=gpu, tenant=tenant, value=s.value,
                                                 message=msg, details=self._details(s.labels)))
        for s in observed or ():
            node, gpu, tenant = self._entity(s.labels)
            key = f"{rule.name}|{node}|{gpu.key() if gpu else ''}|{tenant.key() if tenant else ''}"
            if node is None or key in bad_keys:
                continue
            states.append(self._ctx(node).signal(source=SignalSource.PROMETHEUS, check=rule.check, healthy=True,
                                                 at=at, gpu=gpu, tenant=tenant, value=s.value,
                                                 message=f"{rule.name}: within bounds",
                                                 details=self._details(s.labels)))
        return Cycle(states=states, events=events)

    @staticmethod
    def _details(labels: dict[str, str]) -> dict[str, str]:
        d = {}
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
