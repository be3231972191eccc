"""The remediator daemon's configuration file (``breakfix remediator --config FILE``), validated at
start-up. Example: ``remediator/examples/remediator.yaml``; deployed by ``deploy/remediator.yaml``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from breakfix.bus.options import NatsOptions
from breakfix.remediator.drain import DrainMode
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.schemas.datafile import DataFileError, load_model

_STRICT = ConfigDict(frozen=True, extra="forbid")


class KubernetesConfig(BaseModel):
    model_config = _STRICT
    in_cluster: bool = True
    kubeconfig: Path | None = Field(None, description="A kubeconfig file (outside the cluster); wins over in_cluster.")
    context: str | None = Field(None, description="The kubeconfig context (default: its current-context).")
    host: str | None = Field(None, description="API server URL when not in-cluster.")
    token_file: Path | None = None
    verify_ssl: bool = True
    event_namespace: str = "breakfix"
    drain_default: DrainMode = "immediate"
    drain_namespaces: dict[str, DrainMode] = Field(default_factory=dict)
    drain_timeout_s: float = Field(600.0, gt=0)
    drain_parallel: int = Field(16, ge=1, le=256)
    drain_gone_timeout_s: float = Field(300.0, ge=0, description="After the evictions, how long a drain waits for "
                                        "the evicted pods to end (their grace period) before it fails; 0: no wait")


class LeaseConfig(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    name: str = "breakfix-remediator"
    namespace: str = "breakfix"
    identity: str = Field(default_factory=lambda: os.environ.get("POD_NAME") or socket.gethostname())
    lease_s: int = Field(15, ge=5)


class RemediatorConfig(BaseModel):
    model_config = _STRICT
    version: int = Field(1, ge=1, le=1)
    cluster: str
    nats_url: str = "nats://127.0.0.1:4222"
    nats: NatsOptions | None = None  # url, creds, tls_ca, tls_cert, tls_key; wins over nats_url
    policy: Path | None = None
    kubernetes: KubernetesConfig = KubernetesConfig()
    lease: LeaseConfig = LeaseConfig()
    provider_url: str | None = None
    reboot_wait_s: float = Field(1800.0, gt=0)
    reboot_poll_s: float = Field(10.0, gt=0)
    actor: str = Field(default_factory=lambda: f"remediator/{socket.gethostname()}")
    metrics_port: int = Field(9473, ge=0, le=65535, description="/metrics, /healthz, /readyz (--metrics-port wins).")
    notify: NotifyConfig | None = None  # channels and routes for on-call (remediator.notify.config)


def load_config(path: str | Path) -> RemediatorConfig:
    p = Path(path)
    if not p.is_file():
        raise DataFileError(p, None, "no such file")
    return load_model(RemediatorConfig, p)
