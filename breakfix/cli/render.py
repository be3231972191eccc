"""Human output for the CLI: incident tables, the audit trail, the simulated cluster's state.

Reads the demo's ``DemoResult`` or replayed incidents; writes with rich to the terminal. Text from
incidents is escaped (``[resolved]`` is a status, not markup); at 80 columns the id column keeps
its width and the plan column wraps; counts are written with their plural.
"""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from breakfix.cli.demo import DemoResult
from breakfix.schemas.incident import ActionKind, ActionOutcome, Incident


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 incident``, ``2 incidents``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def incident_table(incidents: list[Incident], title: str) -> Table:
    t = Table(title=escape(title), show_lines=False, expand=False)
    t.add_column("incident", no_wrap=True, min_width=8)
    for col in ("scope", "where", "category", "domain", "severity", "status", "signals"):
        t.add_column(col, overflow="fold")
    t.add_column("plan", overflow="fold", ratio=3, min_width=12)
    for inc in incidents:
        where = inc.node or ",".join(inc.nodes) or "-"
        if inc.gpus:
            where += " " + ",".join(g.label() for g in inc.gpus)
        if inc.tenants:
            where += " " + ",".join(x.key() for x in inc.tenants)
        plan = "-"
        if inc.plan is not None:
            plan = f"{inc.plan.rule}: " + (" -> ".join(inc.plan.actions()) or "(record only)")
        signals = str(inc.signal_count) + (f" (+{inc.duplicate_count} dup)" if inc.duplicate_count else "")
        t.add_row(*(escape(x) for x in (inc.id, inc.scope.value, where, inc.category, inc.domain.value,
                                          inc.severity.value, inc.status.value, signals, plan)))
    return t


def print_demo(result: DemoResult, console: Console) -> None:
    incidents = sorted(result.console.incidents.values(), key=lambda i: (i.first_seen, i.id))
    console.print(incident_table(incidents, f"Incidents - scenario {result.scenario.name}"))
    by_inc: dict[str, list[str]] = defaultdict(list)
    for rec in result.console.actions:
        if rec.kind is ActionKind.STEP and rec.outcome in (ActionOutcome.STARTED,):
            continue
        if rec.kind is ActionKind.PLAN and rec.outcome is ActionOutcome.PLANNED:
            continue
        label = rec.action.value if rec.action else rec.kind.value
        why = rec.reason and (rec.kind is ActionKind.REFUSAL or (rec.kind is not ActionKind.PLAN and rec.action))
        waits = f" (waiting: {rec.waiting.value})" if rec.waiting else ""
        by_inc[rec.incident_id].append(f"{label}={rec.outcome.value}{waits}" + (f" ({rec.reason})" if why else ""))
    console.print("\n[bold]What was done[/bold] (audit trail on breakfix.actions.>)")
    for inc in incidents:
        done = by_inc.get(inc.id)
        if not done:
            continue
        console.print(escape(f"  {inc.id} {inc.node} {inc.category} [{inc.status.value}]"), highlight=False)
        for line in done:
            console.print(escape(f"    - {line}"), highlight=False)
    cl = result.cluster
    console.print("\n[bold]Simulated cluster[/bold]")
    for n in cl.nodes.values():
        if not (n.cordoned or n.reboots or n.gpu_resets or n.drained or n.drained_gpus or n.pod_restarts):
            continue
        console.print(escape(f"  {n.name}: cordoned={n.cordoned} reboots={n.reboots} gpu_resets={dict(n.gpu_resets)} "
                      f"pod_restarts={dict(n.pod_restarts)}"))
    console.print(f"  {plural(len(cl.escalations), 'escalation')}, "
                  f"{plural(len(cl.notifications), 'tenant notification')}")
    console.print(escape(
        f"\n{plural(result.signals_sent, 'signal')} sent (JetStream dropped {result.duplicates_dropped} re-sent by "
        f"msg-id), {len(result.console.dead_letters)} dead-lettered, "
        f"{plural(len(incidents), 'incident')}, {plural(len(result.console.actions), 'audit record')}, "
        f"{result.elapsed_s:.1f}s"
    ), highlight=False)
    for subject, reason in result.console.dead_letters:
        console.print(escape(f"  dead letter from {subject}: {reason}"), highlight=False)
