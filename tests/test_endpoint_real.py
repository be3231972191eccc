"""The endpoint source on real ``/metrics`` pages of vLLM (KServe), NVIDIA NIM, SGLang and a two-model Triton, and
on the documented names and behaviours of TGI, TensorRT-LLM, Dynamo and llama.cpp, read from a live HTTP server as
the source reads it. Sources of every page: ``tests/data/SOURCES.md``; of every rule: ``collectors/endpoint.py``.

Each test compares two scrapes, as the collector does each interval. A "fresh" first page is the real page with
every sample at 0 (the server just started: the same series, nothing counted yet)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.endpoint import EndpointRules, EndpointSpec, Slo, probe, quantile
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0
from tests.test_endpoint_frameworks import serving

DATA = Path(__file__).parent / "data"
SLO = Slo(ttft_p95_s=2.0, itl_p95_s=0.2, error_rate=0.05, kv_cache=0.95)
_SAMPLE = re.compile(r"^(?P<series>[^#\s][^ ]*(?:\{.*\})?) (?P<value>\S+)$")


def page(name: str) -> str:
    return (DATA / name).read_text()


def zeroed(text: str) -> str:
    """The same page with every sample at 0: the server as it starts."""
    return "\n".join(m.group("series") + " 0" if (m := _SAMPLE.match(line)) else line
                     for line in text.splitlines()) + "\n"


def set_values(text: str, values: dict[str, float]) -> str:
    """The page with the samples whose series text (name and labels as written) is a key set to its value."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        out.append(f"{m.group('series')} {values[m.group('series')]}" if m and m.group("series") in values else line)
    missing = set(values) - {m.group("series") for line in text.splitlines() if (m := _SAMPLE.match(line))}
    assert not missing, f"not on the page: {missing}"
    return "\n".join(out) + "\n"


@dataclass
class Server:
    """A real HTTP server answering health, model list and metrics as configured."""

    metrics: str = ""
    metrics_path: str = "/metrics"
    health: int = 200
    health_body: bytes = b"{}"
    health_type: str = "application/json"
    models: int = 200
    models_body: str = '{"object":"list","data":[{"id":"m","object":"model"}]}'
    hits: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits.append(request.path)
            if request.path == "/health":
                return web.Response(status=self.health, body=self.health_body, headers={
                    "Content-Type": self.health_type})
            if request.path == "/v1/models":
                return web.Response(status=self.models, text=self.models_body, content_type="application/json")
            if request.path == self.metrics_path:
                return web.Response(text=self.metrics)
            return web.Response(status=404, text="not found")

        a = web.Application()
        a.router.add_route("GET", "/{tail:.*}", handle)
        return a




def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


async def scrapes(catalog: Catalog, *pages: str, server: Server | None = None) -> list[Cycle]:
    server = server or Server()
    out = []
    async with serving(server) as url, aiohttp.ClientSession() as http:
        spec = EndpointSpec(name="llm", namespace="inf", url=url, slo=SLO)
        rules = EndpointRules(ctx(catalog), spec)
        for text in pages:
            server.metrics = text
            out.append(rules.apply(await probe(http, spec), T0))
    return out


def states(cycle: Cycle) -> dict[str, tuple[bool, float | None]]:
    return {s.check: (s.healthy, s.value) for s in cycle.states}


# --- real pages ---------------------------------------------------------------------------------------------------
async def test_real_vllm_page_p95_is_interpolated_inside_its_bucket_not_its_upper_bound(catalog: Catalog) -> None:
    """KServe vLLM page: 14 first tokens, 13 within 1 s and the 14th in (1, 2.5]. p95 (rank 13.3) is 1.45 s as
    histogram_quantile reads it; the bucket's upper bound 2.5 s would breach the default 2 s SLO on a healthy
    server."""
    real = page("endpoint_vllm_kserve.txt")
    _, second = await scrapes(catalog, zeroed(real), real)
    got = states(second)
    assert got["endpoint.ttft"] == (True, pytest.approx(1.45))
    assert got["endpoint.errors"] == (True, 0.0) and got["endpoint.kv_cache"] == (True, 0.0)
    assert got["endpoint.down"][0]


async def test_real_nim_page_request_failure_total_counts_failed_requests(catalog: Catalog) -> None:
    """NIM's request_success_total has no finished_reason label: failures are its request_failure_total."""
    real = page("endpoint_nim_llm.txt")
    failing = set_values(real, {'request_success_total{model_name="test"}': 11.0,
                                'request_failure_total{model_name="test"}': 10.0})
    _, second = await scrapes(catalog, real, failing)
    assert states(second)["endpoint.errors"] == (False, 0.5)  # 10 failed of the 20 finished since


