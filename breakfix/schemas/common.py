"""Shared value types of the wire contracts: severity, GPU and tenant references, timestamps.

Collectors build these from raw readings; the correlator and remediator read them back
from NATS messages. Nothing here does I/O.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


class Severity(StrEnum):
    """How bad a fault is. Ordered: ``info`` < ``warning`` < ``critical`` < ``fatal``."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"
    FATAL = "fatal"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2, Severity.FATAL: 3}


def max_severity(a: Severity, b: Severity) -> Severity:
    """The worse of two severities."""
    return a if a.rank >= b.rank else b


_PCI_RE = re.compile(
    r"^(?:PCI:)?(?:(?P<dom>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})"
    r"(?:\.(?P<fn>[0-7]))?$"
)


@lru_cache(maxsize=8192)
def normalize_pci_bus_id(raw: str) -> str:
    """Normalise a PCI address to lowercase ``dddd:bb:dd.f``.

    The kernel prints ``PCI:0000:3b:00`` (no function), NVML prints ``00000000:3B:00.0``
    (8-hex domain); both become ``0000:3b:00.0``. Raises ``ValueError`` on anything else.
    """
    m = _PCI_RE.match(raw.strip())
    if m is None:
        raise ValueError(f"not a PCI bus id: {raw!r}")
    dom = int(m.group("dom") or "0", 16)
    if dom > 0xFFFF:
        raise ValueError(f"PCI domain out of range: {raw!r}")
    bus = int(m.group("bus"), 16)
    dev = int(m.group("dev"), 16)
    fn = int(m.group("fn") or "0")
    return f"{dom:04x}:{bus:02x}:{dev:02x}.{fn:x}"


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
"""Timestamps in the contracts lie in [EARLIEST, LATEST): the epoch (a node whose clock was never set)
up to a bound far enough from ``datetime.max`` that adding any window or age cannot overflow."""


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a timezone (RFC 3339)")
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise ValueError("timestamp out of range") from None
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"timestamp {value.isoformat()} outside {EARLIEST.year}..{LATEST.year}")
    return value


def format_rfc3339(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and microseconds only when present.

    The text of ``strftime("%Y-%m-%dT%H:%M:%S[.%f]Z")``, written by ``isoformat`` (half the time: the collector
    stamps every signal id with it on every poll); a year before 1000, which ``strftime`` writes unpadded, keeps
    ``strftime``'s text (``tests/test_schemas.py`` pins the two together)."""
    value = value.astimezone(UTC)
    if value.year < 1000:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if value.microsecond else "%Y-%m-%dT%H:%M:%SZ")
    return value.isoformat()[:-6] + "Z"  # "+00:00" -> "Z"


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc)]
"""A timezone-aware timestamp, stored in UTC, written as RFC 3339 by pydantic-core's own serializer: a UTC value
comes out exactly as ``format_rfc3339`` writes it (``Z``, microseconds only when present), at a fraction of the
cost of a Python serializer called per field (every audit record and plan-store write carries several)."""


FROZEN = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


class GpuRef(BaseModel):
    """One GPU on a node. ``index`` is the NVML index; ``pci_bus_id`` is normalised."""

    model_config = FROZEN

    index: int | None = Field(default=None, ge=0)
    uuid: str | None = None
    pci_bus_id: str | None = None

    @field_validator("pci_bus_id")
    @classmethod
    def _norm_pci(cls, v: str | None) -> str | None:
        return None if v is None else normalize_pci_bus_id(v)

    def key(self) -> str:
        """A stable identity for grouping: UUID when known, then index, then PCI address."""
        if self.uuid:
            return self.uuid
        if self.index is not None:
            return f"gpu{self.index}"
        return self.pci_bus_id or "gpu?"

    def label(self) -> str:
        """Short human label, e.g. ``gpu3``."""
        if self.index is not None:
            return f"gpu{self.index}"
        return self.pci_bus_id or self.uuid or "gpu?"


_DEPLOYMENT_POD = re.compile(r"^(?P<w>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$")
_INDEXED_POD = re.compile(r"^(?P<w>.+)-[0-9]+$")
_JOB_POD = re.compile(r"^(?P<w>.+)-[a-z0-9]{5}$")


@lru_cache(maxsize=65536)
def _workload_of(pod: str) -> str:
    for pattern in (_DEPLOYMENT_POD, _INDEXED_POD, _JOB_POD):
        m = pattern.match(pod)
        if m:
            return m.group("w")
    return pod


class TenantRef(BaseModel):
    """The workload that owns a GPU or an endpoint."""

    model_config = FROZEN

    namespace: str
    pod: str | None = None
    container: str | None = None
    endpoint: str | None = None

    def key(self) -> str:
        return f"{self.namespace}/{self.endpoint or self.pod or '*'}"

    def workload(self) -> str:
        """The workload the pod belongs to, from Kubernetes' naming conventions: ``train-worker-3``
        (StatefulSet / indexed Job) -> ``train-worker``; ``api-7d9f8c6b5-x2k4p`` (Deployment) -> ``api``;
        ``batch-x7k2q`` (Job) -> ``batch``. An endpoint is its own workload."""
        if self.endpoint:
            return self.endpoint
        if not self.pod:
            return "*"
        return _workload_of(self.pod)


def first_error(exc: Any) -> str:
    """One readable line from a pydantic ValidationError (or any exception)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            e = errs[0]
            loc = ".".join(str(p) for p in e.get("loc", ())) or "<root>"
            more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
            return f"{loc}: {e.get('msg')}{more}"
    return str(exc)
