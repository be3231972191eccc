"""The correlator core's state, its indexes, and the plain-JSON form a checkpoint stores.

``CoreState`` is shared by reference between the core's collaborators (``correlator.book``,
``correlator.patterns``, ``correlator.lifecycle``, wired by ``correlator.grouping.Correlator``): every
dict the grouping rules read and write lives here, so ``to_state`` / ``load_state`` capture all of
it. The service (``correlator.service``) writes ``to_state()`` through ``correlator.checkpoint``
together with the stream sequence it covers, and a restarted correlator calls ``load_state`` before
it consumes again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from datetime import datetime, timedelta
from typing import Any, Final

from breakfix.correlator.model import LINK_CATEGORIES, SCOPE_NODE, TERMINAL, TrackedIncident, link_key_for
from breakfix.correlator.rules import Rules, default_rules
from breakfix.correlator.topology import TopologyGrouper, _Candidates
from breakfix.schemas.catalog import Catalog, FaultClass
from breakfix.schemas.signal import Signal

LEMON_LABEL = "breakfix.io/lemon"
TENANT_LABEL = "breakfix.io/tenant"
STATE_VERSION = 1
_CLASS_CACHE = 4096


class FaultIndex:
    """Fault key -> the incident holding that fault open (``Signal.fault_key``, ``check@node/...``), and which nodes
    any of them can be on. A healthy signal clears only an indexed fault, and most healthy signals come from nodes
    with none open (every GPU's resync heartbeat): ``may_hold(node)`` answers those with one lookup, before the
    signal's fault key is built. Every change goes through ``set`` and ``pop``, which keep the node counts.

    ``set`` is given the fault's node where the caller knows it (a signal's). Otherwise (a checkpoint, a peer's
    faults moving to the incident they fold into) the node is worked out of the key, where it is not delimited on
    its own (a node name may hold ``/``): the key then counts for every prefix of its entity that ends before a
    ``/``, and for the whole entity. The node is one of them, so the answer is never a wrong "no"; a wrong "maybe"
    costs only the full look-up."""

    def __init__(self, ids: dict[str, str] | None = None) -> None:
        self.ids: dict[str, str] = {}
        self._node: dict[str, str] = {}  # fault key -> its node, where ``set`` was told it
        self._where: dict[str, list[str]] = {}  # fault key -> the names it counts for, where it was not
        self._nodes: dict[str, int] = {}  # node name -> fault keys counting for it
        for fk, iid in (ids or {}).items():
            self.set(fk, iid)

    def may_hold(self, node: str) -> bool:
        return node in self._nodes

    def get(self, fk: str) -> str | None:
        return self.ids.get(fk)

    def __getitem__(self, fk: str) -> str:
        return self.ids[fk]

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FaultIndex) and self.ids == other.ids

    __hash__ = None  # type: ignore[assignment]  # mutable

    def items(self) -> list[tuple[str, str]]:
        return list(self.ids.items())

    def set(self, fk: str, iid: str, node: str | None = None) -> None:
        if fk not in self.ids:
            if node is not None:
                self._node[fk] = node
                self._count(node, 1)
            else:
                where = self._where[fk] = _node_candidates(fk)
                for n in where:
                    self._count(n, 1)
        self.ids[fk] = iid

    def pop(self, fk: str) -> None:
        if self.ids.pop(fk, None) is None:
            return
        node = self._node.pop(fk, None)
        if node is not None:
            self._count(node, -1)
        else:
            for n in self._where.pop(fk):
                self._count(n, -1)

    def _count(self, node: str, by: int) -> None:
        n = self._nodes.get(node, 0) + by
        if n:
            self._nodes[node] = n
        else:
            del self._nodes[node]


def _node_candidates(fk: str) -> list[str]:
    """The strings a fault key's node may be: its entity (past the first ``@``: a check name holds none) up to each
    ``/``, and whole."""
    at = fk.find("@") + 1
    out: list[str] = []
    i = fk.find("/", at)
    while i != -1:
        out.append(fk[at:i])
        i = fk.find("/", i + 1)
    out.append(fk[at:])
    return out


_STAT_NAMES: Final = ("signals", "duplicates", "suppressed", "healthy", "folded", "below_threshold", "impact",
                      "expired")


class CoreStats:
    """The core's counters (``Correlator.stats``, the checkpoint's ``stats``), one native integer each: a counter
    kept in a dict costs a lookup, a boxed add and a store per signal, about a tenth of a heartbeat's work."""

    def __init__(self) -> None:
        self.signals = 0
        self.duplicates = 0
        self.suppressed = 0
        self.healthy = 0
        self.folded = 0
        self.below_threshold = 0
        self.impact = 0
        self.expired = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _STAT_NAMES}

    def load(self, d: dict[str, int]) -> None:
        """A checkpoint's counters (names this version does not keep are left out)."""
        for name in _STAT_NAMES:
            if name in d:
                setattr(self, name, int(d[name]))


def _ts(d: datetime) -> str:
    return d.isoformat()


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s)


