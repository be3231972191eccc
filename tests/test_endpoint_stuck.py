"""``endpoint.stuck``: the server answers /health and /v1/models but its engine makes no progress.

The judgement (``collectors.endpoint.judge_stuck``) is pure: two scrapes, the holds carried from the interval
before and the current time in, a state (or none) and the holds to carry out. The tables below drive it page by page,
each engine by the metric names it documents (written out here, not read from ``ENGINES``, so a misspelt name fails);
the last tests go through the rules, the endpoint plugin and the edge filter against a live HTTP server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from breakfix.collectors.config import EndpointsConfig, SloConfig
from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import EdgeFilter
from breakfix.collectors.endpoint import (
    EndpointRules,
    EndpointSpec,
    Probe,
    Scrape,
    Slo,
    Stall,
    judge_stuck,
)
from breakfix.collectors.promlines import parse_tolerant
from breakfix.collectors.source import SourceEnv
from breakfix.collectors.sources import EndpointPlugin
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import Severity
from tests.conftest import T0
from tests.test_endpoint_frameworks import serving
from tests.test_endpoint_real import Server, page, set_values, zeroed

HOLD = 120.0
STEP = 60.0  # seconds between scrapes in the tables


@dataclass(frozen=True)
class Names:
    """One framework's running gauge, waiting gauge and progress counter, and the labels of its series."""

    running: str
    waiting: str
    counter: str
    labels: str = ""
    model: str = ""  # what details.model says for it ("" when the framework labels no model)

    def page(self, running: float, waiting: float, counter: float | None) -> str:
        labels = f"{{{self.labels}}}" if self.labels else ""
        text = (f"# TYPE {self.running} gauge\n{self.running}{labels} {running:g}\n"
                f"# TYPE {self.waiting} gauge\n{self.waiting}{labels} {waiting:g}\n")
        if counter is not None:
            text += (f"# TYPE {self.counter.removesuffix('_total')} counter\n"
                     f"{self.counter}{labels} {counter:g}\n")
        return text


FRAMEWORKS = {
    "vllm": Names("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total",
                  'engine="0",model_name="m"', "m"),
    "sglang": Names("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:generation_tokens_total",
                    'model_name="m"', "m"),
    "nim": Names("num_requests_running", "num_requests_waiting", "generation_tokens_total", 'model_name="m"', "m"),
    "trtllm": Names("trtllm_num_requests_running", "trtllm_num_requests_waiting", "trtllm_generation_tokens_total",
                    'engine_type="trtllm",model_name="m"', "m"),
    "trtllm-via-dynamo": Names("trtllm:num_requests_running", "trtllm:num_requests_waiting",
                               "trtllm:generation_tokens_total", 'model_name="m"', "m"),
    "dynamo": Names("dynamo_frontend_inflight_requests", "dynamo_frontend_queued_requests",
                    "dynamo_frontend_output_tokens_total", 'model="m"', "m"),
    "tgi": Names("tgi_batch_current_size", "tgi_queue_size", "tgi_batch_inference_success", 'method="decode"'),
    "llamacpp": Names("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:n_decode_total"),
}


def judge(*pages: str, hold: float = HOLD, times: list[float] | None = None) -> list[Stall]:
    """Each page through ``judge_stuck`` as the collector scrapes them (``STEP`` seconds apart unless ``times``)."""
    out: list[Stall] = []
    before: Scrape | None = None
    since: dict[str, datetime] = {}
    for i, text in enumerate(pages):
        now = Scrape(parse_tolerant(text)[0], T0 + timedelta(seconds=times[i] if times else i * STEP))
        stall = judge_stuck(before, now, since, hold)
        out.append(stall)
        before, since = now, stall.since
    return out


def verdicts(stalls: list[Stall]) -> list[bool | None]:
    return [s.stuck for s in stalls]


# --- each framework by its documented names ---------------------------------------------------------------------
# TensorRT-LLM counts tokens and completions only as a request finishes: its running case is never judged
STREAMING = [fw for fw in FRAMEWORKS if not fw.startswith("trtllm")]


