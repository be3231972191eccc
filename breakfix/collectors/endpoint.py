"""The endpoint source: inference endpoints' health and latency against their SLOs.

Each configured endpoint is probed every cycle over HTTP (aiohttp): its health path, its model
list (``/v1/models`` must answer with at least one model) and its ``/metrics``. The page is read by
``collectors.promlines.parse_tolerant``: one sample no parser takes is skipped (named in
``Probe.errors``), the rest of the page is still judged. The pure ``EndpointRules`` compare two
scrapes, as Prometheus' ``increase()`` and ``histogram_quantile()`` would over the collector's
interval, and hand ``endpoint.*`` states to the edge (``collectors.edge``):

- ``endpoint.ttft`` / ``endpoint.itl``: the p95 of the observations between the two scrapes, linearly
  interpolated inside its bucket as ``histogram_quantile`` does (Prometheus ``promql/quantile.go``
  ``bucketQuantile``; the project's fleet rules in ``rules/fleet.yaml`` use the same function). A p95
  in the ``+Inf`` bucket is "above the highest finite bound": a breach when that bound is over the
  SLO, otherwise not judged (the true value is unknown);
- ``endpoint.errors``: the share of the requests finished between the scrapes that failed;
- ``endpoint.kv_cache``: the highest KV-cache usage gauge (0..1) on the page.

Counters are cumulative: a series whose value went down was reset (the server restarted) and its
whole current value is new (Prometheus' counter-reset rule); a series absent from the previous page
started from zero. Latency and error share are judged per model (label ``model_name``, else ``model``:
Triton and Dynamo serve several models from one endpoint) and the worst model is reported, so one
model's breach is not diluted by another's traffic and histograms with different bucket layouts are
never summed. Engines (vLLM ``engine``, SGLang ``dp_rank``/``tp_rank``) of one model are summed.

Metric names per framework are in ``METRICS`` / ``REQUESTS``, each with its source: vLLM v0 and v1
(``vllm/v1/metrics/loggers.py``; ``/work/shared/reference/inference_metrics.csv``), NVIDIA NIM for LLMs
(unprefixed names; ``request_success_total`` counts stop/length finishes and ``request_failure_total``
the others, per NIM's observability page and a real NIM ``/v1/metrics`` page in
``tests/data/endpoint_nim_llm.txt``), Dynamo (``lib/runtime/src/metrics/prometheus_names.rs``; the older
``nv_llm_http_service_`` prefix), Triton (``docs/user_guide/metrics.md``), SGLang (``docs/references/
production_metrics.md``, ``python/sglang/srt/metrics/collector.py``), TGI (``docs/source/reference/
metrics.md``; ``tgi_request_failure{err}`` from its router), TensorRT-LLM (``tensorrt_llm/metrics/
collector.py``: ``trtllm_`` names; ``trtllm:`` when Dynamo re-exports them) and llama.cpp server
(``llamacpp:kv_cache_usage_ratio``, its README). Unknown names are not judged: a page of another
framework yields ``endpoint.down`` only. Signals carry the tenant (namespace, endpoint) and the
serving pods and nodes, so the correlator can tie a breach to the hardware incident under it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import aiohttp

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.promlines import parse_tolerant
from breakfix.collectors.promtext import Sample
from breakfix.schemas.common import TenantRef
from breakfix.schemas.signal import Signal, SignalSource

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


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_p95_s: float = 2.0
    itl_p95_s: float = 0.2
    error_rate: float = 0.05
    kv_cache: float = 0.95


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    name: str
    namespace: str
    url: str  # base URL, e.g. http://10.0.0.5:8000
    health_path: str = "/health"
    models_path: str = "/v1/models"  # "": not probed
    metrics_path: str = "/metrics"
    slo: Slo = Slo()
    serving_pods: tuple[str, ...] = ()
    serving_nodes: tuple[str, ...] = ()
    timeout_s: float = 5.0


@dataclass
class Probe:
    health_ok: bool
    health_detail: str
    models_ok: bool | None  # None: not known (not probed, unreachable, or the path needs a key we do not have)
    metrics: dict[str, list[Sample]] | None = None
    errors: list[str] = field(default_factory=list)


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


def _requests(now: dict[str, list[Sample]], before: dict[str, list[Sample]]) -> dict[str, tuple[float, float]]:
    """Per model, (finished, failed) requests between two scrapes, for the first framework on the page."""
    for r in REQUESTS:
        if r.finished not in now and (r.failed is None or r.failed not in now):
            continue
        out: dict[str, tuple[float, float]] = {}
        _count(out, r, r.finished, now, before, finished=True, failed=partial(_failed_reason, r.reason))
        _count(out, r, r.failed, now, before, finished=not r.failed_is_part, failed=_always,
               started=r.finished in before)
        return out
    return {}


class EndpointRules:
    def __init__(self, ctx: NodeContext, spec: EndpointSpec) -> None:
        self.ctx = ctx
        self.spec = spec
        self.tenant = TenantRef(namespace=spec.namespace, endpoint=spec.name)
        self.prev: dict[str, list[Sample]] | None = None

    def apply(self, probe: Probe, at: datetime) -> Cycle:
        spec, slo = self.spec, self.spec.slo
        base_details = {"serving_pods": ",".join(spec.serving_pods), "serving_nodes": ",".join(spec.serving_nodes),
                        "url": spec.url}
        states: list[Signal] = []

        def state(check: str, bad: bool, msg: str, value: float | None = None, threshold: float | None = None,
                  model: str = "") -> None:
            details = {**base_details, "model": model} if model else base_details
            states.append(self.ctx.signal(source=SignalSource.ENDPOINT, check=check, healthy=not bad, at=at,
                                          tenant=self.tenant, value=value, threshold=threshold,
                                          message=f"{spec.namespace}/{spec.name}: {msg}", details=details))

        def of(model: str) -> str:
            return f" (model {model})" if model else ""

        down = not probe.health_ok or probe.models_ok is False
        why = probe.health_detail if not probe.health_ok else "no model served" if probe.models_ok is False else "up"
        state("endpoint.down", down, why)
        m = probe.metrics
        if m is None:
            return Cycle(states=states)
        prev = self.prev
        for kind, limit in (("ttft", slo.ttft_p95_s), ("itl", slo.itl_p95_s)):
            base = next((b for b in METRICS[kind] if f"{b}_bucket" in m), None)
            if base is None or prev is None:
                continue
            p95s: list[tuple[str, float, bool]] = []
            for model, buckets in _hist_increase(m, prev, base).items():
                got = quantile(buckets, 0.95)
                if got is not None:
                    p95s.append((model, got[0] * UNIT_S.get(base, 1.0), got[1]))
            judged = [(model, v, above) for model, v, above in p95s if not above or v > limit]
            if not judged:
                continue  # no observation since the last scrape, or only "above a bound under the SLO"
            model, p95, above = max(judged, key=lambda t: t[1])
            if p95 <= limit and len(judged) < len(p95s):
                continue  # a model above its highest bucket, under the SLO: unknown, so no "healthy" for it either
            shown = f"above {p95:.4g}s (the highest bucket)" if above else f"{p95:.4g}s"
            state(f"endpoint.{kind}", p95 > limit, f"{kind.upper()} p95 {shown} (SLO {limit:g}s){of(model)}",
                  round(p95, 6), limit, model)
        kv = [s for s in next((m[n] for n in METRICS["kv_cache"] if n in m), ()) if math.isfinite(s.value)]
        if kv:
            worst = max(kv, key=lambda s: s.value)
            state("endpoint.kv_cache", worst.value >= slo.kv_cache, f"KV cache {worst.value:.0%} used"
                  f"{of(_model(worst.labels))}", worst.value, slo.kv_cache, _model(worst.labels))
        if prev is not None:
            counts = _requests(m, prev)
            # per model only with enough requests to mean something (one aborted request of a model asked once,
            # a client that hung up, is not 100 % failing); the whole endpoint always, as one model would be
            shares = [(min(failed / done, 1.0), done, model) for model, (done, failed) in counts.items()
                      if done >= MIN_MODEL_REQUESTS and len(counts) > 1]
            done_all, failed_all = sum(d for d, _ in counts.values()), sum(f for _, f in counts.values())
            if done_all > 0:
                only = next(iter(counts)) if len(counts) == 1 else ""
                shares.append((min(failed_all / done_all, 1.0), done_all, only))
            if shares:
                share, done, model = max(shares)
                state("endpoint.errors", share > slo.error_rate, f"{share:.1%} of {done:g} requests failed{of(model)}",
                      round(share, 4), slo.error_rate, model)
        self.prev = m
        return Cycle(states=states)


KEY_REQUIRED = (401, 403, 429)  # the path needs an API key (vLLM --api-key guards every /v1 path, /health
#                                 excepted), or the server throttles us: the model list is not known, never "none"
NOT_SERVED = (404, 405)  # the server has no such path (Triton, TGI before /v1/models)
NIM_METRICS_PATH = "/v1/metrics"  # NIM for LLMs serves its page there (its observability docs)
MAX_ERRORS = 8
MAX_BODY = 32 << 20  # bytes of one reply (a multi-model Triton page is a few MB)
# what one HTTP call may raise: network trouble, a URL yarl refuses (ValueError), a bad socket (OSError)
NETWORK: tuple[type[BaseException], ...] = (TimeoutError, aiohttp.ClientError, OSError, ValueError)


def _text(raw: bytes, charset: str | None) -> str:
    """A body as text, whatever it holds: bytes its charset cannot decode are replaced, an unknown charset is
    read as UTF-8 (aiohttp's own ``text()`` raises UnicodeDecodeError / LookupError there)."""
    try:
        return raw.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


async def probe(session: aiohttp.ClientSession, spec: EndpointSpec) -> Probe:
    """One round of HTTP calls; network trouble is a failed probe, never an exception.

    The model list decides "no model served" only when the server answered it: a key the collector lacks
    (401/403) or a path the server does not have (404/405) leaves it unknown, said in ``errors``. A default
    ``/metrics`` that is not found is asked again at NIM's ``/v1/metrics``."""
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)

    async def get(path: str) -> tuple[int, str]:
        async with session.get(spec.url.rstrip("/") + path, timeout=timeout) as r:
            body = await r.content.read(MAX_BODY + 1)  # a page is read only this far: memory stays bounded
            if len(body) > MAX_BODY:
                raise ValueError(f"{path}: over {MAX_BODY} bytes")
            return r.status, _text(body, r.charset)

    p = Probe(health_ok=False, health_detail="", models_ok=None)
    try:
        status, _ = await get(spec.health_path)
        p.health_ok, p.health_detail = status == 200, f"health answered HTTP {status}"
    except NETWORK as exc:
        p.health_detail = f"health unreachable: {exc.__class__.__name__}"
        return p
    if spec.models_path:
        try:
            status, body = await get(spec.models_path)
            if status in KEY_REQUIRED + NOT_SERVED:
                p.errors.append(f"models: HTTP {status} at {spec.models_path}: not judged")
            else:
                p.models_ok = status == 200 and '"id"' in body
        except NETWORK as exc:
            p.errors.append(f"models: {exc!r}")
    try:
        status, body = await get(spec.metrics_path)
        if status == 404 and spec.metrics_path == "/metrics":
            status, body = await get(NIM_METRICS_PATH)
        if status == 200:
            p.metrics, skipped = parse_tolerant(body)
            p.errors.extend(f"metrics: line {s.line} ({s.family}) skipped: {s.reason}" for s in skipped[:MAX_ERRORS])
    except NETWORK as exc:
        p.errors.append(f"metrics: {exc!r}"[:300])
    return p