class CoreState:
    """Open incidents and the indexes to find them. Mutated only through the core's methods."""

    def __init__(self, catalog: Catalog, rules: Rules | None = None, *, topology: bool = True) -> None:
        self.catalog = catalog
        self.rules = rules or default_rules()
        self.incidents: dict[str, TrackedIncident] = {}
        self.by_key: dict[str, str] = {}
        self.by_fault = FaultIndex()
        # signal id -> the incident it went to ("" below a threshold), the latest ``seen_limit`` ids: a plain dict
        # (a compiled lookup) and the ids in the order first seen, oldest dropped first (as an OrderedDict would)
        self.seen: dict[str, str] = {}
        self._seen_order: deque[str] = deque()
        self.on_node: dict[str, dict[str, None]] = {}      # node -> operator incidents touching it
        self.serving: dict[str, dict[str, None]] = {}      # node -> endpoint incidents served from it
        self.down: dict[str, tuple[str, str, datetime]] = {}  # node -> (incident, gpu key, at) of a GPU that died
        self.by_gpu: dict[str, str] = {}                    # gpu key -> the incident that last took this GPU's codes
        self.app_hist: dict[str, dict[str, datetime]] = {}  # gpu -> workload -> last app XID
        self.bursts: dict[str, list[datetime]] = {}        # gpu -> incident opens
        self.pending: dict[str, list[datetime]] = {}       # fault key -> times below its threshold
        self.topology = TopologyGrouper(self.rules) if topology else None
        self._classes: OrderedDict[tuple[str, str | None], FaultClass] = OrderedDict()  # LRU, _CLASS_CACHE
        self.counters = CoreStats()
        self.symp = catalog.correlation.sympathetic_xids
        self._message_xids = catalog.message_xids  # classes depend on the message: never cached
        self.seen_limit = self.rules.seen_limit
        self.dedupe_td = timedelta(seconds=self.rules.dedupe_s)
        self.symp_td = timedelta(seconds=self.rules.sympathetic_s)
        self.peer_td = timedelta(seconds=self.rules.peer.window_s if self.rules.peer else self.rules.sympathetic_s)
        corr = catalog.correlation
        self.dbe_facts = frozenset({"xid:48", *corr.dbe_equivalents})
        self.remap_facts = frozenset({*(f"xid:{c}" for c in corr.dbe_companions), *corr.remap_equivalents})
        self.memory_facts = self.dbe_facts | self.remap_facts
        self.contained_facts = frozenset(f"xid:{c}" for c in corr.containment_xids)

    @property
    def stats(self) -> dict[str, int]:
        """The counters by name (a copy)."""
        return self.counters.as_dict()

    # -- helpers shared by the collaborators --------------------------------------------------------------
    def class_cacheable(self, s: Signal) -> bool:
        """False when the signal's class depends on its message (XID 154/74/NVLink5, an SXid's Fatal)."""
        check = s.check
        return not ((check == "xid" and s.code in self._message_xids) or check == "sxid")

    def classify(self, s: Signal) -> FaultClass:
        if not self.class_cacheable(s):
            return self.catalog.classify(check=s.check, code=s.code, message=s.message, details=s.details)
        k = (s.check, s.code)
        cache = self._classes
        fc = cache.get(k)
        if fc is None:
            fc = cache[k] = self.catalog.classify(check=s.check, code=s.code, message=s.message, details=s.details)
            if len(cache) > _CLASS_CACHE:  # codes are open-ended input: keep the cache bounded
                cache.popitem(last=False)
        else:
            cache.move_to_end(k)
        return fc

    def dbe_with_remap(self, counts: dict[str, int]) -> bool:
        """A DBE and a row-remap event on one incident, from any source (a DCGM code counts by its name)."""
        facts = {k if k in self.dbe_facts or k in self.remap_facts else k.rpartition(":")[2] for k in counts}
        return not facts.isdisjoint(self.dbe_facts) and not facts.isdisjoint(self.remap_facts)

    def is_memory_fault(self, key: str) -> bool:
        """A code key that is a DBE or a row-remap event from any source (``xid:48``, ``xid:63``, ``ecc.dbe``,
        ``row_remap.pending``, a DCGM code counted by its name): the facts an XID 94/95 reports the containment of."""
        return key in self.memory_facts or key.rpartition(":")[2] in self.memory_facts

    def remember(self, signal_id: str, incident: str) -> None:
        seen = self.seen
        if signal_id not in seen:
            order = self._seen_order
            order.append(signal_id)
            if len(order) > self.seen_limit:
                del seen[order.popleft()]
        seen[signal_id] = incident

    def live(self, iid: str | None) -> TrackedIncident | None:
        inc = self.incidents.get(iid) if iid else None
        return None if inc is None or inc.status in TERMINAL else inc

    # -- checkpoint form ---------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this core stands, for ``Checkpoint.encode``
        (orjson: plain values, datetimes, dataclasses; pydantic models through ``model_dump``)."""
        groups = {k: {"members": {m: [n, _ts(t)] for m, (n, t) in g.members.items()}, "fabric": g.fabric}
                  for k, g in (self.topology.groups.items() if self.topology else ())}
        return {
            "version": STATE_VERSION,
            "incidents": [inc.state_dict() for inc in self.incidents.values()],
            "seen": list(self.seen.items()),
            "serving": {k: list(v) for k, v in self.serving.items()},
            "down": {k: [i, g, _ts(t)] for k, (i, g, t) in self.down.items()},
            "by_gpu": dict(self.by_gpu),
            # the indexes are stored, not rebuilt from the incidents: a re-keyed incident leaves its old key, and a
            # node incident shares its members' faults while healthy signals clear them on the member holding them
            "by_key": dict(self.by_key),
            "by_fault": dict(self.by_fault.ids),
            # in order: endpoint impact goes to the first operator incident standing on a serving node
            "on_node": {k: list(v) for k, v in self.on_node.items()},
            "app_hist": {k: {w: _ts(t) for w, t in v.items()} for k, v in self.app_hist.items()},
            "bursts": {k: [_ts(t) for t in v] for k, v in self.bursts.items()},
            "pending": {k: [_ts(t) for t in v] for k, v in self.pending.items()},
            "topology": groups,
            "stats": self.counters.as_dict(),
        }

    def _link_keys(self) -> None:
        """A checkpoint from before a node's links had an incident key of their own (``model.LINK_CATEGORIES``).

        A node incident holding only link faults moves to the links' key, so a host fault on the node opens the
        host's incident beside it. One holding link faults beside host faults (a link an XID 79 joined) stays under
        the node's key and is also named by the links' key while it is open, so its link faults keep clearing and
        repeating where they are open; once it settles, the next link fault opens a link incident."""
        for inc in sorted(self.incidents.values(), key=lambda i: (i.status not in TERMINAL, i.first_seen)):
            if inc.scope is not SCOPE_NODE or inc.node is None or not inc.key.startswith("node|"):
                continue
            link_key = link_key_for(inc.cluster, inc.node)
            links = [fk for fk in inc.open_faults if self._is_link(fk)]
            if inc.category in LINK_CATEGORIES and len(links) == len(inc.open_faults):
                if self.by_key.get(inc.key) == inc.id:
                    del self.by_key[inc.key]
                    self.by_key[link_key] = inc.id
                inc.key = link_key
            elif links and inc.status not in TERMINAL and self.by_key.get(inc.key) == inc.id:
                self.by_key.setdefault(link_key, inc.id)

    def _is_link(self, fault_key: str) -> bool:
        check = fault_key.partition("@")[0]
        return self.catalog.classify(check=check, code=None).category in LINK_CATEGORIES

    def load_state(self, d: dict[str, Any]) -> None:
        """Replace this core's state with a checkpoint's; indexes are rebuilt from the incidents."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint state version {d.get('version')!r}, this correlator reads {STATE_VERSION}")
        self.incidents = {}
        self.by_key, self.on_node = {}, {}
        self.by_fault = FaultIndex()
        for raw in d["incidents"]:
            inc = TrackedIncident.from_state(raw)
            self.incidents[inc.id] = inc
        # a key names its live incident where it has one (an incident re-keyed to its GPU may be older than a settled
        # one under that key), else its newest
        for inc in sorted(self.incidents.values(), key=lambda i: (i.status not in TERMINAL, i.first_seen)):
            self.by_key[inc.key] = inc.id
            if inc.status not in TERMINAL:
                for fk in inc.open_faults:
                    self.by_fault.set(fk, inc.id)
                if inc.domain.value == "operator" and inc.node is not None:
                    self.on_node.setdefault(inc.node, {})[inc.id] = None
        self.seen = {k: v for k, v in d["seen"]}
        self._seen_order = deque(self.seen)
        self.serving = {k: dict.fromkeys(v) for k, v in d["serving"].items()}
        self.down = {k: (i, g, _dt(t)) for k, (i, g, t) in d["down"].items()}
        self.by_gpu = dict(d.get("by_gpu", {}))
        # a checkpoint from before the indexes were stored keeps them as rebuilt above (by_key, by_fault, on_node)
        self.by_key = dict(d.get("by_key", self.by_key))
        if "by_fault" in d:
            self.by_fault = FaultIndex(d["by_fault"])
        if "on_node" in d:
            self.on_node = {k: dict.fromkeys(v) for k, v in d["on_node"].items()}
        self._link_keys()
        self.app_hist = {k: {w: _dt(t) for w, t in v.items()} for k, v in d["app_hist"].items()}
        self.bursts = {k: [_dt(t) for t in v] for k, v in d["bursts"].items()}
        self.pending = {k: [_dt(t) for t in v] for k, v in d["pending"].items()}
        if self.topology is not None:
            self.topology.groups = {}
            for k, g in d["topology"].items():
                c = _Candidates(fabric=g["fabric"])
                c.members = {m: (n, _dt(t)) for m, (n, t) in g["members"].items()}
                self.topology.groups[k] = c
        self.counters.load(d["stats"])
