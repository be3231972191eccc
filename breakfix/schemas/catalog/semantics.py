"""NVIDIA's semantics for codes that need more than one table lookup: SXids, XID 74 registers, DCGM equivalents.

Data files beside this module, copied from ``/work/shared/reference`` with their sources:

- ``sxid_catalog.csv``: NVSwitch SXid -> Fabric Manager guide class (``non_fatal``, ``potential_fatal``,
  ``always_fatal``), NVIDIA Fabric Manager User Guide, Appendix D (via leptonai/gpud ``sxid.go``).
  The kernel line says ``Fatal`` or ``Non-fatal`` (kernel_log_formats.md section 4); that word wins over
  the class, and a ``potential_fatal`` SXid without it is counted as non-fatal.
- ``dcgm_fr_semantics.csv``: a ``DCGM_FR_*`` code's XID equivalent (DCGM 4.6 ``DcgmHealthWatch.cpp``:
  the devastating XIDs 79/94/95, the DRIVER watch's recovery action = XID 154) and DCGM's own severity
  (``dcgm_errors.cpp`` ``dcgmErrorMeta``: ``MONITOR`` = "can perform workload, but needs to be monitored").
- XID 74 register bits: NVIDIA Xid catalog, "Resolution Buckets" sheet, WORKFLOW_NVLINK_ERR.

``schemas.catalog.Catalog`` reads these through ``load_semantics`` at start-up; the correlator only
sees the resulting ``FaultClass``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from breakfix.schemas.datafile import DataFileError

SXID_SOURCE = "NVIDIA Fabric Manager User Guide, Appendix D (SXid fatal classes), sxid_catalog.csv"
XID74_SOURCE = "NVIDIA Xid catalog, Resolution Buckets sheet: WORKFLOW_NVLINK_ERR (XID 74 register decode)"
DCGM_SEVERITY_SOURCE = "NVIDIA DCGM dcgm_errors.cpp dcgmErrorMeta (DCGM_ERROR_MONITOR: can perform workload)"

# XID 74 prints seven hex registers: "NVLink: fatal error detected on link 14(0x100000, 0x0, ...)".
_XID74_REGS = re.compile(r"link\s*\d+\s*\((?P<regs>0x[0-9a-fA-F]+(?:\s*,\s*0x[0-9a-fA-F]+)*)", re.IGNORECASE)
# WORKFLOW_NVLINK_ERR: Reg1 bits 0/23/30 ignore, 1/20 sympathetic; Reg4 16/17 sympathetic; Reg5 20/23/26/29 are
# "ECC threshold only (continue)". Register numbers are 1-based as in NVIDIA's text.
_XID74_IGNORE = {1: frozenset({0, 23, 30}), 5: frozenset({20, 23, 26, 29})}
_XID74_SYMPATHETIC = {1: frozenset({1, 20}), 4: frozenset({16, 17})}


def xid74_verdict(message: str) -> str | None:
    """``IGNORE`` when only ignorable bits are set, ``SYMPATHETIC`` when only those and sympathetic bits are,
    None when a bit NVIDIA says needs action is set or the registers cannot be read (the bucket decides)."""
    m = _XID74_REGS.search(message)
    if m is None:
        return None
    try:
        regs = [int(v.strip(), 16) for v in m.group("regs").split(",")]
    except ValueError:
        return None
    if not any(regs):
        return None
    verdict = "IGNORE"
    for i, value in enumerate(regs, start=1):
        bits = {b for b in range(64) if value >> b & 1}
        ignorable = _XID74_IGNORE.get(i, frozenset())
        sympathetic = _XID74_SYMPATHETIC.get(i, frozenset())
        if not bits <= ignorable | sympathetic:
            return None
        if bits & sympathetic:
            verdict = "SYMPATHETIC"
    return verdict


@dataclass(frozen=True, slots=True)
class SxidEntry:
    sxid: str
    name: str
    fm_class: str  # non_fatal | potential_fatal | always_fatal
    source: str


@dataclass(frozen=True, slots=True)
class DcgmSemantics:
    code: str
    xid_equivalent: str
    xid154_action: str
    severity: str
    source: str
    check_equivalent: str = ""  # the NVML check reporting the same fact (DCGM_FR_PENDING_ROW_REMAP: row_remap.pending)

    @property
    def can_perform_workload(self) -> bool:
        return self.severity == "MONITOR"


@dataclass(frozen=True, slots=True)
class Semantics:
    sxids: dict[str, SxidEntry]
    dcgm: dict[str, DcgmSemantics]

    @staticmethod
    def sxid_word(message: str, details: dict[str, str] | None = None) -> str:
        """The kernel line's ``Fatal`` / ``Non-fatal`` word (the kmsg source's ``fatal`` detail), or ""."""
        word = (details or {}).get("fatal", "")
        if not word:
            low = message.lower()
            word = "Non-fatal" if ", non-fatal," in low else "Fatal" if ", fatal," in low else ""
        return word

    def sxid_fatal(self, code: str, message: str, details: dict[str, str] | None = None) -> bool:
        """The kernel line's Fatal/Non-fatal word wins; otherwise only ``always_fatal`` SXids are fatal."""
        word = self.sxid_word(message, details)
        if word:
            return word.lower() == "fatal"
        entry = self.sxids.get(code)
        return entry is not None and entry.fm_class == "always_fatal"


_FM_CLASSES = frozenset({"non_fatal", "potential_fatal", "always_fatal"})
_SEVERITIES = frozenset({"MONITOR", "ISOLATE", "RESET", "TRIAGE", "CONFIG", "NONE"})


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(enumerate(csv.DictReader(fh), start=2))
    except OSError as exc:
        raise DataFileError(path, None, f"cannot read: {exc.strerror or exc}") from None


def load_semantics(directory: Path) -> Semantics:
    sxids: dict[str, SxidEntry] = {}
    path = directory / "sxid_catalog.csv"
    for lineno, r in _rows(path):
        if r.get("fm_guide_class") not in _FM_CLASSES or not (r.get("sxid") or "").isdigit():
            raise DataFileError(path, lineno, f"bad SXid row {r!r}")
        sxids[r["sxid"]] = SxidEntry(r["sxid"], r.get("name") or "", r["fm_guide_class"], r.get("source") or "")
    dcgm: dict[str, DcgmSemantics] = {}
    path = directory / "dcgm_fr_semantics.csv"
    for lineno, r in _rows(path):
        code, sev = r.get("code") or "", r.get("dcgm_severity") or ""
        if not code.startswith("DCGM_FR_") or sev not in _SEVERITIES or not r.get("source"):
            raise DataFileError(path, lineno, f"bad DCGM semantics row {r!r}")
        xid, check = r.get("xid_equivalent") or "", r.get("check_equivalent") or ""
        if (xid and not xid.isdigit()) or (xid and check) or (check and not re.fullmatch(r"[a-z][a-z0-9_.]*", check)):
            raise DataFileError(path, lineno, f"bad equivalent (an XID number or an NVML check name, one) {r!r}")
        dcgm[code] = DcgmSemantics(code, xid, r.get("xid154_action") or "", sev, r["source"], check)
    return Semantics(sxids, dcgm)