@pytest.mark.parametrize("fw", [fw for fw in FRAMEWORKS if fw not in STREAMING], ids=str)
def test_a_long_generation_on_an_engine_that_counts_only_finished_requests_is_never_stuck(fw: str) -> None:
    """One healthy 15-minute generation (a long reasoning answer) leaves TensorRT-LLM's counters flat until it
    finishes: requests running without progress are not judged there; requests waiting with none running are."""
    n = FRAMEWORKS[fw]
    assert verdicts(judge(*[n.page(running=1, waiting=0, counter=500)] * 16)) == [None] * 16
    assert verdicts(judge(*[n.page(running=0, waiting=7, counter=500)] * 4)) == [None, None, None, True]


@pytest.mark.parametrize("fw", STREAMING, ids=str)
def test_requests_running_and_no_token_generated_is_stuck_once_held_for_stuck_after_s(fw: str) -> None:
    n = FRAMEWORKS[fw]
    stalls = judge(*[n.page(running=3, waiting=0, counter=500)] * 4)
    # first page: nothing to compare; then the stall is seen at 60 s and held 0, 60, 120 s
    assert verdicts(stalls) == [None, None, None, True]
    fault = stalls[-1]
    assert "3 requests running, 0 tokens generated in 60 s, for 120 s (stuck after 120 s)" in fault.message
    assert fault.model == n.model and fault.held_s == 120.0


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=str)
def test_requests_waiting_while_none_run_and_none_finish_is_stuck_once_held(fw: str) -> None:
    n = FRAMEWORKS[fw]
    stalls = judge(*[n.page(running=0, waiting=7, counter=500)] * 4)
    assert verdicts(stalls) == [None, None, None, True]
    assert "7 requests waiting, none running or finished in 60 s, for 120 s" in stalls[-1].message


@pytest.mark.parametrize("fw", STREAMING, ids=str)
def test_progress_after_a_stall_clears_it(fw: str) -> None:
    n = FRAMEWORKS[fw]
    stuck = n.page(running=3, waiting=0, counter=500)
    stalls = judge(stuck, stuck, stuck, stuck, n.page(running=3, waiting=0, counter=540))
    assert verdicts(stalls) == [None, None, None, True, False]
    assert stalls[-1].since == {}, "progress ends the hold"


@pytest.mark.parametrize("fw", FRAMEWORKS, ids=str)
def test_an_idle_engine_is_healthy_from_its_first_scrape(fw: str) -> None:
    n = FRAMEWORKS[fw]
    stalls = judge(n.page(running=0, waiting=0, counter=500), n.page(running=0, waiting=0, counter=500))
    assert verdicts(stalls) == [False, False]
    assert "idle" in stalls[0].message


# --- the judgement, case by case (vLLM names) ---------------------------------------------------------------------
V = FRAMEWORKS["vllm"]


def vllm(running: float, waiting: float = 0, tokens: float | None = 500, ok: float | None = None,
         failed: float = 0) -> str:
    text = V.page(running, waiting, tokens)
    if ok is not None:
        text += ("# TYPE vllm:request_success counter\n"
                 f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {ok:g}\n'
                 f'vllm:request_success_total{{engine="0",finished_reason="abort",model_name="m"}} {failed:g}\n')
    return text


def two_models(a_running: float, a_tokens: float, b_running: float, b_tokens: float) -> str:
    lines = ["# TYPE vllm:num_requests_running gauge", "# TYPE vllm:num_requests_waiting gauge",
             "# TYPE vllm:generation_tokens counter"]
    for model, running, tokens in (("a", a_running, a_tokens), ("b", b_running, b_tokens)):
        lines += [f'vllm:num_requests_running{{model_name="{model}"}} {running:g}',
                  f'vllm:num_requests_waiting{{model_name="{model}"}} 0',
                  f'vllm:generation_tokens_total{{model_name="{model}"}} {tokens:g}']
    return "\n".join(lines) + "\n"


