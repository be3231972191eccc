"""Follow the kernel log (``/dev/kmsg`` or a log file) without missing or replaying a line.

``KmsgFollower.read`` returns the lines that appeared since the last call, each with the
position just after it; the daemon commits a position (``commit``) only after the signals from
those lines were published or spooled, so a crash re-reads at most what was not yet safe.

- ``/dev/kmsg``: records carry a sequence number that restarts at boot; the stored position is
  ``(boot_id, seq)`` and records at or below it are skipped after a restart of the daemon. A
  new boot id (the node rebooted) starts from the oldest record still in the ring.
- a file (syslog, ``journalctl -k -f`` output, a copied log): the stored position is
  ``(inode, offset)``. Rotation by rename is followed: the old file is read to its end (found
  again by inode as ``<path>.1`` after a restart) before the new one is read from the start; a
  file truncated in place (copytruncate) is read again from the start.
Positions live in one small JSON file, written atomically. Line timestamps come from the line
(raw kmsg microseconds or ``[seconds]`` since boot, ISO, ``dmesg -T``, syslog, journalctl ``short-unix`` and
``short-full``, ``dmesg -d`` / journalctl ``short-delta`` stamps with their ``<delta>``, the ``[Dec 2 10:37]``
minute stamps of ``dmesg -H``; behind a ``dmesg -r`` / RFC 5424 priority, a ``dmesg -x`` facility:level or the
``node: kern: warning: [ISO]:`` of ``talosctl dmesg``) so a line read twice yields the same signal id; a line with
none says so (``NO_TIME``, ``has_time``). The ``[  +0.000004]`` lines of ``dmesg -H`` carry only the seconds since
the line before: ``HumanClock``, fed every line in order, places them after the last minute stamp (``DELTA``).
The kmsg source (``collectors.kmsg_source``) drives this.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import BinaryIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

_RAW = re.compile(r"^\d+,(?P<seq>\d+),(?P<usec>\d+),[^;]*;")
_FACILITY = r"(?:kern|user|mail|daemon|auth|syslog|lpr|news|uucp|cron|authpriv|ftp|res[0-3]|local[0-7])"
# What a writer puts before the time: the syslog priority of ``dmesg -r`` (``<4>[ts]``), RFC 3164 (``<4>Aug 30``)
# and RFC 5424 (``<4>1 ISO host kernel - - - msg``), the ``facility:level : `` of ``dmesg -x`` (util-linux
# prints ``%-6s:%-6s: ``: ``kern  :warn  : [ts]``), and ``talosctl dmesg`` (Talos machined prints
# ``%s: %7s: [%s]: %s``, facility, priority, RFC 3339 nanosecond time, message; talosctl puts the node first:
# ``192.168.11.119: kern: warning: [2026-04-22T21:30:51.494604223Z]: NVRM: Xid ...``, as pasted in
# NVIDIA/open-gpu-kernel-modules issue 1118), up to the ``[`` before its ISO time. Shared with ``collectors.sniff``.
PREFIX = (rf"(?:<\d{{1,3}}>(?:1 )?|{_FACILITY} *:(?:emerg|alert|crit|err|warn|notice|info|debug) *: "
          rf"|(?:\S+: )?{_FACILITY}: *(?:emerg|alert|crit|err|warning|notice|info|debug): \[(?=\d{{4}}-))")
_PREFIX = re.compile(PREFIX)
# ``[seconds]`` since boot; ``dmesg -d`` and journalctl ``-o short-delta`` add the delta to the record before:
# ``[%5ld.%06ld <%12.06f>]`` (util-linux dmesg.c print_record, DMESG_TIMEFTM_TIME_DELTA).
_MONO = re.compile(r"^(?:\S+\s+){0,5}?\[\s*(?P<mono>\d+\.\d+)(?: <\s*-?\d+\.\d+>)?\]")
_ISO = re.compile(r"^(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)")
# ``dmesg -T`` (``[%a %b %e %H:%M:%S %Y]``); ``dmesg -T -d`` adds `` <delta>`` (DMESG_TIMEFTM_CTIME_DELTA).
_DMESG_T = re.compile(r"^\[(?P<t>\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})(?: <\s*-?\d+\.\d+>)?\]")
# ``dmesg -H`` / ``--time-format reltime`` (util-linux dmesg.c print_record, DMESG_TIMEFTM_RELTIME): the first record
# of a minute gets ``[%b%e %H:%M]`` (short_ctime: ``[Dec 2 10:37]``, ``[Mar24 11:26]``), the writer's local time
# with no year and no seconds; every other record ``[  %+8.06f]`` / ``[ %+9.06f]`` (``[  +0.000004]``), the seconds
# since the record printed before it (record_count_delta), which no line alone can place: ``HumanClock``.
_HUMAN = re.compile(r"^\[(?P<mon>[A-Z][a-z]{2}) ?(?P<day>[ \d]?\d) (?P<hm>\d\d:\d\d)\]")
_HUMAN_DELTA = re.compile(r"^\[\s*(?P<delta>[+-]\d+\.\d+)\]")
_SYSLOG = re.compile(r"^(?P<t>\w{3} [ \d]\d \d\d:\d\d:\d\d)(?P<frac>\.\d{1,9})? ")
# journalctl -o short-unix (``1725018189.123456 host kernel: ...``): seconds since the epoch, UTC by definition.
_EPOCH = re.compile(r"^(?P<s>\d{9,11})\.(?P<frac>\d{1,9}) ")
# journalctl -o short-full (``Fri 2024-08-30 11:43:09 UTC host kernel: ...``): the writer's wall clock and its zone
# as ``%Z`` prints it (an abbreviation, or ``+03`` for a zone without one).
_FULL = re.compile(r"^\w{3} (?P<t>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?P<frac>\.\d{1,9})? "
                   r"(?P<zone>[+-]\d\d(?::?\d\d)?|[A-Za-z]{1,6}) ")
_TIMES = (_ISO, _DMESG_T, _SYSLOG, _EPOCH, _FULL, _HUMAN, _MONO)


def read_boot_id(path: Path = BOOT_ID) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown-boot"


def boot_time(stat: Path = Path("/proc/stat")) -> datetime:
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("btime "):
                return datetime.fromtimestamp(int(line.split()[1]), UTC)
    except OSError:
        pass
    return datetime.fromtimestamp(0, UTC)


LOCAL = None  # ``log_zone("local")``: this machine's zone rules (TZ, /etc/localtime), applied per date


def log_zone(name: str) -> tzinfo | None:
    """The zone a log's wall-clock times are in: ``UTC``, ``local`` (this machine's rules, daylight saving
    included; in a container that is the container's zone, usually UTC) or an IANA name such as
    ``Europe/Berlin``. Raises ``ValueError`` for a name the zone database does not know."""
    if name == "UTC":
        return UTC
    if name == "local":
        return LOCAL
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, UnicodeError) as exc:  # OSError: a directory ("Europe")
        raise ValueError(f"unknown time zone {name!r}: use UTC, local, or an IANA name such as Europe/Berlin") from exc


def _wall(t: datetime, tz: tzinfo | None) -> datetime:
    """A naive wall-clock time read in ``tz`` (None: this machine's rules), as UTC. The zone's daylight-saving
    rules apply per date; a time in the repeated autumn hour is read as its first occurrence (``fold=0``) and
    one in the skipped spring hour with the offset before the change."""
    if tz is UTC:
        return t.replace(tzinfo=UTC)
    return t.astimezone(UTC) if tz is None else t.replace(tzinfo=tz).astimezone(UTC)


def _wall_now(now: datetime, tz: tzinfo | None) -> datetime:
    """``now`` on the log's wall clock, naive: the year a syslog line (which has none) belongs to."""
    return (now.astimezone(tz) if tz is not None else now.astimezone()).replace(tzinfo=None)


# Time sources of a line (``details.time_source`` on offline signals): the line carries wall-clock time;
# the line carries seconds since boot, anchored to a boot time; the line carries no time at all; the line carries
# only its seconds since the line before (``dmesg -H``), placed after the last minute stamp by ``HumanClock``.
ABSOLUTE, RELATIVE, NO_TIME, DELTA = "absolute", "relative", "none", "delta"


def _body(line: str) -> str:
    """The line from its time on: NUL bytes before it skipped (a syslog file whose last writes were lost in a crash
    holds a run of them, and the next boot's first line follows it), and a priority / facility:level prefix."""
    line = line.lstrip("\x00")
    if _RAW.match(line):
        return line
    if p := _PREFIX.match(line):
        return line[p.end():]
    return line


def line_time(line: str, *, booted: datetime, now: datetime, tz: tzinfo | None = UTC) -> datetime:
    """When the kernel wrote ``line``, from the line itself; ``now`` when it says nothing.

    Raises ``ValueError`` / ``OverflowError`` for an impossible date or a timestamp out of range."""
    return line_time_source(line, booted=booted, now=now, tz=tz)[0]


def line_time_source(line: str, *, booted: datetime, now: datetime,
                     tz: tzinfo | None = UTC) -> tuple[datetime, str]:
    """``line_time`` and where it came from: ``ABSOLUTE``, ``RELATIVE`` (seconds since ``booted``) or ``NO_TIME``.

    A ``dmesg -r`` / syslog priority (``<4>``, RFC 5424 ``<4>1``), a ``dmesg -x`` facility:level or a ``talosctl
    dmesg`` node and facility/priority before the time is skipped. Syslog, ``dmesg -T``, ``dmesg -H`` minute stamps,
    ISO times without an offset and journalctl ``short-full`` times with a zone abbreviation other than UTC are the
    writer's wall clock: they are read in ``tz`` (``log_zone``; UTC unless the log's node keeps local time) and
    returned in UTC; ``short-unix`` seconds are UTC. A stamp without a year (syslog, ``dmesg -H``) takes the latest
    year that puts it at most a day after ``now``. A ``dmesg -H`` delta line is ``NO_TIME`` here: ``HumanClock``."""
    line = _body(line)
    if m := _RAW.match(line):
        return booted + timedelta(microseconds=int(m.group("usec"))), RELATIVE
    if m := _ISO.match(line):
        iso = m.group("iso").replace(",", ".")
        if re.search(r"[+-]\d{4}$", iso):
            iso = iso[:-2] + ":" + iso[-2:]
        t = datetime.fromisoformat(iso)
        return (t.astimezone(UTC) if t.tzinfo else _wall(t, tz)), ABSOLUTE
    if m := _DMESG_T.match(line):
        return _wall(datetime.strptime(m.group("t"), "%a %b %d %H:%M:%S %Y"), tz), ABSOLUTE
    if m := _SYSLOG.match(line):
        naive = _syslog_year(m.group("t"), _wall_now(now, tz))
        if m.group("frac"):  # journalctl -o short-precise
            naive += timedelta(microseconds=int(m.group("frac")[1:7].ljust(6, "0")))
        return _wall(naive, tz), ABSOLUTE
    if m := _EPOCH.match(line):
        return datetime.fromtimestamp(int(m.group("s")), UTC) + _micro(m.group("frac")), ABSOLUTE
    if m := _FULL.match(line):
        t = datetime.fromisoformat(m.group("t")) + _micro(m.group("frac"))
        return _zoned(t, m.group("zone"), tz), ABSOLUTE
    if m := _HUMAN.match(line):
        return _human_minute(m, now, tz), ABSOLUTE
    if m := _MONO.match(line):
        return booted + timedelta(seconds=float(m.group("mono"))), RELATIVE
    return now, NO_TIME


def has_time(line: str) -> bool:
    """Whether ``line`` carries a time of its own in a form ``line_time_source`` reads: False exactly when it
    would answer ``NO_TIME``. Only the forms are matched, no date is parsed."""
    line = _body(line)
    return bool(_RAW.match(line)) or any(r.match(line) for r in _TIMES)


def _human_minute(m: re.Match[str], now: datetime, tz: tzinfo | None) -> datetime:
    """A ``dmesg -H`` minute stamp (``_HUMAN``) as UTC, at second 0 of its minute, in the year a syslog stamp would
    take. Raises ``ValueError`` for an impossible date."""
    stamp = f"{m.group('mon')} {int(m.group('day')):2d} {m.group('hm')}:00"
    return _wall(_syslog_year(stamp, _wall_now(now, tz)), tz)


class HumanClock:
    """The times of a ``dmesg -H`` capture, which its delta lines cannot give alone: a ``[Dec 2 10:37]`` minute
    stamp sets the clock, each ``[  +0.000004]`` line after it moves the clock on by its seconds since the record
    before (util-linux ``record_count_delta``), and any other stamped line stops it. Feed it every line of the log
    in order (``step``), not only the NVIDIA ones: the deltas of the lines between count. The minute stamp has no
    seconds, so a placed time is the earliest the line can have been written (within that minute when nothing was
    filtered out of the capture)."""

    def __init__(self, *, tz: tzinfo | None = UTC) -> None:
        self.tz = tz  # the zone of the capture's wall clock (``log_zone``)
        self.last: datetime | None = None

    def step(self, line: str, *, now: datetime) -> datetime | None:
        """Take the next line; its time when it is a delta line the clock can place (then ``DELTA`` is its time
        source), else None (read the line's own time with ``line_time_source``). Never raises."""
        body = _body(line)
        if not body.startswith("["):
            return None  # an unstamped line (a continuation, a cut line) neither places nor stops the clock
        if m := _HUMAN_DELTA.match(body):
            if self.last is None:
                return None
            try:
                self.last += timedelta(seconds=float(m.group("delta")))
            except OverflowError:
                self.last = None
            return self.last
        if m := _HUMAN.match(body):
            try:
                self.last = _human_minute(m, now, self.tz)
            except (ValueError, OverflowError):
                self.last = None
            return None
        if _MONO.match(body) or _DMESG_T.match(body):
            self.last = None
        return None


def _micro(frac: str | None) -> timedelta:
    return timedelta(microseconds=int(frac[:6].ljust(6, "0"))) if frac else timedelta(0)


def _zoned(t: datetime, zone: str, tz: tzinfo | None) -> datetime:
    """A short-full wall-clock time with its ``%Z`` zone, as UTC: ``UTC``/``GMT`` and numeric offsets say it
    all; an abbreviation (``CEST``) names no unique zone, so it is read in the log's zone ``tz`` like the other
    wall-clock stamps."""
    if zone in ("UTC", "GMT", "UT", "Z"):
        return t.replace(tzinfo=UTC)
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "").ljust(4, "0")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        return t.replace(tzinfo=UTC) - (offset if zone[0] == "+" else -offset)
    return _wall(t, tz)