async def test_real_sglang_page_p95_past_the_highest_bucket_is_a_breach_not_a_crash(catalog: Catalog) -> None:
    """SGLang's documented page: 8495 of 11008 first tokens took over 30 s, its highest finite bound. The p95 is
    "above 30 s", never infinity (which no signal may carry); ITL is read from time_per_output_token_seconds,
    the name SGLang used before inter_token_latency_seconds."""
    real = page("endpoint_sglang_docs.txt")
    _, second = await scrapes(catalog, zeroed(real), real)
    got = states(second)
    assert got["endpoint.ttft"] == (False, 30.0)
    ttft = next(s for s in second.states if s.check == "endpoint.ttft")
    assert "above 30s" in ttft.message and ttft.details["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert got["endpoint.itl"] == (True, pytest.approx(0.149791, abs=1e-6))
    assert got["endpoint.kv_cache"] == (True, 0.28)


async def test_real_two_model_triton_page_one_failing_model_is_not_diluted_by_the_other(catalog: Catalog) -> None:
    real = page("endpoint_triton_two_models.txt")
    busy = set_values(real, {
        'nv_inference_request_success{model="densenet_onnx",version="1"}': 60,
        'nv_inference_request_failure{model="densenet_onnx",reason="BACKEND",version="1"}': 40,
        'nv_inference_request_success{model="cc_fraud_detect_model",version="1"}': 100000})
    _, second = await scrapes(catalog, real, busy)
    errors = next(s for s in second.states if s.check == "endpoint.errors")
    assert (errors.healthy, errors.value, errors.details["model"]) == (False, 0.4, "densenet_onnx")


# --- counters and histograms across a restart ---------------------------------------------------------------------
VLLM = """# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {stop}
vllm:request_success_total{{engine="0",finished_reason="abort",model_name="m"}} {abort}
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="1.0",model_name="m"}} {fast}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="{le}",model_name="m"}} {all}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {all}
vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {all}
"""


def vllm(stop: int = 0, abort: int = 0, fast: int = 0, all: int = 0, le: str = "10.0") -> str:
    return VLLM.format(stop=stop, abort=abort, fast=fast, all=all, le=le)


async def test_a_counter_that_went_down_was_reset_and_its_new_counts_are_judged(catalog: Catalog) -> None:
    """The server restarted between the scrapes: 40 of the 50 requests since were aborted (Prometheus counter-reset
    rule: after a fall the whole current value is new)."""
    _, second = await scrapes(catalog, vllm(stop=1000), vllm(stop=10, abort=40))
    assert states(second)["endpoint.errors"] == (False, 0.8)


async def test_a_histogram_that_went_down_was_reset_and_its_new_counts_are_judged(catalog: Catalog) -> None:
    _, second = await scrapes(catalog, vllm(fast=5000, all=5000), vllm(fast=10, all=100))
    assert states(second)["endpoint.ttft"][0] is False  # 90 of 100 first tokens after the restart took up to 10 s


async def test_a_bucket_bound_no_number_reads_is_skipped_not_a_crash(catalog: Catalog) -> None:
    _, second = await scrapes(catalog, vllm(fast=1, all=1, le="ten"), vllm(fast=2, all=100, le="ten"))
    assert "endpoint.ttft" not in states(second)  # only the 1.0 and +Inf bounds: p95 "above 1 s", under the SLO
    assert states(second)["endpoint.down"] == (True, None)


async def test_a_series_new_since_the_last_scrape_counts_from_zero(catalog: Catalog) -> None:
    """Triton adds a failure series per reason when it first fails: all its count is new."""
    ok = '# TYPE nv_inference_request_success counter\nnv_inference_request_success{{model="m",version="1"}} {n}\n'
    fail = '# TYPE nv_inference_request_failure counter\n' \
           'nv_inference_request_failure{{model="m",reason="OTHER",version="1"}} 0\n{extra}'
    before = ok.format(n=100) + fail.format(extra="")
    after = ok.format(n=150) + fail.format(
        extra='nv_inference_request_failure{model="m",reason="REJECTED",version="1"} 50\n')
    _, second = await scrapes(catalog, before, after)
    assert states(second)["endpoint.errors"] == (False, 0.5)


async def test_models_with_different_bucket_layouts_are_judged_apart(catalog: Catalog) -> None:
    """Triton histograms can have per-model bounds; merged by bound they are no cumulative histogram at all."""
    tmpl = ('nv_inference_first_response_histogram_ms_bucket{{model="a",le="100"}} {a1}\n'
            'nv_inference_first_response_histogram_ms_bucket{{model="a",le="+Inf"}} {a2}\n'
            'nv_inference_first_response_histogram_ms_bucket{{model="b",le="5000"}} {b1}\n'
            'nv_inference_first_response_histogram_ms_bucket{{model="b",le="+Inf"}} {b2}\n')
    _, second = await scrapes(catalog, tmpl.format(a1=0, a2=0, b1=0, b2=0),
                              tmpl.format(a1=1000, a2=1000, b1=0, b2=100))
    ttft = next(s for s in second.states if s.check == "endpoint.ttft")
    assert (ttft.healthy, ttft.value, ttft.details["model"]) == (False, 5.0, "b")  # all of b's above 5 s


async def test_negative_and_infinite_samples_are_no_counts_and_no_crash(catalog: Catalog) -> None:
    """A gauge of -Inf (Prometheus text allows it) never reaches a signal, which takes finite numbers only; a
    negative counter is no count."""
    text = "vllm:kv_cache_usage_perc{{model_name=\"m\"}} -Inf\n" + VLLM.replace("{abort}", "{abort} \n", 1)
    _, second = await scrapes(catalog, text.format(stop=0, abort=-5, fast=0, all=0, le="10.0"),
                              text.format(stop=10, abort=-50, fast=0, all=0, le="10.0"))
    got = states(second)
    assert "endpoint.kv_cache" not in got and got["endpoint.errors"] == (True, 0.0)


OPENMETRICS = """# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="a \\"quoted\\" \\\\ name"}} {fast} # {{trace_id="7f"}} 0.4
vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="a \\"quoted\\" \\\\ name"}} {all}
vllm:time_to_first_token_seconds_count{{model_name="a \\"quoted\\" \\\\ name"}} {all}
vllm:time_to_first_token_seconds_created{{model_name="a \\"quoted\\" \\\\ name"}} 1.7e9
vllm:time_to_first_token_seconds_sum{{model_name="a \\"quoted\\" \\\\ name"}} NaN
# EOF
"""


async def test_openmetrics_page_with_exemplars_created_nan_and_escaped_labels_is_judged(catalog: Catalog) -> None:
    _, second = await scrapes(catalog, OPENMETRICS.format(fast=0, all=0), OPENMETRICS.format(fast=960, all=1000))
    ttft = next(s for s in second.states if s.check == "endpoint.ttft")
    assert (ttft.healthy, ttft.value) == (True, pytest.approx(950 / 960))
    assert ttft.details["model"] == 'a "quoted" \\ name'


def test_quantile_follows_histogram_quantile() -> None:
    inf = float("inf")
    assert quantile({0.5: 10, 1.0: 20, 5.0: 100, inf: 100}, 0.95) == (4.75, False)
    assert quantile({1.0: 1, inf: 100}, 0.95) == (1.0, True)  # in the +Inf bucket: the highest finite bound
    assert quantile({1.0: 0, inf: 0}, 0.95) is None and quantile({1.0: 5}, 0.95) is None  # empty; no +Inf
    assert quantile({1.0: 50, 2.0: 40, inf: 100}, 0.95) == (2.0, True)  # a count that fell is made monotonic
    assert quantile({1.0: 50, 2.0: 100, inf: 100}, 0.5) == (1.0, False)


# --- frameworks by their documented names -------------------------------------------------------------------------
TGI = """# TYPE tgi_request_success counter
tgi_request_success {ok}
# TYPE tgi_request_failure counter
tgi_request_failure{{err="validation"}} {invalid}
tgi_request_failure{{err="generation"}} {gen}
# TYPE tgi_request_mean_time_per_token_duration histogram
tgi_request_mean_time_per_token_duration_bucket{{le="0.05"}} {quick}
tgi_request_mean_time_per_token_duration_bucket{{le="0.5"}} {all}
tgi_request_mean_time_per_token_duration_bucket{{le="+Inf"}} {all}
tgi_request_mean_time_per_token_duration_sum 1.0
tgi_request_mean_time_per_token_duration_count {all}
"""


async def test_tgi_slow_tokens_and_generation_failures_are_judged_and_validation_errors_are_not(
        catalog: Catalog) -> None:
    _, second = await scrapes(catalog, TGI.format(ok=0, invalid=0, gen=0, quick=0, all=0),
                              TGI.format(ok=90, invalid=500, gen=10, quick=10, all=100))
    got = states(second)
    assert got["endpoint.errors"] == (False, 0.1)  # 10 generation failures of 100; 500 bad requests are the client's
    assert got["endpoint.itl"][0] is False


TRTLLM = """# TYPE trtllm_request_success_total counter
trtllm_request_success_total{{engine_type="trtllm",finished_reason="stop",model_name="m"}} {stop}
trtllm_request_success_total{{engine_type="trtllm",finished_reason="cancelled",model_name="m"}} {cancelled}
# TYPE trtllm_request_error_total counter
trtllm_request_error_total{{engine_type="trtllm",http_code="400",model_name="m"}} {e400}
trtllm_request_error_total{{engine_type="trtllm",http_code="500",model_name="m"}} {e500}
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{{engine_type="trtllm",model_name="m"}} {kv}
# TYPE trtllm_time_to_first_token_seconds histogram
trtllm_time_to_first_token_seconds_bucket{{engine_type="trtllm",le="0.5",model_name="m"}} {fast}
trtllm_time_to_first_token_seconds_bucket{{engine_type="trtllm",le="+Inf",model_name="m"}} {fast}
"""


async def test_trtllm_names_raise_the_same_signals(catalog: Catalog) -> None:
    _, second = await scrapes(catalog, TRTLLM.format(stop=0, cancelled=0, e400=0, e500=0, kv=0.1, fast=0),
                              TRTLLM.format(stop=80, cancelled=10, e400=300, e500=10, kv=0.97, fast=100))
    got = states(second)
    assert got["endpoint.errors"] == (False, 0.2)  # (10 cancelled + 10 HTTP 500) of 100; the 400s are the client's
    assert got["endpoint.kv_cache"] == (False, 0.97) and got["endpoint.ttft"] == (True, 0.475)


DYNAMO = """# TYPE {p}_requests_total counter
{p}_requests_total{{endpoint="chat_completions",error_type="",model="qwen",request_type="stream",status="success"}} {ok}
{p}_requests_total{{endpoint="chat_completions",error_type="validation",model="qwen",request_type="stream",status="error"}} {bad}
{p}_requests_total{{endpoint="chat_completions",error_type="internal",model="qwen",request_type="stream",status="error"}} {err}
"""  # noqa: E501


@pytest.mark.parametrize("prefix", ["dynamo_frontend", "nv_llm_http_service"])
async def test_dynamo_client_validation_errors_are_not_endpoint_failures(catalog: Catalog, prefix: str) -> None:
    _, quiet = await scrapes(catalog, DYNAMO.format(p=prefix, ok=0, bad=0, err=0),
                             DYNAMO.format(p=prefix, ok=100, bad=400, err=1))
    assert states(quiet)["endpoint.errors"] == (True, round(1 / 101, 4))
    _, failing = await scrapes(catalog, DYNAMO.format(p=prefix, ok=0, bad=0, err=0),
                               DYNAMO.format(p=prefix, ok=100, bad=0, err=100))
    assert states(failing)["endpoint.errors"] == (False, 0.5)


async def test_llamacpp_kv_cache_usage_ratio_is_the_kv_cache_check(catalog: Catalog) -> None:
    text = "# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio 0.99\n" \
           "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n"
    (one,) = await scrapes(catalog, text)
    assert states(one)["endpoint.kv_cache"] == (False, 0.99)


# --- HTTP ---------------------------------------------------------------------------------------------------------
async def test_models_list_behind_an_api_key_is_not_an_endpoint_down(catalog: Catalog) -> None:
    """vLLM --api-key answers 401 on every /v1 path but /health and /metrics stay open: the model list is unknown,
    the endpoint is up."""
    (one,) = await scrapes(catalog, vllm(), server=Server(models=401, models_body='{"error":"Unauthorized"}'))
    assert states(one)["endpoint.down"] == (True, None)
    (throttled,) = await scrapes(catalog, vllm(), server=Server(models=429, models_body='{"error":"rate limited"}'))
    assert states(throttled)["endpoint.down"] == (True, None), "throttled: the model list is not known, not empty"
    (empty,) = await scrapes(catalog, vllm(), server=Server(models_body='{"object":"list","data":[]}'))
    assert states(empty)["endpoint.down"] == (False, None), "an answered, empty model list still is no model served"


async def test_nim_metrics_at_v1_metrics_are_found_when_metrics_is_not(catalog: Catalog) -> None:
    server = Server(metrics_path="/v1/metrics")
    real = page("endpoint_nim_llm.txt")
    _, second = await scrapes(catalog, real, set_values(real, {'request_success_total{model_name="test"}': 2.0}),
                              server=server)
    assert states(second)["endpoint.errors"] == (True, 0.0) and "/v1/metrics" in server.hits


async def test_one_malformed_line_does_not_hide_the_rest_of_the_page(catalog: Catalog) -> None:
    broken = "# TYPE custom_backend_metric gauge\ncustom_backend_metric{x=\"1\"} not-a-number\n"
    _, second = await scrapes(catalog, broken + vllm(stop=0), broken + vllm(stop=10, abort=10))
    assert states(second)["endpoint.errors"] == (False, 0.5)


async def test_a_health_body_in_an_unknown_charset_is_read_not_raised(catalog: Catalog) -> None:
    server = Server(health_body=b"\xff\xfe ok", health_type="text/plain; charset=no-such-charset")
    (one,) = await scrapes(catalog, vllm(), server=server)
    assert states(one)["endpoint.down"] == (True, None)


# --- from a review of the judgments ---------------------------------------------------------------------------------
def judged(catalog: Catalog, *pages: str) -> list[dict[str, tuple[bool, float | None]]]:
    """Pages through the rules directly (no server): what each scrape says."""
    from breakfix.collectors.endpoint import Probe
    from breakfix.collectors.promlines import parse_tolerant

    rules = EndpointRules(ctx(catalog), EndpointSpec(name="llm", namespace="inf", url="http://x", slo=SLO))
    return [states(rules.apply(Probe(True, "ok", True, parse_tolerant(text)[0]), T0)) for text in pages]


def tgi(ok: int, failed: int | None) -> str:
    text = f"# TYPE tgi_request_success counter\ntgi_request_success {ok}\n"
    if failed is not None:  # TGI registers its failure counter with the first failure
        text += f'# TYPE tgi_request_failure counter\ntgi_request_failure{{err="generation"}} {failed}\n'
    return text


def test_a_failure_counter_that_appears_with_its_first_failures_counts_them(catalog: Catalog) -> None:
    _, second, third = judged(catalog, tgi(100, None), tgi(110, 50), tgi(120, 50))
    assert second["endpoint.errors"][0] is False and second["endpoint.errors"][1] == pytest.approx(50 / 60, abs=1e-4)
    assert third["endpoint.errors"] == (True, 0.0)


def test_one_aborted_request_of_a_rarely_used_model_is_not_a_failing_endpoint(catalog: Catalog) -> None:
    """vLLM counts a client that hung up as an abort: one of one for a model asked once is no 100 % failure; the
    endpoint's share (1 in 10,001) is what is judged."""
    def page(big: int, tiny_abort: int) -> str:
        return ("# TYPE vllm:request_success_total counter\n"
                f'vllm:request_success_total{{finished_reason="stop",model_name="big"}} {big}\n'
                f'vllm:request_success_total{{finished_reason="abort",model_name="tiny"}} {tiny_abort}\n')
    _, second = judged(catalog, page(0, 0), page(10_000, 1))
    assert second["endpoint.errors"][0] is True


def test_a_label_with_a_non_ascii_digit_never_stops_the_judgment(catalog: Catalog) -> None:
    def page(ok: int, err: int) -> str:
        return ("# TYPE trtllm_request_success_total counter\n"
                f'trtllm_request_success_total{{finished_reason="stop",model_name="m"}} {ok}\n'
                "# TYPE trtllm_request_error_total counter\n"
                f'trtllm_request_error_total{{http_code="²",model_name="m"}} {err}\n')
    _, second = judged(catalog, page(1, 1), page(2, 2))
    assert "endpoint.errors" in second and "endpoint.down" in second


def test_a_model_above_its_highest_bucket_under_the_slo_keeps_the_check_unjudged(catalog: Catalog) -> None:
    """Model "a" has its p95 beyond its highest bucket (5 s) under a 20 s SLO: unknown. A healthy model "b" must not
    clear the check for it."""
    from breakfix.collectors.endpoint import Probe
    from breakfix.collectors.promlines import parse_tolerant

    def page(a_inf: int, b_fast: int) -> str:
        lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
        for model, fast, total in (("a", 0, a_inf), ("b", b_fast, b_fast)):
            lines += [f'vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="{model}"}} {fast}',
                      f'vllm:time_to_first_token_seconds_bucket{{le="5.0",model_name="{model}"}} {fast}',
                      f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="{model}"}} {total}',
                      f'vllm:time_to_first_token_seconds_count{{model_name="{model}"}} {total}']
        return "\n".join(lines) + "\n"

    rules = EndpointRules(ctx(catalog), EndpointSpec(name="llm", namespace="inf", url="http://x",
                                                     slo=Slo(ttft_p95_s=20.0)))
    rules.apply(Probe(True, "ok", True, parse_tolerant(page(0, 0))[0]), T0)
    second = rules.apply(Probe(True, "ok", True, parse_tolerant(page(10, 10))[0]), T0)
    assert "endpoint.ttft" not in states(second)
