"""Pure history figures for the console's History view, and their server-rendered SVG charts.

Input: the incidents in the index (it keeps every incident for the retention, 90 days by default)
and the audit records the console holds; output: per-day counts by category, time to repair
p50 / p90 by category, the automatic vs human-resolved share, top failing nodes and GPUs, and the
RMA list (escalated hardware incidents with their evidence), also as CSV.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from html import escape

from breakfix.schemas.incident import ActionKind, ActionRecord, Domain, Incident, IncidentStatus

PERIODS = (7, 30, 90)
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
HUMAN_KINDS = (ActionKind.RELEASE, ActionKind.APPROVAL, ActionKind.CANCEL)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class History:
    days: int
    start: date
    per_day: dict[str, list[int]]  # category -> count per day, oldest first
    ttr: dict[str, tuple[float, float, int]]  # category -> (p50 s, p90 s, n)
    automatic: int
    human: int
    top_nodes: list[tuple[str, int]]
    top_gpus: list[tuple[str, int]]
    rma: list[Incident]
    total: int


def history(incidents: Iterable[Incident], records: Iterable[ActionRecord], now: datetime, days: int) -> History:
    start = (now - timedelta(days=days - 1)).date()
    humans = {r.incident_id for r in records if r.kind in HUMAN_KINDS and not r.actor.startswith("remediator")}
    per_day: dict[str, list[int]] = defaultdict(lambda: [0] * days)
    ttr: dict[str, list[float]] = defaultdict(list)
    nodes: Counter[str] = Counter()
    gpus: Counter[str] = Counter()
    auto = human = total = 0
    rma: list[Incident] = []
    for inc in incidents:
        d = inc.first_seen.date()
        if d < start or inc.parent is not None:
            continue
        total += 1
        per_day[inc.category][(d - start).days] += 1
        if inc.node:
            nodes[inc.node] += 1
            for g in inc.gpus:
                gpus[f"{inc.node}/{g.label()}"] += 1
        if inc.status is IncidentStatus.RESOLVED:
            if inc.time_to_repair_s is not None:
                ttr[inc.category].append(inc.time_to_repair_s)
            if inc.id in humans:
                human += 1
            else:
                auto += 1
        if inc.status is IncidentStatus.ESCALATED and inc.domain is Domain.OPERATOR:
            rma.append(inc)
    return History(days, start, dict(sorted(per_day.items())),
                   {c: (percentile(v, 0.5), percentile(v, 0.9), len(v)) for c, v in sorted(ttr.items())},
                   auto, human, nodes.most_common(10), gpus.most_common(10),
                   sorted(rma, key=lambda i: i.first_seen, reverse=True), total)


def rma_csv(rma: Iterable[Incident]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["incident", "cluster", "node", "gpus", "category", "codes", "first_seen", "title", "evidence"])
    for i in rma:
        w.writerow([i.id, i.cluster, i.node or "", " ".join(g.label() for g in i.gpus), i.category,
                    " ".join(i.codes), i.first_seen.isoformat(), i.title, " | ".join(i.evidence[:5])])
    return buf.getvalue()


def stacked_bars_svg(h: History, width: int = 720, height: int = 220) -> str:
    """Incidents per day, stacked by category, with a legend; an accessible SVG (role=img, title)."""
    totals = [sum(v[i] for v in h.per_day.values()) for i in range(h.days)]
    top = max([1, *totals])
    pad_l, pad_b, legend_h = 32, 20, 18 * ((len(h.per_day) + 3) // 4)
    plot_h = height - pad_b - 8
    bw = (width - pad_l) / h.days
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height + legend_h}" role="img" '
             f'aria-label="Incidents per day by category"><title>Incidents per day by category</title>',
             f'<text x="2" y="12" class="axis">{top}</text><text x="2" y="{plot_h + 4}" class="axis">0</text>']
    base = [0] * h.days
    for ci, (cat, counts) in enumerate(h.per_day.items()):
        color = PALETTE[ci % len(PALETTE)]
        for i, n in enumerate(counts):
            if not n:
                continue
            bh = plot_h * n / top
            y = plot_h - plot_h * base[i] / top - bh + 4
            parts.append(f'<rect x="{pad_l + i * bw + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" '
                         f'height="{bh:.1f}" fill="{color}"><title>{escape(cat)} '
                         f'{h.start + timedelta(days=i)}: {n}</title></rect>')
            base[i] += n
    for i in range(0, h.days, max(1, h.days // 7)):
        parts.append(f'<text x="{pad_l + i * bw:.1f}" y="{height - 4}" class="axis">'
                     f'{(h.start + timedelta(days=i)).strftime("%m-%d")}</text>')
    for ci, cat in enumerate(h.per_day):
        x, y = 10 + (ci % 4) * (width // 4), height + 14 + 18 * (ci // 4)
        parts.append(f'<rect x="{x}" y="{y - 10}" width="10" height="10" fill="{PALETTE[ci % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="{y}" class="legend">{escape(cat)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def ttr_svg(h: History, width: int = 720) -> str:
    """Time to repair p50 / p90 per category as horizontal bars (seconds)."""
    rows = list(h.ttr.items())
    height = 24 * len(rows) + 24
    top = max([1.0, *(p90 for _c, (_p50, p90, _n) in rows)])
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="Time to repair by '
             f'category"><title>Time to repair by category (p50, p90)</title>']
    for i, (cat, (p50, p90, n)) in enumerate(rows):
        y = 8 + 24 * i
        w90 = (width - 260) * p90 / top
        w50 = (width - 260) * p50 / top
        parts.append(f'<text x="0" y="{y + 12}" class="legend">{escape(cat)} (n={n})</text>'
                     f'<rect x="200" y="{y}" width="{w90:.1f}" height="16" fill="#f28e2b"><title>p90 {p90:.0f}s'
                     f'</title></rect><rect x="200" y="{y + 4}" width="{w50:.1f}" height="8" fill="#4e79a7">'
                     f'<title>p50 {p50:.0f}s</title></rect>'
                     f'<text x="{204 + w90:.1f}" y="{y + 12}" class="axis">p50 {p50:.0f}s / p90 {p90:.0f}s</text>')
    parts.append("</svg>")
    return "".join(parts)


def share_svg(h: History, width: int = 360) -> str:
    """Automatic vs human-resolved share, one bar."""
    total = max(1, h.automatic + h.human)
    wa = width * h.automatic / total
    return (f'<svg class="chart" viewBox="0 0 {width} 40" role="img" aria-label="Automatic vs human resolved">'
            f'<title>Resolved automatically: {h.automatic}, by a human: {h.human}</title>'
            f'<rect x="0" y="0" width="{wa:.1f}" height="24" fill="#59a14f"/>'
            f'<rect x="{wa:.1f}" y="0" width="{width - wa:.1f}" height="24" fill="#e15759"/>'
            f'<text x="4" y="38" class="legend">automatic {h.automatic}</text>'
            f'<text x="{width - 120}" y="38" class="legend">human {h.human}</text></svg>')
