"""The fabric source: InfiniBand ports from sysfs -> link health signals.

Reads ``/sys/class/infiniband/<dev>/ports/<n>/{state,phys_state,rate,link_layer,counters/*}``
(formats from the kernel's ``drivers/infiniband/core/sysfs.c``: ``4: ACTIVE``, ``5: LinkUp``,
``400 Gb/sec (4X NDR)``, decimal counters) into ``PortSample``s; the pure ``FabricRules`` turn
samples and the previous ones into per-port states (component ``<dev>/<port>``):

- ``ib.link_down``: state not ACTIVE or physical state not LinkUp;
- ``ib.flapping``: ``link_downed`` or ``link_error_recovery`` rose ``flap_count`` times within
  ``flap_window_s`` (healthy again after a quiet window);
- ``ib.errors``: symbol / receive / link-integrity / remote-physical errors per minute at or
  above the threshold;
- ``ib.rate_degraded``: a rate below the expected one (configured, or the best seen on the port).
IBA error counters saturate instead of wrapping; a counter that goes down was reset and
counts as zero new errors. NVLink health comes from the nvml source, not from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.schemas.signal import Signal, SignalSource

SYSFS = Path("/sys/class/infiniband")
ERROR_COUNTERS = ("symbol_error", "port_rcv_errors", "local_link_integrity_errors", "port_rcv_remote_physical_errors")
FLAP_COUNTERS = ("link_downed", "link_error_recovery")
_RATE = re.compile(r"^(?P<gbps>\d+(?:\.\d+)?) Gb/sec")


@dataclass(frozen=True, slots=True)
class FabricThresholds:
    errors_per_min: float = 10.0
    flap_count: int = 2
    flap_window_s: float = 600.0
    expected_rate_gbps: float | None = None  # None: the best rate seen on the port


@dataclass
class PortSample:
    port: str  # "<dev>/<n>"
    state: int
    state_text: str
    phys_state: int
    phys_text: str
    rate_gbps: float | None
    rate_text: str
    link_layer: str
    counters: dict[str, int] = field(default_factory=dict)


def _num_text(raw: str) -> tuple[int, str]:
    num, _, text = raw.strip().partition(":")
    try:
        return int(num), text.strip()
    except ValueError:
        return -1, raw.strip()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_ports(root: Path = SYSFS) -> list[PortSample]:
    """Every port under ``root``; a port whose files vanish mid-read is skipped this cycle."""
    out: list[PortSample] = []
    if not root.is_dir():
        return out
    for dev in sorted(p for p in root.iterdir() if (p / "ports").is_dir()):
        for port in sorted((dev / "ports").iterdir(), key=lambda p: p.name):
            state, phys, rate = (_read(port / f) for f in ("state", "phys_state", "rate"))
            if state is None or phys is None:
                continue
            counters: dict[str, int] = {}
            cdir = port / "counters"
            for name in (*ERROR_COUNTERS, *FLAP_COUNTERS):
                raw = _read(cdir / name)
                if raw is not None and raw.strip().isdigit():
                    counters[name] = int(raw)
            m = _RATE.match(rate or "")
            s, st = _num_text(state)
            p, pt = _num_text(phys)
            out.append(PortSample(f"{dev.name}/{port.name}", s, st, p, pt, float(m.group("gbps")) if m else None,
                                  (rate or "").strip(), (_read(port / "link_layer") or "").strip(), counters))
    return out


class FabricRules:
    def __init__(self, ctx: NodeContext, thresholds: FabricThresholds | None = None) -> None:
        self.ctx = ctx
        self.th = thresholds or FabricThresholds()
        self.prev: dict[str, tuple[PortSample, float]] = {}
        self.flaps: dict[str, list[float]] = {}
        self.best_rate: dict[str, float] = {}

    def apply(self, ports: list[PortSample], at: datetime, mono: float) -> Cycle:
        states: list[Signal] = []
        th = self.th
        for p in ports:
            def state(check: str, bad: bool, msg: str, value: float | None = None, threshold: float | None = None,
                      p: PortSample = p) -> None:
                states.append(self.ctx.signal(source=SignalSource.FABRIC, check=check, healthy=not bad, at=at,
                                              component=p.port, value=value, threshold=threshold,
                                              message=f"{p.port}: {msg}", details={"link_layer": p.link_layer}))

            down = p.state != 4 or p.phys_state != 5
            state("ib.link_down", down, f"state {p.state_text or p.state}, physical {p.phys_text or p.phys_state}")
            prev, prev_t = self.prev.get(p.port, (None, mono))
            elapsed = mono - prev_t
            if prev is not None and elapsed > 0:
                def delta(names: tuple[str, ...], p: PortSample = p, prev: PortSample = prev) -> int:
                    return sum(max(0, p.counters.get(n, 0) - prev.counters.get(n, 0)) for n in names
                               if n in p.counters and n in prev.counters)

                errors = delta(ERROR_COUNTERS) * 60 / elapsed
                state("ib.errors", errors >= th.errors_per_min, f"{errors:.1f} link errors/min", round(errors, 2),
                      th.errors_per_min)
                flaps = self.flaps.setdefault(p.port, [])
                flaps.extend([mono] * min(delta(FLAP_COUNTERS), 100))
                flaps[:] = [t for t in flaps if mono - t <= th.flap_window_s]
                state("ib.flapping", len(flaps) >= th.flap_count,
                      f"{len(flaps)} link downs/recoveries within {th.flap_window_s:g}s", len(flaps), th.flap_count)
            if p.rate_gbps is not None and not down:
                best = self.best_rate[p.port] = max(self.best_rate.get(p.port, 0.0), p.rate_gbps)
                expected = th.expected_rate_gbps or best
                state("ib.rate_degraded", p.rate_gbps < expected, f"rate {p.rate_text}, expected {expected:g} Gb/sec",
                      p.rate_gbps, expected)
            self.prev[p.port] = (p, mono)
        return Cycle(states=states)
