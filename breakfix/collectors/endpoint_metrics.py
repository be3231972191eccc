"""What the endpoint source reads from an inference server's ``/metrics`` page, per framework, and how.

The names (``METRICS``: latency histograms and the KV-cache gauge; ``REQUESTS``: finished and failed
request counters), each with its source, and the pure arithmetic over two scrapes that
``collectors.endpoint`` (``EndpointRules``) and ``collectors.endpoint_stuck`` judge with: counter
increases with Prometheus' counter-reset rule, histogram increases per series, ``quantile`` as
``histogram_quantile`` computes it, and finished / failed requests per model. Pages come from
``collectors.promlines.parse_tolerant``; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from breakfix.collectors.promtext import Sample

# signal -> candidate histogram base names (``<base>_bucket``), first present on the page wins.
METRICS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds",
             "time_to_first_token_seconds",  # NIM for LLMs (vLLM names without the prefix); TRT-LLM <= 1.0
             "dynamo_frontend_time_to_first_token_seconds",
             "nv_llm_http_service_time_to_first_token_seconds",  # Dynamo frontends before the dynamo_frontend_ rename
             "nv_inference_first_response_histogram_ms",  # Triton, --metrics-config histogram_latencies=true
             "sglang:time_to_first_token_seconds",
             "trtllm_time_to_first_token_seconds", "trtllm:time_to_first_token_seconds"),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",  # v0.11 rename; v0 name
            "dynamo_frontend_inter_token_latency_seconds", "nv_llm_http_service_inter_token_latency_seconds",
            "time_per_output_token_seconds",  # NIM for LLMs
            "sglang:inter_token_latency_seconds",
            "sglang:time_per_output_token_seconds",  # SGLang before inter_token_latency (its docs' example page)
            "trtllm_time_per_output_token_seconds", "trtllm:time_per_output_token_seconds",
            "tgi_request_mean_time_per_token_duration"),  # TGI: seconds, a histogram (buckets on "*duration")
    # usage of the KV-cache pool, 0..1: vLLM's kv_cache_usage_perc (gpu_cache_usage_perc before 0.9 and in NIM),
    # SGLang's token_usage, TRT-LLM's kv_cache_utilization (used / max blocks), llama.cpp's kv_cache_usage_ratio
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "gpu_cache_usage_perc",
                 "sglang:token_usage", "trtllm_kv_cache_utilization", "trtllm:kv_cache_utilization",
                 "llamacpp:kv_cache_usage_ratio"),
}
UNIT_S = {"nv_inference_first_response_histogram_ms": 0.001}  # histogram bounds in ms (Triton)
MIN_MODEL_REQUESTS = 20  # a model's own error share is judged from this many finished requests in an interval
MODEL_LABELS = ("model_name", "model")  # vLLM, SGLang, NIM, TRT-LLM: model_name; Dynamo, Triton: model


def _client_http_code(labels: dict[str, str]) -> bool:
    code = labels.get("http_code", "")
    return code.isascii() and code.isdigit() and 400 <= int(code) < 500  # "²".isdigit(), but int() refuses it


@dataclass(frozen=True, slots=True)
class Requests:
    """How one framework counts finished and failed requests (all cumulative counters).

    ``finished``: requests finished, failed ones included where ``reason`` names the label telling them
    (``reason[1]`` its failure values); ``failed``: a separate counter of failed requests, ``failed_is_part``
    when those are already in ``finished``; ``client``: a sample the client caused (a 4xx: bad request,
    unknown model), counted neither as finished nor as failed: not the endpoint's fault."""

    finished: str
    reason: tuple[str, frozenset[str]] | None = None
    failed: str | None = None
    failed_is_part: bool = False
    client: Callable[[dict[str, str]], bool] | None = None


_DYNAMO_CLIENT = frozenset({"validation", "not_found", "not_implemented"})  # prometheus_names.rs error_type 4xx


