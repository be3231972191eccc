"""The pure grouping core: (state, signal, now) -> state + incident changes. No I/O, no clock reads.

``Correlator.ingest`` folds one ``Signal`` into the open incidents; ``apply_action`` folds one
remediator ``ActionRecord`` into an incident's lifecycle; ``expire`` forgets what is long
settled. Each returns ``Change``s (``correlator.model``) for the service to publish. The
service (``correlator.service``, NATS) and ``breakfix replay`` (a file) drive it and pass time
in. What the rules mean is data: ``correlator/rules/default.yaml`` via ``correlator.rules``.

Grouping, in the order a fault signal meets it:
1. duplicates (same id) are counted on their incident and dropped;
2. collateral XID 45 within the window of another fault on the same GPU folds into it;
3. XID 74 / NVLink errors on the peers of a GPU that just went down fold into its incident;
4. an endpoint SLO breach served by a node with an open hardware incident becomes its impact;
5. application XIDs on one GPU across several workloads open a suspect-GPU incident;
6. otherwise the key: tenant (namespace, workload), GPU (node, GPU) or node;
7. count-in-window thresholds hold back an incident until the count is reached;
8. new and reopened incidents feed lemon detection and topology grouping.
"""

from __future__ import annotations

from datetime import datetime

from breakfix.correlator.lifecycle import Lifecycle
from breakfix.correlator.model import Change, TrackedIncident, category_rank, incident_id
from breakfix.correlator.patterns import Patterns
from breakfix.correlator.state import LEMON_LABEL, TENANT_LABEL, CoreState
from breakfix.schemas.catalog import FaultClass
from breakfix.schemas.common import max_severity
from breakfix.schemas.incident import ChangeKind, Domain, IncidentScope, IncidentStatus
from breakfix.schemas.signal import Signal

NODE_CATEGORIES = frozenset({"node_reboot_required"})
_XID154 = "xid:154"
_COMPANION_SOURCE = "NVIDIA Xid catalog WORKFLOW_XID_48: with XID 63/64, DRAIN_AND_RESET"
__all__ = ["LEMON_LABEL", "CoreState", "Correlator", "code_key"]


def code_key(signal: Signal) -> str:
    """``xid:48``, ``dcgm:DCGM_FR_...``, ``<check>:<code>``, or the check name when there is no code."""
    if signal.code:
        return f"{signal.check}:{signal.code}"
    return signal.check


