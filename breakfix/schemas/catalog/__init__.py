"""The fault catalog: what a fault code means and which incident category it starts.

Data comes from the CSV and YAML files beside this module (NVIDIA's Xid catalog, DCGM
failure codes, breakfix's class mapping; see SOURCES.md). ``load_catalog()`` reads and
validates them once at start-up and fails fast. The correlator classifies signals with
``Catalog.classify``; the remediator reads categories and buckets through the same object.
An unknown code always classifies as ``unknown_fault``: operator domain, the cautious path.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.schemas.catalog.nvlink5 import NVLINK5_XIDS, Nvlink5Row, decode, read_table
from breakfix.schemas.catalog.semantics import (
    DCGM_SEVERITY_SOURCE,
    SXID_SOURCE,
    XID74_SOURCE,
    Semantics,
    load_semantics,
    xid74_verdict,
)
from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import DataFileError, load_model
from breakfix.schemas.incident import Domain

CATALOG_DIR = Path(__file__).resolve().parent
UNKNOWN = "unknown_fault"
UNKNOWN_SOURCE = ("breakfix cautious default: not in NVIDIA's Xid catalog "
                  "(https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html) or DCGM/NVSentinel tables")

_CANONICAL_NUMBER = re.compile(r"[1-9][0-9]{0,5}")  # an XID or SXid as the driver prints it, the correlator counts it
_DCGM_CODE = re.compile(r"DCGM_FR_[A-Z0-9_]{1,80}")
# checks whose code is a DCGM failure code (collectors.dcgm, collectors.promfleet): classified by that code alone
_CODED_CHECKS = frozenset({"dcgm.health", "dcgm.recovery_action"})
_XID154_RE = re.compile(r"recovery action changed from 0x[0-9a-fA-F]+ \([^)]*\) to 0x[0-9a-fA-F]+ \(([^)]*)\)")


class CategorySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    severity: Severity
    domain: Domain
    title: str


class CheckSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    category: str
    severity: Severity | None = None


class CorrelationFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    application_xids: frozenset[str]
    sympathetic_xids: frozenset[str]
    dbe_companions: frozenset[str]
    # the same facts from other sources: a DBE (XID 48) and a row-remap event/failure (XID 63/64)
    dbe_equivalents: frozenset[str] = frozenset()
    remap_equivalents: frozenset[str] = frozenset()
    # XIDs that say how the driver contained an uncorrectable memory error (94, 95): with a DBE on the GPU, one fault
    containment_xids: frozenset[str] = frozenset()


class ClassesFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    version: int = Field(ge=1, le=1)
    categories: dict[str, CategorySpec]
    buckets: dict[str, str]
    xid154_actions: dict[str, str]
    dcgm_actions: dict[str, str]
    checks: dict[str, CheckSpec]
    correlation: CorrelationFacts
    nvlink5_actions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_categories(self) -> ClassesFile:
        if UNKNOWN not in self.categories:
            raise ValueError(f"category {UNKNOWN!r} must be defined")
        refs = [
            *(("buckets", k, v) for k, v in self.buckets.items()),
            *(("xid154_actions", k, v) for k, v in self.xid154_actions.items()),
            *(("dcgm_actions", k, v) for k, v in self.dcgm_actions.items()),
            *(("checks", k, v.category) for k, v in self.checks.items()),
            *(("nvlink5_actions", k, v) for k, v in self.nvlink5_actions.items()),
        ]
        for section, key, cat in refs:
            if cat not in self.categories:
                raise ValueError(f"{section}.{key}: unknown category {cat!r}")
        return self


@dataclass(frozen=True, slots=True)
class XidEntry:
    xid: int
    mnemonic: str
    description: str
    immediate_bucket: str
    investigatory_bucket: str
    default_domain: str
    source: str


@dataclass(frozen=True, slots=True)
class FaultClass:
    """The verdict for one fault: category, severity, domain, and where that came from."""

    category: str
    severity: Severity
    domain: Domain
    bucket: str
    known: bool
    title: str
    source: str = ""
    equivalent: str = ""  # the code key this fault counts as, e.g. ``xid:95`` for DCGM_FR_UNCONTAINED_ERROR


# A DCGM code DCGM marks "can perform workload" never takes a path that reboots, resets or RMAs.
_WORKLOAD_OK_CAP = frozenset({"node_reboot_required", "hardware_support", "gpu_reset_required",
                              "gpu_drain_reset_required", "multi_gpu_failure", "software_update",
                              "mechanical_inspection", "unknown_fault"})
_XID154_NAMES = ("Node Reboot Required", "GPU Reset Required", "Drain and Reset", "Drain P2P",
                 "Recover IMEX Domain")


class Catalog:
    """Read-only lookups over the validated catalog files."""

    def __init__(self, classes: ClassesFile, xids: dict[int, XidEntry], dcgm: dict[str, str],
                 nvlink5: list[Nvlink5Row] | None = None, semantics: Semantics | None = None) -> None:
        self.classes = classes
        self.xids = xids
        self.dcgm = dcgm
        self.nvlink5 = nvlink5 or []
        self.semantics = semantics or Semantics({}, {})
        self.correlation = classes.correlation
        # XIDs whose class depends on the message text (recovery action, NVLink5 decode, XID 74 registers)
        self.message_xids = frozenset({"154", "74"}) | NVLINK5_XIDS

    def message_dependent(self, check: str, code: str | None) -> bool:
        """True when the same check and code can classify differently by message (no caching)."""
        return check == "sxid" or (check == "xid" and code in self.message_xids)

    def unknown_code_key(self, key: str, *, listed_only: bool = True) -> str | None:
        """Why ``key`` is not a code key the correlator counts on an incident (``Incident.codes``), None when it is:
        ``xid:48``, ``sxid:12028``, a check (``row_remap.pending``, ``dcgm.health``), a check with its code
        (``dcgm.health:DCGM_FR_PCI_REPLAY_RATE``). A code counted as another (a DCGM code with an XID or NVML
        equivalent) is refused with the key it is counted as. ``listed_only=False`` (kill switches) also takes an XID,
        SXid or DCGM failure code the catalog does not list yet, in its canonical form: a new driver's XID storm is
        when a switch is needed. A policy or kill switch naming anything else would match nothing, silently."""
        check, sep, code = key.partition(":")
        if check in ("xid", "sxid") and sep:
            name = "XID" if check == "xid" else "SXid"
            if not _CANONICAL_NUMBER.fullmatch(code):
                return f"{key!r}: {name} {code!r} is not a number as the driver prints it (e.g. {check}:79)"
            listed = int(code) in self.xids if check == "xid" else code in self.semantics.sxids
            if not listed and listed_only:
                which = "NVIDIA's Xid catalog" if check == "xid" else "the SXid catalog"
                return f"{key!r}: {name} {code!r} is not in {which}"
            return None
        if check not in self.classes.checks and check not in _CODED_CHECKS:
            return f"{key!r}: no check {check!r} in the catalog (code keys look like xid:48, sxid:12028, " \
                   "row_remap.pending or dcgm.health:DCGM_FR_...)"
        if not sep:  # dcgm.health comes without a code for a DCGM verdict that names none; a recovery action never
            return f"{key!r}: {check} always carries its DCGM code (counted as XID 154)" \
                if check == "dcgm.recovery_action" else None
        if not code:
            return f"{key!r}: no code after the colon"
        if (check in _CODED_CHECKS or code.startswith("DCGM_FR_")) and self.dcgm_name(code) is None \
                and (listed_only or not _DCGM_CODE.fullmatch(code)):
            return f"{key!r}: {code!r} is not a DCGM failure code in the catalog"
        equivalent = self.classify(check=check, code=code).equivalent
        if equivalent and equivalent != key:
            return f"{key!r} is counted as {equivalent!r} (the same fault from NVML or the driver): name that"
        return None

    def category(self, name: str) -> CategorySpec:
        return self.classes.categories.get(name) or self.classes.categories[UNKNOWN]

    def _make(self, category: str, bucket: str, known: bool, title: str, source: str,
              severity: Severity | None = None, domain: Domain | None = None) -> FaultClass:
        spec = self.category(category)
        return FaultClass(category, severity or spec.severity, domain or spec.domain, bucket, known,
                          title or spec.title, source)

    def unknown(self, what: str) -> FaultClass:
        return self._make(UNKNOWN, "", False, f"Unknown fault {what}", UNKNOWN_SOURCE)

    def xid(self, code: str, message: str = "", details: dict[str, str] | None = None) -> FaultClass:
        """Classify an XID by NVIDIA's immediate resolution bucket."""
        try:
            entry = self.xids.get(int(code))
        except ValueError:
            entry = None
        if entry is None or not entry.immediate_bucket:
            return self.unknown(f"XID {code}")
        bucket = entry.immediate_bucket
        title = f"XID {entry.xid} {entry.description}"
        if bucket == "XID_154":
            verdict = _xid154_action(message, details)
            cat = self.classes.xid154_actions.get(verdict)
            if cat is None:
                return self._make(UNKNOWN, bucket, False, f"XID 154 with unreadable recovery action {verdict!r}",
                                  entry.source)
            return self._make(cat, bucket, True, f"XID 154 recovery action: {verdict}", entry.source)
        if bucket == "WORKFLOW_NVLINK5_ERR" and message:
            d = decode(self.nvlink5, str(entry.xid), message)
            action_cat = self.classes.nvlink5_actions.get(d.immediate) if d else None
            if d is not None and action_cat is not None:
                return self._make(action_cat, bucket, True, f"{title}: {d.subcode} -> {d.immediate}",
                                  "NVIDIA Xid catalog NVLink5 decode (xid_144_150_nvlink5_decode.csv)")
        if bucket == "WORKFLOW_NVLINK_ERR" and message:
            v = xid74_verdict(message)
            if v is not None:
                cat = "informational" if v == "IGNORE" else "sympathetic"
                return self._make(cat, bucket, True, f"{title}: only bits NVIDIA lists as {v.lower()}", XID74_SOURCE)
        cat = self.classes.buckets.get(bucket)
        if cat is None:
            return self._make(UNKNOWN, bucket, False, title, entry.source)
        domain = Domain.TENANT if entry.default_domain == "tenant" else None
        return self._make(cat, bucket, True, title, entry.source, domain=domain)

    def dcgm_name(self, code: str) -> str | None:
        """The catalog's name for a DCGM failure code, with or without the ``DCGM_FR_`` prefix."""
        for name in (code, "DCGM_FR_" + code, code.removeprefix("DCGM_FR_")):
            if name in self.dcgm or name in self.semantics.dcgm:
                return name
        return None

    def dcgm_code(self, code: str) -> FaultClass:
        """NVSentinel's action for a DCGM code; a code with an XID equivalent classifies as that XID
        (one fault, one plan, whatever the source), and "can perform workload" codes are capped."""
        name = self.dcgm_name(code) or code
        sem = self.semantics.dcgm.get(name)
        if sem is not None and sem.xid_equivalent:
            msg = f"GPU recovery action changed from 0x0 (None) to 0x0 ({sem.xid154_action})" if sem.xid154_action \
                else ""
            fc = self.xid(sem.xid_equivalent, msg)
            return FaultClass(fc.category, fc.severity, fc.domain, fc.bucket, fc.known, f"DCGM {name} (as XID "
                              f"{sem.xid_equivalent}): {fc.title}", f"{sem.source}; {fc.source}",
                              equivalent=f"xid:{sem.xid_equivalent}")
        if sem is not None and sem.check_equivalent:  # the same fact NVML reports: the same class and counted key
            fc = self.classify(check=sem.check_equivalent, code=None)
            return FaultClass(fc.category, fc.severity, fc.domain, fc.bucket, fc.known,
                              f"DCGM {name} (as {sem.check_equivalent})", f"{sem.source}; {fc.source}",
                              equivalent=sem.check_equivalent)
        action = self.dcgm.get(name)
        cat = self.classes.dcgm_actions.get(action or "")
        if cat is None:
            return self.unknown(code)
        if sem is not None and sem.can_perform_workload and cat in _WORKLOAD_OK_CAP:
            return self._make("gpu_monitor", action or "", True, f"DCGM {name}: can perform workload, monitor",
                              DCGM_SEVERITY_SOURCE)
        return self._make(cat, action or "", True, f"DCGM {name}", "NVIDIA NVSentinel dcgmerrorsmapping.csv")

    def sxid(self, code: str, message: str = "", details: dict[str, str] | None = None) -> FaultClass:
        """NVSwitch SXid: fatal ones need the documented recovery; non-fatal ones are only counted."""
        entry = self.semantics.sxids.get(code)
        if entry is None and not self.semantics.sxid_word(message, details):
            return self.unknown(f"SXid {code}")  # neither listed nor said Fatal/Non-fatal: the cautious path
        fatal = self.semantics.sxid_fatal(code, message, details)
        name = entry.name if entry else "unlisted SXid"
        cat = "nvswitch_fatal" if fatal else "nvswitch_nonfatal"
        return self._make(cat, entry.fm_class if entry else "", True,
                          f"SXid {code} {name} ({'fatal' if fatal else 'non-fatal'})", SXID_SOURCE)

    def classify(self, *, check: str, code: str | None, message: str = "",
                 details: dict[str, str] | None = None) -> FaultClass:
        """Map one fault (check and code) to its class. Unknown anything -> ``unknown_fault``."""
        if check == "xid":
            return self.xid(code or "", message, details)
        if check == "sxid" and code:
            return self.sxid(code, message, details)
        if code and (code.startswith("DCGM_FR_") or (check.startswith("dcgm") and self.dcgm_name(code))):
            return self.dcgm_code(code)
        spec = self.classes.checks.get(check)
        if spec is None:
            return self.unknown(f"check {check}" + (f" code {code}" if code else ""))
        return self._make(spec.category, "", True, "", "breakfix classes.yaml", severity=spec.severity)


