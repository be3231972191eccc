"""The fleet rules against series as a real Prometheus holds them.

Prometheus Operator stamps every target it scrapes through a ServiceMonitor with ``namespace``, ``service``,
``pod``, ``container``, ``endpoint`` (the port name) and ``job`` (its generated scrape configs; the dcgm-exporter
Helm chart's ServiceMonitor scrapes port ``metrics``, NVIDIA/dcgm-exporter ``deployment/templates/
service-monitor.yaml``, ``honorLabels: false`` so the exporter's own ``pod``/``namespace`` become ``exported_*``).
Checked with ``promtool test rules``: those labels reach every rule's result.
"""

from __future__ import annotations

from breakfix.collectors.promfleet import FleetRules, Series, load_fleet_rules
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0

EXPORTER = {"gpu": "0", "UUID": "GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77", "pci_bus_id": "00000000:1A:00.0",
            "device": "nvidia0", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "gpu-node-074",
            "DCGM_FI_DRIVER_VERSION": "550.90.07"}
OPERATOR = {"namespace": "gpu-operator", "service": "nvidia-dcgm-exporter", "pod": "nvidia-dcgm-exporter-x2k4p",
            "container": "nvidia-dcgm-exporter", "endpoint": "gpu-metrics", "job": "nvidia-dcgm-exporter",
            "instance": "10.0.0.5:9400", "exported_namespace": "inference", "exported_pod": "llama-70b-vllm-0"}


def test_a_gpu_series_scraped_through_a_servicemonitor_is_no_tenant_endpoint(catalog: Catalog) -> None:
    """Every GPU fault was a fault of 'endpoint' gpu-operator/gpu-metrics, with the exporter pod as its server, and
    its fault key differed from the same GPU's scraped without the operator."""
    spec = load_fleet_rules()
    dbe = next(r for r in spec.rules if r.name == "dcgm-volatile-dbe")
    xid = next(r for r in spec.rules if r.name == "dcgm-last-xid")
    scraped = Series({**EXPORTER, **OPERATOR}, 2.0)
    plain = Series(dict(EXPORTER), 2.0)
    cycle = FleetRules(spec, cluster="c1", catalog=catalog, baseline_events=False).apply(dbe, [scraped], [scraped], T0)
    (s,) = cycle.states
    assert (s.tenant, s.details, s.node, s.gpu.uuid if s.gpu else None) == (
        None, {}, "gpu-node-074", EXPORTER["UUID"])
    ref = FleetRules(spec, cluster="c1", catalog=catalog, baseline_events=False).apply(dbe, [plain], None, T0).states[0]
    assert s.fault_key() == ref.fault_key()
    (e,) = FleetRules(spec, cluster="c1", catalog=catalog, baseline_events=False).apply(
        xid, [Series({**EXPORTER, **OPERATOR, "err_code": "79", "err_msg": "GPU has fallen off the bus"}, 79.0)],
        None, T0).events
    assert (e.code, e.tenant) == ("79", None)


def test_an_endpoint_series_keeps_its_tenant_and_serving_node(catalog: Catalog) -> None:
    spec = load_fleet_rules()
    kv = next(r for r in spec.rules if r.name == "vllm-kv-cache")
    labels = {"namespace": "team-llm", "endpoint": "chat", "node": "gpu-node-074"}
    (s,) = FleetRules(spec, cluster="c1", catalog=catalog).apply(kv, [Series(labels, 0.97)], None, T0).states
    assert (s.tenant.key() if s.tenant else None, s.details) == ("team-llm/chat", {"serving_nodes": "gpu-node-074"})


def test_a_gpu_per_link_series_names_its_gpu_by_gpu_uuid(catalog: Catalog) -> None:
    """dcgm-exporter's linkMetricsFormat writes ``gpu_uuid``, not ``UUID``."""
    spec = load_fleet_rules()
    dbe = next(r for r in spec.rules if r.name == "dcgm-volatile-dbe")
    link = {"nvlink": "3", "gpu": "0", "gpu_uuid": EXPORTER["UUID"], "hostname": "gpu-node-074"}
    (s,) = FleetRules(spec, cluster="c1", catalog=catalog).apply(dbe, [Series(link, 1.0)], None, T0).states
    assert s.gpu is not None and s.gpu.uuid == EXPORTER["UUID"]
