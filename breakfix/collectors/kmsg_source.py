"""The kmsg source: new kernel-log lines -> XID / SXid / GPU-lost event signals.

Reads through ``collectors.kmsg_follow.KmsgFollower`` (``/dev/kmsg`` or a file), applies the
pure line rules of ``collectors.kmsg``, learns PCI-to-UUID pairs from the driver's own
``NVRM: GPU at PCI:...`` lines, and stamps each signal with the time in the line and an id
made from the line's stable identity (boot id + sequence, or inode + offset). ``poll`` returns
the signals and the position to commit once they are safely published or spooled.
"""

from __future__ import annotations

from datetime import datetime

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg import gpu_map_entry, parse_line, to_signal
from breakfix.collectors.kmsg_follow import KmsgFollower, Position, boot_time, line_time
from breakfix.schemas.common import GpuRef
from breakfix.schemas.signal import Signal


class KmsgSource:
    name = "kmsg"

    def __init__(self, follower: KmsgFollower, ctx: NodeContext, *, booted: datetime | None = None) -> None:
        self.follower = follower
        self.ctx = ctx
        self.booted = booted or boot_time()
        self.lines = 0

    def poll(self, now: datetime) -> tuple[list[Signal], Position | None]:
        """Everything new since the last poll (blocking file reads: run it in a worker thread)."""
        lines = self.follower.read()
        self.lines += len(lines)
        out: list[Signal] = []
        for ln in lines:
            if "NVRM" not in ln.text and "SXid" not in ln.text:
                continue
            mapped = gpu_map_entry(ln.text)
            if mapped is not None:
                if mapped[0] not in self.ctx.gpus_by_pci:
                    self.ctx.register_gpus([GpuRef(uuid=mapped[1], pci_bus_id=mapped[0])])
                continue
            ev = parse_line(ln.text)
            if ev is not None:
                at = line_time(ln.text, booted=self.booted, now=now)
                out.append(to_signal(ev, self.ctx, observed_at=at, discriminator=ln.key))
        return out, lines[-1].position if lines else None
