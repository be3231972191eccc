"""The collector daemon's configuration file, validated at start-up (a mistake names file:line).

``breakfix collector --config FILE`` reads it; ``collectors.app.build_collector`` builds the
daemon and ``collectors.sources`` the plugins of every enabled section. Each source section
embeds its rules' own ``Thresholds`` model under ``thresholds:`` (bounded: finite, >= 0).
``node`` may come from the environment (``node_env``, the DaemonSet sets ``NODE_NAME`` from
the downward API). Example: ``deploy/collector.yaml`` and
``collectors/examples/collector.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from breakfix.bus.options import NatsOptions
from breakfix.collectors.dcgm import DcgmThresholds
from breakfix.collectors.fabric import FabricThresholds
from breakfix.collectors.kmsg_follow import log_zone
from breakfix.collectors.nvml_eval import Thresholds as NvmlThresholds
from breakfix.schemas.datafile import DataFileError, load_model

_STRICT = ConfigDict(frozen=True, extra="forbid")


def _known_keys(cls: type) -> Callable[[Any], Any]:
    """A thresholds section names only fields of the rules' own ``Thresholds`` dataclass."""
    names = {f.name for f in dataclasses.fields(cls)}

    def check(value: Any) -> Any:
        if isinstance(value, dict):
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"unknown threshold(s) {', '.join(map(str, unknown))}; "
                                 f"known: {', '.join(sorted(names))}")
        return value

    return check


def _finite_non_negative(value: Any) -> Any:
    """Every number in a thresholds model is finite and not negative (NaN or inf would disable a rule);
    windows (``*_s``) and counts (``*_count``) are positive."""
    for f in dataclasses.fields(value):
        x = getattr(value, f.name)
        if not isinstance(x, int | float) or isinstance(x, bool):
            continue
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"{f.name}: must be a finite number >= 0, got {x}")
        if f.name.endswith(("_s", "_count")) and x <= 0:
            raise ValueError(f"{f.name}: must be > 0, got {x}")
    return value


# The rules' own Thresholds models, embedded in each source's section under ``thresholds:``.
NvmlThresholdsField = Annotated[NvmlThresholds, BeforeValidator(_known_keys(NvmlThresholds)),
                                AfterValidator(_finite_non_negative)]
DcgmThresholdsField = Annotated[DcgmThresholds, BeforeValidator(_known_keys(DcgmThresholds)),
                                AfterValidator(_finite_non_negative)]
FabricThresholdsField = Annotated[FabricThresholds, BeforeValidator(_known_keys(FabricThresholds)),
                                  AfterValidator(_finite_non_negative)]


class NatsConfig(NatsOptions):  # url, creds, tls_ca, tls_cert, tls_key (bus.options)
    model_config = _STRICT
    publish_timeout_s: float = Field(2.0, gt=0)
    connect_retry_s: float = Field(2.0, gt=0, allow_inf_nan=False)
    connect_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)


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
    thresholds: NvmlThresholdsField = NvmlThresholds()


def _zone_name(v: str) -> str:
    log_zone(v)  # raises ValueError (a config error with its file:line) for a zone the database does not know
    return v


class KmsgConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    path: Path = Path("/dev/kmsg")
    poll_s: float = Field(0.5, gt=0)
    from_start: bool = False
    # the zone of wall-clock times in a log file (syslog, dmesg -T, ISO without an offset): UTC, local (this
    # machine's) or an IANA name; /dev/kmsg and [seconds] stamps count from boot and need none
    timezone: Annotated[str, AfterValidator(_zone_name)] = "UTC"


class DcgmConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = False
    url: str = "http://127.0.0.1:9400/metrics"
    interval_s: float = Field(30.0, gt=0)
    thresholds: DcgmThresholdsField = DcgmThresholds()


class FabricConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    sysfs: Path = Path("/sys/class/infiniband")
    interval_s: float = Field(10.0, gt=0)
    thresholds: FabricThresholdsField = FabricThresholds()  # expected_(ethernet_)rate_gbps, skip_ethernet, ...


class SloConfig(BaseModel):
    model_config = _STRICT
    ttft_p95_s: float = Field(2.0, gt=0)
    itl_p95_s: float = Field(0.2, gt=0)
    error_rate: float = Field(0.05, ge=0, le=1)
    kv_cache: float = Field(0.95, gt=0, le=1)
    stuck_after_s: float = Field(120.0, ge=30, le=3600, allow_inf_nan=False,
                                 description="endpoint.stuck: requests running with no token generated (or waiting "
                                             "with none running or finished) for this long (an engine that counts "
                                             "tokens only as requests finish, TensorRT-LLM, is judged on waiting only)")


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
    proc_gpus: Path = Path("/proc/driver/nvidia/gpus")  # GPU UUID -> device minor, for DRA's gpu-<minor> names


class AgentConfig(BaseModel):
    """The node agent (``collectors.agent``): remediation commands the remediator may send here."""

    model_config = _STRICT
    enabled: bool = False
    allow: tuple[str, ...] = ("reset_gpu", "validate", "reboot", "gpu_pods")
    nvidia_smi: str = "nvidia-smi"
    dcgmi: str = "dcgmi"
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    gpu_count: int | None = Field(None, ge=1, le=64, description="GPUs on this node; unset: NVML's enumeration.")
    reboot_window_s: float = Field(3600.0, gt=0, allow_inf_nan=False,
                                   description="At most one reboot per node within this window (agent's own cap).")
    reset_window_s: float = Field(300.0, gt=0, allow_inf_nan=False,
                                  description="At most one reset per GPU within this window.")
    engine_wait_s: float = Field(300.0, ge=0, allow_inf_nan=False,
                                 description="validate: how long to wait for the DCGM host engine to answer "
                                             "(after a reboot it may still be starting)")
    podresources_socket: Path | None = Field(
        Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
        description="The kubelet's PodResources socket for gpu_pods (which pods hold a GPU or its MIG devices); "
                    "null on hosts without a kubelet: gpu_pods then fails and the remediator drains the node.")


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
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Overrides http_listen's port (--metrics-port).")
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