def _xid154_action(message: str, details: dict[str, str] | None) -> str:
    """The recovery action of an XID 154: the driver's full line, the kmsg source's ``recovery_action``
    detail, or (dcgm-exporter's last-XID gauge) the action's name alone in the message."""
    m = _XID154_RE.search(message)
    if m:
        return m.group(1).strip()
    if details and details.get("recovery_action"):
        return details["recovery_action"].strip()
    low = message.lower()
    return next((n for n in _XID154_NAMES if n.lower() in low), "")


def _read_xids(path: Path) -> dict[int, XidEntry]:
    out: dict[int, XidEntry] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            try:
                xid = int(row["xid"])
                entry = XidEntry(xid, row["mnemonic"], row["description"], row["immediate_bucket"],
                                 row["investigatory_bucket"], row["default_domain"], row["source"])
            except (KeyError, ValueError, TypeError) as exc:
                raise DataFileError(path, lineno, f"bad XID row: {exc}") from None
            if entry.default_domain not in ("tenant", "operator", "either"):
                raise DataFileError(path, lineno, f"bad default_domain {entry.default_domain!r}")
            if not entry.source:
                raise DataFileError(path, lineno, "every XID entry needs a source")
            out[xid] = entry
    return out


def _read_dcgm(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["code"]: row["nvsentinel_action"] for row in csv.DictReader(fh)}


def load_catalog(directory: Path = CATALOG_DIR) -> Catalog:
    """Load and validate the catalog. Raises ``DataFileError`` naming the bad file and line."""
    classes = load_model(ClassesFile, directory / "classes.yaml")
    return Catalog(classes, _read_xids(directory / "xid_catalog.csv"), _read_dcgm(directory / "dcgm_fr_catalog.csv"),
                   read_table(directory / "xid_144_150_nvlink5_decode.csv"), load_semantics(directory))


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The catalog shipped with breakfix, loaded once per process."""
    return load_catalog()
