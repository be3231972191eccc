"""InfiniBand port states as the kernel and the OFED tools print them -> one reading with a verdict.

The kernel's ``drivers/infiniband/core/sysfs.c`` writes ``state`` and ``phys_state`` as ``"%d: %s"``
with these names (``ib_port_state`` and ``phys_state_to_str``); ``ibstat`` prints the name only
(``State: Active``, ``Physical state: LinkUp``) and ``ibstatus`` prints the sysfs text. A value is
*known* when its number and name are the kernel's pair (or one of them alone names a kernel value);
anything else (``phys_state`` reading ``4: ACTIVE``: the number is PortConfigurationTraining, the name
is a port-state name) is *unknown*: a warning for the fabric rules, never a critical link-down.
Facts: /work/shared/reference/infiniband_sysfs.md (kernel ABI doc and sysfs.c), copied here.
"""

from __future__ import annotations

from dataclasses import dataclass

PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
PHYS_STATES = {1: "Sleep", 2: "Polling", 3: "Disabled", 4: "PortConfigurationTraining", 5: "LinkUp",
               6: "LinkErrorRecovery", 7: "Phy Test"}
# ibstat (infiniband-diags umad names) spells some states its own way.
PORT_ALIASES = {"initializing": 2, "actdefer": 5, "activedefer": 5}
ACTIVE = (4, 5)  # ACTIVE, ACTIVE_DEFER
LINK_UP = 5
POLLING = 2  # no peer answering yet: right after a boot every link starts here
BRINGUP_STATES = (2, 3)  # INIT (link up, the SM has not configured the port), ARMED: on the way to ACTIVE
BRINGUP_PHYS = (4, 6)  # PortConfigurationTraining, LinkErrorRecovery: the link is training


def _ascii_digits(text: str) -> bool:
    """The kernel prints ``%d``: ASCII digits only (``str.isdigit`` also takes "²" and "٤", which ``int`` refuses
    or reads as another number)."""
    return text.isascii() and text.isdigit()


def _norm(name: str) -> str:
    return "".join(name.split()).replace("_", "").lower()


@dataclass(frozen=True, slots=True)
class Reading:
    number: int | None  # None: unknown
    text: str           # as read, for messages

    @property
    def known(self) -> bool:
        return self.number is not None


def parse_state(raw: str, table: dict[int, str]) -> Reading:
    """``4: ACTIVE`` / ``ACTIVE`` / ``Active`` / ``4`` -> a reading; number and name must agree."""
    text = raw.strip()[:80]
    num_s, sep, name = text.partition(":")
    if not sep:
        num_s, name = (text, "") if _ascii_digits(text) else ("", text)
    by_name = {_norm(v): k for k, v in table.items()}
    if table is PORT_STATES:
        by_name.update(PORT_ALIASES)
    num = int(num_s) if _ascii_digits(num_s.strip()) and len(num_s.strip()) < 4 else None
    named = by_name.get(_norm(name)) if name.strip() else None
    if num_s.strip() and num is None:
        return Reading(None, text)
    if num is not None and name.strip():
        return Reading(num if named == num else None, text)
    if num is not None:
        return Reading(num if num in table else None, text)
    return Reading(named, text)
