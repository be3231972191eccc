"""Offline sources for SREs and tests: ``breakfix signals kmsg|dcgm|ib|ibstat|nvsmi`` print one Signal JSON per line.

Each reader takes what an SRE has at hand (a copied dmesg, a saved ``/metrics`` page, a sysfs tree,
``ibstat`` output, an ``nvidia-smi -q`` dump) and runs the live sources' own rules over it. Input in the
wrong format is refused with one line and exit 2 naming the command that reads it
(``collectors.sniff``); exit 0 with no output means the input was of the right format and healthy.
Bad lines or samples are skipped, counted and reported on stderr; the rest is printed.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from breakfix.cli.cliutil import err, fail, load, signals_app
from breakfix.schemas.datafile import DataFileError, read_text

MAX_INPUT = 256 * 1024 * 1024
_ANSI = re.compile(r"\x1b\[[0-9;?]{0,32}[A-Za-z]")
Node = Annotated[str, typer.Option(help="Node the input came from.")]
Cluster = Annotated[str, typer.Option(help="Cluster name.")]
AllStates = Annotated[bool, typer.Option("--all", help="Print healthy readings too.")]


def _read(file: Path, wanted: str, max_bytes: int = MAX_INPUT, *, lenient: bool = False) -> str:
    """The input's text, refused (exit 2, one line) when it is unreadable or not in the ``wanted`` format.
    ``lenient`` (kernel logs): bytes that are not UTF-8 are replaced and warned about, not fatal."""
    from breakfix.collectors.sniff import refusal, sniff

    warning = ""
    try:
        text = read_text(file, max_bytes)
    except DataFileError as exc:
        if not (lenient and ("not UTF-8" in exc.message or "NUL byte" in exc.message)):
            raise fail(str(exc)) from None
        try:
            text = read_text(file, max_bytes, lenient=True)
        except DataFileError as again:  # mostly NULs (/dev/zero, a core file): binary after all
            raise fail(str(again)) from None
        warning = (f"warning: {file}: NUL bytes dropped (the runs an unclean shutdown leaves in a log)"
                   if "NUL byte" in exc.message else f"warning: {exc}; undecodable bytes read as U+FFFD")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")  # a BOM and CRLF from files copied through Windows
    if "\x1b[" in text:  # `dmesg --color=always`, a terminal capture: colour codes are not text
        text = _ANSI.sub("", text)
    if not text.strip():
        raise fail(f"{file}: empty, not {wanted} output")
    fmt = sniff(text)
    if fmt != wanted:
        raise fail(f"{file}: {refusal(fmt, wanted)}")
    if warning:
        err.print(warning, highlight=False, markup=False)
    return text


@signals_app.callback()
def _signals_logging() -> None:
    """stdout is the signals, one JSON per line: the sources' own warnings (a skipped sample, an odd port) go to
    stderr (``cli.logs``), never between them."""
    from breakfix.cli.logs import configure

    configure(json=False, level="WARNING")


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _ctx(cluster: str, node: str) -> Any:
    from breakfix.collectors.context import NodeContext
    from breakfix.schemas.catalog import load_catalog

    return NodeContext(cluster=cluster, node=node, catalog=load(load_catalog))


def _print_signals(signals: list[Any]) -> None:
    for sig in signals:
        sys.stdout.write(sig.model_dump_json(by_alias=True) + "\n")


def _skipped(file: Path, what: str, reasons: list[str], count: int | None = None) -> None:
    n = len(reasons) if count is None else count
    if n and reasons:
        more = f" (+{n - 1} more)" if n > 1 else ""
        err.print(f"skipped {n} bad {what}{'s' if n != 1 else ''} in {file}: {reasons[0]}{more}", highlight=False,
                  markup=False)


def _rfc3339(value: str, flag: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"{flag}: {value!r} is not an RFC 3339 time (e.g. 2025-03-04T09:12:41Z)") from None
    if t.tzinfo is None:
        raise fail(f"{flag}: {value!r} needs a timezone (Z or +hh:mm)")
    return t.astimezone(UTC)


def _anchor(boot_time: str | None, reference: str | None) -> datetime | None:
    if boot_time and reference:
        raise fail("give --boot-time or --reference, not both")
    if boot_time:
        return _rfc3339(boot_time, "--boot-time")
    if reference:
        stamp, sep, when = reference.partition("=")
        try:
            seconds = float(stamp.strip().strip("[]"))
        except ValueError:
            seconds = -1.0
        if not sep or not (0 <= seconds < 1e10):
            raise fail(f"--reference: {reference!r} is not LINE_TIMESTAMP=RFC3339 (e.g. 1234.5=2025-03-04T09:12:41Z)")
        return _rfc3339(when, "--reference") - timedelta(seconds=seconds)
    return None


@signals_app.command("kmsg")
def signals_kmsg(
    file: Annotated[Path, typer.Argument(help="A kernel log: dmesg, dmesg -T, syslog, journalctl -k, /dev/kmsg dump.")],
    node: Node,
    cluster: Cluster = "default",
    boot_time: Annotated[str | None, typer.Option(help="Boot time of the node the log came from (RFC 3339): "
                                                       "anchors [seconds-since-boot] stamps.")] = None,
    reference: Annotated[str | None, typer.Option(help="LINE_TIMESTAMP=RFC3339: one line's [seconds] stamp and the "
                                                       "wall-clock time it was written; anchors the others.")] = None,
    timezone: Annotated[str, typer.Option(help="Zone of the log's wall-clock times (syslog, dmesg -T, ISO without "
                                               "an offset): UTC, local, or an IANA name such as Europe/Berlin.")]
    = "UTC",
) -> None:
    """Parse NVIDIA XID, SXid and fallen-off-the-bus lines from a copied kernel log."""
    from breakfix.collectors.kmsg import line_signals
    from breakfix.collectors.kmsg_follow import DELTA, RELATIVE, HumanClock, line_time_source, log_zone

    try:
        tz = log_zone(timezone)
    except ValueError as exc:
        raise fail(f"--timezone: {exc}") from None
    anchored = _anchor(boot_time, reference)
    text = _read(file, "kmsg", lenient=True)
    ctx = _ctx(cluster, node)
    now = datetime.now(UTC)
    booted = anchored or now  # unanchored: relative stamps are counted from now, and marked
    relative = 0
    bad: list[str] = []
    human = HumanClock(tz=tz)  # dmesg -H: a [  +0.000004] line is placed after the [Dec 2 10:37] stamp before it
    placed: datetime | None = None

    def at(line: str) -> tuple[datetime, str]:
        nonlocal relative
        if placed is not None:
            return placed, DELTA
        t, source = line_time_source(line, booted=booted, now=now, tz=tz)
        if source == RELATIVE and anchored is None:
            relative += 1
            return t, RELATIVE
        return t, ""

    write = sys.stdout.write
    for lineno, line in enumerate(text.splitlines(), start=1):
        placed = human.step(line, now=now)  # every line: the deltas of the lines between count
        if "NVRM" not in line and "SXid" not in line:
            continue
        sigs, refused = line_signals(line, ctx, observed_at=at, discriminator=f"{file.name}:{lineno}")
        bad.extend(f"line {lineno}: {exc}" for exc in refused)
        for sig in sigs:
            write(sig.model_dump_json(by_alias=True) + "\n")
    if relative:
        err.print(f"[yellow]warning:[/yellow] {relative} line(s) carry only seconds since boot; their times are "
                  "not real (details.time_source=relative). Give --boot-time or --reference.", highlight=False)
    _skipped(file, "line", bad)


@signals_app.command("dcgm")
def signals_dcgm(
    file: Annotated[Path, typer.Argument(help="A saved dcgm-exporter /metrics page.")],
    node: Node,
    cluster: Cluster = "default",
    all_states: AllStates = False,
) -> None:
    """Health signals from one dcgm-exporter scrape (faults, and every non-zero last XID)."""
    from breakfix.collectors.dcgm import DcgmRules

    text = _read(file, "prometheus")
    if "DCGM_" not in text:
        raise fail(f"{file}: a Prometheus page without one DCGM_ metric: not dcgm-exporter's /metrics")
    rules = DcgmRules(_ctx(cluster, node))
    try:
        cycle = rules.apply(text, datetime.now(UTC), 0.0, baseline_xids=False)
    except ValueError as exc:
        raise fail(f"{file}: {_one_line(str(exc))}") from None
    _print_signals([s for s in cycle.states if all_states or not s.healthy] + cycle.events)
    _skipped(file, "sample", rules.reasons, rules.skipped)


def _fabric_thresholds(expected_rate: float | None, ethernet_rate: float | None, skip_ethernet: bool,
                       limits: list[str] | None = None) -> Any:
    from breakfix.collectors.fabric import DEFAULT_TOTALS, TOTAL_COUNTERS, FabricThresholds

    for name, v in (("--expected-rate", expected_rate), ("--ethernet-rate", ethernet_rate)):
        if v is not None and not (0 < v < 1e6):
            raise fail(f"{name}: must be a positive rate in Gb/sec, not {v}")
    totals = dict(DEFAULT_TOTALS)
    for item in limits or []:
        name, _, n = item.partition("=")
        if name not in TOTAL_COUNTERS or not n.isdigit() or not 0 < int(n) < 2**32:
            raise fail(f"--counter-limit: {item!r} is not COUNTER=N with COUNTER one of {', '.join(TOTAL_COUNTERS)}")
        totals[name] = int(n)
    return FabricThresholds(expected_rate_gbps=expected_rate, expected_ethernet_rate_gbps=ethernet_rate,
                            skip_ethernet=skip_ethernet, single_reading=True, totals=tuple(totals.items()))


ExpectedRate = Annotated[float | None, typer.Option(help="Expected InfiniBand port rate in Gb/sec.")]
EthernetRate = Annotated[float | None, typer.Option(help="Expected rate of Ethernet (RoCE) ports in Gb/sec "
                                                         "(default: the port's own best).")]
SkipEthernet = Annotated[bool, typer.Option("--skip-ethernet", help="Leave Ethernet (RoCE) ports out.")]
CounterLimit = Annotated[list[str] | None, typer.Option(
    help="COUNTER=N: limit for a counter read once (link_downed 1, symbol_error 1000, port_rcv_errors 1000).")]


@signals_app.command("ib")
def signals_ib(
    sysfs: Annotated[Path, typer.Argument(help="A /sys/class/infiniband tree (live or copied).")],
    node: Node,
    cluster: Cluster = "default",
    expected_rate: ExpectedRate = None,
    ethernet_rate: EthernetRate = None,
    skip_ethernet: SkipEthernet = False,
    counter_limit: CounterLimit = None,
    all_states: AllStates = False,
) -> None:
    """Link state, rate and error counters of every port (one reading: counters against their limits)."""
    from breakfix.collectors.fabric import FabricRules, read_ports
    from breakfix.collectors.ibstat import looks_like_ibstat

    if not sysfs.is_dir():
        hint = ""
        if sysfs.is_file():
            try:
                if looks_like_ibstat(read_text(sysfs, 1 << 20)):
                    hint = "; looks like ibstat output: use `breakfix signals ibstat FILE --node N`"
            except DataFileError:
                pass
        raise fail(f"{sysfs}: not a directory{hint}")
    th = _fabric_thresholds(expected_rate, ethernet_rate, skip_ethernet, counter_limit)
    skipped: list[str] = []
    ports = read_ports(sysfs, skipped)
    if not ports:
        hint = "expected <device>/ports/<n>/state"
        for f in sorted(p for p in sysfs.iterdir() if p.is_file())[:20]:
            try:
                if looks_like_ibstat(read_text(f, 1 << 20)):
                    hint = f"{f.name} looks like ibstat output: use `breakfix signals ibstat FILE --node N`"
                    break
            except DataFileError:
                continue
        raise fail(f"{sysfs}: no InfiniBand ports ({hint})")
    cycle = FabricRules(_ctx(cluster, node), th).apply(ports, datetime.now(UTC), 0.0)
    _print_signals([s for s in cycle.states if all_states or not s.healthy])
    _skipped(sysfs, "file", skipped)


@signals_app.command("ibstat")
def signals_ibstat(
    file: Annotated[Path, typer.Argument(help="Saved `ibstat` or `ibstatus` output.")],
    node: Node,
    cluster: Cluster = "default",
    expected_rate: ExpectedRate = None,
    ethernet_rate: EthernetRate = None,
    skip_ethernet: SkipEthernet = False,
    all_states: AllStates = False,
) -> None:
    """Port state and rate from ibstat / ibstatus text, by the fabric source's rules."""
    from breakfix.collectors.fabric import FabricRules
    from breakfix.collectors.ibstat import parse_ibstat

    th = _fabric_thresholds(expected_rate, ethernet_rate, skip_ethernet)
    read = parse_ibstat(_read(file, "ibstat"))
    cycle = FabricRules(_ctx(cluster, node), th).apply(read.ports, datetime.now(UTC), 0.0)
    _print_signals([s for s in cycle.states if all_states or not s.healthy])
    _skipped(file, "port block", read.skipped)


