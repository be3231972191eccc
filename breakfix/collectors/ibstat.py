"""``ibstat`` and ``ibstatus`` text -> the same ``PortSample``s the fabric source reads from sysfs.

``ibstat`` (infiniband-diags ``ibstat.c``) prints one ``CA '<dev>'`` block per HCA (``Switch``, ``Router``,
``iWARP RNIC`` for other node types) with indented ``Port <n>:`` blocks (``State: Active``, ``Physical
state: LinkUp``, ``Rate: 400``, ``Link layer: InfiniBand``); ``ibstat <dev> <port>`` prints ``CA: '<dev>'``
and that one port's block without indentation (``port_dump(port, alone=1)``). ``Rate`` is ``%d``, ``2.5``
for 1X SDR, and ``%d (FDR10)`` for FDR10 links. When a device listed by umad cannot be read, ibstat stops
with ``ibpanic: [pid] main: stat of IB device '<dev>' failed: <errno text>``: the adapter vanished while
it was being read. ``ibstatus`` (a shell script) prints one ``Infiniband device '<dev>' port <n> status:``
block per port with the sysfs text (``state: 4: ACTIVE``, ``phys state: 5: LinkUp``, ``rate: 400 Gb/sec
(4X NDR)``, ``link_layer: InfiniBand``; ``unknown`` for a file it could not read) and stops with ``Fatal
error:  device '<dev>': sys files not found (...)`` for a device whose ``ports`` directory is gone.

Both go through ``collectors.ibstate`` and then the fabric source's own rules
(``collectors.fabric.FabricRules``), so a port reads the same whichever way it was captured; a vanished
adapter is a ``PortSample`` with ``missing`` set and the device as its ``port`` (its port numbers are not
printed), which the rules judge as ``ib.link_down`` in single readings. Pure: text in, ports out; a port
block without a state is skipped and counted, and so is an ``ibpanic`` that names no device (ibstat could
not list the devices at all). Used by ``breakfix signals ibstat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from breakfix.collectors.fabric import PortSample, missing_port, port_sample
from breakfix.collectors.ibstate import PHYS_STATES, PORT_STATES, parse_state

_NODE = r"(?:CA|Switch|Router|iWARP RNIC|\?\?\?)"  # ibstat.c node_type_str
_CA = re.compile(rf"^{_NODE}(?P<alone>:)? '(?P<dev>[^']{{1,64}})'\s*$")
_PORT = re.compile(r"^(?P<indent>\s*)Port (?P<n>\d{1,3}):\s*$", re.ASCII)
_IBSTATUS = re.compile(r"^Infiniband device '(?P<dev>[^']{1,64})' port (?P<n>\d{1,3}) status:\s*$", re.ASCII)
_KV = re.compile(r"^(?P<indent>\s*)(?P<k>[A-Za-z_ ]{1,40}?):\s*(?P<v>.*?)\s*$")
# ibstat: "ibpanic: [1400444] main: stat of IB device 'mlx5_8' failed: No such file or directory"
_IBPANIC = re.compile(r"^ibpanic: (?P<what>.*?)(?:stat of IB device '(?P<dev>[^']{1,64})' failed.*)?\s*$")
# ibstatus: "Fatal error:  device 'mlx5_1': sys files not found (/sys/class/infiniband/mlx5_1/ports)"
_FATAL = re.compile(r"^Fatal error:\s+device '(?P<dev>[^']{1,64})': sys files not found.*$")
_RATE = re.compile(r"^(?P<gbps>\d{1,6}(?:\.\d{1,3})?)(?:\s*\((?P<speed>[A-Za-z0-9]{1,12})\))?$", re.ASCII)
MAX_PORTS = 4096


@dataclass
class IbstatRead:
    ports: list[PortSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def looks_like_ibstat(text: str) -> bool:
    head = text[:65536]
    return bool(re.search(rf"^{_NODE}:? '[^']+'\s*$", head, re.M) or re.search(
        r"^Infiniband device '[^']+' port \d+ status:", head, re.M))


def _rate(raw: str) -> str:
    """ibstat's ``400`` / ``2.5`` / ``40 (FDR10)`` as the sysfs text ``400 Gb/sec`` / ``40 Gb/sec (FDR10)``;
    ibstatus already prints the sysfs text."""
    m = _RATE.match(raw.strip())
    if not m:
        return raw
    return f"{m.group('gbps')} Gb/sec" + (f" ({m.group('speed')})" if m.group("speed") else "")


def parse_ibstat(text: str) -> IbstatRead:
    """Every port block of ``ibstat`` or ``ibstatus`` output, in order, and every adapter they found gone."""
    out = IbstatRead()
    dev, alone = "", False
    current: tuple[str, dict[str, str]] | None = None

    def add(p: PortSample) -> None:
        if len(out.ports) < MAX_PORTS:
            out.ports.append(p)

    def close() -> None:
        if current is None:
            return
        name, kv = current
        state, phys = kv.get("state"), kv.get("physical state") or kv.get("phys state")
        if state is None or phys is None:
            out.skipped.append(f"{name}: no state")
            return
        add(port_sample(name, parse_state(state, PORT_STATES), parse_state(phys, PHYS_STATES),
                        _rate(kv.get("rate", "")), kv.get("link layer") or kv.get("link_layer") or "", {}))

    def gone(device: str, why: str) -> None:
        add(missing_port(device, why[:200]))

    for line in text.splitlines():
        if m := _CA.match(line):
            close()
            current, dev, alone = None, m.group("dev"), bool(m.group("alone"))
        elif (m := _PORT.match(line)) and dev and (m.group("indent") or alone):
            close()
            current = (f"{dev}/{m.group('n')}", {})
        elif m := _IBSTATUS.match(line):
            close()
            current = (f"{m.group('dev')}/{m.group('n')}", {})
            dev, alone = "", False
        elif m := _IBPANIC.match(line):
            close()
            current = None
            if m.group("dev"):
                gone(m.group("dev"), f"ibstat: stat of IB device '{m.group('dev')}' failed")
            else:
                out.skipped.append(f"ibstat failed: {line.strip()[:200]}")
        elif m := _FATAL.match(line):
            close()
            current = None
            gone(m.group("dev"), "ibstatus: sys files not found")
        elif current is not None and (m := _KV.match(line)) and (m.group("indent") or alone):
            current[1].setdefault(m.group("k").strip().lower(), m.group("v"))
    close()
    return out
