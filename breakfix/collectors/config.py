"""The collector daemon's configuration file, validated at start-up (a mistake names file:line).

``breakfix collector --config FILE`` reads it; ``collectors.daemon`` builds the sources it
enables. ``node`` may come from the environment (``node_env``, the DaemonSet sets
``NODE_NAME`` from the downward API). Example: ``deploy/collector.yaml`` and
``collectors/examples/collector.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.bus.options import NatsOptions
from breakfix.schemas.datafile import DataFileError, load_model

_STRICT = ConfigDict(frozen=True, extra="forbid")


class NatsConfig(NatsOptions):  # url, creds, tls_ca, tls_cert, tls_key (bus.options)
    model_config = _STRICT
    publish_timeout_s: float = Field(2.0, gt=0)
    connect_retry_s: float = Field(2.0, gt=0)


class SpoolConfig(BaseModel):
    model_config = _STRICT
    dir: Path = Path("/var/lib/breakfix/spool")
    max_records: int = Field(100_000, ge=10)


class EdgeConfig(BaseModel):
    model_config = _STRICT
    resync_s: float = Field(300.0, gt=0)
    repeat_window_s: float = Field(60.0, ge=0)


class NvmlConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    interval_s: float = Field(10.0, gt=0)
    expected_gpus: int | None = Field(None, ge=0)
    xid_events: bool = True
    fake_gpus: int | None = Field(None, ge=1, description="Use the in-memory fake NVML (benchmarks, demos).")
    sbe_burst: int = 100
    pcie_replay_per_min: float = 60.0
    nvlink_errors_per_min: float = 10.0


class KmsgConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    path: Path = Path("/dev/kmsg")
    poll_s: float = Field(0.5, gt=0)
    from_start: bool = False


class DcgmConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = False
    url: str = "http://127.0.0.1:9400/metrics"
    interval_s: float = Field(30.0, gt=0)
    nvlink_errors_per_min: float = 10.0
    pcie_replay_per_min: float = 60.0


class FabricConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    sysfs: Path = Path("/sys/class/infiniband")
    interval_s: float = Field(10.0, gt=0)
    errors_per_min: float = 10.0
    flap_count: int = Field(2, ge=1)
    flap_window_s: float = Field(600.0, gt=0)
    expected_rate_gbps: float | None = Field(None, gt=0, allow_inf_nan=False)
    expected_ethernet_rate_gbps: float | None = Field(None, gt=0, allow_inf_nan=False)  # RoCE ports; None: own best
    skip_ethernet: bool = False


class SloConfig(BaseModel):
    model_config = _STRICT
    ttft_p95_s: float = Field(2.0, gt=0)
    itl_p95_s: float = Field(0.2, gt=0)
    error_rate: float = Field(0.05, ge=0, le=1)
    kv_cache: float = Field(0.95, gt=0, le=1)


class EndpointConfig(BaseModel):
    model_config = _STRICT
    name: str
    namespace: str
    url: str
    health_path: str = "/health"
    models_path: str = "/v1/models"
    metrics_path: str = "/metrics"
    slo: SloConfig = SloConfig()
    serving_pods: tuple[str, ...] = ()
    serving_nodes: tuple[str, ...] = ()


class EndpointsConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = False
    interval_s: float = Field(15.0, gt=0)
    endpoints: tuple[EndpointConfig, ...] = ()


class PodResourcesConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = False
    socket: Path = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    resource: str = "nvidia.com/gpu"
    interval_s: float = Field(30.0, gt=0)


class AgentConfig(BaseModel):
    """The node agent (``collectors.agent``): remediation commands the remediator may send here."""

    model_config = _STRICT
    enabled: bool = False
    allow: tuple[str, ...] = ("reset_gpu", "validate", "reboot")
    nvidia_smi: str = "nvidia-smi"
    dcgmi: str = "dcgmi"
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")


class TopologyFromNode(BaseModel):
    """Read per-node topology from the Node's labels (the DaemonSet's config is the same everywhere)."""

    model_config = _STRICT
    enabled: bool = False
    host: str | None = Field(None, description="API server URL; in-cluster service account when unset.")
    labels: dict[str, str] = Field(default_factory=lambda: {
        "rack": "topology.breakfix.io/rack", "switch": "topology.breakfix.io/switch",
        "nvlink_domain": "nvidia.com/gpu.clique", "nodepool": "node.kubernetes.io/instance-type"})


class Sources(BaseModel):
    model_config = _STRICT
    nvml: NvmlConfig = NvmlConfig()
    kmsg: KmsgConfig = KmsgConfig()
    dcgm: DcgmConfig = DcgmConfig()
    fabric: FabricConfig = FabricConfig()
    endpoint: EndpointsConfig = EndpointsConfig()
    podresources: PodResourcesConfig = PodResourcesConfig()


class CollectorConfig(BaseModel):
    model_config = _STRICT
    version: int = Field(1, ge=1, le=1)
    cluster: str = Field(min_length=1)
    node: str | None = None
    node_env: str = "NODE_NAME"
    labels: dict[str, str] = Field(default_factory=dict, description="Topology: rack, switch, nvlink_domain, ...")
    topology_from_node: TopologyFromNode = TopologyFromNode()
    state_dir: Path = Path("/var/lib/breakfix")
    http_listen: str = "0.0.0.0:9410"
    nats: NatsConfig = NatsConfig()
    spool: SpoolConfig = SpoolConfig()
    edge: EdgeConfig = EdgeConfig()
    sources: Sources = Sources()
    agent: AgentConfig = AgentConfig()

    @model_validator(mode="after")
    def _node(self) -> CollectorConfig:
        if not (self.node or os.environ.get(self.node_env)):
            raise ValueError(f"node: not set, and ${self.node_env} is empty")
        host, _, port = self.http_listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"http_listen: expected HOST:PORT, got {self.http_listen!r}")
        return self

    @property
    def node_name(self) -> str:
        return self.node or os.environ[self.node_env]


def load_config(path: str | Path) -> CollectorConfig:
    """Read and validate; raises ``DataFileError`` (file:line: reason)."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(p, None, "no such file")
    return load_model(CollectorConfig, p)
