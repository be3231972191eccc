"""The fabric source: InfiniBand ports from sysfs -> link health signals.

Reads ``/sys/class/infiniband/<dev>/ports/<n>/{state,phys_state,rate,link_layer,counters/*}``
(formats from the kernel's ``drivers/infiniband/core/sysfs.c``: ``4: ACTIVE``, ``5: LinkUp``,
``400 Gb/sec (4X NDR)``, decimal counters) into ``PortSample``s; the pure ``FabricRules`` turn
samples and the previous ones into per-port states (component ``<dev>/<port>``):

- ``ib.link_down``: state not ACTIVE or physical state not LinkUp on a port seen up before (critical); a
  port never seen ACTIVE on this node is not judged, only logged once (``ib_port_never_active``) and
  listed in ``inactive``: uncabled storage or management ports look the same; ports in ``ignore_ports``
  and SR-IOV virtual functions are not judged either; a port coming up (INIT or ARMED with the physical link
  up, or the link training, or still Polling within ``bringup_hold_s`` of the node's boot) is judged only after
  ``bringup_hold_s``, meanwhile it says nothing; a state or physical
  state that is no kernel value (number and name disagree, e.g. ``phys_state`` ``4: ACTIVE``) is a
  *warning* ``ib.link_down``, never critical (``collectors.ibstate``);
- ``ib.flapping``: ``link_downed`` or ``link_error_recovery`` rose ``flap_count`` times within
  ``flap_window_s``, or the port was read down after ACTIVE that often (a subnet manager cycling it between INIT and
  ACTIVE, which no counter shows and whose bring-up hold restarts each time); healthy again after a quiet window;
- ``ib.errors``: symbol / receive / link-integrity / remote-physical errors per minute at or
  above the threshold;
- one reading with no reading before (``single_reading``: the offline commands): the counters
  themselves against ``totals`` limits: ``link_downed`` -> ``ib.flapping``; ``symbol_error``,
  ``port_rcv_errors``, ``excessive_buffer_overrun_errors`` -> ``ib.errors``;
- ``ib.rate_degraded``: a rate below the expected one (configured, or the best seen on the port).
  Ports whose link layer is Ethernet (RoCE) are judged against their own expected rate
  (``expected_ethernet_rate_gbps``, or the best seen on the port), never the InfiniBand one, or
  skipped entirely with ``skip_ethernet``.
- a port seen up before that is no longer under ``/sys/class/infiniband`` (the adapter fell off the bus,
  its driver unbound, a firmware reset tore the device down) is ``ib.link_down`` (critical, ``reading``
  ``missing``) until it is read again: an entity missing from a cycle is never cleared by the edge
  (``collectors.edge``), so its last healthy state would otherwise stand. NVSentinel's NIC health monitor
  treats a device's disappearance the same way (``/work/shared/reference/infiniband_sysfs.md``). A port
  of the same link layer appearing meanwhile makes it a rename instead (mlx5 RoCE LAG unregisters
  ``mlx5_2``/``mlx5_3`` and registers ``mlx5_bond_0``, and back): said healthy (``reading`` ``renamed``)
  and forgotten. ``ibstat`` text names a vanished adapter too (``collectors.ibstat``: its ``ibpanic`` /
  ``ibstatus`` fatal line).
IBA error counters saturate instead of wrapping (widths in ``SATURATED``, sysfs.c ``PORT_PMA_ATTR``): a
counter at its width reads "at least", and its rises are invisible until the counters are reset; messages
say so. A counter that goes down was reset and counts as zero new errors. A file that cannot be read or
parsed is skipped and counted (``read_ports(..., skipped=)``); a ``rate`` the kernel refuses with EINVAL
(``rate_show`` for a port with no valid width, i.e. down) is no rate, not a skipped file. Numbers are ASCII
digits only: sysfs prints ``%u``/``%llu``. NVLink health comes from the nvml source, not from here.
"""