def _syslog_year(stamp: str, here: datetime) -> datetime:
    """A syslog stamp (no year) in the latest year that puts it at most a day after ``here``, the log's wall
    clock now; 29 February goes to the latest leap year that does. Raises ``ValueError`` for an impossible date."""
    parsed = datetime.strptime(f"2000 {stamp}", "%Y %b %d %H:%M:%S")  # 2000 is a leap year: 29 Feb parses
    for year in range(here.year, here.year - 9, -1):
        try:
            t = parsed.replace(year=year)
        except ValueError:  # 29 February outside a leap year
            continue
        if t <= here + timedelta(days=1):
            return t
    raise ValueError(f"no year fits the syslog time {stamp!r}")


def relative_seconds(line: str) -> float | None:
    """The seconds-since-boot stamp of a line (``[1234.5]`` or a raw kmsg record), if it has one."""
    line = _body(line)
    if m := _RAW.match(line):
        return int(m.group("usec")) / 1e6
    if m := _MONO.match(line):
        return float(m.group("mono"))
    return None


@dataclass
class Position:
    boot_id: str = ""
    seq: int = -1          # /dev/kmsg
    inode: int = 0         # files
    offset: int = 0


class PositionStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Position:
        try:
            return Position(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return Position()

    def save(self, pos: Position) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(pos)))
        os.replace(tmp, self.path)


