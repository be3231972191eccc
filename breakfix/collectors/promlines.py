"""Prometheus text that is *mostly* right -> the samples that are, and the lines that are not.

A real dcgm-exporter page can carry one sample that no parser takes (``ERROR - FAILED TO CONVERT
TO STRING`` as a value, seen on an A800 MIG page). ``parse_tolerant`` first parses the whole page
with prometheus_client (``collectors.promtext.parse``); only when that fails does it parse each
sample line on its own, under its family's ``# TYPE`` line, and returns the lines it had to skip
with their family and reason. A page where no sample parses is still ``ValueError`` ("not
Prometheus text"). Used by the dcgm source and ``breakfix signals dcgm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from breakfix.collectors.promtext import Sample, parse

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*")
_TYPE = re.compile(r"^#\s*TYPE\s+(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\s+(?P<type>\w+)\s*$")
MAX_LINE = 64 * 1024  # a longer line is skipped, never parsed


@dataclass(frozen=True, slots=True)
class SkippedSample:
    family: str
    line: int
    reason: str


def _family(line: str, types: dict[str, str]) -> str:
    m = _NAME.match(line)
    name = m.group(0) if m else "?"
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix) and name[: -len(suffix)] in types:
            return name[: -len(suffix)]
    return name


def parse_tolerant(text: str) -> tuple[dict[str, list[Sample]], list[SkippedSample]]:
    """Samples by name, and the sample lines skipped (empty when the page parses whole)."""
    try:
        return parse(text), []
    except ValueError as whole:
        first_error = str(whole)
    out: dict[str, list[Sample]] = {}
    skipped: list[SkippedSample] = []
    types: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if m := _TYPE.match(line):
                types[m.group("name")] = m.group("type")
            continue
        family = _family(line, types)
        if len(line) > MAX_LINE:
            skipped.append(SkippedSample(family, lineno, "line too long"))
            continue
        header = f"# TYPE {family} {types[family]}\n" if family in types else ""
        try:
            got = parse(header + line + "\n")
        except ValueError as exc:
            skipped.append(SkippedSample(family, lineno, str(exc)[:200]))
            continue
        for name, samples in got.items():
            out.setdefault(name, []).extend(samples)
    if not out:
        raise ValueError(first_error)
    return out, skipped