STUCK = vllm(running=3)
CASES = {
    "hold not yet reached: no state, the stall is carried": (
        [STUCK, STUCK, STUCK], [None, None, None]),
    "hold reached: a fault, and it stays one while the stall lasts": (
        [STUCK] * 6, [None, None, None, True, True, True]),
    "a longer hold waits longer": (
        [STUCK] * 6, [None, None, None, None, None, None]),  # run with hold=300 below
    "first scrape with requests running: nothing to compare, not judged": (
        [STUCK], [None]),
    "a token counter that went down was reset: not judged, and the hold starts again": (
        [STUCK, STUCK, vllm(running=3, tokens=10), vllm(running=3, tokens=10), vllm(running=3, tokens=10),
         vllm(running=3, tokens=10)],
        [None, None, None, None, None, True]),
    "a request counter that went down was reset: not judged either": (
        [vllm(3, ok=100), vllm(3, ok=100), vllm(3, ok=100), vllm(3, ok=5), vllm(3, ok=5)],
        [None, None, None, None, None]),
    "requests that finished successfully are progress (a pooling model generates no token)": (
        [vllm(3, tokens=0, ok=100), vllm(3, tokens=0, ok=150)], [None, False]),
    "requests that only fail are no progress: running and no token stays a stall": (
        [vllm(3, ok=100, failed=0)] + [vllm(3, ok=100, failed=f) for f in (5, 10, 15)], [None, None, None, True]),
    "waiting while only failures finish: neither stuck nor healthy": (
        [vllm(0, waiting=5, ok=100, failed=5 * i) for i in range(5)], [None] * 5),
    "waiting while requests finish: healthy": (
        [vllm(0, waiting=5, ok=100), vllm(0, waiting=5, ok=120)], [None, False]),
    "a running gauge without a token counter: running is not judged": (
        [vllm(3, tokens=None)] * 4, [None, None, None, None]),
    "the same page idle without a token counter is still idle": (
        [vllm(0, tokens=None)], [False]),
    "a page of no engine we know (Triton): not judged": (
        [page("endpoint_triton_two_models.txt")] * 4, [None, None, None, None]),
    "running gauge gone from the page: no fault from missing data": (
        [STUCK, STUCK, "# TYPE x gauge\nx 1\n", STUCK, STUCK], [None, None, None, None, None]),
}


@pytest.mark.parametrize(("pages", "expected"), CASES.values(), ids=list(CASES))
def test_stuck_judgement(pages: list[str], expected: list[bool | None], request: pytest.FixtureRequest) -> None:
    hold = 300.0 if "longer hold" in request.node.callspec.id else HOLD
    assert verdicts(judge(*pages, hold=hold)) == expected


def test_one_model_stuck_while_another_progresses_is_reported_for_that_model() -> None:
    stalls = judge(*[two_models(2, 1000 + 50 * i, 4, 700) for i in range(4)])
    assert verdicts(stalls) == [None, None, None, True]
    assert stalls[-1].model == "b" and "4 requests running" in stalls[-1].message
    assert set(stalls[-1].since) == {"b"}, "only b's stall is carried: the endpoint as a whole progresses"


def test_a_model_under_its_hold_keeps_the_endpoint_from_being_called_healthy() -> None:
    """b stalls while a progresses: no healthy state then, which would clear a fault still open for b."""
    stalls = judge(two_models(2, 1000, 4, 700), two_models(2, 1050, 4, 700))
    assert verdicts(stalls) == [None, None]


def test_sglang_first_and_inter_token_counts_are_progress_while_its_token_counter_waits_for_finishes() -> None:
    """SGLang adds to generation_tokens_total only when a request finishes; a long generation streams tokens that
    its inter-token histogram counts meanwhile."""
    def sglang(itl_count: int) -> str:
        return (FRAMEWORKS["sglang"].page(running=1, waiting=0, counter=500)
                + "# TYPE sglang:inter_token_latency_seconds histogram\n"
                  f'sglang:inter_token_latency_seconds_bucket{{le="+Inf",model_name="m"}} {itl_count}\n'
                  f'sglang:inter_token_latency_seconds_count{{model_name="m"}} {itl_count}\n'
                  'sglang:inter_token_latency_seconds_sum{model_name="m"} 1.0\n')
    assert verdicts(judge(*[sglang(100 + 400 * i) for i in range(5)])) == [None, False, False, False, False]


