"""``breakfix replay``: recorded signals -> correlation -> decision, with no NATS.

Reads a JSONL file of ``Signal``s, uses each signal's ``observed_at`` as the clock, and
returns every incident in its final state with the plan ``decide`` gives it (nothing is
executed). Each incident carries ``source``: the NVIDIA document (or breakfix correlation rule)
behind its category; its plan names the policy rule and that rule's reason. A broken line is a
``ReplayError`` naming the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from breakfix.correlator.app import CorrelatorConfig, build_core
from breakfix.remediator.decide import ClusterView, decide
from breakfix.remediator.policy import Policy
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import first_error
from breakfix.schemas.incident import Incident
from breakfix.schemas.signal import Signal


class ReplayError(ValueError):
    pass


def read_signals(path: Path, *, skip_invalid: bool = False,
                 errors: list[str] | None = None) -> Iterator[Signal]:
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield Signal.model_validate_json(line)
            except (ValidationError, ValueError) as exc:
                msg = f"{path}:{lineno}: invalid signal: {first_error(exc)}"
                if not skip_invalid:
                    raise ReplayError(msg) from None
                if errors is not None:
                    errors.append(msg)


def replay(path: Path, *, catalog: Catalog, policy: Policy, skip_invalid: bool = False,
           errors: list[str] | None = None) -> list[Incident]:
    core = build_core(CorrelatorConfig(catalog=catalog))
    for sig in read_signals(path, skip_invalid=skip_invalid, errors=errors):
        core.ingest(sig, sig.observed_at)
    view = ClusterView()
    out: list[Incident] = []
    for tracked in core.incidents.values():
        inc = tracked.snapshot()
        if inc.plan is None and not inc.status.terminal:
            inc = inc.model_copy(update={"plan": decide(inc, view, policy)})
        out.append(inc)
    out.sort(key=lambda i: (i.first_seen, i.id))
    return out
