"""Which tool wrote this text? So every offline reader can refuse the wrong input with a hint.

``sniff(text)`` looks at the head of an input (at most 64 KiB / 200 lines) and names its format:
``nvsmi`` (``nvidia-smi -q`` text or ``-q -x`` XML), ``ibstat`` (``ibstat`` / ``ibstatus``),
``nvsmi-table`` (plain ``nvidia-smi``: no health fields), ``prometheus`` (a ``/metrics`` page such as
dcgm-exporter's), ``signals`` (breakfix Signal JSONL),
``kmsg`` (a kernel log in any prefix the kmsg rules read, ``dmesg -r`` / ``-x`` and RFC 5424 included),
``binary`` or None. ``hint(fmt)`` is the command to use instead. Pure; used by ``breakfix.cli.cli_signals``.
"""

from __future__ import annotations

import re

from breakfix.collectors.ibstat import looks_like_ibstat
from breakfix.collectors.kmsg_follow import PREFIX
from breakfix.collectors.nvsmi import looks_like_nvsmi

HEAD = 65536
COMMANDS = {"kmsg": ("a kernel log", "breakfix signals kmsg FILE --node N"),
            "prometheus": ("a Prometheus /metrics page", "breakfix signals dcgm FILE --node N"),
            "nvsmi": ("nvidia-smi -q output", "breakfix signals nvsmi FILE --node N"),
            "ibstat": ("ibstat / ibstatus output", "breakfix signals ibstat FILE --node N"),
            "signals": ("breakfix Signal JSONL", "breakfix replay FILE"),
            "ib": ("an InfiniBand sysfs tree", "breakfix signals ib DIR --node N"),
            "nvsmi-table": ("nvidia-smi's summary table", "nvidia-smi -q > FILE; breakfix signals nvsmi FILE --node N")}
# A kernel-log line: a time in one of the forms the kmsg rules read (``kmsg_follow``), after an optional
# ``dmesg -r`` / syslog priority or ``dmesg -x`` facility:level (``kmsg_follow.PREFIX``), or a kernel/NVIDIA word.
_KERNEL = re.compile(
    rf"^{PREFIX}?(?:\d+,\d+,\d+,[^;]*;|\[\s*\d+\.\d+\]|\[\w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d \d{{4}}\]"
    r"|\[[A-Z][a-z]{2} ?[ \d]?\d \d\d:\d\d\]|\[\s*[+-]\d+\.\d+\]"  # dmesg -H: [Dec 2 10:37], [  +0.000004]
    r"|\w{3} [ \d]\d \d\d:\d\d:\d\d |\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d|\d{9,11}\.\d+ "
    r"|\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d |-- (?:Logs|Journal|No entries|Boot))|kernel: |NVRM|nvidia|SXid")
_PROM = re.compile(r"^(?:# (?:TYPE|HELP) \S+.*"
                   r"|[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?\s+(?:[-+]?(?:[\d.]|Inf|inf|NaN|nan))\S*(?:\s+-?\d+)?"
                   r"|[a-zA-Z_:][a-zA-Z0-9_:]*\{.*\}\s+.*)\s*$")


def sniff(text: str) -> str | None:
    head = text[:HEAD]
    if "\x00" in head:
        return "binary"
    if looks_like_nvsmi(head):
        return "nvsmi"
    if looks_like_ibstat(head):
        return "ibstat"
    if "NVIDIA-SMI" in head and "Driver Version" in head:
        return "nvsmi-table"
    lines = [x for x in head.splitlines()[:200] if x.strip()]
    if not lines:
        return None
    if lines[0].lstrip().startswith("{") and '"check"' in lines[0]:
        return "signals"
    body = [x for x in lines if not x.startswith("#") or _PROM.match(x)]  # plain comments say nothing
    prom = sum(1 for x in body if _PROM.match(x))
    if body and prom * 10 >= len(body) * 8 and any(not x.startswith("#") for x in body):
        return "prometheus"
    kernel = sum(1 for x in lines if _KERNEL.search(x))
    if kernel * 2 >= len(lines):
        return "kmsg"
    return None


def refusal(fmt: str | None, wanted: str) -> str:
    """One line: what the input is not, what it looks like, and what to run instead."""
    what = COMMANDS.get(wanted, (wanted, ""))[0]
    if fmt == "binary":
        return f"not {what}: binary data"
    if fmt is None:
        return f"not {what}: no line in the form it prints"
    name, command = COMMANDS[fmt]
    return f"not {what}: looks like {name}; use `{command}`"