from __future__ import annotations

import errno
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.ibstate import (
    ACTIVE,
    BRINGUP_PHYS,
    BRINGUP_STATES,
    LINK_UP,
    PHYS_STATES,
    POLLING,
    PORT_STATES,
    Reading,
    parse_state,
)
from breakfix.schemas.common import Severity
from breakfix.schemas.signal import Signal, SignalSource

log = structlog.get_logger("breakfix.collector.fabric")

SYSFS = Path("/sys/class/infiniband")
ERROR_COUNTERS = ("symbol_error", "port_rcv_errors", "local_link_integrity_errors", "port_rcv_remote_physical_errors")
FLAP_COUNTERS = ("link_downed", "link_error_recovery")
TOTAL_COUNTERS = ("link_downed", "symbol_error", "port_rcv_errors", "excessive_buffer_overrun_errors")
_RATE = re.compile(r"^(?P<gbps>\d{1,6}(?:\.\d{1,3})?) Gb/sec", re.ASCII)
# Single-reading limits (counts since the last counter reset). IBA widths: link_downed 8 bit, symbol_error and
# port_rcv_errors 16 bit, excessive_buffer_overrun_errors 4 bit: it reads 15 (saturated) on the healthy H100
# capture in infiniband_sysfs.md, so it is reported in the message but judged only when a limit is configured.
DEFAULT_TOTALS = {"link_downed": 1, "symbol_error": 1000, "port_rcv_errors": 1000}
# The value each IBA PortCounters error counter stops at (2**width - 1), sysfs.c PORT_PMA_ATTR widths.
SATURATED = {"symbol_error": 65535, "link_error_recovery": 255, "link_downed": 255, "port_rcv_errors": 65535,
             "port_rcv_remote_physical_errors": 65535, "local_link_integrity_errors": 15,
             "excessive_buffer_overrun_errors": 15}
_COUNTER = re.compile(r"^\s*(?P<n>[0-9]{1,20})\s*$", re.ASCII)


@dataclass(frozen=True, slots=True)
class FabricThresholds:
    errors_per_min: float = 10.0
    flap_count: int = 2
    flap_window_s: float = 600.0
    expected_rate_gbps: float | None = None  # None: the best rate seen on the port
    expected_ethernet_rate_gbps: float | None = None  # Ethernet (RoCE) ports; None: the best seen on the port
    skip_ethernet: bool = False
    single_reading: bool = False  # judge counters by their totals when there is no reading before
    ignore_ports: tuple[str, ...] = ()  # fnmatch patterns of "<dev>/<port>" never judged (storage, management NICs)
    bringup_hold_s: float = 120.0  # a port coming up (INIT, ARMED, link training) is a fault only after this long
    totals: tuple[tuple[str, int], ...] = tuple(DEFAULT_TOTALS.items())


@dataclass
class PortSample:
    port: str  # "<dev>/<n>"
    state: int | None  # None: not a kernel value
    state_text: str
    phys_state: int | None
    phys_text: str
    rate_gbps: float | None
    rate_text: str
    link_layer: str
    counters: dict[str, int] = field(default_factory=dict)
    missing: bool = False  # the port (or, from ibstat text, the whole adapter ``port`` names) is gone


def missing_port(port: str, why: str = "", *, link_layer: str = "") -> PortSample:
    """A port (or, from ibstat text, a whole adapter) that was not there to read: ``why`` the tool's words."""
    return PortSample(port, None, why, None, "", None, "", link_layer, {}, missing=True)


class SkipCount:
    """A ``skipped`` sink for ``read_ports`` that only counts (the daemon's: nothing grows with input)."""

    def __init__(self) -> None:
        self.n = 0

    def append(self, _what: str) -> None:
        self.n += 1


