"""The collector's on-disk spool: signals wait here, in order, while NATS is unreachable.

One file per signal (``<seq>-<rank>.json``) under the spool directory, so a crash loses nothing
that was accepted and a restart finds the queue as it was. Guarantees:

- every write is atomic, whatever the severity: a temp file, ``fsync``, ``rename``, then an
  ``fsync`` of the directory; a temp file left by a crash was never accepted and is removed;
- a file that cannot be read back as a signal (torn, truncated, misnamed, unreadable) is moved
  to ``quarantine/`` (at most ``QUARANTINE_CAP`` files kept), counted and logged, and the
  spool goes on with the rest, at start-up and at replay alike;
- bounded by ``max_records``: when full the oldest *informational* signal is dropped first, then
  warnings, then critical ones; fatal signals are never dropped for room (the spool grows past
  its bound rather than lose one);
- a write the disk refuses (full, quota, I/O error) is a drop counted by severity, never a crash.

Every drop is counted per severity (``dropped``) and every quarantine (``quarantined``) for the
daemon's ``/metrics``. Written by and replayed through ``collectors.forwarder``.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import structlog

from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal

log = structlog.get_logger("breakfix.collector.spool")

_DROP_ORDER = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)
_RANKS = {s.rank: s for s in Severity}
QUARANTINE = "quarantine"
QUARANTINE_CAP = 1000


@dataclass(frozen=True, slots=True, order=True)
class _Entry:
    seq: int
    rank: int
    path: Path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path, *, max_records: int = 100_000) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self.dropped: Counter[str] = Counter()
        self.write_errors = 0
        self.quarantined = 0
        self._qfiles: int | None = None
        self.entries: list[_Entry] = []
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that never finished was never accepted
        for p in self.dir.glob("*.json"):
            try:
                seq, rank = p.stem.split("-")
                entry = _Entry(int(seq), int(rank), p)
            except ValueError:
                self.quarantine(p, "not a spool file name")
                continue
            try:
                empty = p.stat().st_size == 0
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.quarantine(p, f"unreadable: {exc}")
                continue
            if entry.rank not in _RANKS or empty:
                self.quarantine(p, "empty file" if entry.rank in _RANKS else "unknown severity rank")
                continue
            self.entries.append(entry)
        self.entries.sort()
        self._next = self.entries[-1].seq + 1 if self.entries else 1

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, signal: Signal) -> bool:
        """Keep ``signal``; False when it was dropped (spool full of more important ones, or the disk refused)."""
        rank = signal.severity.rank
        if len(self.entries) >= self.max_records and not self._make_room(rank):
            self.dropped[signal.severity.value] += 1  # nothing less important to evict: drop the newcomer
            return False
        path = self.dir / f"{self._next:012d}-{rank}.json"
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(signal.model_dump_json(by_alias=True).encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.dir)
        except OSError as exc:  # ENOSPC, EDQUOT, EIO: a counted drop, never a crash
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.dropped[signal.severity.value] += 1
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 100 == 0:
                log.error("spool_write_failed", error=str(exc), severity=signal.severity.value,
                          failures=self.write_errors, signal=signal.id)
            if path.exists():  # renamed but the directory sync failed: it is there, keep it
                self.entries.append(_Entry(self._next, rank, path))
                self._next += 1
                return True
            return False
        self.entries.append(_Entry(self._next, rank, path))
        self._next += 1
        return True

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
        """The oldest ``n`` signals, as stored JSON. A file that cannot be read is quarantined."""
        out = []
        for e in list(self.entries[:n]):
            try:
                out.append((e, e.path.read_bytes()))
            except FileNotFoundError:
                self.entries.remove(e)
            except OSError as exc:
                self.reject(e, f"unreadable: {exc}")
        return out

    def remove(self, entries: list[_Entry]) -> None:
        gone = set(entries)
        self.entries = [e for e in self.entries if e not in gone]
        for e in entries:
            e.path.unlink(missing_ok=True)

    def reject(self, entry: _Entry, reason: str) -> None:
        """An entry whose file is not a signal: out of the queue and into quarantine."""
        self.entries = [e for e in self.entries if e != entry]
        self.quarantine(entry.path, reason)

    def quarantine(self, path: Path, reason: str) -> None:
        """Move ``path`` to ``quarantine/`` (kept for a human; the oldest beyond the cap are deleted)."""
        qdir = self.dir / QUARANTINE
        self.quarantined += 1
        try:
            qdir.mkdir(exist_ok=True)
            if self._qfiles is None:
                self._qfiles = sum(1 for _ in qdir.iterdir())
            os.replace(path, qdir / path.name)
            self._qfiles += 1
            if self._qfiles > QUARANTINE_CAP + QUARANTINE_CAP // 10:  # prune in steps, not on every file
                kept = sorted(qdir.iterdir(), key=lambda p: p.stat().st_mtime)
                for old in kept[:max(0, len(kept) - QUARANTINE_CAP)]:
                    old.unlink(missing_ok=True)
                self._qfiles = min(len(kept), QUARANTINE_CAP)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            log.error("spool_quarantine_failed", file=str(path), error=str(exc))
        log.error("spool_file_quarantined", file=path.name, reason=reason[:200], quarantined=self.quarantined,
                  to=str(qdir))