class Correlator(Lifecycle, Patterns, CoreState):
    """The grouping core. State and checkpoint form: ``CoreState``; healthy/actions: ``Lifecycle``;
    multi-signal patterns: ``Patterns``."""

    # -- signals ----------------------------------------------------------------------------------
    def ingest(self, s: Signal, now: datetime) -> list[Change]:
        """Fold one signal in; return the changes to publish (often none)."""
        self.stats["signals"] += 1
        hit = self.seen.get(s.id)
        if hit is not None:
            self.stats["duplicates"] += 1
            inc = self.incidents.get(hit)
            if inc is not None:
                inc.duplicate_count += 1
            return []
        fk = s.fault_key()
        if s.healthy:  # not remembered: a repeated healthy reading clears nothing twice
            return self._clear(fk, s, now)
        ck = code_key(s)
        fc = self._classify(s)
        eck = fc.equivalent or ck  # a DCGM code counts as its XID equivalent (one fault, one plan)
        at = s.observed_at
        rules = self.rules
        gkey = s.gpu.key() if s.gpu is not None else None
        gpu_key = f"gpu|{s.cluster}|{s.node}|{gkey}" if gkey is not None else None
        if gpu_key is not None and s.check == "xid" and s.code in self._symp:
            host = self._live(self.by_key.get(gpu_key))
            if host is not None and at - host.last_seen <= self._symp_td:
                return self._add(host, s, fk, ck, fc, now, fold=True)
        if gpu_key is not None and (eck == _XID154 or fc.category in NODE_CATEGORIES):
            # NVIDIA Xid catalog, XID_154: the recovery action applies to the GPU's fault; it raises the
            # incident already holding that GPU's codes (and a GPU off the bus joins that incident too)
            host = self._gpu_host(gpu_key, s)
            if host is not None:
                return self._add(host, s, fk, ck, fc, now, fold=not fc.known) + self._after_down(host, s, eck, fc)
        if eck in rules.peer_codes:
            d = self.down.get(s.node)
            if d is not None and d[1] != gkey and at - d[2] <= self._peer_td:
                host = self._live(d[0])
                if host is not None:
                    return self._add(host, s, fk, ck, fc, now, fold=True)
        if fc.category in rules.impact_categories and s.tenant is not None:
            changes = self._endpoint(s, fk, ck, fc, now)
            if changes is not None:
                return changes
        if gpu_key is not None and eck in rules.suspect_codes and s.tenant is not None:
            changes = self._suspect(gpu_key, s, fk, ck, fc, now)
            if changes is not None:
                return changes
        key, scope = self._key(s, fc, gpu_key)
        inc = self.incidents.get(self.by_key.get(key, ""))
        if inc is not None and inc.status.terminal:
            if inc.status is IncidentStatus.RESOLVED and inc.resolved_at is not None \
                    and (at - inc.resolved_at).total_seconds() <= rules.flap_s:
                return self._reopen(inc, s, fk, ck, fc, now) + self._after_down(inc, s, eck, fc)
            inc = None
        if inc is None:
            thr = rules.thresholds.get(eck)
            if thr is not None and not self._threshold_met(f"{fk}#{eck}", at, thr.count, thr.window_s):
                self.stats["below_threshold"] += 1
                self._remember(s.id, "")
                return []
            cthr = rules.category_thresholds.get(fc.category)
            if cthr is not None and not self._threshold_met(f"{fk}#cat:{fc.category}", at, cthr.count,
                                                            cthr.window_s):
                self.stats["below_threshold"] += 1
                self._remember(s.id, "")
                return []
            changes = self._open(key, scope, s, fk, ck, fc, now)
            return changes + self._after_down(self.incidents[self.by_key[key]], s, eck, fc)
        return self._add(inc, s, fk, ck, fc, now) + self._after_down(inc, s, eck, fc)

    def _gpu_host(self, gpu_key: str, s: Signal) -> TrackedIncident | None:
        """The live incident holding this GPU's codes (its own, or the one that took them), or its parent.
        A tenant incident qualifies only when this GPU on this node is all it holds (a plan targets one GPU)."""
        host = self._live(self.by_key.get(gpu_key)) or self._live(self.by_gpu.get(gpu_key))
        if host is None:
            return None
        if host.scope is IncidentScope.TENANT and (len(host.gpus) != 1 or list(host.nodes) != [s.node]):
            return None
        parent = self._live(host.parent)
        return parent if parent is not None and parent.scope is not IncidentScope.FABRIC else host

    def _after_down(self, host: TrackedIncident, s: Signal, eck: str, fc: FaultClass) -> list[Change]:
        """A GPU went down (or a fatal NVSwitch SXid): NVLink peers' incidents opened just before fold in."""
        rules = self.rules
        if eck not in rules.down_codes and fc.category not in rules.down_categories:
            return []
        down_gpu = s.gpu.key() if s.gpu is not None and eck in rules.down_codes else ""
        changes: list[Change] = []
        at = s.observed_at
        for iid in list(self.on_node.get(s.node, ())):
            p = self._live(iid)
            if p is None or p is host or p.parent is not None or p.scope is not IncidentScope.GPU \
                    or not p.counts or not rules.peer_codes.issuperset(p.counts) or down_gpu in p.gpus \
                    or abs(at - p.first_seen) > self._peer_td:
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
                self.by_fault[fk] = host.id
            host.note(at, "folded", f"peer incident {p.id} ({', '.join(p.counts)})", rules.timeline_limit)
            self.stats["folded"] += 1
            changes.append(Change(ChangeKind.FOLDED, p))
        if changes:
            host.version += 1
            changes.append(Change(ChangeKind.UPDATED, host))
        return changes

    def _key(self, s: Signal, fc: FaultClass, gpu_key: str | None) -> tuple[str, IncidentScope]:
        if fc.domain is Domain.TENANT and s.tenant is not None:
            # one tenant workload across its pods, GPUs and nodes
            return f"tenant|{s.cluster}|{s.tenant.namespace}|{s.tenant.workload()}", IncidentScope.TENANT
        if gpu_key is not None and fc.category not in NODE_CATEGORIES:
            return gpu_key, IncidentScope.GPU
        return f"node|{s.cluster}|{s.node}", IncidentScope.NODE

    def _threshold_met(self, key: str, at: datetime, count: int, window_s: float) -> bool:
        times = self.pending.setdefault(key, [])
        times.append(at)
        while times and (at - times[0]).total_seconds() > window_s:
            times.pop(0)
        if len(times) >= count:
            del self.pending[key]
            return True
        del times[:-count]
        return False

    def _open(self, key: str, scope: IncidentScope, s: Signal, fk: str, ck: str, fc: FaultClass,
              now: datetime, note: str = "") -> list[Change]:
        inc = TrackedIncident(
            id=incident_id(key, s.id), key=key, cluster=s.cluster, scope=scope, node=s.node,
            category=fc.category, severity=fc.severity if fc.known else max_severity(fc.severity, s.severity),
            domain=fc.domain, title=fc.title, first_seen=s.observed_at, last_seen=s.observed_at, source=fc.source,
        )
        if fc.category == "application_fault" and s.tenant is None:
            # NVIDIA RESTART_APP, but no pod is known to hold the GPU: on-call must find the workload
            inc.labels[TENANT_LABEL] = "unknown"
            inc.title = f"Tenant unknown: {fc.title}"
        self.incidents[inc.id] = inc
        self.by_key[key] = inc.id
        self._absorb(inc, s, fk, ck, fc)
        inc.note(s.observed_at, "opened", note or f"{ck} on {s.entity_key()}", self.rules.timeline_limit)
        if scope is IncidentScope.GPU and inc.domain is Domain.OPERATOR:
            self._lemon(inc, s)  # a new incident is a new burst; a flap reopen is not
        return [Change(ChangeKind.OPENED, inc), *self._after_open(inc, s, now, new=True)]

    def _reopen(self, inc: TrackedIncident, s: Signal, fk: str, ck: str, fc: FaultClass,
                now: datetime) -> list[Change]:
        inc.status = IncidentStatus.OPEN
        inc.flaps += 1
        inc.plan = None
        inc.resolved_at = None
        inc.time_to_repair_s = None
        inc.version += 1
        self._absorb(inc, s, fk, ck, fc)
        inc.note(s.observed_at, "reopened", f"{ck} again (flap {inc.flaps})", self.rules.timeline_limit)
        return [Change(ChangeKind.REOPENED, inc), *self._after_open(inc, s, now)]

    def _after_open(self, inc: TrackedIncident, s: Signal, now: datetime, new: bool = False) -> list[Change]:
        changes: list[Change] = []
        if inc.domain is Domain.OPERATOR and inc.node is not None:
            self.on_node.setdefault(inc.node, {})[inc.id] = None
            changes.extend(self._link_impacted(inc))
            if new:  # a flap reopening its incident is not another GPU failing
                changes.extend(self._multi_gpu(inc, s.observed_at))
        if self.topology is not None:
            changes.extend(self.topology.observe(inc, self.incidents, self.by_key, s.observed_at))
        return changes

    def _add(self, inc: TrackedIncident, s: Signal, fk: str, ck: str, fc: FaultClass, now: datetime,
             fold: bool = False) -> list[Change]:
        at = s.observed_at
        lk = f"{fk}#{ck}"
        last = inc.last_at.get(lk)
        if last is not None and fk in inc.open_faults and at - last <= self._dedupe and ck in inc.counts:
            # the storm path: count it, store nothing new, publish nothing
            self.stats["suppressed"] += 1
            self._remember(s.id, inc.id)
            inc.signal_count += 1
            inc.counts[ck] += 1
            inc.last_at[lk] = at
            if at > inc.last_seen:
                inc.last_seen = at
            if at > inc.open_faults[fk]:
                inc.open_faults[fk] = at
            return []
        if fold:
            self.stats["folded"] += 1
        if not self._absorb(inc, s, fk, ck, fc, fold=fold):
            return []
        inc.version += 1
        changes = [Change(ChangeKind.UPDATED, inc)]
        if self.topology is not None and not fold and inc.parent is None and inc.node is not None:
            changes.extend(self.topology.observe(inc, self.incidents, self.by_key, at))
        return changes

    def _absorb(self, inc: TrackedIncident, s: Signal, fk: str, ck: str, fc: FaultClass,
                fold: bool = False) -> bool:
        """Add a fault signal's facts to an incident; True when something an SRE would notice changed."""
        rules = self.rules
        at = s.observed_at
        self._remember(s.id, inc.id)
        inc.last_at[f"{fk}#{ck}"] = at
        material = False
        inc.signal_count += 1
        if len(inc.signal_ids) < rules.evidence_ids:
            inc.signal_ids.append(s.id)
        if len(inc.evidence) < rules.evidence_messages and s.message:
            inc.evidence.append(s.message[:rules.message_chars])
        if at > inc.last_seen:
            inc.last_seen = at
        caps, limit = rules.caps, rules.timeline_limit
        n = inc.counts.get(ck)
        if n is not None:
            inc.counts[ck] = n + 1
        elif len(inc.counts) < caps.codes:
            inc.counts[ck] = 1
            material = True
            if fold:
                inc.note(at, "folded", f"{ck} on {s.entity_key()}", limit)
        else:
            inc.over("codes", at, caps.codes, limit)
        if s.check not in inc.checks and len(inc.checks) < caps.codes:
            inc.checks[s.check] = None
        if not fold:
            if s.node not in inc.nodes:
                if len(inc.nodes) < caps.components:
                    inc.nodes[s.node] = None
                    for k, v in s.labels.items():
                        inc.labels.setdefault(k, v)
                    material = True
                else:
                    inc.over("components", at, caps.components, limit)
            if s.gpu is not None:
                g = s.gpu.key()
                self.by_gpu[f"gpu|{s.cluster}|{s.node}|{g}"] = inc.id
                if g not in inc.gpus:
                    if len(inc.gpus) < caps.components:
                        inc.gpus[g] = s.gpu
                        material = True
                    else:
                        inc.over("components", at, caps.components, limit)
            if s.tenant is not None:
                t = s.tenant.key()
                if t not in inc.tenants:
                    if len(inc.tenants) < caps.components:
                        inc.tenants[t] = s.tenant
                        inc.labels.pop(TENANT_LABEL, None)
                        material = True
                    else:
                        inc.over("components", at, caps.components, limit)
            material |= self._merge_class(inc, fc, at)
        prev = inc.open_faults.get(fk)
        if prev is None and len(inc.open_faults) >= caps.open_faults:
            inc.over("open_faults", at, caps.open_faults, limit)
        elif prev is None or prev < at:
            inc.open_faults[fk] = at
            self.by_fault[fk] = inc.id
            material |= prev is None
        if s.gpu is not None and (fc.equivalent or ck) in rules.down_codes:
            self.down[s.node] = (inc.id, s.gpu.key(), at)
        elif fc.category in rules.down_categories:
            self.down[s.node] = (inc.id, "", at)
        if inc.category == "gpu_reset_required" and "xid:48" in inc.counts \
                and not self._companion_keys.isdisjoint(inc.counts):
            material |= self._companions(inc, at)
        return material

    def _merge_class(self, inc: TrackedIncident, fc: FaultClass, at: datetime) -> bool:
        changed = False
        if category_rank(fc.category) < category_rank(inc.category):
            inc.note(at, "category", f"{inc.category} -> {fc.category}", self.rules.timeline_limit)
            inc.category, inc.title, inc.source = fc.category, fc.title, fc.source
            if fc.domain is Domain.OPERATOR or inc.domain is not Domain.OPERATOR:
                inc.domain = fc.domain
            changed = True
        sev = max_severity(inc.severity, fc.severity)
        if sev is not inc.severity:
            inc.severity, changed = sev, True
        return changed

    def _companions(self, inc: TrackedIncident, at: datetime) -> bool:
        """XID 48 with 63/64 on the same GPU means drain-and-reset (NVIDIA WORKFLOW_XID_48)."""
        spec = self.catalog.category("gpu_drain_reset_required")
        inc.note(at, "category", "XID 48 with a row-remap event: drain and reset", self.rules.timeline_limit)
        inc.category, inc.title = "gpu_drain_reset_required", "XID 48 DBE with row-remap event: drain and reset"
        inc.source = _COMPANION_SOURCE
        inc.severity = max_severity(inc.severity, spec.severity)
        return True
