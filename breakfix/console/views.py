"""Pure view models for the console's pages: incident rows, filters, plan ladders, detail sections.

Input: the console's in-memory incidents and records (``breakfix.console.state``); output: plain
dicts and lists the Jinja2 templates render. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from html import escape

from markupsafe import Markup

from breakfix.console.state import Progress
from breakfix.schemas.incident import ActionKind, ActionRecord, Incident, IncidentStatus

FILTERS = ("cluster", "category", "node", "tenant", "status")
PAGE = 200


@dataclass(frozen=True)
class Row:
    inc: Incident
    where: str
    gpus: str
    blast: str
    progress: str
    waiting: str


def is_open(inc: Incident) -> bool:
    return not inc.status.terminal or inc.status is IncidentStatus.ESCALATED


def matches(inc: Incident, f: Mapping[str, str]) -> bool:
    if f.get("cluster") and inc.cluster != f["cluster"]:
        return False
    if f.get("category") and inc.category != f["category"]:
        return False
    if f.get("node") and f["node"] != inc.node and f["node"] not in inc.nodes:
        return False
    if f.get("tenant") and not any(f["tenant"] in t.key() for t in (*inc.tenants, *inc.impact)):
        return False
    st = f.get("status", "")
    if st == "open":
        return is_open(inc) and inc.parent is None
    if st == "all" or not st:
        return st == "all" or (is_open(inc) and inc.parent is None)
    return inc.status.value == st


def progress_text(inc: Incident, p: Progress | None) -> str:
    if inc.plan is None:
        return "-"
    rungs = inc.plan.rungs()
    if p is None:
        return f"planned: {rungs[0].name} (0 of {len(rungs[0].steps)})"
    rung = next((r for r in rungs if r.name == p.rung), rungs[0])
    return f"step {p.step + 1} of {len(rung.steps)}, rung {rung.name}: {p.action} {p.outcome}"


def rows(incidents: Iterable[Incident], progress: Mapping[str, Progress], f: Mapping[str, str],
         page: int = 0, waiting: Mapping[str, str] | None = None) -> tuple[list[Row], int]:
    """Matching incidents, open first then most severe then oldest, one page; and the total."""
    chosen = [i for i in incidents if matches(i, f)]
    chosen.sort(key=lambda i: (not is_open(i), i.status is IncidentStatus.ESCALATED, -i.severity.rank,
                               i.first_seen, i.id))
    out = []
    for inc in chosen[page * PAGE:(page + 1) * PAGE]:
        out.append(Row(inc, f"{inc.cluster} / {inc.node or ', '.join(inc.nodes[:4]) or '-'}",
                       ", ".join(g.label() for g in inc.gpus) or "-",
                       ", ".join(t.key() for t in (*inc.tenants, *inc.impact)[:6]) or "-",
                       progress_text(inc, progress.get(inc.id)),
                       inc.waiting.value if inc.waiting else (waiting or {}).get(inc.id, "-")))
    return out, len(chosen)


def choices(incidents: Iterable[Incident]) -> dict[str, list[str]]:
    clusters: set[str] = set()
    categories: set[str] = set()
    for i in incidents:
        clusters.add(i.cluster)
        categories.add(i.category)
    return {"cluster": sorted(clusters)[:200], "category": sorted(categories)[:200],
            "status": ["open", "all", *(s.value for s in IncidentStatus)]}


@dataclass(frozen=True)
class LadderStep:
    rung: str
    index: int
    action: str
    approval: bool
    current: bool
    outcome: str


def ladder(inc: Incident, records: Iterable[ActionRecord]) -> list[LadderStep]:
    """Every step of every rung with its latest outcome; the step now running or waiting is current."""
    if inc.plan is None:
        return []
    latest: dict[tuple[str, int], str] = {}
    last: tuple[str, int] | None = None
    rungs = inc.plan.rungs()
    for r in records:
        if r.kind in (ActionKind.STEP, ActionKind.REFUSAL) and r.step_index is not None and r.step_index < 99:
            key = (r.details.get("rung", rungs[0].name), r.step_index)
            latest[key] = r.outcome.value
            last = key
    out = []
    for rung in rungs:
        for i, s in enumerate(rung.steps):
            out.append(LadderStep(rung.name, i, s.action.value, s.requires_approval,
                                  (rung.name, i) == last and inc.status not in (IncidentStatus.RESOLVED,),
                                  latest.get((rung.name, i), "")))
    return out


def notifications(records: Iterable[ActionRecord]) -> list[ActionRecord]:
    return [r for r in records if r.kind is ActionKind.NOTIFICATION]


def members(inc: Incident, incidents: Mapping[str, Incident]) -> list[Incident]:
    found = [incidents[m] for m in inc.members if m in incidents]
    return found + [i for i in incidents.values() if i.parent == inc.id and i.id not in inc.members][:100]


_URL = re.compile(r"https://[^\s<>\"')]+")


def link_urls(text: str) -> Markup:
    """Escape ``text`` and turn each https URL in it into a link (catalog sources)."""
    out, last = [], 0
    for m in _URL.finditer(text):
        out.append(escape(text[last:m.start()]))
        url = escape(m.group(0))
        out.append(f'<a href="{url}" rel="noreferrer">{url}</a>')
        last = m.end()
    out.append(escape(text[last:]))
    return Markup("".join(out))


def age(inc: Incident, now: datetime) -> str:
    s = max(0, int((now - inc.first_seen).total_seconds()))
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"
