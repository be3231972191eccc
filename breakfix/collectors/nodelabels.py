"""Topology labels for this node, read from its Kubernetes Node object.

A DaemonSet's ConfigMap is the same on every node, so per-node topology (rack, leaf switch,
NVLink domain, nodepool) comes from the Node's labels instead: ``node_topology`` reads the Node
through the official client (in-cluster service account, or an API URL) and maps the label names
the config lists (``rack: topology.example.com/rack``) onto the signal label keys the correlator
groups by. Read once at start-up by ``collectors.daemon``; a failure leaves the config's labels
and is logged, never fatal.
"""

from __future__ import annotations

from kubernetes import client
from kubernetes import config as kconfig


def node_topology(node: str, mapping: dict[str, str], *, host: str | None = None) -> dict[str, str]:
    """``{signal label: value}`` for every mapped Node label that is present (blocking call)."""
    if host:
        cfg = client.Configuration()
        cfg.host = host
        api = client.ApiClient(cfg)
    else:
        kconfig.load_incluster_config()  # type: ignore[no-untyped-call]
        api = client.ApiClient()
    n = client.CoreV1Api(api).read_node(node)
    labels = (n.metadata.labels if n.metadata else None) or {}
    return {key: labels[name] for key, name in mapping.items() if name in labels}