def port_sample(port: str, state: Reading, phys: Reading, rate: str, link_layer: str,
                counters: dict[str, int]) -> PortSample:
    """One port's reading, however it was read (sysfs here, ``ibstat`` text in ``collectors.ibstat``)."""
    m = _RATE.match(rate.strip())
    return PortSample(port, state.number, state.text, phys.number, phys.text, float(m.group("gbps")) if m else None,
                      rate.strip(), link_layer.strip(), counters)


Skipped = list[str] | SkipCount
MAX_PORTS = 4096


def _saturated(name: str, value: int | None) -> bool:
    return value is not None and name in SATURATED and value >= SATURATED[name]


def _at_least(name: str, value: int) -> str:
    return f" (saturated: at least {value})" if _saturated(name, value) else ""


def _read(path: Path, skipped: Skipped | None = None, quiet: tuple[int, ...] = ()) -> str | None:
    """A sysfs file's text; gone, or an errno in ``quiet``: None; unreadable or not UTF-8: None, counted."""
    try:
        with path.open("rb") as fh:
            return fh.read(4096).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        if skipped is not None and not (isinstance(exc, OSError) and exc.errno in quiet):
            skipped.append(f"{path}: {type(exc).__name__}")
        return None


def _dirs(path: Path, skipped: Skipped | None) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)[:4096]
    except OSError as exc:
        if skipped is not None:
            skipped.append(f"{path}: {type(exc).__name__}")
        return []


def read_ports(root: Path = SYSFS, skipped: Skipped | None = None) -> list[PortSample]:
    """Every port under ``root``; a port whose files vanish mid-read is skipped this cycle, and a file that
    cannot be read or parsed (a counter that is no number, ``N/A (no PMA)`` aside) is added to ``skipped``."""
    out: list[PortSample] = []
    if not root.is_dir():
        return out
    for dev in _dirs(root, skipped):
        if not (dev / "ports").is_dir() or (dev / "device" / "physfn").exists():
            continue  # an SR-IOV virtual function mirrors its physical port, which is judged itself
        for port in _dirs(dev / "ports", skipped):
            state, phys = (_read(port / f, skipped) for f in ("state", "phys_state"))
            if state is None or phys is None:
                continue
            rate = _read(port / "rate", skipped, quiet=(errno.EINVAL,))  # rate_show: -EINVAL for no valid width
            counters: dict[str, int] = {}
            cdir = port / "counters"
            for name in dict.fromkeys((*ERROR_COUNTERS, *FLAP_COUNTERS, *TOTAL_COUNTERS)):
                raw = _read(cdir / name, skipped)
                if raw is None or raw.strip().startswith("N/A"):
                    continue
                if m := _COUNTER.match(raw):
                    counters[name] = int(m.group("n"))
                elif skipped is not None:
                    skipped.append(f"{cdir / name}: not a counter")
            out.append(port_sample(f"{dev.name}/{port.name}", parse_state(state, PORT_STATES),
                                   parse_state(phys, PHYS_STATES), rate or "",
                                   _read(port / "link_layer", skipped) or "", counters))
    return out


