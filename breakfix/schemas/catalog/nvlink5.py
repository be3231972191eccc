"""NVLink5 XIDs 144-150: decode the kernel line's subcode and error status with NVIDIA's table.

The driver prints ``<xid>, [pid=..., name=...,] <SUBCODE> <Fatal|Nonfatal> XC<0|1> i<n> Link <nn|-1>
(<intrInfo> <errorStatus> <dbg0..3>)``. ``decode`` finds the rows of
``xid_144_150_nvlink5_decode.csv`` (NVIDIA Xid catalog workbook, sheet 2; see SOURCES.md) for
that XID and subcode whose error-status bit is set, and returns the most urgent immediate
action among them (RESET_GPU, then XID_154_EVAL, then IGNORE); a promoted error, whose IntrInfo
matches a row's "Action 2" pattern, takes that row's second action. ``schemas.catalog.Catalog``
uses it to classify these XIDs; the kmsg source adds the decoded fields to the signal.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from breakfix.schemas.datafile import DataFileError

NVLINK5_XIDS = frozenset({"144", "145", "146", "147", "148", "149", "150"})
_URGENCY = {"RESET_GPU": 2, "XID_154_EVAL": 1, "IGNORE": 0}
_LINE = re.compile(
    r"(?P<sub>[A-Z][A-Z0-9_]*(?: Degraded)?)\s+(?P<fatal>Fatal|Nonfatal|Non-fatal)\s+XC(?P<xc>\d)\s+i(?P<inst>\d+)\s+"
    r"Link\s+(?P<link>-?\d+)\s+\((?P<intr>0x[0-9a-fA-F]+)\s+(?P<status>0x[0-9a-fA-F]+)"
)


@dataclass(frozen=True, slots=True)
class Nvlink5Row:
    xid: str
    subcodes: frozenset[str]
    error_status: tuple[int, ...] | None  # bit masks; 0 matches a zero status, 0xFFFFFFFF any
    immediate: str
    investigatory: str
    severity: str
    hw_sw: str
    impact: str
    intr_masks: tuple[str, ...] = ()  # IntrInfo bit patterns (MSB first, '-' = any), before and from R575
    action2_masks: tuple[str, ...] = ()  # IntrInfo patterns of a promoted error ("Action 2"), before and from R575
    action2: str = ""  # its action (RESET_GPU for promotable RLW_RXPIPE errors)


@dataclass(frozen=True, slots=True)
class Nvlink5Decode:
    subcode: str
    fatal: bool
    link: int
    intr_info: int
    error_status: int
    immediate: str
    investigatory: str
    hw_sw: str
    impact: str

    def details(self) -> dict[str, str]:
        return {"nvlink5_subcode": self.subcode, "nvlink5_fatal": str(self.fatal).lower(), "link": str(self.link),
                "nvlink5_error_status": f"0x{self.error_status:08x}", "nvlink5_immediate_action": self.immediate,
                "nvlink5_investigatory_action": self.investigatory, "nvlink5_hw_sw": self.hw_sw,
                "nvlink5_impact": self.impact}


def read_table(path: Path) -> list[Nvlink5Row]:
    rows: list[Nvlink5Row] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, r in enumerate(csv.DictReader(fh), start=2):
            if r["immediate_action"] not in _URGENCY:
                raise DataFileError(path, lineno, f"unknown immediate_action {r['immediate_action']!r}")
            action2 = (r.get("action2") or "").strip()
            action2_masks = tuple(m for m in ((r.get("action2_mask_v1") or "").strip(),
                                              (r.get("action2_mask_v2") or "").strip()) if m)
            if (action2 and action2 not in _URGENCY) or bool(action2) != bool(action2_masks):
                raise DataFileError(path, lineno, f"action2 {action2!r} needs a known action and its IntrInfo masks")
            status = r["error_status_hex"].strip()
            try:
                masks = tuple(int(v, 16) for v in status.split("/")) if status else None
            except ValueError:
                raise DataFileError(path, lineno, f"bad error_status_hex {status!r}") from None
            rows.append(Nvlink5Row(r["xid"], frozenset(s.strip() for s in r["subcode"].split("/")),
                                   masks, r["immediate_action"],
                                   r["investigatory_action"], r["severity"], r["hw_sw"], r["local_remote_impact"],
                                   tuple(m for m in (r["intrinfo_mask_v1_lt_R575"], r["intrinfo_mask_v2_ge_R575"])
                                         if m), action2_masks, action2))
    return rows


def _status_matches(masks: tuple[int, ...] | None, status: int) -> bool:
    if masks is None:
        return True
    return any(m == 0xFFFFFFFF or (m == 0 and status == 0) or (status & m) for m in masks)


def _intr_matches(mask: str, intr: int) -> bool:
    bits = format(intr, f"0{len(mask)}b")[-len(mask):]
    return all(c == "-" or c == b for c, b in zip(mask, bits, strict=True))


def decode(rows: list[Nvlink5Row], xid: str, message: str) -> Nvlink5Decode | None:
    """The decoded line, or None when the line or its subcode is not in NVIDIA's table."""
    m = _LINE.search(message)
    if m is None:
        return None
    sub, status = m.group("sub"), int(m.group("status"), 16)
    matches = [r for r in rows if r.xid == xid and sub in r.subcodes and _status_matches(r.error_status, status)]
    if not matches:
        return None
    # rows that differ only by IntrInfo (XID 149 link-down reasons, some ignorable) are told apart by its mask;
    # when no mask fits, keep every row (the most urgent action wins, as before)
    intr = int(m.group("intr"), 16)

    def action(r: Nvlink5Row) -> str:
        """NVIDIA sheet 2: a promotable error ("Non-fatal*") whose IntrInfo matches the row's "Action 2" pattern takes
        that action instead of the immediate one (RLW_RXPIPE: IGNORE -> RESET_GPU)."""
        return r.action2 if r.action2 and any(_intr_matches(a, intr) for a in r.action2_masks) else r.immediate

    by_mask = [r for r in matches if any(_intr_matches(mask, intr) for mask in (*r.intr_masks, *r.action2_masks))]
    matches = by_mask or matches
    best = max(matches, key=lambda r: _URGENCY[action(r)])
    return Nvlink5Decode(sub, m.group("fatal") == "Fatal", int(m.group("link")), int(m.group("intr"), 16), status,
                         action(best), best.investigatory, best.hw_sw, best.impact)
