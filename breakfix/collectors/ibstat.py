"""``ibstat`` and ``ibstatus`` text -> the same ``PortSample``s the fabric source reads from sysfs.

``ibstat`` (infiniband-diags) prints one ``CA '<dev>'`` block per HCA with indented ``Port <n>:``
blocks (``State: Active``, ``Physical state: LinkUp``, ``Rate: 400``, ``Link layer: InfiniBand``);
``ibstatus`` prints one ``Infiniband device '<dev>' port <n> status:`` block per port with the sysfs
text (``state: 4: ACTIVE``, ``phys state: 5: LinkUp``, ``rate: 400 Gb/sec (4X NDR)``,
``link_layer: InfiniBand``). Both go through ``collectors.ibstate`` and then the fabric source's
own rules (``collectors.fabric.FabricRules``), so a port reads the same whichever way it was
captured. Pure: text in, ports out; a port block without a state is skipped and counted.
Used by ``breakfix signals ibstat``. Formats: infiniband-diags ``ibstat.c`` / ``ibstatus`` script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from breakfix.collectors.fabric import PortSample, port_sample
from breakfix.collectors.ibstate import PHYS_STATES, PORT_STATES, parse_state

_CA = re.compile(r"^CA '(?P<dev>[^']{1,64})'\s*$")
_PORT = re.compile(r"^\s+Port (?P<n>\d{1,3}):\s*$")
_IBSTATUS = re.compile(r"^Infiniband device '(?P<dev>[^']{1,64})' port (?P<n>\d{1,3}) status:\s*$")
_KV = re.compile(r"^\s+(?P<k>[A-Za-z_ ]{1,40}?):\s*(?P<v>.*?)\s*$")
MAX_PORTS = 4096


@dataclass
class IbstatRead:
    ports: list[PortSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def looks_like_ibstat(text: str) -> bool:
    head = text[:65536]
    return bool(re.search(r"^CA '[^']+'\s*$", head, re.M) or re.search(r"^Infiniband device '[^']+' port \d+ status:",
                                                                       head, re.M))


def parse_ibstat(text: str) -> IbstatRead:
    """Every port block of ``ibstat`` or ``ibstatus`` output, in order."""
    out = IbstatRead()
    dev = ""
    current: tuple[str, dict[str, str]] | None = None

    def close() -> None:
        if current is None:
            return
        name, kv = current
        state, phys = kv.get("state"), kv.get("physical state") or kv.get("phys state")
        if state is None or phys is None:
            out.skipped.append(f"{name}: no state")
            return
        rate = kv.get("rate", "")
        if rate.isdigit():
            rate = f"{rate} Gb/sec"
        if len(out.ports) < MAX_PORTS:
            out.ports.append(port_sample(name, parse_state(state, PORT_STATES), parse_state(phys, PHYS_STATES), rate,
                                         kv.get("link layer") or kv.get("link_layer") or "", {}))

    for line in text.splitlines():
        if m := _CA.match(line):
            close()
            current, dev = None, m.group("dev")
        elif (m := _PORT.match(line)) and dev:
            close()
            current = (f"{dev}/{m.group('n')}", {})
        elif m := _IBSTATUS.match(line):
            close()
            current = (f"{m.group('dev')}/{m.group('n')}", {})
            dev = ""
        elif current is not None and (m := _KV.match(line)):
            current[1].setdefault(m.group("k").strip().lower(), m.group("v"))
    close()
    return out
