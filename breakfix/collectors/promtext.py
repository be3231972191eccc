"""Prometheus text exposition -> plain samples, with prometheus_client's own parser.

Used by the dcgm source (dcgm-exporter ``/metrics``) and the endpoint source (vLLM, NIM,
Dynamo, Triton ``/metrics``). A page that does not parse raises ``ValueError`` with the
parser's reason; the source reports it and keeps running.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# DCGM's "blank" sentinels leak through as values: DCGM_INT64_BLANK = 0x7ffffffffffffff0 and up,
# DCGM_FP64_BLANK = 140737488355328.0 (2**47) and the few codes just above it.
INT64_BLANK = 0x7FFFFFFFFFFFFFF0
FP64_BLANK = 140737488355328.0


def is_blank(value: float) -> bool:
    return value != value or value >= INT64_BLANK or FP64_BLANK <= value < FP64_BLANK + 16


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
                if is_blank(s.value):  # NaN or a DCGM blank
                    continue
                sample = Sample(s.name, dict(s.labels), float(s.value))
                out[s.name].append(sample)
                if family.type == "counter" and s.name == family.name + "_total":
                    out[family.name].append(sample)  # the parser adds _total; exporters may not have written it
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"not Prometheus text: {exc}") from None
    return dict(out)