def _dynamo_client(labels: dict[str, str]) -> bool:
    return labels.get("error_type", "") in _DYNAMO_CLIENT


# first framework whose counters are on the page wins
REQUESTS: tuple[Requests, ...] = (
    # vLLM FINISH_REASON_STRINGS: stop, length, abort, error, repetition
    Requests("vllm:request_success_total", ("finished_reason", frozenset({"abort", "error"}))),
    # TRT-LLM finish_reason: stop, length, timeout, cancelled; request_error_total{http_code} counts HTTP errors
    Requests("trtllm_request_success_total", ("finished_reason", frozenset({"timeout", "cancelled"})),
             failed="trtllm_request_error_total", client=_client_http_code),
    Requests("trtllm:request_success_total", ("finished_reason", frozenset({"timeout", "cancelled"})),
             failed="trtllm:request_error_total", client=_client_http_code),
    Requests("dynamo_frontend_requests_total", ("status", frozenset({"error"})), client=_dynamo_client),
    Requests("nv_llm_http_service_requests_total", ("status", frozenset({"error"})), client=_dynamo_client),
    # NIM for LLMs: request_success_total (stop, length) + request_failure_total (other finish reasons); a NIM
    # or vLLM page without the failure counter tells failures by finished_reason
    Requests("request_success_total", ("finished_reason", frozenset({"abort", "error"})),
             failed="request_failure_total"),
    Requests("sglang:num_requests_total", failed="sglang:num_aborted_requests_total", failed_is_part=True),
    # TGI router: tgi_request_success, tgi_request_failure{err=validation|overloaded|generation|...}
    Requests("tgi_request_success", failed="tgi_request_failure",
             client=lambda labels: labels.get("err") == "validation"),
    # Triton: nv_inference_request_failure, with reason=OTHER|BACKEND|REJECTED|CANCELED in newer releases
    Requests("nv_inference_request_success", failed="nv_inference_request_failure"),
)

Key = tuple[tuple[str, str], ...]


def _model(labels: dict[str, str]) -> str:
    return next((labels[k] for k in MODEL_LABELS if labels.get(k)), "")


def _key(labels: dict[str, str], drop: str = "") -> Key:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


def _increase(now: float, before: float | None) -> float:
    """A counter's rise since the previous scrape; a fall is a reset, after which all of ``now`` is new."""
    if before is None or now < before:
        return now
    return now - before


def _le(raw: str | None) -> float | None:
    """A bucket bound, ``+Inf`` included; no bound, NaN or text: None (the sample is skipped)."""
    try:
        le = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return None if math.isnan(le) else le


def _buckets(samples: dict[str, list[Sample]], base: str) -> dict[Key, dict[float, float]]:
    """Cumulative bucket counts per series (its labels without ``le``)."""
    out: dict[Key, dict[float, float]] = {}
    for s in samples.get(base + "_bucket") or ():
        le = _le(s.labels.get("le"))
        if le is not None and 0 <= s.value < math.inf:
            out.setdefault(_key(s.labels, "le"), {})[le] = s.value
    return out


def _hist_increase(now: dict[str, list[Sample]], before: dict[str, list[Sample]],
                   base: str) -> dict[str, dict[float, float]]:
    """Per model, the bucket counts of the observations made between two scrapes.

    A series whose bucket layout changed or whose count went down was reset, and a series new beside the ones
    the previous page had started from zero: all its counts are new. Series of one model (its engines) are
    summed on the bounds they all have, so the sum is still cumulative."""
    prev = _buckets(before, base)
    if not prev:
        return {}  # the histogram was not on the previous page: nothing to compare with yet
    per_model: dict[str, list[dict[float, float]]] = {}
    for key, b in _buckets(now, base).items():
        p = prev.get(key)
        reset = p is None or set(p) != set(b) or any(b[le] < p[le] for le in b)
        delta = dict(b) if reset or p is None else {le: b[le] - p[le] for le in b}
        per_model.setdefault(_model(dict(key)), []).append(delta)
    out: dict[str, dict[float, float]] = {}
    for model, deltas in per_model.items():
        bounds = set.intersection(*(set(d) for d in deltas))
        out[model] = {le: sum(d[le] for d in deltas) for le in bounds}
    return out


