"""The incident book: opening, reopening and growing incidents from observations, in place.

Part of the pure grouping core, wired by ``correlator.grouping.Correlator``: it mutates the shared
``CoreState`` (incidents and their indexes) and calls ``correlator.patterns.Patterns`` for what a
new incident may trigger (lemons, multi-GPU failures, endpoint impact) and the topology grouper.
Every fault signal reaches it as one ``Observation`` (``correlator.model``). Per-incident caps
(``rules.caps``) bound every list; past a cap the incident counts the rest in ``overflow``.
Returns ``Change``s; no I/O, no clock reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from breakfix.correlator.model import (
    DOMAIN_OPERATOR,
    KIND_FOLDED,
    KIND_OPENED,
    KIND_REOPENED,
    KIND_UPDATED,
    NODE_CATEGORIES,
    SCOPE_FABRIC,
    SCOPE_GPU,
    SCOPE_NODE,
    SCOPE_TENANT,
    SEVERITY_RANK,
    STATUS_OPEN,
    STATUS_VALIDATING,
    Change,
    Observation,
    TrackedIncident,
    category_rank,
    incident_id,
    tenant_key,
    worse,
)
from breakfix.correlator.state import TENANT_LABEL, CoreState
from breakfix.schemas.catalog import FaultClass
from breakfix.schemas.incident import MIG_SEEN_LABEL, IncidentScope

if TYPE_CHECKING:
    from breakfix.correlator.patterns import Patterns

_COMPANION_SOURCE = "NVIDIA Xid catalog WORKFLOW_XID_48: with XID 63/64, DRAIN_AND_RESET"


class IncidentBook:
    """Incident mutations over the shared state; ``patterns`` is set by the ``Correlator`` that wires both."""

    def __init__(self, state: CoreState) -> None:
        self.state = state
        self.rules = rules = state.rules
        self.patterns: Patterns
        # the rules read on every signal, copied once into native fields (``rules.caps`` is a pydantic model, each of
        # whose attribute reads goes through its ``__getattr__`` hook)
        self.codes_cap = rules.caps.codes
        self.components_cap = rules.caps.components
        self.open_faults_cap = rules.caps.open_faults
        self.timeline_limit = rules.timeline_limit
        self.evidence_ids = rules.evidence_ids
        self.evidence_messages = rules.evidence_messages
        self.message_chars = rules.message_chars
        self.down_codes = rules.down_codes
        self.down_categories = rules.down_categories

    def gpu_host(self, gpu_key: str, node: str) -> TrackedIncident | None:
        """The live incident holding this GPU's codes (its own, or the one that took them), or its parent.
        A tenant incident qualifies only when this GPU on this node is all it holds (a plan targets one GPU)."""
        host = self.state.live(self.state.by_key.get(gpu_key)) or self.state.live(self.state.by_gpu.get(gpu_key))
        if host is None:
            return None
        if host.scope is SCOPE_TENANT and (len(host.gpus) != 1 or list(host.nodes) != [node]):
            return None
        return host if host.parent is None else self.top(host)

    def top(self, inc: TrackedIncident) -> TrackedIncident:
        """The incident standing on its own that ``inc`` folded into (up through a node's reboot holding a GPU's
        incident that took its NVLink peers), short of a fabric incident; ``inc`` when it has no live parent."""
        for _ in range(4):
            parent = self.state.live(inc.parent)
            if parent is None or parent.scope is SCOPE_FABRIC:
                break
            inc = parent
        return inc

    def after_down(self, host: TrackedIncident, o: Observation) -> list[Change]:
        """A GPU went down (or a fatal NVSwitch SXid): NVLink peers' incidents opened just before fold in."""
        rules, eck = self.rules, o.eck
        if eck not in self.down_codes and o.fc.category not in self.down_categories:
            return []
        down_gpu = o.gkey if o.gkey is not None and eck in self.down_codes else ""
        changes: list[Change] = []
        at = o.at
        for iid in list(self.state.on_node.get(o.node, ())):
            p = self.state.live(iid)
            if p is None or p is host or p.parent is not None or p.scope is not SCOPE_GPU \
                    or not p.counts or not rules.peer_codes.issuperset(p.counts) or down_gpu in p.gpus \
                    or abs(at - p.first_seen) > self.state.peer_td:
                continue
            p.parent = host.id
            p.version += 1
            p.note(at, "folded", f"NVLink peer of {host.id}: {', '.join(p.counts)} follows the fault there",
                   rules.timeline_limit)
            host.members[p.id] = None
            for k, v in p.counts.items():
                host.counts[k] = host.counts.get(k, 0) + v
            for fk, t in p.open_faults.items():
                host.open_faults[fk] = t
                self.state.by_fault.set(fk, host.id)
            host.note(at, "folded", f"peer incident {p.id} ({', '.join(p.counts)})", rules.timeline_limit)
            self.state.counters.folded += 1
            changes.append(Change(KIND_FOLDED, p))
        if changes:
            host.version += 1
            changes.append(Change(KIND_UPDATED, host))
        return changes

    def threshold_met(self, key: str, at: datetime, count: int, window_s: float) -> bool:
        times = self.state.pending.setdefault(key, [])
        times.append(at)
        while times and (at - times[0]).total_seconds() > window_s:
            times.pop(0)
        if len(times) >= count:
            del self.state.pending[key]
            return True
        del times[:-count]
        return False

    def open(self, key: str, scope: IncidentScope, o: Observation, note: str = "") -> list[Change]:
        fc, d, at = o.fc, o.d, o.at
        inc = TrackedIncident(
            id=incident_id(key, o.sid), key=key, cluster=d["cluster"], scope=scope, node=o.node,
            category=fc.category, severity=fc.severity if fc.known else worse(fc.severity, d["severity"]),
            domain=fc.domain, title=fc.title, first_seen=at, last_seen=at, source=fc.source,
        )
        if fc.category == "application_fault" and o.tenant is None:
            # NVIDIA RESTART_APP, but no pod is known to hold the GPU: on-call must find the workload
            inc.labels[TENANT_LABEL] = "unknown"
            inc.title = f"Tenant unknown: {fc.title}"
        self.state.incidents[inc.id] = inc
        self.state.by_key[key] = inc.id
        self.absorb(inc, o)
        # the signal's entity, as ``Signal.entity_key`` has it: the fault key past its check
        inc.note(at, "opened", note or f"{o.ck} on {o.fk[len(o.check) + 1:]}", self.timeline_limit)
        if scope is SCOPE_GPU and inc.domain is DOMAIN_OPERATOR:
            self.patterns.lemon(inc, at)  # a new incident is a new burst; a flap reopen is not
        changes = [Change(KIND_OPENED, inc), *self._after_open(inc, at, new=True)]
        if scope is SCOPE_NODE and inc.category in NODE_CATEGORIES:
            changes.extend(self.patterns.one_reboot(inc, at))  # it takes the node's other reboots
        return changes

    def reopen(self, inc: TrackedIncident, o: Observation) -> list[Change]:
        at = o.at
        if inc.parent is not None and self.state.live(inc.parent) is None:
            # folded into an incident settled since: back on its own, so its plan runs (a live parent keeps it, and
            # hears of it: ``echo``)
            inc.note(at, "unfolded", f"parent {inc.parent} settled", self.rules.timeline_limit)
            inc.parent = None
        inc.status = STATUS_OPEN
        inc.flaps += 1
        inc.plan = None
        inc.resolved_at = None
        inc.time_to_repair_s = None
        inc.version += 1
        self.absorb(inc, o)
        inc.note(at, "reopened", f"{o.ck} again (flap {inc.flaps})", self.rules.timeline_limit)
        changes = [Change(KIND_REOPENED, inc), *self._after_open(inc, at)]
        if inc.category in NODE_CATEGORIES:  # back needing a node reboot: one reboot incident for the node again
            changes.extend(self.patterns.one_reboot(inc, at))
        return changes

    def echo(self, member: TrackedIncident, o: Observation) -> list[Change]:
        """A fault counted on a folded incident (its repeat, or its flap reopening it) while the incident standing on
        its own validates or soaks after its repair: counted there too, so the remediator sees the recurrence
        (``follow.recurrence`` compares counts). Otherwise the parent's counts stay as they were at the fold."""
        parent = self.state.incidents.get(member.parent or "")
        if parent is None or (parent.status is not STATUS_VALIDATING and parent.parent is None):
            return []  # the common case first (a storm's repeats land on multi-GPU members): no climb
        top = self.top(member)
        if top is member or top.status is not STATUS_VALIDATING:
            return []
        n = top.counts.get(o.ck)
        if n is None and len(top.counts) >= self.rules.caps.codes:
            top.over("codes", o.at, self.codes_cap, self.rules.timeline_limit)
        else:
            top.counts[o.ck] = (n or 0) + 1
        top.signal_count += 1
        top.last_seen = max(top.last_seen, o.at)
        top.version += 1
        top.note(o.at, "recurred", f"{o.ck} on folded {member.id}", self.rules.timeline_limit)
        return [Change(KIND_UPDATED, top)]

    def _after_open(self, inc: TrackedIncident, at: datetime, new: bool = False) -> list[Change]:
        changes: list[Change] = []
        if inc.domain is DOMAIN_OPERATOR and inc.node is not None:
            self.state.on_node.setdefault(inc.node, {})[inc.id] = None
            changes.extend(self.patterns.link_impacted(inc))
            if new:  # a flap reopening its incident is not another GPU failing
                changes.extend(self.patterns.multi_gpu(inc, at))
        if self.state.topology is not None:
            changes.extend(self.state.topology.observe(inc, self.state.incidents, self.state.by_key, at))
        return changes

    def add(self, inc: TrackedIncident, o: Observation, fold: bool = False) -> list[Change]:
        fk, ck, lk, at = o.fk, o.ck, o.lk, o.at
        last = inc.last_at.get(lk)
        if last is not None and fk in inc.open_faults and at - last <= self.state.dedupe_td and ck in inc.counts \
                and (fold or not raises_class(inc, o.fc)):
            # the storm path: count it, store nothing new, publish nothing. Not for a repeat whose own line rates it
            # worse than the incident (XID 154's recovery action gone from None to a reset, an NVLink5 decode turned
            # RESET_GPU, an SXid turned fatal: the class comes from the message, CoreState.class_cacheable): that
            # one is absorbed and raises the incident, as it would a minute later. A folded signal never sets its
            # host's class (absorb), so its repeats stay on this path whatever their class.
            self.state.counters.suppressed += 1
            self.state.remember(o.sid, inc.id)
            inc.signal_count += 1
            inc.counts[ck] += 1
            inc.last_at[lk] = at
            if at > inc.last_seen:
                inc.last_seen = at
            if at > inc.open_faults[fk]:
                inc.open_faults[fk] = at
            if inc.status is not STATUS_VALIDATING:
                return []
            inc.version += 1  # a repeat while the remediator validates and soaks is a recurrence it must see
            return [Change(KIND_UPDATED, inc)]
        if fold:
            self.state.counters.folded += 1
        tenant_domain = inc.domain is not DOMAIN_OPERATOR
        before = inc.category
        if not self.absorb(inc, o, fold=fold) and inc.status is not STATUS_VALIDATING:
            return []
        inc.version += 1
        changes = [Change(KIND_UPDATED, inc)]
        # a GPU's tenant incident turned hardware (a DBE joining its XID 94, XID 154's action joining an application
        # XID): from here on it is a new hardware incident on the node, as if opened so: lemon bursts, multi-GPU and
        # endpoint impact see it (a one-GPU workload incident is re-keyed as the GPU's first)
        turned = tenant_domain and inc.domain is DOMAIN_OPERATOR and inc.parent is None \
            and (inc.scope is SCOPE_GPU or self._to_gpu_scope(inc, o))
        if not fold and inc.parent is None and inc.category in NODE_CATEGORIES and before not in NODE_CATEGORIES:
            changes.extend(self.patterns.one_reboot(inc, at))  # one reboot incident per node (RESTART_BM)
        if turned and inc.parent is None:
            self.patterns.lemon(inc, at)
            changes.extend(self._after_open(inc, at, new=True))
        elif turned and inc.scope is SCOPE_GPU and inc.node is not None:
            self.state.on_node.setdefault(inc.node, {})[inc.id] = None  # folded into its node's reboot: as a restored
            # core has it
        elif self.state.topology is not None and not fold and inc.parent is None and inc.node is not None:
            changes.extend(self.state.topology.observe(inc, self.state.incidents, self.state.by_key, at))
        return changes

    def _to_gpu_scope(self, inc: TrackedIncident, o: Observation) -> bool:
        """Re-key a one-GPU tenant incident that a hardware fault joined (``gpu_host`` lets only those take a GPU's
        codes) as that GPU's incident; False for any other. The workload's next fault opens its own incident."""
        st, gpu_key = self.state, o.gpu_key
        if inc.scope is not SCOPE_TENANT or gpu_key is None or len(inc.gpus) != 1 \
                or list(inc.nodes) != [o.node]:
            return False
        if st.by_key.get(inc.key) == inc.id:
            del st.by_key[inc.key]
        inc.note(o.at, "scope", f"tenant -> gpu: {o.ck} is the GPU's fault, not the workload's",
                 self.rules.timeline_limit)
        inc.key, inc.scope, inc.node = gpu_key, SCOPE_GPU, o.node
        st.by_key[gpu_key] = inc.id
        return True

    def absorb(self, inc: TrackedIncident, o: Observation, fold: bool = False) -> bool:
        """Add a fault signal's facts to an incident; True when something an SRE would notice changed."""
        st, fk, ck, fc, at, d = self.state, o.fk, o.ck, o.fc, o.at, o.d
        limit = self.timeline_limit
        st.remember(o.sid, inc.id)
        inc.last_at[o.lk] = at
        material = False
        inc.signal_count += 1
        if len(inc.signal_ids) < self.evidence_ids:
            inc.signal_ids.append(o.sid)
        message: str = d["message"]
        if message and len(inc.evidence) < self.evidence_messages:
            inc.evidence.append(message[:self.message_chars])
        if at > inc.last_seen:
            inc.last_seen = at
        codes_cap, components_cap = self.codes_cap, self.components_cap
        counts = inc.counts
        n = counts.get(ck)
        if n is not None:
            counts[ck] = n + 1
        elif len(counts) < codes_cap:
            counts[ck] = 1
            material = True
            if fold:
                inc.note(at, "folded", f"{ck} on {fk[len(o.check) + 1:]}", limit)  # its entity
        else:
            inc.over("codes", at, codes_cap, limit)
        check = o.check
        if check not in inc.checks and len(inc.checks) < codes_cap:
            inc.checks[check] = None
        node = o.node
        if not fold:
            if node not in inc.nodes:
                if len(inc.nodes) < components_cap:
                    inc.nodes[node] = None
                    labels: dict[str, str] = d["labels"]
                    for k, v in labels.items():
                        inc.labels.setdefault(k, v)
                    material = True
                else:
                    inc.over("components", at, components_cap, limit)
            details: dict[str, str] = d["details"]
            if details and "GPU_I_ID" in details and MIG_SEEN_LABEL not in inc.labels:
                inc.labels[MIG_SEEN_LABEL] = "true"  # a GPU instance's fault (kmsg GPU-I, dcgm-exporter GPU_I_ID): the
                material = True  # remediator does not take the GPUs for whole (remediator.decide.whole_gpu)
            g = o.gkey
            if g is not None:
                if o.gpu_key is not None:
                    st.by_gpu[o.gpu_key] = inc.id
                if g not in inc.gpus:
                    if len(inc.gpus) < components_cap:
                        inc.gpus[g] = d["gpu"]  # gkey is set only with a GPU
                        material = True
                    else:
                        inc.over("components", at, components_cap, limit)
            tenant = o.tenant
            if tenant is not None:
                t = tenant_key(tenant)
                if t not in inc.tenants:
                    if len(inc.tenants) < components_cap:
                        inc.tenants[t] = tenant
                        inc.labels.pop(TENANT_LABEL, None)
                        material = True
                    else:
                        inc.over("components", at, components_cap, limit)
            if fc.category != inc.category or fc.severity is not inc.severity:  # else merge_class changes nothing
                material |= self.merge_class(inc, fc, at)
        prev = inc.open_faults.get(fk)
        if prev is None and len(inc.open_faults) >= self.open_faults_cap:
            inc.over("open_faults", at, self.open_faults_cap, limit)
        elif prev is None or prev < at:
            inc.open_faults[fk] = at
            st.by_fault.set(fk, inc.id, node)
            material |= prev is None
        if o.gkey is not None and (fc.equivalent or ck) in self.down_codes:  # fc: maybe a pattern's, not o.eck's
            st.down[node] = (inc.id, o.gkey, at)
        elif fc.category in self.down_categories:
            st.down[node] = (inc.id, "", at)
        if inc.category == "gpu_reset_required" and st.dbe_with_remap(counts):
            material |= self.companions(inc, at)
        return material

    def merge_class(self, inc: TrackedIncident, fc: FaultClass, at: datetime) -> bool:
        """Raise the incident to ``fc`` where it is worse (``raises_class``); True when something changed."""
        changed = False
        if category_rank(fc.category) < category_rank(inc.category):
            inc.note(at, "category", f"{inc.category} -> {fc.category}", self.rules.timeline_limit)
            inc.category, inc.title, inc.source = fc.category, fc.title, fc.source
            if fc.domain is DOMAIN_OPERATOR or inc.domain is not DOMAIN_OPERATOR:
                inc.domain = fc.domain
            changed = True
        sev = worse(inc.severity, fc.severity)
        if sev is not inc.severity:
            inc.severity, changed = sev, True
        return changed

    def companions(self, inc: TrackedIncident, at: datetime) -> bool:
        """XID 48 with 63/64 on the same GPU (or the same facts from NVML/DCGM) means drain-and-reset
        (NVIDIA WORKFLOW_XID_48)."""
        spec = self.state.catalog.category("gpu_drain_reset_required")
        inc.note(at, "category", "XID 48 with a row-remap event: drain and reset", self.rules.timeline_limit)
        inc.category, inc.title = "gpu_drain_reset_required", "XID 48 DBE with row-remap event: drain and reset"
        inc.source = _COMPANION_SOURCE
        inc.severity = worse(inc.severity, spec.severity)
        return True


def raises_class(inc: TrackedIncident, fc: FaultClass) -> bool:
    """Whether ``IncidentBook.merge_class`` would change the incident: ``fc`` is a more cautious category or a higher
    severity than it has (equal categories skip the rank lookups: the storm path asks on every repeat)."""
    if fc.category != inc.category and category_rank(fc.category) < category_rank(inc.category):
        return True
    return SEVERITY_RANK[fc.severity] > SEVERITY_RANK[inc.severity]
