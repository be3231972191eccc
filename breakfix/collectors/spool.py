"""The collector's on-disk spool: signals wait here, in order, while NATS is unreachable.

One file per signal (``<seq>-<rank>.json``, written to a temp name and renamed, fsynced for
critical and fatal signals) under the spool directory, so a crash loses nothing that was
accepted and a restart finds the queue as it was. Bounded by ``max_records``: when full the
oldest *informational* signal is dropped first, then warnings, then critical ones; fatal
signals are never dropped (the spool grows past its bound rather than lose one). Every drop is
counted per severity for the daemon's ``/metrics``. Read by ``collectors.forwarder``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal

_DROP_ORDER = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)


@dataclass(frozen=True, slots=True, order=True)
class _Entry:
    seq: int
    rank: int
    path: Path


class Spool:
    def __init__(self, directory: Path, *, max_records: int = 100_000) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self.dropped: Counter[str] = Counter()
        self.quarantined = 0
        self.entries: list[_Entry] = []
        for p in self.dir.glob("*.json"):
            try:
                seq, rank = p.stem.split("-")
                self.entries.append(_Entry(int(seq), int(rank), p))
            except ValueError:
                p.unlink(missing_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that never finished was never accepted
        self.entries.sort()
        self._next = self.entries[-1].seq + 1 if self.entries else 1

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, signal: Signal) -> None:
        rank = signal.severity.rank
        if len(self.entries) >= self.max_records and not self._make_room(rank):
            self.dropped[signal.severity.value] += 1  # nothing less important to evict: drop the newcomer
            return
        path = self.dir / f"{self._next:012d}-{rank}.json"
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(signal.model_dump_json(by_alias=True).encode())
            if rank >= Severity.CRITICAL.rank:
                fh.flush()
                os.fsync(fh.fileno())
        tmp.rename(path)
        self.entries.append(_Entry(self._next, rank, path))
        self._next += 1

    def _make_room(self, incoming_rank: int) -> bool:
        """Evict the oldest of the least important entries, never one more important than the
        newcomer and never a fatal one. False: the newcomer itself is the one to drop."""
        for sev in _DROP_ORDER:
            if sev.rank > incoming_rank:
                break
            victim = next((e for e in self.entries if e.rank == sev.rank), None)
            if victim is not None:
                self.entries.remove(victim)
                victim.path.unlink(missing_ok=True)
                self.dropped[sev.value] += 1
                return True
        return incoming_rank >= Severity.FATAL.rank  # fatal: kept even past the bound

    def peek(self, n: int) -> list[tuple[_Entry, bytes]]:
        """The oldest ``n`` signals, as stored JSON."""
        out = []
        for e in self.entries[:n]:
            try:
                out.append((e, e.path.read_bytes()))
            except FileNotFoundError:
                continue
        return out

    def remove(self, entries: list[_Entry]) -> None:
        gone = set(entries)
        self.entries = [e for e in self.entries if e not in gone]
        for e in entries:
            e.path.unlink(missing_ok=True)
