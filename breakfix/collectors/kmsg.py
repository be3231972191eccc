"""The kernel-log rules: NVIDIA driver lines (XID, SXid, fallen off the bus, GPU init failed, NVLink discovery
wedged) -> ``Signal``s.

Pure: ``parse_line`` takes one line in any prefix seen in the wild (raw ``/dev/kmsg``
records ``6,1234,5678,-;``, dmesg ``[ts]``, ``dmesg -T`` / ``-H`` / ``-d`` / ``-r`` / ``-x``, syslog (RFC 5424 too),
journald short-iso / short-unix / short-full / short-monotonic, ``talosctl dmesg``; CRLF endings and NUL padding
ignored) and returns a ``KernelEvent`` or None for everything else (non-XID NVRM noise and the SXid detail lines
included). ``records`` first cuts a line that holds records glued together (a copy that lost a newline) at each
Xid, SXid or other driver record start the rules read, never inside a /dev/kmsg record's ``\\x0a``-joined lines;
``line_signals`` reads each of them. ``to_signal`` turns an event into a ``Signal`` through the node's
``NodeContext``, mapping the PCI address to the GPU (from NVML, or from the ``NVRM: GPU at [PCI:]... GPU-<uuid>``
lines the driver prints); the MIG GPU / compute instance of an Xid goes to ``details.GPU_I_ID`` / ``GPU_CI_ID``, the
severity is the catalog's. Line grammar and real examples: NVIDIA driver output collected in
tests/data/kmsg_real.log and kmsg_real_forms.log (sources in tests/data/SOURCES.md). A line's time is read by
``collectors.kmsg_follow`` (the caller's ``observed_at``), which also follows the log with persisted positions;
the daemon's source: ``collectors.kmsg_source``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice, pairwise

from breakfix.collectors.context import NodeContext
from breakfix.collectors.kmsg_follow import NO_TIME, has_time
from breakfix.schemas.catalog.nvlink5 import NVLINK5_XIDS, decode
from breakfix.schemas.common import GpuRef, normalize_pci_bus_id
from breakfix.schemas.signal import Signal, SignalSource

# Every prefix form of the Xid line (kernel_log_formats.md section 1): ``(PCI:dddd:bb:dd)``, the old ``(dddd:bb:dd)``,
# the MIG forms ``(PCI:dddd:bb:dd GPU-I:05)`` and ``(PCI:dddd:bb:dd GPU-I:01 GPU-CI:02)`` (open-gpu-kernel-modules
# kernel_rc.c krcReportXid: ``NVRM: Xid (PCI:%04x:%02x:%02x GPU-I:%02u GPU-CI:%02u): %d, pid=%s, name=%s, %s``), an
# address with a function, a redacted ``(PCI:...)`` and no parenthesis at all. The PCI address and the GPU / compute
# instance are found inside the parenthesis. The driver prints ``pid=`` as ``%u`` or ``'<unknown>'``: anything else
# after ``pid=`` (a line cut and glued to the next) is left in the text, never taken for a process.
_XID = re.compile(
    r"NVRM: Xid(?: ?\((?P<inside>[^)]{0,80})\))?:? (?P<xid>\d{1,6})\b"
    r"(?:, pid=(?P<pid>'?(?:<unknown>|\d+)'?)(?=,|\s*$))?(?:, name=(?P<name>[^,]*))?(?:, (?P<rest>.*))?\s*$"
)
_XID_PCI = re.compile(r"(?:PCI:)?(?P<pci>[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}(?:\.[0-7])?)")
_XID_MIG = re.compile(r"GPU-I:\s*(?P<gi>[0-9a-fA-F]{1,4})")
_XID_CI = re.compile(r"GPU-CI:\s*(?P<ci>[0-9a-fA-F]{1,4})")
_SXID = re.compile(
    r"nvidia-nvswitch(?P<switch>\d+): SXid \(PCI:(?P<pci>[0-9a-fA-F:.]+)\): (?P<sxid>\d+), (?P<rest>.*)$"
)
# Fallen off the bus without an Xid (kernel_log_formats.md section 3): ``GPU <bdf>: GPU has fallen off the bus``,
# the older ``GPU at <bdf> has fallen off the bus``, and the three-line message whose first line is
# ``The NVIDIA GPU <bdf>`` ALONE (``(PCI ID: ...) installed in this system has`` / ``fallen off the bus ...``
# follow). The driver's other ``The NVIDIA GPU <bdf> ...`` messages (``(PCI ID: ...)`` on the same line: not
# supported by this driver, requires the open kernel modules; memory onlining) go on after the address, so they
# are not a lost GPU. In a /dev/kmsg record the lines are one, joined by ``\x0a``: there the record must say
# ``fallen off the bus`` itself (as gpud's fallback regex requires). The address may come without its domain
# (``NVRM: GPU 18:00.0: GPU has fallen off the bus.``, leptonai/gpud components/accelerator/nvidia/xid/kmsg_test.go;
# gpud's regexes take the domain as optional): domain 0000.
_BDF = r"(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"
_FALLEN = re.compile(
    rf"NVRM: (?:GPU (?:at )?(?:PCI:)?(?P<pci1>{_BDF}):? "
    rf"(?:GPU )?has fallen off the bus|The NVIDIA GPU (?P<pci2>{_BDF})"
    r"(?:\s*$|\\x0a.{0,400}?fallen off the bus))"  # bounded: a long line costs a bounded scan per candidate
)
# A GPU the driver failed to initialise (kernel_log_formats.md section 5, NVIDIA/gpu-operator issue 1146):
# ``NVRM: GPU 0000:0a:00.0: RmInitAdapter failed! (0x24:0x72:1568)``, and ``rm_init_adapter failed, device minor number
# 5`` after it (same GPU; the address when the line carries one). The GPU is not usable until a reboot at least: an
# operator fault (``gpu.init_failed``), never driver chatter.
_INIT_FAILED = re.compile(
    rf"NVRM: (?:GPU (?:at )?(?:PCI:)?(?P<pci>{_BDF}):? )?(?:RmInitAdapter|rm_init_adapter) failed")
# The driver wedged in NVLink link discovery (kernel_log_formats.md section 5; leptonai/gpud pkg nvlink
# ``RegexDriverWedgeKMessage``, whose suggested repair is a system reboot): ``NVRM: knvlinkDiscoverPostRxDetLinks_GH100:
# Getting peer0's postRxDetLinkMask failed!`` and ``NVRM: knvlinkUpdatePostRxDetectLinkMask_IMPL: Failed to update Rx
# Detect Link mask!``, repeated while it retries (open-gpu-kernel-modules kernel_nvlinkcorelibtrain.c); nvidia-smi hangs
# meanwhile. Node-wide: the lines name no GPU.
_NVLINK_WEDGE = re.compile(
    r"NVRM: knvlink(?:DiscoverPostRxDetLinks_\w+: Getting peer\d+(?:'s)? postRxDetLinkMask failed"
    r"|UpdatePostRxDetectLinkMask_\w+: Failed to update Rx Detect Link mask)")
# The PCI-to-UUID line (kernel_rc.c _krcLogUuidOnce: ``NVRM: GPU at PCI:%04x:%02x:%02x: %s``); older drivers print
# it without ``PCI:`` (``NVRM: GPU at 0000:03:00: GPU-b850f46d-...``, NVIDIA's Xid documentation example).
_GPU_MAP = re.compile(r"NVRM: GPU at (?:PCI:)?(?P<pci>[0-9a-fA-F:.]+): (?P<uuid>GPU-[0-9a-fA-F-]+)")
_RECOVERY = re.compile(r"recovery action changed from 0x[0-9a-fA-F]+ \([^)]*\) to 0x[0-9a-fA-F]+ \((?P<action>[^)]*)\)")
_RAW_KMSG = re.compile(r"^\d+,(?P<seq>\d+),(?P<usec>\d+),[^;]*;")
_MONO = re.compile(r"\[\s*(?P<mono>\d+\.\d+)(?: <\s*-?\d+\.\d+>)?\]")  # dmesg -d adds `` <delta>``
# Where a record may start, with the dmesg time in front of it when there is one: a record cut short and glued to the
# next one (a console or log copy that lost a newline) holds a second start, and that record is read too. An Xid or
# SXid start always starts one; any other ``NVRM: `` only where the record it begins is one the rules above read on
# its own (fallen off the bus, init failed, NVLink wedged, the PCI-to-UUID line: ``_DRIVER_RECORDS``), and never right
# after a ``\x0a``: there it is a line of the same /dev/kmsg record, as in the three-line fallen-off message.
_RECORD_START = re.compile(r"(?:\[\s*\d+\.\d+(?: <\s*-?\d+\.\d+>)?\]\s*)?(?P<at>NVRM: |nvidia-nvswitch\d+: SXid\b)")
_XID_START = re.compile(r"NVRM: Xid\b|nvidia-nvswitch")  # at ``at``: the SXid form is whole once the above matched
_DRIVER_RECORDS = (_FALLEN, _INIT_FAILED, _NVLINK_WEDGE, _GPU_MAP)
MAX_RECORDS = 16  # records read from one line; the rest stay in the last one's text
MAX_CANDIDATES = 256  # record starts looked at in one line (a hostile line of "NVRM: " costs no more than these)


class BadLine(ValueError):
    """A line that names an NVIDIA fault but cannot be read (impossible address, date or number)."""


@dataclass(frozen=True, slots=True)
class KernelEvent:
    kind: str  # "xid" | "sxid" | "gpu.lost" | "gpu.init_failed" | "nvlink.driver_wedge"
    code: str | None
    pci: str | None  # None: the line names no PCI address
    message: str
    details: dict[str, str] = field(default_factory=dict)
    seq: str = ""


def _details(**kv: str | None) -> dict[str, str]:
    return {k: v.strip() for k, v in kv.items() if v is not None and v.strip()}


def _instance(raw: str) -> str:
    return str(int(raw)) if raw.isdigit() else raw.lower()


def _pci(raw: str) -> str:
    try:
        return normalize_pci_bus_id(raw)
    except ValueError as exc:
        raise BadLine(str(exc)) from None


def records(line: str) -> list[str]:
    """The kernel records in one line: the line itself, or, where a record was cut and glued to the next one(s),
    the line up to the second record's start, then each further record (its dmesg time in front when it had one).
    An Xid or SXid start cuts a line; so does the start of any other driver record the rules read (``_RECORD_START``),
    but not after ``\\x0a``: a /dev/kmsg record whose lines are joined by ``\\x0a`` stays whole."""
    if line.count("NVRM: ") + line.count("SXid") < 2:
        return [line]
    starts: list[int] = []
    end = len(line)  # from the last start back: a record ends where the next one starts
    candidates = [(m.start(), m.start("at")) for m in islice(_RECORD_START.finditer(line), MAX_CANDIDATES)]
    for start, at in reversed(candidates):
        if _XID_START.match(line, at) or (not line.endswith("\\x0a", 0, start)
                                          and any(r.match(line, at, end) for r in _DRIVER_RECORDS)):
            starts.append(start)
            end = start
    if len(starts) < 2:
        return [line]
    starts.reverse()
    cuts = [0, *starts[1:MAX_RECORDS], len(line)]
    return [line[a:b] for a, b in pairwise(cuts) if line[a:b].strip()]


def parse_line(line: str) -> KernelEvent | None:
    """One kernel-log line -> an event, or None when it is not an NVIDIA fault line.

    Raises ``BadLine`` for a fault line with an impossible PCI address; callers skip and count it."""
    if "Xid" not in line and "fallen off" not in line and "The NVIDIA GPU" not in line and "nit_adapter" not in line \
            and "nitAdapter" not in line and "knvlink" not in line:
        return None  # cheap substring checks first: most NVRM lines are driver chatter
    # CRLF from a file copied through Windows; the NUL run a crash leaves in a log file before the next line
    line = line.lstrip("\x00").rstrip(" \t\r\n\x00")
    raw = _RAW_KMSG.match(line)
    seq = raw.group("seq") if raw else ""
    mono = _MONO.search(line)
    if seq == "" and mono:
        seq = mono.group("mono")
    m = _XID.search(line)
    if m:
        msg = line[line.index("NVRM: Xid"):]
        pid = (m.group("pid") or "").strip("'")
        inside = m.group("inside") or ""
        pm = _XID_PCI.search(inside)
        gi = _XID_MIG.search(inside)
        ci = _XID_CI.search(inside)
        d = _details(pid=None if pid in ("", "<unknown>") else pid,
                     process=None if (m.group("name") or "").strip() in ("", "<unknown>") else m.group("name"),
                     text=m.group("rest"), GPU_I_ID=_instance(gi.group("gi")) if gi else None,
                     GPU_CI_ID=_instance(ci.group("ci")) if ci else None)
        return KernelEvent("xid", m.group("xid"), _pci(pm.group("pci")) if pm else None, msg, d, seq)
    m = _SXID.search(line)
    if m:
        rest = m.group("rest")
        if rest.startswith(("Severity ", "Data {")):  # the detail lines after an SXid line: not another fault
            return None
        fatal = rest.split(",", 1)[0].strip()
        link = re.search(r"Link (\d+)", rest)  # ``Link 04``: link 4, as the NVLink5 Xid decode names it
        d = _details(switch=m.group("switch"), fatal=fatal if fatal in ("Fatal", "Non-fatal") else None,
                     link=str(int(link.group(1))) if link else None, text=rest)
        return KernelEvent("sxid", m.group("sxid"), _pci(m.group("pci")),
                           line[line.index("nvidia-nvswitch"):], d, seq)
    m = _FALLEN.search(line)
    if m:
        pci = m.group("pci1") or m.group("pci2")
        return KernelEvent("gpu.lost", None, _pci(pci), line[line.index("NVRM"):], {}, seq)
    m = _INIT_FAILED.search(line)
    if m:
        minor = re.search(r"minor number (\d+)", line)
        return KernelEvent("gpu.init_failed", None, _pci(m.group("pci")) if m.group("pci") else None,
                           line[line.index("NVRM"):], _details(minor=minor.group(1) if minor else None), seq)
    m = _NVLINK_WEDGE.search(line)
    if m:
        return KernelEvent("nvlink.driver_wedge", None, None, line[line.index("NVRM"):], {}, seq)
    return None


def gpu_map_entry(line: str) -> tuple[str, str] | None:
    """``NVRM: GPU at PCI:0000:01:00: GPU-...`` (or the older ``NVRM: GPU at 0000:01:00: GPU-...``) ->
    (normalised PCI, UUID)."""
    m = _GPU_MAP.search(line) if "NVRM: GPU at " in line else None
    if m is None:
        return None
    try:
        return normalize_pci_bus_id(m.group("pci")), m.group("uuid")
    except ValueError:
        return None


def to_signal(ev: KernelEvent, ctx: NodeContext, *, observed_at: datetime, discriminator: str = "",
              extra: dict[str, str] | None = None) -> Signal:
    """A kernel event as a signal for the context's node. The PCI address maps to the GPU's identity
    (and so to its pod); NVLink5 XIDs 144-150 carry NVIDIA's decode of their subcode and status. The severity is
    the catalog's for every kind: an SXid's comes from the line's ``Fatal`` / ``Non-fatal`` word or, for the
    link-less lines that have none (``26006, SOE HALTED``), from the Fabric Manager guide's class."""
    disc = discriminator or ev.seq or ev.message
    if ev.kind == "sxid":  # severity: the catalog's, from the line's Fatal/Non-fatal word or the FM guide's class
        component = f"nvswitch{ev.details.get('switch', '?')}:{ev.pci}"
        return ctx.signal(source=SignalSource.KMSG, check="sxid", code=ev.code, healthy=False, at=observed_at,
                          component=component, message=ev.message, details={**ev.details, **(extra or {})},
                          discriminator=disc)
    details = {**ev.details, **(extra or {})}
    if ev.kind == "xid" and ev.code == "154":
        m = _RECOVERY.search(ev.message)
        if m:
            details["recovery_action"] = m.group("action").strip()
    if ev.kind == "xid" and ev.code in NVLINK5_XIDS:
        decoded = decode(ctx.catalog.nvlink5, ev.code, ev.message)
        if decoded is not None:
            details.update(decoded.details())
    return ctx.signal(source=SignalSource.KMSG, check=ev.kind, code=ev.code, healthy=False, at=observed_at,
                      gpu=ctx.gpu(pci=ev.pci) if ev.pci else None, message=ev.message, details=details,
                      discriminator=disc)