def quantile(buckets: dict[float, float], q: float) -> tuple[float, bool] | None:
    """``histogram_quantile(q)`` of cumulative bucket counts: (value, in the ``+Inf`` bucket), or None.

    Prometheus ``bucketQuantile``: a ``+Inf`` bucket and one finite bound at least are needed; counts are
    made monotonic; the value is interpolated linearly inside its bucket (from 0 for the first bucket when
    its bound is positive); in the ``+Inf`` bucket it is the highest finite bound, flagged."""
    les = sorted(buckets)
    if len(les) < 2 or les[-1] != math.inf:
        return None
    counts: list[float] = []
    for le in les:  # ensureMonotonic
        counts.append(max(buckets[le], counts[-1] if counts else 0.0))
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next((i for i in range(len(les) - 1) if counts[i] >= rank), len(les) - 1)
    if b == len(les) - 1:
        return les[-2], True
    if b == 0 and les[0] <= 0:
        return les[0], False
    start, below = (les[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    in_bucket = counts[b] - below
    if in_bucket <= 0:
        return les[b], False
    return start + (les[b] - start) * (rank - below) / in_bucket, False


def _series(samples: dict[str, list[Sample]], name: str | None) -> dict[Key, Sample]:
    return {_key(s.labels): s for s in samples.get(name or "") or ()} if name else {}


def _count(out: dict[str, tuple[float, float]], r: Requests, name: str | None, now: dict[str, list[Sample]],
           before: dict[str, list[Sample]], *, finished: bool, failed: Callable[[Sample], bool],
           started: bool = False) -> None:
    """Add the rises of counter ``name`` between two scrapes to ``out`` (model -> finished, failed). ``started``:
    the framework's requests were counted on the previous page already, so this counter absent there had not
    counted anything yet (TGI's ``tgi_request_failure`` and TRT-LLM's error counter appear with their first
    failure): all of it is new."""
    prev = _series(before, name)
    if not prev and not started:
        return  # not on the previous page: no rise known yet (a series new beside others starts from 0)
    for key, s in _series(now, name).items():
        if not 0 <= s.value < math.inf or (r.client is not None and r.client(s.labels)):
            continue  # a counter is never negative nor infinite: that sample is no count
        last = prev[key].value if key in prev and 0 <= prev[key].value < math.inf else None
        rise = _increase(s.value, last)
        done, bad = out.get(_model(s.labels), (0.0, 0.0))
        out[_model(s.labels)] = (done + (rise if finished else 0.0), bad + (rise if failed(s) else 0.0))


def _failed_reason(reason: tuple[str, frozenset[str]] | None, s: Sample) -> bool:
    return reason is not None and s.labels.get(reason[0], "") in reason[1]


def _always(_s: Sample) -> bool:
    return True


def _framework(now: dict[str, list[Sample]]) -> Requests | None:
    """The first framework whose request counters are on the page."""
    return next((r for r in REQUESTS if r.finished in now or (r.failed is not None and r.failed in now)), None)


def _requests(now: dict[str, list[Sample]], before: dict[str, list[Sample]]) -> dict[str, tuple[float, float]]:
    """Per model, (finished, failed) requests between two scrapes, for the first framework on the page."""
    r = _framework(now)
    if r is None:
        return {}
    out: dict[str, tuple[float, float]] = {}
    _count(out, r, r.finished, now, before, finished=True, failed=partial(_failed_reason, r.reason))
    _count(out, r, r.failed, now, before, finished=not r.failed_is_part, failed=_always,
           started=r.finished in before)
    return out
