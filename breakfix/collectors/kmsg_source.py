"""The kmsg source: new kernel-log lines -> XID / SXid / GPU-lost event signals.

Reads through ``collectors.kmsg_follow.KmsgFollower`` (``/dev/kmsg`` or a file), applies the
pure line rules of ``collectors.kmsg``, learns PCI-to-UUID pairs from the driver's own
``NVRM: GPU at PCI:...`` lines, and stamps each signal with the time in the line and an id
made from the line's stable identity (boot id + sequence, or inode + offset); the delta lines of a ``dmesg -H``
capture are placed by a ``HumanClock`` that sees every line (``details.time_source=delta``). ``signals`` turns
one batch of lines into signals: one bad line (impossible date, PCI domain, timestamp: a
``BadLine``; or anything else a line makes the rules raise) is skipped, counted in ``skipped``
and logged; the rest of its batch is still returned, so a poison line never costs the faults
around it. ``poll`` returns the signals and the position to commit once they are safely
published or spooled (the daemon's plugin, ``collectors.sources``, commits it only after the
forwarder took the batch).
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

import structlog

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg import line_signals
from breakfix.collectors.kmsg_follow import DELTA, HumanClock, KmsgFollower, Line, Position, boot_time, line_time
from breakfix.schemas.signal import Signal

log = structlog.get_logger("breakfix.collector.kmsg")


class KmsgSource:
    name = "kmsg"

    def __init__(self, follower: KmsgFollower, ctx: NodeContext, *, booted: datetime | None = None,
                 tz: tzinfo | None = UTC) -> None:
        self.follower = follower
        self.ctx = ctx
        self.booted = booted or boot_time()
        self.tz = tz  # the zone of the log's wall-clock times (``KmsgConfig.timezone``; None: this machine's)
        self.clock = HumanClock(tz=tz)  # dmesg -H deltas, across batches
        self.lines = 0
        self.skipped = 0  # bad lines since start: breakfix_collector_parse_skipped_total{source="kmsg"}

    def poll(self, now: datetime) -> tuple[list[Signal], Position | None]:
        """Everything new since the last poll (blocking file reads: run it in a worker thread)."""
        lines = self.follower.read()
        return self.signals(lines, now), lines[-1].position if lines else None

    def signals(self, lines: list[Line], now: datetime) -> list[Signal]:
        """One batch of lines -> signals; a line that fails is skipped and counted, the rest still count."""
        self.lines += len(lines)
        out: list[Signal] = []
        bad = 0
        first = ""

        placed: datetime | None = None  # this line's time from the dmesg -H clock, if it is a delta line

        def at(text: str) -> tuple[datetime, str]:
            if placed is not None:
                return placed, DELTA
            return line_time(text, booted=self.booted, now=now, tz=self.tz), ""

        for ln in lines:
            placed = self.clock.step(ln.text, now=now)
            try:  # a record glued to the next is two, at the line's time (kmsg.line_signals)
                sigs, refused = line_signals(ln.text, self.ctx, observed_at=at, discriminator=ln.key)
            except Exception as exc:  # the daemon's own guard: no line may cost the batch its fatal XIDs
                bad += 1
                first = first or f"{ln.key}: {exc!r}"[:300]
                continue
            out.extend(sigs)
            bad += len(refused)
            first = first or (f"{ln.key}: {refused[0]}" if refused else "")
        if bad:
            self.skipped += bad
            log.warning("kmsg_lines_skipped", node=self.ctx.node, count=bad, first=first, total=self.skipped)
        return out
