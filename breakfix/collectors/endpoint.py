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
- ``endpoint.kv_cache``: the highest KV-cache usage gauge (0..1) on the page;
- ``endpoint.stuck``: the engine answers but makes no progress (an NCCL hang in a tensor-parallel group, a
  dead worker, a wedged scheduler): over the interval requests ran and no token was generated, or requests
  waited while none ran and none finished. A fault once that held for ``Slo.stuck_after_s``; progress or an
  idle engine clears it. Pure: ``collectors.endpoint_stuck.judge_stuck`` (see its ``ENGINES``).

Counters are cumulative: a series whose value went down was reset (the server restarted) and its
whole current value is new (Prometheus' counter-reset rule); a series absent from the previous page
started from zero. Latency and error share are judged per model (label ``model_name``, else ``model``:
Triton and Dynamo serve several models from one endpoint) and the worst model is reported, so one
model's breach is not diluted by another's traffic and histograms with different bucket layouts are
never summed. Engines (vLLM ``engine``, SGLang ``dp_rank``/``tp_rank``) of one model are summed.

Metric names per framework are in ``collectors.endpoint_metrics`` (``METRICS`` / ``REQUESTS``, with the
arithmetic over two scrapes), each with its source: vLLM v0 and v1
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
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.endpoint_metrics import (
    METRICS,
    MIN_MODEL_REQUESTS,
    UNIT_S,
    _hist_increase,
    _model,
    _requests,
    quantile,
)
from breakfix.collectors.endpoint_stuck import Scrape, Stall, judge_stuck
from breakfix.collectors.promlines import parse_tolerant
from breakfix.collectors.promtext import Sample
from breakfix.schemas.common import TenantRef
from breakfix.schemas.signal import Signal, SignalSource

__all__ = ["EndpointRules", "EndpointSpec", "Probe", "Scrape", "Slo", "Stall", "judge_stuck", "probe", "quantile"]


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_p95_s: float = 2.0
    itl_p95_s: float = 0.2
    error_rate: float = 0.05
    kv_cache: float = 0.95
    stuck_after_s: float = 120.0  # endpoint.stuck: no progress for this long (a generation takes far less)


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


class EndpointRules:
    def __init__(self, ctx: NodeContext, spec: EndpointSpec) -> None:
        self.ctx = ctx
        self.spec = spec
        self.tenant = TenantRef(namespace=spec.namespace, endpoint=spec.name)
        self.prev: dict[str, list[Sample]] | None = None
        self.prev_at: datetime | None = None
        self.stuck_since: dict[str, datetime] = {}  # endpoint.stuck: per model ("" all), when its stall was first seen

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
        before = Scrape(prev, self.prev_at) if prev is not None and self.prev_at is not None else None
        stall = judge_stuck(before, Scrape(m, at), self.stuck_since, slo.stuck_after_s)
        self.stuck_since = stall.since
        if stall.stuck is not None:
            state("endpoint.stuck", stall.stuck, stall.message + of(stall.model), round(stall.held_s, 3),
                  slo.stuck_after_s, stall.model)
        self.prev, self.prev_at = m, at
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