def test_a_progress_counter_that_appears_with_its_first_forward_passes_counts_them() -> None:
    """TGI's metrics appear with their first increment: absent before, 12 now is 12 forward passes."""
    tgi = FRAMEWORKS["tgi"]
    before = "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 2\n"
    assert verdicts(judge(before, tgi.page(running=2, waiting=0, counter=12))) == [None, False]


def test_a_clock_that_stepped_back_restarts_the_hold() -> None:
    stalls = judge(STUCK, STUCK, STUCK, STUCK, times=[0, 60, 120, 30])
    assert verdicts(stalls) == [None, None, None, None]
    assert stalls[-1].since == {"": T0 + timedelta(seconds=30)}


def test_the_judgement_reads_no_clock_and_keeps_no_state() -> None:
    """The same inputs give the same answer, whenever asked, and the holds passed in are not changed."""
    before, now = Scrape(parse_tolerant(STUCK)[0], T0), Scrape(parse_tolerant(STUCK)[0], T0 + timedelta(minutes=5))
    since = {"": T0 + timedelta(minutes=1)}
    first, second = judge_stuck(before, now, since, HOLD), judge_stuck(before, now, since, HOLD)
    assert first == second and first.stuck is True and first.held_s == 240.0
    assert since == {"": T0 + timedelta(minutes=1)}


# --- the rules: a signal like the other endpoint checks ---------------------------------------------------------
def ctx(catalog: Catalog) -> NodeContext:
    return NodeContext(cluster="c1", node="n1", catalog=catalog)


def test_the_fault_is_a_critical_tenant_signal_with_the_model_and_the_hold(catalog: Catalog) -> None:
    rules = EndpointRules(ctx(catalog), EndpointSpec(name="chat", namespace="team", url="http://x",
                                                     slo=Slo(stuck_after_s=60), serving_nodes=("n7",)))
    cycles = [rules.apply(Probe(True, "ok", True, parse_tolerant(STUCK)[0]), T0 + timedelta(seconds=30 * i))
              for i in range(4)]
    assert [next((s.healthy for s in c.states if s.check == "endpoint.stuck"), None) for c in cycles] == [
        None, None, None, False]
    s = next(s for s in cycles[-1].states if s.check == "endpoint.stuck")
    assert s.severity == Severity.CRITICAL and s.tenant is not None and s.tenant.key() == "team/chat"
    assert (s.value, s.threshold, s.details["model"], s.details["serving_nodes"]) == (60.0, 60.0, "m", "n7")
    assert s.message == ("team/chat: vLLM stuck: 3 requests running, 0 tokens generated in 30 s, for 60 s "
                         "(stuck after 60 s) (model m)")


def test_a_scrape_without_metrics_keeps_the_hold_running(catalog: Catalog) -> None:
    """A /metrics that did not answer says nothing: the next page is compared with the last one read."""
    rules = EndpointRules(ctx(catalog), EndpointSpec(name="chat", namespace="team", url="http://x",
                                                     slo=Slo(stuck_after_s=60)))
    pages = [STUCK, STUCK, None, STUCK]
    cycles = [rules.apply(Probe(True, "ok", True, parse_tolerant(p)[0] if p else None), T0 + timedelta(seconds=30 * i))
              for i, p in enumerate(pages)]
    stuck = next(s for s in cycles[-1].states if s.check == "endpoint.stuck")
    assert not stuck.healthy and stuck.value == 60.0


# --- configuration ------------------------------------------------------------------------------------------------
def test_stuck_after_s_defaults_to_120_s() -> None:
    assert SloConfig().stuck_after_s == 120.0 == Slo().stuck_after_s


@pytest.mark.parametrize(("bad", "why"), [(0, "greater than or equal to 30"), (29.9, "greater than or equal to 30"),
                                          (3600.5, "less than or equal to 3600"), (float("nan"), "finite number"),
                                          (float("inf"), "finite number"), ("soon", "valid number")])
def test_stuck_after_s_outside_30_to_3600_s_is_a_config_error(bad: object, why: str) -> None:
    with pytest.raises(ValidationError, match=f"stuck_after_s\n  Input should be (a )?{why}"):
        SloConfig.model_validate({"stuck_after_s": bad})


