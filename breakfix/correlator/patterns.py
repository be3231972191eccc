"""Multi-signal patterns in the grouping core: suspect GPUs, lemons, and endpoint impact.

- **Suspect GPU**: application XIDs (13/31/43) on one GPU from several different workloads
  within the window mean the GPU, not the code, is suspect: a GPU incident in the operator
  domain opens for diagnostics. The same XIDs across different GPUs of one tenant never meet
  here (each GPU keeps its own history), so they stay tenant incidents.
- **Lemon**: a GPU that opens ``bursts`` incidents within the window goes to the RMA path.
- **Endpoint impact**: an endpoint SLO breach served from a node with an open hardware incident
  is that incident's impact; an endpoint incident that opened first is folded under the
  hardware incident when it appears. The serving nodes come from the endpoint collector's
  ``details.serving_nodes`` (comma-separated), falling back to the signal's node.
Wired by ``correlator.grouping.Correlator`` with the shared ``CoreState`` and the ``IncidentBook``; pure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from breakfix.correlator.book import IncidentBook
from breakfix.correlator.model import (
    DOMAIN_OPERATOR,
    KIND_FOLDED,
    KIND_OPENED,
    KIND_UPDATED,
    NODE_CATEGORIES,
    SCOPE_GPU,
    SCOPE_NODE,
    SCOPE_TENANT,
    STATUS_VALIDATING,
    Change,
    Observation,
    TrackedIncident,
    category_rank,
    incident_id,
    node_key_for,
    tenant_incident_key,
    tenant_key,
    workload,
    worse,
)
from breakfix.correlator.state import LEMON_LABEL, CoreState
from breakfix.schemas.catalog import FaultClass
from breakfix.schemas.common import Severity

_HISTORY_CAP = 32
SUSPECT_SOURCE = ("NVIDIA Xid catalog WORKFLOW_XID_13 / WORKFLOW_XID_31 (repeats on one GPU: run diagnostics); "
                  "NVSentinel analyzer (repeated XID 31/13 on one GPU -> diagnostics)")
LEMON_SOURCE = "NVSentinel analyzer: repeated hardware XID bursts on one GPU within 24 h -> CONTACT_SUPPORT"
MULTI_GPU_SOURCE = "breakfix correlator rule multi_gpu: several GPUs of one node failing together point at the host"
# member categories whose repair is a human's, in the order they win (NVIDIA Xid catalog resolution buckets)
_HUMAN_REPAIR = {"hardware_support": "NVIDIA Xid catalog CONTACT_SUPPORT: investigate / RMA, not returned by a reboot",
                 "mechanical_inspection": "NVIDIA Xid catalog CHECK_MECHANICALS: check seating and connections"}


def controller_of(o: Observation) -> str:
    """The workload an application fault belongs to: its controller, not its pod name (issue 11).

    ``details.controller`` (e.g. ``Deployment/api``) when a collector knows it; otherwise Kubernetes'
    pod naming: Deployment/ReplicaSet ``api-7d9f8c6b5-x2k4p`` -> ``api``, Job ``batch-x7k2q`` -> ``batch``,
    StatefulSet ``train-3`` -> ``train``, LeaderWorkerSet ``lws-2`` (leader) / ``lws-2-1`` (worker) -> ``lws``.
    """
    t = o.tenant
    assert t is not None
    td: dict[str, Any] = t.__dict__  # the ref's field values, read once
    namespace: str = td["namespace"]
    d: dict[str, str] = o.d["details"]
    owner = (d.get("controller") or d.get("owner")) if d else None
    if owner:
        return f"{namespace}/{owner}"
    w = workload(t)
    pod: str | None = td["pod"]
    if pod and w != pod:
        head, _, tail = w.rpartition("-")
        if head and tail.isdigit():  # a LeaderWorkerSet worker: <lws>-<group>-<index>
            w = head
    return f"{namespace}/{w}"


class Patterns:
    """Multi-signal patterns over the shared state; opens and grows incidents through the book."""

    def __init__(self, state: CoreState, book: IncidentBook) -> None:
        self.state = state
        self.book = book
        self.rules = state.rules
        self.catalog = state.catalog
        # the suspect-GPU rule's fields read on every application XID, copied once (a pydantic model's attribute reads
        # go through its ``__getattr__`` hook)
        suspect = self.rules.suspect
        self.suspect_category = suspect.category if suspect is not None else ""
        self.suspect_window_s = suspect.window_s if suspect is not None else 0.0
        self.multi_gpu_window_s = self.rules.multi_gpu.window_s if self.rules.multi_gpu is not None else 0.0

    def suspect(self, gpu_key: str, o: Observation) -> list[Change] | None:
        rule, st = self.rules.suspect, self.state
        assert rule is not None and o.tenant is not None
        host = st.live(st.by_key.get(gpu_key))
        if host is not None and host.category == self.suspect_category:
            return self.book.add(host, o)
        at = o.at
        controller = controller_of(o)
        hist = self.state.app_hist.setdefault(gpu_key, {})  # workload -> last time, oldest first
        hist.pop(controller, None)
        hist[controller] = at
        window_s = self.suspect_window_s
        for w, t in list(hist.items()):
            if (at - t).total_seconds() <= window_s and len(hist) <= _HISTORY_CAP:
                break
            del hist[w]
        if len(hist) < rule.min_workloads:
            return None
        workloads = list(hist)
        spec = self.catalog.category(rule.category)
        suspect = FaultClass(rule.category, spec.severity, spec.domain, "", True, spec.title, SUSPECT_SOURCE)
        note = f"{o.ck} from {len(workloads)} workloads within {rule.window_s:g}s: {', '.join(workloads)}"
        if host is not None:
            changes = self.book.add(host, o.with_class(suspect))
            host.note(at, "suspect", note, self.rules.timeline_limit)
            return changes
        return self.book.open(gpu_key, SCOPE_GPU, o.with_class(suspect), note=note)

    def lemon(self, inc: TrackedIncident, at: datetime) -> None:
        rule = self.rules.lemon
        if rule is None or inc.labels.get(LEMON_LABEL) == "true" or inc.category not in self.rules.lemon_categories:
            return  # only hardware incidents count: application XIDs alone never take the RMA path
        times = self.state.bursts.setdefault(inc.key, [])
        times.append(at)
        while times and (at - times[0]).total_seconds() > rule.window_s:
            times.pop(0)
        if len(times) < rule.bursts:
            return
        spec = self.catalog.category(rule.category)
        inc.labels[LEMON_LABEL] = "true"
        inc.note(at, "lemon", f"{len(times)} incidents on this GPU within {rule.window_s:g}s; was {inc.category}",
                 self.rules.timeline_limit)
        inc.category = rule.category
        inc.source = LEMON_SOURCE
        inc.title = f"Lemon GPU ({len(times)} incidents within {rule.window_s / 3600:g} h): {spec.title}"
        inc.severity = worse(inc.severity, spec.severity)
        inc.domain = DOMAIN_OPERATOR

    def endpoint(self, o: Observation) -> list[Change] | None:
        assert o.tenant is not None
        details: dict[str, str] = o.d["details"]
        serving = [n for n in details.get("serving_nodes", "").split(",") if n] or [o.node]
        for node in serving:
            for iid in self.state.on_node.get(node, ()):
                host = self.state.live(iid)
                if host is not None and host.domain is DOMAIN_OPERATOR and host.scope is not SCOPE_TENANT:
                    return self._impact(self.book.top(host), o)  # the incident standing on its own, not a member
        key = tenant_incident_key(o.d["cluster"], o.tenant)
        for node in serving:
            self.state.serving.setdefault(node, {})[key] = None
        return None

    def _impact(self, host: TrackedIncident, o: Observation) -> list[Change]:
        tenant = o.tenant
        assert tenant is not None
        self.state.counters.impact += 1
        t = tenant_key(tenant)
        new = t not in host.impact
        host.impact[t] = tenant
        changes = self.book.add(host, o, fold=True)
        if new:
            host.note(o.at, "impact", f"endpoint {t} out of SLO ({o.ck})", self.rules.timeline_limit)
            if not changes:
                host.version += 1
                changes = [Change(KIND_UPDATED, host)]
        return changes

    def multi_gpu(self, inc: TrackedIncident, at: datetime) -> list[Change]:
        """Several GPU incidents on one node within the window become one node incident."""
        rule = self.rules.multi_gpu
        if rule is None or inc.scope is not SCOPE_GPU or inc.domain is not DOMAIN_OPERATOR \
                or inc.parent is not None or inc.node is None or inc.category not in self.rules.multi_gpu_categories:
            return []  # only hardware faults: XID 74 on several GPUs is an NVLink fault, not a host fault
        node_key = node_key_for(inc.cluster, inc.node)
        host = self.state.live(self.state.by_key.get(node_key))
        if host is not None and self.node_is_the_unit(host) and host.status is not STATUS_VALIDATING:
            # the node is already the unit being fixed (a multi-GPU incident sent to a human keeps taking its GPUs:
            # a node awaiting RMA or a hands-on check never gets a GPU reset ladder of its own); one validating after
            # its reboot takes no new fault, which gets a repair of its own
            return self._fold_into_node(host, [inc], at)
        if host is not None and (host.parent is not None or host.status is STATUS_VALIDATING):
            return []
        window_s, categories = self.multi_gpu_window_s, self.rules.multi_gpu_categories
        peers = [p for iid in self.state.on_node.get(inc.node, ()) if (p := self.state.live(iid)) is not None
                 and p.scope is SCOPE_GPU and p.parent is None and p.category in categories
                 and (at - p.first_seen).total_seconds() <= window_s]
        gpus = {g for p in peers for g in p.gpus}
        if len(gpus) < rule.min_gpus:
            return []
        spec = self.catalog.category(rule.category)
        title = f"{len(gpus)} GPUs failing together on {inc.node}: {spec.title}"
        why = f"{len(gpus)} GPU incidents on {inc.node} within {rule.window_s:g}s"
        # the node's reboot for the host takes the node's GPU incidents already needing one (a GPU off the bus earlier)
        taken = {p.id for p in peers}  # by id: TrackedIncident's dataclass equality compares every field
        rebooting = [p for p in self._needing_reboot(inc) if p.id not in taken]
        if host is not None:  # the node's own incident of another kind (a GPU-less thermal fault, a count mismatch)
            return self._host_takes(host, peers + rebooting, at, category=rule.category, title=title,
                                    source=MULTI_GPU_SOURCE, why=why)
        return self._open_node(inc, peers + rebooting, at, category=rule.category, severity=spec.severity,
                               title=title, source=MULTI_GPU_SOURCE, why=why)

    def node_is_the_unit(self, host: TrackedIncident) -> bool:
        """Whether a node's own incident takes the node's failing GPUs: a node reboot or a multi-GPU failure, or a
        multi-GPU incident sent to a human."""
        rule = self.rules.multi_gpu
        return host.category in NODE_CATEGORIES or (rule is not None and host.category == rule.category) or (
            host.category in _HUMAN_REPAIR and host.source.startswith(MULTI_GPU_SOURCE))

    def one_reboot(self, inc: TrackedIncident, at: datetime) -> list[Change]:
        """NVIDIA RESTART_BM ("restart bare metal") repairs the whole node, so a node gets one reboot incident and one
        plan. ``inc`` just opened with, or was raised to, a node reboot: the node's own incident takes the node's other
        incidents needing one; a GPU's or workload's joins the node's own incident where that takes the node's GPUs
        (``node_is_the_unit``), else it and the others needing a reboot fold into a node incident opened for them."""
        st = self.state
        if inc.node is None or inc.parent is not None or inc.category not in NODE_CATEGORIES:
            return []
        others = self._needing_reboot(inc)
        if inc.scope is SCOPE_NODE:
            return self._fold_into_node(inc, others, at) if others and inc.status is not STATUS_VALIDATING \
                else []
        node_key = node_key_for(inc.cluster, inc.node)
        host = st.live(st.by_key.get(node_key))
        if host is not None and host.status is STATUS_VALIDATING and host.parent is None:
            host = None  # validating after its reboot, it takes no new fault: a node incident opened for these takes
            # the node's key from it (its own faults still clear on it), else this one stands alone
        if host is not None:  # the node's own incident takes this one
            if host.parent is not None:
                return []
            if self.node_is_the_unit(host):
                return self._fold_into_node(host, [inc], at)
            # one of another kind (a GPU-less thermal or non-fatal NVSwitch fault, a count mismatch) becomes the node's
            # reboot, or keeps a human's repair, which covers the reboot; either way it takes every incident needing one
            changes = self._host_takes(host, [*others, inc], at, category=inc.category, title=inc.title,
                                       source=inc.source, why=f"{inc.id} needs a node reboot")
        elif not others:
            return []
        else:
            group = [*others, inc]
            why = f"{len(group)} incidents on {inc.node} need a node reboot: one reboot for them"
            changes = self._open_node(inc, group, at, category=inc.category, severity=inc.severity,
                                      title=f"Node reboot for {len(group)} incidents on {inc.node}: {inc.title}",
                                      source=inc.source, why=why)
        if st.topology is not None:  # the node's reboot counts towards a rack or switch incident, as an XID 79's does
            changes.extend(st.topology.observe(st.incidents[st.by_key[node_key]], st.incidents, st.by_key, at))
        return changes

    def _needing_reboot(self, inc: TrackedIncident) -> list[TrackedIncident]:
        """The GPU and workload incidents on ``inc``'s node, other than it, standing on their own and needing a node
        reboot; one validating after its reboot takes no new fault (that gets a reboot of its own), nor joins one."""
        st = self.state
        return [p for iid in st.on_node.get(inc.node or "", ()) if (p := st.live(iid)) is not None and p is not inc
                and p.parent is None and p.cluster == inc.cluster and p.category in NODE_CATEGORIES
                and p.scope in (SCOPE_GPU, SCOPE_TENANT) and p.status is not STATUS_VALIDATING]

    def _host_takes(self, host: TrackedIncident, members: list[TrackedIncident], at: datetime, *, category: str,
                    title: str, source: str, why: str) -> list[Change]:
        """The node's own incident of another kind takes ``members``: raised to ``category`` where that is the more
        cautious repair (the order of ``model.CATEGORY_PRIORITY``), as a node-scope signal of that class joining it
        would raise it; one already more cautious (a human's repair, a reprovision) keeps its path, which covers it."""
        if category_rank(category) < category_rank(host.category):
            host.note(at, "category", f"{host.category} -> {category}: {why}", self.rules.timeline_limit)
            host.category, host.title, host.source, host.domain = category, title, source, DOMAIN_OPERATOR
            host.severity = worse(host.severity, self.catalog.category(category).severity)
        return self._fold_into_node(host, members, at)

    def _open_node(self, inc: TrackedIncident, members: list[TrackedIncident], at: datetime, *, category: str,
                   severity: Severity, title: str, source: str, why: str) -> list[Change]:
        """Open the node incident of ``inc``'s node (its key, named after its earliest member) and fold ``members``
        into it: a multi-GPU failure, or one reboot for the node."""
        assert inc.node is not None
        node_key = node_key_for(inc.cluster, inc.node)
        first = min(members, key=lambda p: p.first_seen)
        node = TrackedIncident(
            id=incident_id(node_key, first.id), key=node_key, cluster=inc.cluster, scope=SCOPE_NODE,
            node=inc.node, category=category, severity=severity, domain=DOMAIN_OPERATOR, title=title,
            first_seen=first.first_seen, last_seen=at, source=source)
        node.nodes[inc.node] = None
        node.labels.update(first.labels)
        node.note(at, "opened", why, self.rules.timeline_limit)
        self.state.incidents[node.id] = node
        self.state.by_key[node_key] = node.id
        self.state.on_node.setdefault(inc.node, {})[node.id] = None
        return [Change(KIND_OPENED, node), *self._fold_into_node(node, members, at, opening=True)]

    def _fold_into_node(self, node: TrackedIncident, members: list[TrackedIncident], at: datetime,
                        opening: bool = False) -> list[Change]:
        changes: list[Change] = []
        for m in members:
            m.parent = node.id
            m.version += 1
            m.note(at, "folded", f"into node incident {node.id}", self.rules.timeline_limit)
            node.members[m.id] = None
            node.gpus.update(m.gpus)
            node.tenants.update(m.tenants)
            for k, v in m.counts.items():
                node.counts[k] = node.counts.get(k, 0) + v
            node.open_faults.update(m.open_faults)
            node.signal_count += m.signal_count
            node.severity = worse(node.severity, m.severity)
            node.last_seen = max(node.last_seen, m.last_seen)
            if len(node.evidence) < self.rules.evidence_messages and m.evidence:
                node.evidence.append(m.evidence[0])
            changes.append(Change(KIND_FOLDED, m))
        rma = next((c for c in _HUMAN_REPAIR if any(m.category == c for m in members)), None)
        if rma is not None and node.category not in _HUMAN_REPAIR and node.category != "unknown_fault":
            # a member NVIDIA sends to support (CONTACT_SUPPORT: RMA) or to a hands-on check (CHECK_MECHANICALS)
            # keeps that path for the node: a reboot and a passing diagnostic must not return it to service
            spec = self.catalog.category(rma)
            node.note(at, "category", f"{node.category} -> {rma}: a member GPU needs a human ({_HUMAN_REPAIR[rma]})",
                      self.rules.timeline_limit)
            node.category, node.source = rma, f"{MULTI_GPU_SOURCE}; {_HUMAN_REPAIR[rma]}"
            node.severity = worse(node.severity, spec.severity)
        if not opening:
            node.version += 1
            if node.category not in NODE_CATEGORIES:  # a node reboot keeps the title of what needs it
                node.title = f"{len(node.gpus)} GPUs failing together on {node.node}"
            changes.append(Change(KIND_UPDATED, node))
        elif rma is not None:
            node.title = f"{len(node.gpus)} GPUs failing together on {node.node}, one needing {rma}"
        return changes

    def link_impacted(self, inc: TrackedIncident) -> list[Change]:
        """A hardware incident opened on a node that serves breached endpoints: fold them under it."""
        changes: list[Change] = []
        assert inc.node is not None
        for key in self.state.serving.get(inc.node, ()):
            ep = self.state.live(self.state.by_key.get(key))
            if ep is None or ep.parent is not None or ep.scope is not SCOPE_TENANT:
                continue
            ep.parent = inc.id
            ep.version += 1
            ep.note(inc.first_seen, "folded", f"caused by hardware incident {inc.id} on {inc.node}",
                    self.rules.timeline_limit)
            for t in ep.tenants.values():
                inc.impact[t.key()] = t
            inc.note(inc.first_seen, "impact", f"endpoint incident {ep.id}", self.rules.timeline_limit)
            changes.append(Change(KIND_FOLDED, ep))
        return changes
