"""The kmsg source: new kernel-log lines -> XID / SXid / GPU-lost event signals.

Reads through ``collectors.kmsg_follow.KmsgFollower`` (``/dev/kmsg`` or a file), applies the
pure line rules of ``collectors.kmsg``, learns PCI-to-UUID pairs from the driver's own
``NVRM: GPU at PCI:...`` lines, and stamps each signal with the time in the line and an id
made from the line's stable identity (boot id + sequence, or inode + offset). ``signals`` turns
one batch of lines into signals; a line the rules cannot handle is skipped, logged and counted
(``skipped``), never allowed to drop the rest of the batch. ``poll`` returns the signals and
the position to commit once they are safely published or spooled (the daemon's plugin,
``collectors.sources``, commits it only after the forwarder took the batch).
"""

from __future__ import annotations

from datetime import datetime

import structlog

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg import gpu_map_entry, parse_line, to_signal
from breakfix.collectors.kmsg_follow import KmsgFollower, Line, Position, boot_time, line_time
from breakfix.schemas.common import GpuRef
from breakfix.schemas.signal import Signal

log = structlog.get_logger("breakfix.collector.kmsg")


class KmsgSource:
    name = "kmsg"

    def __init__(self, follower: KmsgFollower, ctx: NodeContext, *, booted: datetime | None = None) -> None:
        self.follower = follower
        self.ctx = ctx
        self.booted = booted or boot_time()
        self.lines = 0
        self.skipped = 0

    def poll(self, now: datetime) -> tuple[list[Signal], Position | None]:
        """Everything new since the last poll (blocking file reads: run it in a worker thread)."""
        lines = self.follower.read()
        return self.signals(lines, now), lines[-1].position if lines else None

    def signals(self, lines: list[Line], now: datetime) -> list[Signal]:
        """One batch of lines -> signals; a line that fails is skipped and counted, the rest still count."""
        self.lines += len(lines)
        out: list[Signal] = []
        for ln in lines:
            if "NVRM" not in ln.text and "SXid" not in ln.text:
                continue
            try:
                sig = self._line(ln, now)
            except Exception as exc:  # one hostile line never costs the batch its fatal XIDs
                self.skipped += 1
                log.warning("kmsg_line_skipped", node=self.ctx.node, key=ln.key, error=repr(exc)[:200],
                            line=ln.text[:200])
                continue
            if sig is not None:
                out.append(sig)
        return out

    def _line(self, ln: Line, now: datetime) -> Signal | None:
        mapped = gpu_map_entry(ln.text)
        if mapped is not None:
            if mapped[0] not in self.ctx.gpus_by_pci:
                self.ctx.register_gpus([GpuRef(uuid=mapped[1], pci_bus_id=mapped[0])])
            return None
        ev = parse_line(ln.text)
        if ev is None:
            return None
        at = line_time(ln.text, booted=self.booted, now=now)
        return to_signal(ev, self.ctx, observed_at=at, discriminator=ln.key)
