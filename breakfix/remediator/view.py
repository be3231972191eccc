"""What the remediator may know about the cluster when it decides: nodes, labels, ownership.

Built by the actuator adapter (``remediator.actuator.Actuator.view``: Kubernetes or the
simulated cluster) and read by the pure ``decide`` and ``guards``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    cordoned: bool = False
    cordoned_by_breakfix: bool = False


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What the decision may know about the cluster, read before deciding."""

    nodes: dict[str, NodeView] = field(default_factory=dict)
    controller_owned_pods: frozenset[str] = frozenset()  # "namespace/pod"

    def node(self, name: str | None) -> NodeView | None:
        return self.nodes.get(name) if name else None