@dataclass(frozen=True, slots=True)
class Line:
    text: str
    position: Position
    key: str  # stable identity of this line: boot id + seq, or inode + offset


class KmsgFollower:
    def __init__(self, path: Path, store: PositionStore, *, boot_id: str | None = None,
                 max_lines: int = 5000, from_start: bool = False) -> None:
        self.path = path
        self.store = store
        self.boot_id = boot_id or read_boot_id()
        self.dev = str(path).startswith("/dev/")
        self.max_lines = max_lines
        self.pos = store.load()
        self.from_start = from_start  # a file never followed before: read its history too?
        self._file: BinaryIO | None = None
        self._fd: int | None = None
        self._inode = 0
        self._offset = 0
        self._buf = b""
        self._rotated_tail: Path | None = None
        if self.dev:
            if self.pos.boot_id != self.boot_id:
                self.pos = Position(boot_id=self.boot_id)
        else:
            self._resume_file()

    # -- files -------------------------------------------------------------------------------------
    def _resume_file(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if self.pos.inode == st.st_ino and self.pos.offset <= st.st_size:
            self._open(self.path, st.st_ino, self.pos.offset)
            return
        rotated = self.path.with_name(self.path.name + ".1")
        if self.pos.inode and rotated.exists() and rotated.stat().st_ino == self.pos.inode:
            self._open(rotated, self.pos.inode, self.pos.offset)  # finish what rotated away while we were down
            self._rotated_tail = rotated
            return
        # a new file since our last position: all of it is new; never followed before: history is old news
        self._open(self.path, st.st_ino, 0 if self.pos.inode or self.from_start else st.st_size)

    def _open(self, path: Path, inode: int, offset: int) -> None:
        fh = path.open("rb")
        fh.seek(offset)
        self._file, self._inode, self._offset, self._buf = fh, inode, offset, b""

    def _read_file(self) -> list[Line]:
        out: list[Line] = []
        if self._file is None:
            self._resume_file()
            if self._file is None:
                return out
        while len(out) < self.max_lines:
            got, eof = self._drain_open()
            out.extend(got)
            if not eof:
                continue
            try:
                st = self.path.stat()
            except FileNotFoundError:
                break
            if self._rotated_tail is not None or st.st_ino != self._inode:
                self._close_file()
                self._rotated_tail = None
                self._open(self.path, st.st_ino, 0)
                continue
            if st.st_size < self._offset:  # truncated in place
                self._close_file()
                self._open(self.path, st.st_ino, 0)
                continue
            break
        return out

    def _drain_open(self) -> tuple[list[Line], bool]:
        """Lines from the next chunk of the open file, and whether it was at its end."""
        out: list[Line] = []
        assert self._file is not None
        chunk = self._file.read(1 << 20)
        if not chunk:
            return out, True
        data = self._buf + chunk
        start = self._offset - len(self._buf)
        pieces = data.split(b"\n")
        self._buf = pieces.pop()
        for piece in pieces:
            end = start + len(piece) + 1
            out.append(Line(piece.decode("utf-8", errors="replace"),
                            Position(boot_id=self.boot_id, inode=self._inode, offset=end), f"{self._inode}:{start}"))
            start = end
        self._offset += len(chunk)
        return out, False

    # -- /dev/kmsg ---------------------------------------------------------------------------------
    def _read_dev(self) -> list[Line]:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        out: list[Line] = []
        while len(out) < self.max_lines:
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten before we read them: go on
                    continue
                raise
            text = rec.decode("utf-8", errors="replace").split("\n", 1)[0]
            m = _RAW.match(text)
            seq = int(m.group("seq")) if m else self.pos.seq + 1
            if seq <= self.pos.seq:
                continue
            out.append(Line(text, Position(boot_id=self.boot_id, seq=seq), f"{self.boot_id}:{seq}"))
        return out

    # -- API ---------------------------------------------------------------------------------------
    def read(self) -> list[Line]:
        """Lines written since the last read (at most ``max_lines``); never blocks."""
        lines = self._read_dev() if self.dev else self._read_file()
        if lines and self.dev:
            self.pos = lines[-1].position
        return lines

    def commit(self, pos: Position) -> None:
        """Remember ``pos`` durably: everything up to it has been published or spooled."""
        self.pos = pos
        self.store.save(pos)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