def line_signal(text: str, ctx: NodeContext, *, observed_at: Callable[[str], tuple[datetime, str]],
                discriminator: str, extra: dict[str, str] | None = None, line: str | None = None) -> Signal | None:
    """One line -> its signal (or None), learning PCI-to-UUID pairs on the way. ``observed_at`` gives the line's
    time and how it was found (``""``: not worth saying); a line that carries no time at all is marked
    ``details.time_source=none`` whatever it says, so a reader's now never passes for the kernel's time. Any
    failure of this one line (impossible address, date, or number; a value the contract refuses) is one
    ``BadLine``: the caller skips and counts it and goes on with the rest of its batch."""
    if "NVRM" not in text and "SXid" not in text:
        return None
    try:
        mapped = gpu_map_entry(text)
        if mapped is not None:
            if mapped[0] not in ctx.gpus_by_pci:
                ctx.register_gpus([GpuRef(uuid=mapped[1], pci_bus_id=mapped[0])])
            return None
        ev = parse_line(text)
        if ev is None:
            return None
        at, source = observed_at(text)  # source: "" or how the time was found, for details.time_source
        if not source and not has_time(line or text):  # no time in the line (``line``: the whole line of a record
            # glued to another, ``records``): ``at`` is the reader's now, and says so
            source = NO_TIME
        more = dict(extra or {})
        if source:
            more["time_source"] = source
        return to_signal(ev, ctx, observed_at=at, discriminator=discriminator, extra=more)
    except BadLine:
        raise
    except (ValueError, OverflowError, TypeError, IndexError, KeyError) as exc:
        raise BadLine(f"{type(exc).__name__}: {exc}"[:300]) from None


def line_signals(line: str, ctx: NodeContext, *, observed_at: Callable[[str], tuple[datetime, str]],
                 discriminator: str) -> tuple[list[Signal], list[BadLine]]:
    """Every record of one line (``records``: a record glued to the next is two) -> its signal, each at the whole
    line's time; the first keeps the line's ``discriminator`` (its id as before), the n-th adds ``#n``. A record
    that is a ``BadLine`` is returned with the others' signals, so the caller counts it and keeps the rest."""
    out: list[Signal] = []
    bad: list[BadLine] = []
    for i, text in enumerate(records(line)):
        try:
            sig = line_signal(text, ctx, observed_at=lambda _record: observed_at(line), line=line,
                              discriminator=discriminator + (f"#{i}" if i else ""))
        except BadLine as exc:
            bad.append(exc)
            continue
        if sig is not None:
            out.append(sig)
    return out, bad
