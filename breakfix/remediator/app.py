"""The remediator's composition root: config + an already-connected bus + a clock -> a ready service.

``build_remediator`` is the one place the remediator is wired: the CLI (``breakfix remediator``),
the demo, the benchmarks and the tests all call it. Without ``cluster_api`` it builds the
production actuator (Kubernetes from ``kubeconfig`` / host / in-cluster, the node agents over the
bus, the provider hook) and the Lease elector; with one (``SimCluster`` or any ``Actuator``) it uses
that and elects nothing. The plan store is the bus's KV bucket when the bus has one, memory otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from breakfix.bus.clock import Clock
from breakfix.bus.protocol import Bus, KeyValue
from breakfix.remediator.actuator import Actuator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.executor import record_key
from breakfix.remediator.policy import Policy, load_policy
from breakfix.remediator.service import RemediatorService
from breakfix.remediator.store import KvStore, MemoryStore, PlanStore
from breakfix.schemas.catalog import Catalog, default_catalog

__all__ = ["build_remediator", "companion_codes"]


def companion_codes(catalog: Catalog) -> Any:
    """A predicate: is this code key (``xid:63``) an informational or sympathetic companion per NVIDIA's catalog?"""
    quiet = {"informational", "sympathetic"}

    def companion(key: str) -> bool:
        check, _, code = key.partition(":")
        try:
            return catalog.classify(check=check, code=code or None).category in quiet
        except Exception:
            return False

    return companion


async def _store_for(bus: Bus) -> PlanStore:
    if not hasattr(bus, "kv_get"):  # a bus without the KeyValue protocol keeps plans in memory
        return MemoryStore()
    kv: KeyValue = bus  # type: ignore[assignment]
    return await KvStore.open(kv)


async def build_remediator(config: RemediatorConfig, *, bus: Bus, clock: Clock, cluster_api: Actuator | None = None,
                           policy: Policy | None = None, kubeconfig: Path | None = None, store: PlanStore | None = None,
                           catalog: Catalog | None = None, **service: Any) -> RemediatorService:
    """A remediator for ``config``; ``kubeconfig`` (the CLI's ``--kubeconfig``) wins over the config file's.
    Raises ``k8s.KubeConfigError`` (one line) when the Kubernetes configuration is missing or unusable."""
    pol = policy or load_policy(config.policy)
    elector = None
    actuator = cluster_api
    if actuator is None:
        from breakfix.remediator.composite import ClusterActuator
        from breakfix.remediator.k8s import DrainPolicy, KubernetesActuator, load_api
        from breakfix.remediator.leader import LeaseElector
        from breakfix.remediator.nodeagent import NodeAgentClient
        from breakfix.remediator.provider import ProviderHook

        k = config.kubernetes
        api = load_api(kubeconfig=kubeconfig or k.kubeconfig, context=k.context, host=k.host,
                       token_file=k.token_file, verify_ssl=k.verify_ssl, in_cluster=k.in_cluster)
        k8s = KubernetesActuator(api, drain=DrainPolicy(default=k.drain_default, namespaces=k.drain_namespaces,
                                                        timeout_s=k.drain_timeout_s, parallel=k.drain_parallel,
                                                        gone_timeout_s=k.drain_gone_timeout_s),
                                 clock=clock)
        actuator = ClusterActuator(k8s, NodeAgentClient(bus, config.cluster, clock.now),  # type: ignore[arg-type]
                                   ProviderHook(config.provider_url, clock=clock) if config.provider_url else None,
                                   event_namespace=k.event_namespace, reboot_wait_s=config.reboot_wait_s,
                                   poll_s=config.reboot_poll_s, clock=clock)
        lease = config.lease
        if lease.enabled:
            elector = LeaseElector(api, name=lease.name, namespace=lease.namespace, identity=lease.identity,
                                   lease_s=lease.lease_s, clock=clock.now)
    if "id_key" not in service:
        service["id_key"] = _id_key(config)
    return RemediatorService(bus, actuator, pol, clock, cluster=config.cluster, actor=config.actor,
                             store=store or await _store_for(bus), elector=elector,
                             companion=companion_codes(catalog or default_catalog()), **service)


def _id_key(config: RemediatorConfig) -> bytes:
    """The record-id key from the remediator's NATS credentials (every replica mounts the same ones); none without
    credentials. An unreadable file is the bus connection's error to report, not this one's."""
    creds = config.nats.creds if config.nats is not None else None
    if creds is None:
        return b""
    try:
        return record_key(Path(creds).read_bytes())
    except OSError:
        return b""