class FabricRules:
    def __init__(self, ctx: NodeContext, thresholds: FabricThresholds | None = None, *,
                 seen_up: set[str] | None = None) -> None:
        """``seen_up``: ports seen ACTIVE before (kept on disk by the source plugin, plus those whose
        ``ib.link_down`` was open when the collector stopped): their loss is a fault, never "not judged"."""
        self.ctx = ctx
        self.th = thresholds or FabricThresholds()
        self.prev: dict[str, tuple[PortSample, float]] = {}
        self.flaps: dict[str, list[float]] = {}
        self.drops: dict[str, list[float]] = {}  # port -> when it was read ACTIVE, then not (in flap_window_s)
        self.was_active: dict[str, bool] = {}  # port -> whether its last reading was ACTIVE and LinkUp
        self.best_rate: dict[str, float] = {}
        self.inactive: set[str] = set()  # ports down and never seen up here: not judged (README: fabric)
        self.coming_up: dict[str, float] = {}  # port -> when (monotonic) it was first read coming up, in its hold
        self.seen_up: set[str] = seen_up if seen_up is not None else set()  # ports ever seen ACTIVE and LinkUp
        #                                  here (kept across restarts by the source plugin): only their loss is critical
        self.skipped_files = SkipCount()  # pass to read_ports: breakfix_collector_parse_skipped_total{source="fabric"}
        self.link_layer: dict[str, str] = {}  # port -> its link layer as last read: a port gone keeps its kind
        self.missing_since: dict[str, float] = {}  # port seen up, not read now -> since when (monotonic)
        self.first_up: dict[str, float] = {}  # port -> when (monotonic) it was first seen up, in this process
        self.read_at: dict[str, float] = {}  # port -> when (monotonic) it was last read

    def apply(self, ports: list[PortSample], at: datetime, mono: float, *, uptime_s: float | None = None) -> Cycle:
        """``uptime_s``: seconds since the node booted (the caller reads ``/proc/uptime`` once a cycle; None when
        unknown): within ``bringup_hold_s`` of a boot a port still Polling is held too, since a collector started with
        the node (systemd, or after breakfix's own reboot rung) reads its ports before the links have left Polling."""
        states: list[Signal] = []
        th = self.th
        booting = uptime_s is not None and uptime_s < th.bringup_hold_s
        read = {p.port for p in ports if not p.missing}
        for p in ports:  # a port up for the first time (here, since this process started): a rename's evidence
            if not p.missing and p.port not in self.seen_up and p.state in ACTIVE and p.phys_state == LINK_UP \
                    and len(self.first_up) < MAX_PORTS:
                self.first_up.setdefault(p.port, mono)
        for port in [k for k in self.missing_since if k in read or k not in self.seen_up]:
            del self.missing_since[port]
        for port in read:
            if port in self.read_at or len(self.read_at) < MAX_PORTS:
                self.read_at[port] = mono
        gone = [missing_port(port, link_layer=self.link_layer.get(port, "")) for port in sorted(self.seen_up - read)]
        for p in [*ports, *gone]:
            if not p.missing and len(self.link_layer) < MAX_PORTS:
                self.link_layer[p.port] = p.link_layer
            ethernet = p.link_layer.lower() == "ethernet"
            if (ethernet and th.skip_ethernet) or any(fnmatch.fnmatchcase(p.port, pat) for pat in th.ignore_ports):
                continue

            def state(check: str, bad: bool, msg: str, value: float | None = None, threshold: float | None = None,
                      p: PortSample = p, severity: Severity | None = None, **details: str) -> None:
                states.append(self.ctx.signal(source=SignalSource.FABRIC, check=check, healthy=not bad, at=at,
                                              component=p.port, value=value, threshold=threshold, severity=severity,
                                              message=f"{p.port}: {msg}",
                                              details={"link_layer": p.link_layer, **details}))

            if p.missing and p.port in self.seen_up and not th.single_reading:
                since = self.missing_since.setdefault(p.port, mono)
                now_as = self._renamed(p)
                if now_as is not None:
                    state("ib.link_down", False, f"gone as {now_as} came up: renamed or (un)bonded, no longer judged",
                          reading="renamed")
                    self.seen_up.discard(p.port)
                    self.link_layer.pop(p.port, None)
                    self.missing_since.pop(p.port, None)
                    log.info("ib_port_renamed", node=self.ctx.node, port=p.port, now=now_as)
                    continue
                if mono - since < th.bringup_hold_s:
                    continue  # unread for a moment (a firmware reset, an EIO), or its device not registered yet
                    #           after a boot: the edge keeps the port's last state meanwhile
            if p.missing:
                if p.port in self.seen_up or th.single_reading:
                    why = p.state_text or "no longer under /sys/class/infiniband"
                    state("ib.link_down", True, f"{why}: the adapter is gone (off the bus, driver unbound or reset)",
                          reading="missing")
                self.prev.pop(p.port, None)
                self.coming_up.pop(p.port, None)
                continue
            known_down = (p.state is not None and p.state not in ACTIVE) or (
                p.phys_state is not None and p.phys_state != LINK_UP)
            unknown = p.state is None or p.phys_state is None
            down = known_down or unknown
            readings = f"state {p.state_text or '?'}, physical {p.phys_text or '?'}"
            if not down:
                self.seen_up.add(p.port)
            # a port never seen ACTIVE on this node is an uncabled or unused port (DGX storage and management
            # ports) as often as a failed link, and a fault there would cordon every such node: it is not judged,
            # only logged once and counted (``inactive``); a port that was up and went down is ib.link_down
            # (critical). Offline readings judge what they see (single_reading).
            if known_down and p.port not in self.seen_up and not th.single_reading:
                if p.port not in self.inactive:
                    self.inactive.add(p.port)
                    log.info("ib_port_never_active", node=self.ctx.node, port=p.port, readings=readings)
                # "not judged" is said as healthy: never news by itself, it clears a warning an odd reading raised
                state("ib.link_down", False, f"{readings}; never ACTIVE on this node: not judged", reading="inactive")
                continue
            self.inactive.discard(p.port)
            self._count_drop(p.port, p.state in ACTIVE and p.phys_state == LINK_UP, mono)
            if self._holding(p, known_down, mono, th, booting):
                continue  # coming up: the edge keeps the port's last state meanwhile; counters are read next time
            if not known_down and unknown:
                state("ib.link_down", True, f"{readings}: not a state the kernel prints", severity=Severity.WARNING,
                      reading="unknown")
            else:
                state("ib.link_down", known_down, readings)
            prev, prev_t = self.prev.get(p.port, (None, mono))
            elapsed = mono - prev_t
            if prev is not None and elapsed > 0:
                def delta(names: tuple[str, ...], p: PortSample = p, prev: PortSample = prev) -> int:
                    return sum(max(0, p.counters.get(n, 0) - prev.counters.get(n, 0)) for n in names
                               if n in p.counters and n in prev.counters)

                errors = delta(ERROR_COUNTERS) * 60 / elapsed
                blind = [n for n in ERROR_COUNTERS if _saturated(n, p.counters.get(n))]
                state("ib.errors", errors >= th.errors_per_min, f"{errors:.1f} link errors/min" + (
                    f"; saturated, rises not visible until the counters are reset: {', '.join(blind)}"
                    if blind else ""), round(errors, 2), th.errors_per_min)
                flaps = self.flaps.setdefault(p.port, [])
                flaps.extend([mono] * min(delta(FLAP_COUNTERS), 100))
                flaps[:] = [t for t in flaps if mono - t <= th.flap_window_s]
                # a link that drops shows in its counters and its state alike: the larger count, never their sum;
                # a port the subnet manager takes from ACTIVE back to INIT and up again shows in its state only
                drops = [t for t in self.drops.get(p.port, ()) if mono - t <= th.flap_window_s]
                n = max(len(flaps), len(drops))
                state("ib.flapping", n >= th.flap_count, f"{len(flaps)} link downs/recoveries, {len(drops)} times "
                      f"read down after ACTIVE, within {th.flap_window_s:g}s", n, th.flap_count)
            elif prev is None and th.single_reading:
                self._totals(p, state)
            if p.rate_gbps is not None and not down:
                best = self.best_rate[p.port] = max(self.best_rate.get(p.port, 0.0), p.rate_gbps)
                expected = (th.expected_ethernet_rate_gbps if ethernet else th.expected_rate_gbps) or best
                state("ib.rate_degraded", p.rate_gbps < expected, f"rate {p.rate_text}, expected {expected:g} Gb/sec",
                      p.rate_gbps, expected)
            self.prev[p.port] = (p, mono)
        if len(self.coming_up) > len(ports):  # bounded by the ports read: forget ports that went away
            names = {p.port for p in ports}
            self.coming_up = {k: v for k, v in self.coming_up.items() if k in names}
        return Cycle(states=states)

    def _count_drop(self, port: str, up: bool, mono: float) -> None:
        """A port read ACTIVE and LinkUp, then not (any state, INIT included, held or not): one drop, kept for
        ``flap_window_s``; a port cycling between INIT and ACTIVE restarts its bring-up hold each time and is never
        judged down, so its drops are what make it ``ib.flapping``. A reading that is no kernel value is not up."""
        if not up and self.was_active.get(port):
            drops = self.drops.setdefault(port, [])
            drops[:] = [t for t in drops if mono - t <= self.th.flap_window_s][-100:]
            drops.append(mono)
        if port in self.was_active or len(self.was_active) < MAX_PORTS:
            self.was_active[port] = up

    def _holding(self, p: PortSample, down: bool, mono: float, th: FabricThresholds, booting: bool) -> bool:
        """A down port still coming up, within ``bringup_hold_s`` of first being read so: not judged yet.

        INIT means the physical link is up but the subnet manager has not configured the port, ARMED that it
        is configured and not yet active (kernel ABI, sysfs-class-infiniband); physical
        PortConfigurationTraining and LinkErrorRecovery are the link training. Every port passes through
        them after a reboot (breakfix's own reboot rung included) and after a switch or SM restart, for as
        long as the SM takes to sweep; a port that stays there past the hold is a fault. DOWN with
        Polling, Disabled or Sleep (no peer, no cable, shut) is judged at once; so are offline readings."""
        bringing_up = down and ((p.state in BRINGUP_STATES and p.phys_state == LINK_UP) or p.phys_state in BRINGUP_PHYS
                                or (p.phys_state == POLLING and booting))
        if not bringing_up or th.single_reading or th.bringup_hold_s <= 0:
            self.coming_up.pop(p.port, None)
            return False
        return mono - self.coming_up.setdefault(p.port, mono) < th.bringup_hold_s

    def _renamed(self, gone: PortSample) -> str | None:
        """The port that took a gone port's place: one first seen up (ever, on this node) after the gone port was
        last read, of the same link layer when the gone port's is known (not after a restart, when only the ports
        seen up are kept). RoCE LAG replaces mlx5_2 and mlx5_3 by mlx5_bond_0 and back; a port that comes back under
        its own name was up before, so it never excuses another's loss."""
        last = self.read_at.get(gone.port, float("-inf"))
        for port, at in self.first_up.items():  # in the order they came up (only ever added, at a rising time)
            if at > last and port in self.seen_up and port != gone.port \
                    and (not gone.link_layer or self.link_layer.get(port, "") == gone.link_layer):
                return port
        return None

    def _totals(self, p: PortSample, state: Callable[..., None]) -> None:
        """One reading, no reading before: the counters since their last reset against ``totals``."""
        limits = dict(self.th.totals)
        over = {n: v for n, v in p.counters.items() if n in limits and n != "link_downed" and v >= limits[n]}
        errs = [n for n in TOTAL_COUNTERS if n != "link_downed" and n in p.counters]
        if errs:
            worst = max((p.counters[n] for n in errs if n in limits), default=0)
            state("ib.errors", bool(over), "error counters since reset: " +
                  ", ".join(f"{n}={p.counters[n]}" + _at_least(n, p.counters[n]) +
                            (f" (limit {limits[n]})" if n in over else "") for n in errs),
                  worst, None, basis="total")
        if "link_downed" in p.counters and "link_downed" in limits:
            n, limit = p.counters["link_downed"], limits["link_downed"]
            state("ib.flapping", n >= limit, f"link_downed={n}{_at_least('link_downed', n)} since the last counter "
                  "reset", n, limit, basis="total")
