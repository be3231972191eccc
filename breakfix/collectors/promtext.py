"""Prometheus text exposition -> plain samples, with prometheus_client's own parser.

Used by the dcgm source (dcgm-exporter ``/metrics``) and the endpoint source (vLLM, NIM,
Dynamo, Triton ``/metrics``). A page that does not parse raises ``ValueError`` with the
parser's reason; the source reports it and keeps running.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# DCGM's "blank" sentinels leak through as values (NVIDIA DCGM ``dcgmlib/dcgm_structs.h``): DCGM_INT64_BLANK =
# 0x7ffffffffffffff0 and up, DCGM_FP64_BLANK = 140737488355328.0 (2**47) and the few codes just above it, and
# DCGM_INT32_BLANK = 0x7ffffff0 up to INT32_MAX (``DCGM_INT32_IS_BLANK``: BLANK, NOT_FOUND, NOT_SUPPORTED,
# NOT_PERMISSIONED...), which DCGM also returns in INT64 fields: dcgm-exporter's own filter
# (``internal/pkg/collector/utils.go`` ``isInt64Blank``) drops the INT32 codes from INT64 fields, so an exporter or
# collector without that filter writes them as plain numbers (a PCIe replay or ECC count of 2147483632).
INT64_BLANK = 0x7FFFFFFFFFFFFFF0
INT32_BLANK = 0x7FFFFFF0
INT32_MAX = 0x7FFFFFFF
FP64_BLANK = 140737488355328.0


def is_blank(value: float, name: str = "") -> bool:
    """NaN or a DCGM blank; the 16 INT32 codes only in a DCGM family (``name`` ``DCGM_*``), so that another
    exporter's count that passes 2147483632 is kept."""
    return (value != value or value >= INT64_BLANK or FP64_BLANK <= value < FP64_BLANK + 16
            or (INT32_BLANK <= value <= INT32_MAX and name.startswith("DCGM_")))


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> dict[str, list[Sample]]:
    """Samples by sample name (``_bucket``/``_count``/``_sum`` kept as their own names)."""
    out: dict[str, list[Sample]] = defaultdict(list)
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if is_blank(s.value, s.name):  # NaN or a DCGM blank
                    continue
                sample = Sample(s.name, dict(s.labels), float(s.value))
                out[s.name].append(sample)
                if family.type == "counter" and s.name == family.name + "_total":
                    out[family.name].append(sample)  # the parser adds _total; exporters may not have written it
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"not Prometheus text: {exc}") from None
    return dict(out)