@signals_app.command("nvsmi")
def signals_nvsmi(
    file: Annotated[Path, typer.Argument(help="Saved `nvidia-smi -q` text or `nvidia-smi -q -x` XML.")],
    node: Node,
    cluster: Cluster = "default",
    expected_gpus: Annotated[int | None, typer.Option(min=0, max=4096, help="GPUs the node should have.")] = None,
    pcie_replay_limit: Annotated[int, typer.Option(min=1, max=2**31, help="PCIe replays since reset that count "
                                                                           "as a fault.")] = 1000,
    all_states: AllStates = False,
) -> None:
    """GPU health from an nvidia-smi dump: ECC, row remaps, retired pages, clocks events, PCIe replays, fabric."""
    from breakfix.collectors.nvsmi import NvsmiFormatError, NvsmiThresholds, nvsmi_signals, parse_nvsmi

    try:
        head = read_text(file, 4096)
    except DataFileError:
        head = ""
    if head.strip().startswith("No devices were found"):
        raise fail(f"{file}: nvidia-smi found no GPU on that node (\"No devices were found\"): check the driver and "
                   "`lspci | grep -i nvidia`")
    text = _read(file, "nvsmi")
    try:
        read = parse_nvsmi(text)
    except NvsmiFormatError as exc:
        raise fail(f"{file}: {_one_line(str(exc))}") from None
    if not read.gpus and read.attached != 0:
        raise fail(f"{file}: nvidia-smi output with no GPU section")
    th = NvsmiThresholds(pcie_replay_total=pcie_replay_limit, expected_gpus=expected_gpus)
    signals = nvsmi_signals(read, _ctx(cluster, node), datetime.now(UTC), th)
    _print_signals([s for s in signals if all_states or not s.healthy])
    n = len(read.gpus)
    note = "" if read.attached in (None, n) else f" (the dump says {read.attached} attached: truncated?)"
    err.print(f"{file}: {n} GPU{'s' if n != 1 else ''} read{note}", highlight=False, markup=False)
