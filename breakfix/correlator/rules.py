"""Correlator rules as data: windows, evidence limits, storm thresholds and topology grouping.

Read from ``correlator/rules/default.yaml`` (or ``--rules FILE``) once at start-up by
``load_rules``; a bad file raises ``schemas.datafile.DataFileError`` with the file and line,
so the daemon stops before it consumes anything. ``Rules.compile`` turns the validated model
into the plain lookups the grouping core reads per signal (``correlator.grouping``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.schemas.catalog import Catalog
from breakfix.schemas.datafile import DataFileError, load_model

RULES_DIR = Path(__file__).resolve().parent / "rules"
DEFAULT_RULES = RULES_DIR / "default.yaml"

_STRICT = ConfigDict(frozen=True, extra="forbid")


class Windows(BaseModel):
    model_config = _STRICT
    dedupe_s: float = Field(60.0, ge=0)
    flap_s: float = Field(600.0, ge=0)
    sympathetic_s: float = Field(120.0, ge=0)
    resolved_retention_s: float = Field(3600.0, ge=0)
    # open and escalated incidents older than this (since last_seen) close as ``stale`` (issue 12)
    max_open_age_s: float = Field(30 * 86400.0, gt=0, allow_inf_nan=False)


class Evidence(BaseModel):
    model_config = _STRICT
    messages: int = Field(20, ge=0, le=1000)
    signal_ids: int = Field(50, ge=0, le=10_000)
    timeline: int = Field(64, ge=4, le=10_000)
    seen_ids: int = Field(100_000, ge=1000)
    message_chars: int = Field(512, ge=16, le=4096)


class Caps(BaseModel):
    """Per-incident caps; past one the incident keeps a count (``overflow``) instead of the item."""

    model_config = _STRICT
    codes: int = Field(64, ge=1, le=1000)
    components: int = Field(256, ge=1, le=5000)
    open_faults: int = Field(512, ge=1, le=5000)
    max_change_bytes: int = Field(512 * 1024, ge=16 * 1024, le=1024 * 1024)


class SuspectGpu(BaseModel):
    model_config = _STRICT
    codes: tuple[str, ...]
    min_workloads: int = Field(2, ge=2)
    window_s: float = Field(86400.0, gt=0)
    category: str


_HARDWARE = ("gpu_reset_required", "gpu_drain_reset_required", "node_reboot_required", "hardware_support",
             "mechanical_inspection", "nvlink_fault", "nvswitch_fatal")


class Lemon(BaseModel):
    model_config = _STRICT
    bursts: int = Field(3, ge=2)
    window_s: float = Field(86400.0, gt=0)
    category: str
    categories: tuple[str, ...] = _HARDWARE  # only hardware incidents count (issue 11: never application XIDs)


class NvlinkPeerFold(BaseModel):
    model_config = _STRICT
    codes: tuple[str, ...]
    down_codes: tuple[str, ...]
    window_s: float = Field(120.0, gt=0)
    # incidents of these categories absorb the node's peer codes too (a fatal SXid and its XID 74s)
    down_categories: tuple[str, ...] = ()


class MultiGpu(BaseModel):
    model_config = _STRICT
    min_gpus: int = Field(3, ge=2)
    window_s: float = Field(120.0, gt=0)
    category: str
    categories: tuple[str, ...] = tuple(c for c in _HARDWARE if c != "nvlink_fault")


class CategoryThreshold(BaseModel):
    model_config = _STRICT
    category: str
    count: int = Field(ge=1)
    window_s: float = Field(gt=0)
    source: str = ""


class Threshold(BaseModel):
    model_config = _STRICT
    code: str
    count: int = Field(ge=1)
    window_s: float = Field(gt=0)


class TopologyRule(BaseModel):
    model_config = _STRICT
    category: str
    key: str = Field(min_length=1)
    min_nodes: int = Field(ge=2)
    window_s: float = Field(gt=0)


class EndpointImpact(BaseModel):
    model_config = _STRICT
    categories: tuple[str, ...] = ("endpoint_slo",)


class RulesFile(BaseModel):
    model_config = _STRICT
    version: int = Field(ge=1, le=1)
    windows: Windows = Windows()
    evidence: Evidence = Evidence()
    suspect_gpu: SuspectGpu | None = None
    lemon: Lemon | None = None
    nvlink_peer_fold: NvlinkPeerFold | None = None
    multi_gpu: MultiGpu | None = None
    thresholds: tuple[Threshold, ...] = ()
    category_thresholds: tuple[CategoryThreshold, ...] = ()
    topology: tuple[TopologyRule, ...] = ()
    endpoint_impact: EndpointImpact = EndpointImpact()
    caps: Caps = Caps()

    @model_validator(mode="after")
    def _unique(self) -> RulesFile:
        codes = [t.code for t in self.thresholds]
        dup = {c for c in codes if codes.count(c) > 1}
        if dup:
            raise ValueError(f"thresholds: code listed twice: {sorted(dup)}")
        cats = [t.category for t in self.topology]
        dup = {c for c in cats if cats.count(c) > 1}
        if dup:
            raise ValueError(f"topology: one rule per category, repeated: {sorted(dup)}")
        return self


@dataclass(frozen=True, slots=True)
class Rules:
    """The compiled rules the grouping core reads; plain attributes, no per-signal parsing."""

    source: RulesFile
    dedupe_s: float
    flap_s: float
    sympathetic_s: float
    retention_s: float
    evidence_messages: int
    evidence_ids: int
    timeline_limit: int
    seen_limit: int
    suspect: SuspectGpu | None
    suspect_codes: frozenset[str]
    lemon: Lemon | None
    peer: NvlinkPeerFold | None
    multi_gpu: MultiGpu | None
    peer_codes: frozenset[str]
    down_codes: frozenset[str]
    thresholds: dict[str, Threshold]
    topology: dict[str, TopologyRule]
    impact_categories: frozenset[str]
    category_thresholds: dict[str, CategoryThreshold]
    caps: Caps
    max_open_age_s: float
    message_chars: int
    lemon_categories: frozenset[str]
    multi_gpu_categories: frozenset[str]
    down_categories: frozenset[str]

    @classmethod
    def compile(cls, f: RulesFile, catalog: Catalog | None = None, path: str | Path = "<rules>") -> Rules:
        if catalog is not None:
            cats = set(catalog.classes.categories)
            named = [("suspect_gpu.category", f.suspect_gpu.category if f.suspect_gpu else None),
                     ("lemon.category", f.lemon.category if f.lemon else None),
                     ("multi_gpu.category", f.multi_gpu.category if f.multi_gpu else None),
                     *((f"topology[{t.category}]", t.category) for t in f.topology),
                     *(("endpoint_impact.categories", c) for c in f.endpoint_impact.categories),
                     *((f"category_thresholds[{t.category}]", t.category) for t in f.category_thresholds)]
            for where, cat in named:
                if cat is not None and cat not in cats:
                    raise DataFileError(path, None, f"{where}: unknown category {cat!r} (not in the catalog)")
        return cls(
            source=f, dedupe_s=f.windows.dedupe_s, flap_s=f.windows.flap_s, sympathetic_s=f.windows.sympathetic_s,
            retention_s=f.windows.resolved_retention_s, evidence_messages=f.evidence.messages,
            evidence_ids=f.evidence.signal_ids, timeline_limit=f.evidence.timeline, seen_limit=f.evidence.seen_ids,
            suspect=f.suspect_gpu, suspect_codes=frozenset(f.suspect_gpu.codes if f.suspect_gpu else ()),
            lemon=f.lemon, peer=f.nvlink_peer_fold, multi_gpu=f.multi_gpu,
            peer_codes=frozenset(f.nvlink_peer_fold.codes if f.nvlink_peer_fold else ()),
            down_codes=frozenset(f.nvlink_peer_fold.down_codes if f.nvlink_peer_fold else ()),
            thresholds={t.code: t for t in f.thresholds}, topology={t.category: t for t in f.topology},
            impact_categories=frozenset(f.endpoint_impact.categories),
            category_thresholds={t.category: t for t in f.category_thresholds}, caps=f.caps,
            max_open_age_s=f.windows.max_open_age_s, message_chars=f.evidence.message_chars,
            lemon_categories=frozenset(f.lemon.categories if f.lemon else ()),
            multi_gpu_categories=frozenset(f.multi_gpu.categories if f.multi_gpu else ()),
            down_categories=frozenset(f.nvlink_peer_fold.down_categories if f.nvlink_peer_fold else ()),
        )


def load_rules(path: str | Path | None = None, catalog: Catalog | None = None) -> Rules:
    """Read, validate and compile a rules file; raise ``DataFileError`` on any mistake."""
    p = Path(path) if path is not None else DEFAULT_RULES
    return Rules.compile(load_model(RulesFile, p), catalog, p)


@lru_cache(maxsize=1)
def default_rules() -> Rules:
    from breakfix.schemas.catalog import default_catalog

    return load_rules(DEFAULT_RULES, default_catalog())
