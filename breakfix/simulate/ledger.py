"""The capacity ledger: what each policy cost, in GPU-hours, jobs, pages and repair times.

Fed by the simulated fleet (``simulate.fleet``) with intervals in simulated seconds: node cordons,
GPU disruptions (reset, reboot, reprovision windows), fault lifetimes. Events may arrive out of
order (the executor runs a whole plan ahead of the event loop), so the ledger keeps intervals and
computes unions only in ``summary``. Accounting rules, per GPU:

- capacity lost = the union of: its node cordoned (held, draining, repairing, waiting), the GPU
  itself being reset/rebooted, and a critical or fatal fault on it (or on its node) not yet cured;
- a fault still in service = a fault present while its node is not cordoned;
- jobs interrupted = the fault's own job (critical or fatal faults) plus jobs on GPUs that a
  drain, reset or reboot takes away, each weighted by the fleet's utilization;
- time to repair = from the fault's start until it is cured and its node is back in service.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from breakfix.schemas.common import Severity
from breakfix.simulate.trace import Fault

Interval = tuple[float, float]


def union_length(intervals: list[Interval], horizon: float) -> float:
    total = 0.0
    end = -1.0
    for a, b in sorted(intervals):
        a, b = max(a, 0.0), min(b, horizon)
        if b <= a:
            continue
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _merge(intervals: list[Interval], horizon: float) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        a, b = max(a, 0.0), min(b, horizon)
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(intervals: list[Interval], holes: list[Interval]) -> float:
    """Length of ``intervals`` (merged) outside ``holes`` (merged)."""
    total = 0.0
    for a, b in intervals:
        covered = sum(max(0.0, min(b, hb) - max(a, ha)) for ha, hb in holes)
        total += (b - a) - covered
    return total


def _critical(f: Fault) -> bool:
    return any(s.severity.rank >= Severity.CRITICAL.rank for s in f.process.signals)


@dataclass
class Ledger:
    gpus_per_node: int
    utilization: float
    horizon_s: float
    cordons: dict[int, list[Interval]] = field(default_factory=lambda: defaultdict(list))
    _open_cordon: dict[int, float] = field(default_factory=dict)
    disruptions: dict[tuple[int, int], list[Interval]] = field(default_factory=lambda: defaultdict(list))
    faults: dict[int, tuple[Fault, float, float | None]] = field(default_factory=dict)
    jobs_interrupted: float = 0.0
    healthy_disrupted: int = 0
    pages: int = 0

    # -- feeds ----------------------------------------------------------------------------------
    def cordon(self, node: int, at: float) -> None:
        self._open_cordon.setdefault(node, at)

    def uncordon(self, node: int, at: float) -> None:
        start = self._open_cordon.pop(node, None)
        if start is not None:
            self.cordons[node].append((start, max(start, at)))

    def disrupt(self, node: int, gpu: int, start: float, end: float, *, faulty: bool) -> None:
        self.disruptions[(node, gpu)].append((start, end))
        if not faulty:
            self.healthy_disrupted += 1
            self.jobs_interrupted += self.utilization

    def interrupt(self, node: int, gpu: int | None, at: float) -> None:
        """A drain takes the jobs off a GPU (or the whole node)."""
        self.jobs_interrupted += self.utilization * (1 if gpu is not None else self.gpus_per_node)

    def fault_started(self, f: Fault, at: float) -> None:
        self.faults[f.id] = (f, at, None)
        if _critical(f):
            self.jobs_interrupted += self.utilization * (1 if f.gpu is not None else self.gpus_per_node)

    def fault_cured(self, f: Fault, at: float) -> None:
        if f.id in self.faults and self.faults[f.id][2] is None:
            self.faults[f.id] = (f, self.faults[f.id][1], at)

    # -- results ----------------------------------------------------------------------------------
    def _cordons(self, node: int) -> list[Interval]:
        out = list(self.cordons.get(node, []))
        if node in self._open_cordon:
            out.append((self._open_cordon[node], self.horizon_s))
        return _merge(out, self.horizon_s)

    def lost_intervals(self) -> dict[tuple[int, int], list[Interval]]:
        """Per affected GPU: the merged intervals it gave no capacity."""
        per: dict[tuple[int, int], list[Interval]] = defaultdict(list)
        for node in set(self.cordons) | set(self._open_cordon):
            for g in range(self.gpus_per_node):
                per[(node, g)].extend(self._cordons(node))
        for key, ivs in self.disruptions.items():
            per[key].extend(ivs)
        for f, start, cured in self.faults.values():
            if not _critical(f):
                continue
            end = cured if cured is not None else self.horizon_s
            for n in f.nodes:
                for g in ([f.gpu] if f.gpu is not None else range(self.gpus_per_node)):
                    per[(n, g)].append((start, end))
        return {k: _merge(v, self.horizon_s) for k, v in per.items()}

    def gpu_hours_lost(self) -> float:
        return sum(b - a for ivs in self.lost_intervals().values() for a, b in ivs) / 3600.0

    def faulty_in_service_gpu_hours(self) -> float:
        total = 0.0
        for f, start, cured in self.faults.values():
            end = cured if cured is not None else self.horizon_s
            span = _merge([(start, end)], self.horizon_s)
            gpus = 1 if f.gpu is not None else self.gpus_per_node
            for n in f.nodes:
                total += gpus * _minus(span, self._cordons(n))
        return total / 3600.0

    def repair_times(self) -> dict[str, list[float]]:
        """Seconds to repair, by root cause (process name); faults never repaired are left out."""
        out: dict[str, list[float]] = defaultdict(list)
        for f, start, cured in self.faults.values():
            if cured is None:
                continue
            back = cured
            for a, b in self._cordons(f.nodes[0]):
                if a <= cured < b:
                    back = b
            out[f.process.name].append(back - start)
        return dict(out)

    def capacity_lost_series(self, bin_s: float = 3600.0) -> list[float]:
        """GPUs out of service, averaged per bin, over the horizon (for the capacity plot)."""
        bins = [0.0] * max(1, int(self.horizon_s // bin_s))
        for ivs in self.lost_intervals().values():
            for a, b in ivs:
                i = int(a // bin_s)
                while a < b and i < len(bins):
                    edge = min(b, (i + 1) * bin_s)
                    bins[i] += (edge - a) / bin_s
                    a = edge
                    i += 1
        return bins
