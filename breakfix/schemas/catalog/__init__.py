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
from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import DataFileError, load_model
from breakfix.schemas.incident import Domain

CATALOG_DIR = Path(__file__).resolve().parent
UNKNOWN = "unknown_fault"

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


class Catalog:
    """Read-only lookups over the validated catalog files."""

    def __init__(self, classes: ClassesFile, xids: dict[int, XidEntry], dcgm: dict[str, str],
                 nvlink5: list[Nvlink5Row] | None = None) -> None:
        self.classes = classes
        self.xids = xids
        self.dcgm = dcgm
        self.nvlink5 = nvlink5 or []
        self.correlation = classes.correlation
        # XIDs whose class depends on the message text (recovery action, NVLink5 decode)
        self.message_xids = frozenset({"154"}) | NVLINK5_XIDS

    def category(self, name: str) -> CategorySpec:
        return self.classes.categories.get(name) or self.classes.categories[UNKNOWN]

    def _make(self, category: str, bucket: str, known: bool, title: str, source: str,
              severity: Severity | None = None, domain: Domain | None = None) -> FaultClass:
        spec = self.category(category)
        return FaultClass(category, severity or spec.severity, domain or spec.domain, bucket, known,
                          title or spec.title, source)

    def unknown(self, what: str) -> FaultClass:
        return self._make(UNKNOWN, "", False, f"Unknown fault {what}", "")

    def xid(self, code: str, message: str = "") -> FaultClass:
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
            m = _XID154_RE.search(message)
            verdict = m.group(1).strip() if m else ""
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
        cat = self.classes.buckets.get(bucket)
        if cat is None:
            return self._make(UNKNOWN, bucket, False, title, entry.source)
        domain = Domain.TENANT if entry.default_domain == "tenant" else None
        return self._make(cat, bucket, True, title, entry.source, domain=domain)

    def dcgm_code(self, code: str) -> FaultClass:
        action = self.dcgm.get(code)
        cat = self.classes.dcgm_actions.get(action or "")
        if cat is None:
            return self.unknown(code)
        return self._make(cat, action or "", True, f"DCGM {code}", "NVIDIA NVSentinel dcgmerrorsmapping.csv")

    def classify(self, *, check: str, code: str | None, message: str = "") -> FaultClass:
        """Map one fault (check and code) to its class. Unknown anything -> ``unknown_fault``."""
        if check == "xid":
            return self.xid(code or "", message)
        if code and code.startswith("DCGM_FR_"):
            return self.dcgm_code(code)
        spec = self.classes.checks.get(check)
        if spec is None:
            return self.unknown(f"check {check}" + (f" code {code}" if code else ""))
        return self._make(spec.category, "", True, "", "breakfix classes.yaml", severity=spec.severity)


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
                   read_table(directory / "xid_144_150_nvlink5_decode.csv"))


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The catalog shipped with breakfix, loaded once per process."""
    return load_catalog()
