"""The endpoint source across serving frameworks: current vLLM's ``finished_reason="error"`` is a failed request,
and SGLang's documented metric names (docs.sglang.io "Production Metrics") raise the same ``endpoint.*`` signals
as vLLM's do, read from a live HTTP server as the source reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import aiohttp
from aiohttp import web

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.endpoint import EndpointRules, EndpointSpec, Slo, probe
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0
from tests.test_collector_sources import FakeVllm

M = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'
# SGLang's /metrics names, HELP and TYPE lines as its Production Metrics page shows them (labels trimmed to model_name)
SGLANG = """# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{{{m}}} {kv}
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_sum{{{m}}} 100.0
sglang:time_to_first_token_seconds_bucket{{le="0.5",{m}}} {fast}
sglang:time_to_first_token_seconds_bucket{{le="10.0",{m}}} {ttft}
sglang:time_to_first_token_seconds_bucket{{le="+Inf",{m}}} {ttft}
sglang:time_to_first_token_seconds_count{{{m}}} {ttft}
# HELP sglang:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE sglang:inter_token_latency_seconds histogram
sglang:inter_token_latency_seconds_sum{{{m}}} 10.0
sglang:inter_token_latency_seconds_bucket{{le="0.05",{m}}} {quick}
sglang:inter_token_latency_seconds_bucket{{le="1.0",{m}}} {itl}
sglang:inter_token_latency_seconds_bucket{{le="+Inf",{m}}} {itl}
sglang:inter_token_latency_seconds_count{{{m}}} {itl}
# HELP sglang:num_requests_total Number of requests processed.
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{{{m}}} {total}
# HELP sglang:num_aborted_requests_total Number of requests aborted.
# TYPE sglang:num_aborted_requests_total counter
sglang:num_aborted_requests_total{{{m}}} {aborted}
"""
# current vLLM: every FINISH_REASON_STRINGS value (stop, length, abort, error, repetition), per engine
L = 'engine="0",model_name="Qwen/Qwen3-8B"'
VLLM_REASONS = """# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{{l},finished_reason="stop"}} {stop}
vllm:request_success_total{{{l},finished_reason="length"}} {length}
vllm:request_success_total{{{l},finished_reason="abort"}} {abort}
vllm:request_success_total{{{l},finished_reason="error"}} {error}
vllm:request_success_total{{{l},finished_reason="repetition"}} {repetition}
"""


def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


def bad(cycle: Cycle) -> dict[str, float | None]:
    return {s.check: s.value for s in cycle.states if not s.healthy}


class Serves(Protocol):
    def app(self) -> web.Application: ...


@asynccontextmanager
async def serving(fake: Serves) -> AsyncIterator[str]:
    """A local HTTP server for ``fake`` (anything with an aiohttp ``app()``) on a free port."""
    site_runner = web.AppRunner(fake.app())
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site_runner.addresses[0][1]}"
    finally:
        await site_runner.cleanup()


async def two_scrapes(catalog: Catalog, first: str, second: str) -> tuple[Cycle, Cycle]:
    fake = FakeVllm()
    fake.metrics = first
    async with serving(fake) as url, aiohttp.ClientSession() as http:
        spec = EndpointSpec(name="llama", namespace="inf", url=url,
                            slo=Slo(ttft_p95_s=2.0, itl_p95_s=0.2, error_rate=0.05, kv_cache=0.95))
        rules = EndpointRules(ctx(catalog), spec)
        one = rules.apply(await probe(http, spec), T0)
        fake.metrics = second
        return one, rules.apply(await probe(http, spec), T0)


async def test_vllm_finished_reason_error_counts_as_a_failed_request(catalog: Catalog) -> None:
    quiet = VLLM_REASONS.format(l=L, stop=100, length=0, abort=0, error=0, repetition=0)
    # 300 requests finished since: 100 stop, 50 length, 50 repetition (all fine) and 100 error
    failing = VLLM_REASONS.format(l=L, stop=200, length=50, abort=0, error=100, repetition=50)
    one, two = await two_scrapes(catalog, quiet, failing)
    assert bad(one) == {}
    assert bad(two) == {"endpoint.errors": round(100 / 300, 4)}


async def test_vllm_length_and_repetition_finishes_are_not_failures(catalog: Catalog) -> None:
    quiet = VLLM_REASONS.format(l=L, stop=100, length=0, abort=0, error=0, repetition=0)
    fine = VLLM_REASONS.format(l=L, stop=150, length=30, abort=0, error=0, repetition=20)
    _, two = await two_scrapes(catalog, quiet, fine)
    errors = next(s for s in two.states if s.check == "endpoint.errors")
    assert errors.healthy and errors.value == 0.0


async def test_sglang_ttft_itl_kv_cache_and_abort_breaches_raise_endpoint_signals(catalog: Catalog) -> None:
    calm = SGLANG.format(m=M, kv=0.5, fast=100, ttft=100, quick=1000, itl=1000, total=100, aborted=0)
    # since then: 400 of 500 first tokens took up to 10 s, 900 of 1000 tokens up to 1 s apart, the KV cache is
    # 99 % used and 300 of 400 requests were aborted. p95 as histogram_quantile interpolates it in its bucket:
    # TTFT 0.5 + 9.5 * (475 - 100) / 400, ITL 0.05 + 0.95 * (950 - 100) / 900
    bad_page = SGLANG.format(m=M, kv=0.99, fast=200, ttft=600, quick=1100, itl=2000, total=500, aborted=300)
    one, two = await two_scrapes(catalog, calm, bad_page)
    assert bad(one) == {}
    assert bad(two) == {"endpoint.ttft": 9.40625, "endpoint.itl": 0.947222, "endpoint.kv_cache": 0.99,
                        "endpoint.errors": 0.75}
    kv = next(s for s in two.states if s.check == "endpoint.kv_cache")
    assert kv.tenant is not None and kv.tenant.key() == "inf/llama" and kv.threshold == 0.95


async def test_sglang_within_slo_is_healthy_on_every_check(catalog: Catalog) -> None:
    calm = SGLANG.format(m=M, kv=0.3, fast=100, ttft=100, quick=1000, itl=1000, total=100, aborted=0)
    fine = SGLANG.format(m=M, kv=0.4, fast=300, ttft=300, quick=2000, itl=2000, total=300, aborted=1)
    _, two = await two_scrapes(catalog, calm, fine)
    assert {s.check: s.healthy for s in two.states} == {
        "endpoint.down": True, "endpoint.ttft": True, "endpoint.itl": True, "endpoint.kv_cache": True,
        "endpoint.errors": True}
