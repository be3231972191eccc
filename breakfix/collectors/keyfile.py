"""Small sets of keys a collector keeps across restarts, one JSON list per file under ``state_dir``.

Written by the daemon (``edge-faults.json``: the faults open now, so a fault fixed while the collector
was down is cleared at its first reading) and the fabric source (``fabric-seen-up.json``: the ports
ever seen ACTIVE, so a restart does not take a failed link for an uncabled port). Read once at start.
A missing file is an empty set; an unreadable one too (logged). A write that fails is logged and
reported, and the caller tries again later. Writes are whole-file replacements with fsync, since the
restart these files serve is often a power cycle.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from breakfix.bus.durable import replace_file

log = structlog.get_logger("breakfix.collector.keyfile")

MAX_KEYS = 10_000  # a node has a few hundred checked entities


def load_keys(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("keyfile_unreadable", path=str(path), error=repr(exc)[:200])
        return []
    return [k for k in data if isinstance(k, str)][:MAX_KEYS] if isinstance(data, list) else []


def write_json(path: Path, data: object) -> None:
    """Replace ``path`` whole with ``data`` as JSON, durably (``bus.durable.replace_file``). Raises ``OSError`` when
    the disk refuses (also used by the node agent's idempotency and rate-limit records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(data))


def save_keys(path: Path, keys: list[str]) -> bool:
    """Replace ``path`` with ``keys``; False (logged) when the disk refused."""
    try:
        write_json(path, keys[:MAX_KEYS])
    except OSError as exc:
        log.warning("keyfile_not_saved", path=str(path), error=repr(exc)[:200])
        return False
    return True