@pytest.mark.parametrize("good", [30, 3600])
def test_stuck_after_s_bounds_themselves_are_accepted(good: float) -> None:
    assert SloConfig.model_validate({"stuck_after_s": good}).stuck_after_s == good


# --- a live server through the endpoint plugin and the edge filter -----------------------------------------------
async def test_a_live_stuck_vllm_server_is_published_once_then_cleared_by_progress(catalog: Catalog,
                                                                                   tmp_path: Path) -> None:
    server = Server()
    edge = EdgeFilter()
    published: list[list[tuple[bool, str]]] = []
    pages = [vllm(0, tokens=100)] + [vllm(3, tokens=100)] * 5 + [vllm(3, tokens=180)]
    async with serving(server) as url, aiohttp.ClientSession() as http:
        config = EndpointsConfig.model_validate({"enabled": True, "interval_s": 30, "endpoints": [
            {"name": "chat", "namespace": "team", "url": url, "slo": {"stuck_after_s": 60}}]})
        env = SourceEnv(ctx=ctx(catalog), clock=None, http=http, state_dir=tmp_path)  # type: ignore[arg-type]
        plugin = EndpointPlugin(config, env)
        assert plugin.rules[0].spec.slo.stuck_after_s == 60
        for i, text in enumerate(pages):
            server.metrics = text
            at = T0 + timedelta(seconds=30 * i)
            cycle = plugin.apply(await plugin.read(), at, float(30 * i))
            published.append([(s.healthy, s.message) for s in edge.apply(cycle, at) if s.check == "endpoint.stuck"])
    # idle (a first healthy is no news); the stall seen at 30 s and held 0, 30, 60 s: the fault, published once;
    # then tokens again: the clearing
    assert [[h for h, _ in p] for p in published] == [[], [], [], [False], [], [], [True]]
    assert "3 requests running, 0 tokens generated in 30 s, for 60 s" in published[3][0][1]


async def test_the_real_sglang_page_frozen_is_a_stuck_engine(catalog: Catalog) -> None:
    """SGLang's documented page (162 running, 2826 queued) served unchanged: no counter moves."""
    server = Server()
    real = page("endpoint_sglang_docs.txt")
    moved = set_values(real, {'sglang:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"}': 7.6e6})
    async with serving(server) as url, aiohttp.ClientSession() as http:
        from breakfix.collectors.endpoint import probe

        spec = EndpointSpec(name="llm", namespace="inf", url=url, slo=Slo(stuck_after_s=120))
        rules = EndpointRules(ctx(catalog), spec)
        got = []
        for i, text in enumerate([real, real, real, real, moved]):
            server.metrics = text
            cycle = rules.apply(await probe(http, spec), T0 + timedelta(seconds=60 * i))
            got.append(next(((s.healthy, s.message) for s in cycle.states if s.check == "endpoint.stuck"), None))
    assert [g[0] if g else None for g in got] == [None, None, None, False, True]
    assert got[3] is not None and "SGLang stuck: 162 requests running" in got[3][1]
    assert "(model meta-llama/Llama-3.1-8B-Instruct)" in got[3][1]


@pytest.mark.parametrize("name", ["endpoint_vllm_kserve.txt", "endpoint_nim_llm.txt"])
async def test_real_idle_vllm_and_nim_pages_are_healthy(catalog: Catalog, name: str) -> None:
    server = Server(metrics_path="/v1/metrics" if "nim" in name else "/metrics")
    real = page(name)
    async with serving(server) as url, aiohttp.ClientSession() as http:
        from breakfix.collectors.endpoint import probe

        spec = EndpointSpec(name="llm", namespace="inf", url=url)
        rules = EndpointRules(ctx(catalog), spec)
        cycles = []
        for i, text in enumerate([zeroed(real), real]):
            server.metrics = text
            cycles.append(rules.apply(await probe(http, spec), T0 + timedelta(seconds=15 * i)))
    for cycle in cycles:
        stuck = next(s for s in cycle.states if s.check == "endpoint.stuck")
        assert stuck.healthy and "idle" in stuck.message
