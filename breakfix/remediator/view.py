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
    _by_label: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict, compare=False, repr=False)

    def node(self, name: str | None) -> NodeView | None:
        return self.nodes.get(name) if name else None

    def members(self, key: str, value: str) -> frozenset[str]:
        """The nodes labelled ``key=value``; the grouping by ``key`` is built once per view (a topology budget
        asks it for every plan, so a pass over every node per plan would make a burst quadratic)."""
        groups = self._by_label.get(key)
        if groups is None:
            built: dict[str, set[str]] = {}
            for name, nv in self.nodes.items():
                v = nv.labels.get(key)
                if v is not None:
                    built.setdefault(v, set()).add(name)
            groups = self._by_label[key] = {v: frozenset(ns) for v, ns in built.items()}
        return groups.get(value, frozenset())
