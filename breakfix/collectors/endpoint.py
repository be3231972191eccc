"""The endpoint source: inference endpoints' health and latency against their SLOs.

Each configured endpoint is probed every cycle over HTTP (aiohttp): its health path, its model
list (``/v1/models`` must answer with at least one model) and its ``/metrics``. The pure
``EndpointRules`` compare two scrapes: TTFT p95 and ITL p95 from the histogram buckets that
grew between them, the error share of the requests finished between them, and KV-cache usage,
each against the endpoint's SLO. Metric names per framework (vLLM, NIM, Dynamo, Triton, SGLang) are
listed in ``METRICS`` from the team's notes on each project's metric catalogue (see
``collectors/SOURCES.md``; SGLang's from its "Production Metrics" page, docs.sglang.io
references/production_metrics); ``auto`` takes whichever is present. A failed request is a vLLM
``finished_reason`` of ``abort`` or ``error`` (vLLM's ``FINISH_REASON_STRINGS``: stop, length, abort,
error, repetition), an SGLang ``sglang:num_aborted_requests_total`` of its
``sglang:num_requests_total``, a Dynamo ``status="error"``, a Triton failure. Signals carry the tenant
(namespace, endpoint) and the serving pods and nodes, so the correlator can tie a breach to
the hardware incident under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.promtext import Sample, parse
from breakfix.schemas.common import TenantRef
from breakfix.schemas.signal import Signal, SignalSource

# signal -> candidate metric names, first present wins. Histograms are given by base name.
METRICS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds", "time_to_first_token_seconds",
             "dynamo_frontend_time_to_first_token_seconds", "nv_inference_first_response_histogram_ms",
             "sglang:time_to_first_token_seconds"),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
            "dynamo_frontend_inter_token_latency_seconds", "time_per_output_token_seconds",
            "sglang:inter_token_latency_seconds"),
    # SGLang's token_usage: the share of the KV-cache token pool in use (0..1), as vLLM's kv_cache_usage_perc
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "gpu_cache_usage_perc",
                 "sglang:token_usage"),
}
# (total counter, the label telling failures, the label values that are failures) per framework
REQUESTS: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("vllm:request_success_total", "finished_reason", frozenset({"abort", "error"})),
    ("dynamo_frontend_requests_total", "status", frozenset({"error"})),
    ("request_success_total", "finished_reason", frozenset({"abort", "error"})),
)
# (all requests, failed requests): two counters, the second a part of the first
REQUEST_PAIRS: tuple[tuple[str, str], ...] = (
    ("sglang:num_requests_total", "sglang:num_aborted_requests_total"),
)
TRITON = ("nv_inference_request_success", "nv_inference_request_failure")


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
    models_path: str = "/v1/models"
    metrics_path: str = "/metrics"
    slo: Slo = Slo()
    serving_pods: tuple[str, ...] = ()
    serving_nodes: tuple[str, ...] = ()
    timeout_s: float = 5.0


@dataclass
class Probe:
    health_ok: bool
    health_detail: str
    models_ok: bool | None
    metrics: dict[str, list[Sample]] | None = None
    errors: list[str] = field(default_factory=list)


def _hist(samples: dict[str, list[Sample]], base: str) -> dict[float, float] | None:
    buckets = samples.get(base + "_bucket")
    if not buckets:
        return None
    out: dict[float, float] = {}
    for s in buckets:
        le = float("inf") if s.labels.get("le") in ("+Inf", "inf") else float(s.labels.get("le", "inf"))
        out[le] = out.get(le, 0.0) + s.value  # summed over models/engines
    return out


def quantile(now: dict[float, float], before: dict[float, float] | None, q: float) -> float | None:
    """The q-quantile of the observations between two cumulative-bucket scrapes (upper bound)."""
    les = sorted(now)
    counts = [now[le] - (before or {}).get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    for le, c in zip(les, counts, strict=True):
        if c >= q * total:
            return le
    return les[-1]


def _requests(samples: dict[str, list[Sample]]) -> tuple[float, float] | None:
    """(finished, failed) request counters, summed, for whichever framework is present."""
    for name, label, bad in REQUESTS:
        rows = samples.get(name)
        if rows:
            return sum(s.value for s in rows), sum(s.value for s in rows if s.labels.get(label) in bad)
    for total, failed_name in REQUEST_PAIRS:
        rows = samples.get(total)
        if rows:
            return sum(s.value for s in rows), sum(s.value for s in samples.get(failed_name) or ())
    ok, failed = samples.get(TRITON[0]), samples.get(TRITON[1])
    if ok is not None or failed is not None:
        f = sum(s.value for s in failed or ())
        return sum(s.value for s in ok or ()) + f, f
    return None


class EndpointRules:
    def __init__(self, ctx: NodeContext, spec: EndpointSpec) -> None:
        self.ctx = ctx
        self.spec = spec
        self.tenant = TenantRef(namespace=spec.namespace, endpoint=spec.name)
        self.prev: dict[str, list[Sample]] | None = None

    def apply(self, probe: Probe, at: datetime) -> Cycle:
        spec, slo = self.spec, self.spec.slo
        details = {"serving_pods": ",".join(spec.serving_pods), "serving_nodes": ",".join(spec.serving_nodes),
                   "url": spec.url}
        states: list[Signal] = []

        def state(check: str, bad: bool, msg: str, value: float | None = None, threshold: float | None = None) -> None:
            states.append(self.ctx.signal(source=SignalSource.ENDPOINT, check=check, healthy=not bad, at=at,
                                          tenant=self.tenant, value=value, threshold=threshold,
                                          message=f"{spec.namespace}/{spec.name}: {msg}", details=details))

        down = not probe.health_ok or probe.models_ok is False
        why = probe.health_detail if not probe.health_ok else "no model served" if probe.models_ok is False else "up"
        state("endpoint.down", down, why)
        m = probe.metrics
        if m is None:
            return Cycle(states=states)
        unit = {"nv_inference_first_response_histogram_ms": 0.001}
        for kind, limit in (("ttft", slo.ttft_p95_s), ("itl", slo.itl_p95_s)):
            base = next((b for b in METRICS[kind] if f"{b}_bucket" in m), None)
            if base is None:
                continue
            now = _hist(m, base)
            before = _hist(self.prev, base) if self.prev else None
            p95 = quantile(now, before, 0.95) if now and before is not None else None
            if p95 is not None:
                p95 *= unit.get(base, 1.0)
                state(f"endpoint.{kind}", p95 > limit, f"{kind.upper()} p95 {p95:g}s (SLO {limit:g}s)", p95, limit)
        kv = next((m[n] for n in METRICS["kv_cache"] if n in m), None)
        if kv:
            usage = max(s.value for s in kv)
            state("endpoint.kv_cache", usage >= slo.kv_cache, f"KV cache {usage:.0%} used", usage, slo.kv_cache)
        req, prev_req = _requests(m), _requests(self.prev) if self.prev else None
        if req is not None and prev_req is not None and req[0] > prev_req[0]:
            share = max(0.0, req[1] - prev_req[1]) / (req[0] - prev_req[0])
            state("endpoint.errors", share > slo.error_rate, f"{share:.1%} of requests failed", round(share, 4),
                  slo.error_rate)
        self.prev = m
        return Cycle(states=states)


async def probe(session: aiohttp.ClientSession, spec: EndpointSpec) -> Probe:
    """One round of HTTP calls; network trouble is a failed probe, never an exception."""
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)

    async def get(path: str) -> tuple[int, str]:
        async with session.get(spec.url.rstrip("/") + path, timeout=timeout) as r:
            return r.status, await r.text()

    p = Probe(health_ok=False, health_detail="", models_ok=None)
    try:
        status, _ = await get(spec.health_path)
        p.health_ok, p.health_detail = status == 200, f"health answered HTTP {status}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        p.health_detail = f"health unreachable: {exc.__class__.__name__}"
        return p
    try:
        status, body = await get(spec.models_path)
        p.models_ok = status == 200 and '"id"' in body
    except (TimeoutError, aiohttp.ClientError) as exc:
        p.errors.append(f"models: {exc!r}")
    try:
        status, body = await get(spec.metrics_path)
        if status == 200:
            p.metrics = parse(body)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        p.errors.append(f"metrics: {exc!r}")
    return p
