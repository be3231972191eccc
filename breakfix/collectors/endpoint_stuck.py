"""``endpoint.stuck``: an inference engine that answers but makes no progress, judged from two scrapes.

An NCCL hang in a tensor-parallel group, a dead worker or a wedged scheduler leaves ``/health`` and
``/v1/models`` answering while nothing is generated. Over one interval: requests ran and none of the
engine's progress counters rose (case a), or requests waited while none ran and none finished (case b).
A fault once that held for the endpoint's ``stuck_after_s``; progress or an idle engine clears it.
``judge_stuck`` is pure (two ``Scrape``s, the holds carried over, no clock): ``collectors.endpoint``
(``EndpointRules``) calls it every cycle and publishes its ``Stall``. Which gauges and counters show
progress per engine is ``ENGINES``, each with its source (``collectors/SOURCES.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from breakfix.collectors.endpoint_metrics import _framework, _model, _requests, _series
from breakfix.collectors.promtext import Sample


@dataclass(frozen=True, slots=True)
class Engine:
    """How one engine shows that it works (``ENGINES``).

    ``running`` / ``waiting``: gauges of the requests in its batch and in its queue; ``progress``: counters that rise
    as it generates (tokens, or forward passes); ``also``: further counters that rise only when it made progress
    (first-token / inter-token histogram counts, finished requests' tokens), read once the engine is known. The
    engine is known by its running gauge or a ``progress`` counter on the page: one with neither is not judged.
    ``streams`` False: every counter it has rises only when a request finishes, so one generation longer than
    ``stuck_after_s`` is not a stall: requests running without progress are not judged, requests waiting are."""

    name: str
    running: str
    waiting: str | None
    progress: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    streams: bool = True  # False: no counter moves while a request generates, only as it finishes (case a unjudged)

    def counters(self) -> tuple[str, ...]:
        return self.progress + self.also


# First engine on the page wins (vLLM before NIM: a NIM page carries vllm:cache_config_info, a Dynamo worker page
# passes vllm: names through). Which counters move while a request is still generating matters: one that only rises
# when a request finishes stays flat through a generation longer than stuck_after_s (see SOURCES.md).
ENGINES: tuple[Engine, ...] = (
    # vllm/v1/metrics/loggers.py: num_requests_running/waiting from the scheduler's stats, generation_tokens_total
    # increased by every engine step's new tokens
    Engine("vLLM", "vllm:num_requests_running", "vllm:num_requests_waiting", ("vllm:generation_tokens_total",)),
    # sglang/srt/metrics/collector.py: num_running_reqs / num_queue_reqs (also refreshed every 30 s while idle);
    # generation_tokens_total rises when a request finishes, its TTFT / inter-token histograms as output streams
    # (non-streamed requests too, every 50 tokens: DEFAULT_FORCE_STREAM_INTERVAL)
    Engine("SGLang", "sglang:num_running_reqs", "sglang:num_queue_reqs", ("sglang:generation_tokens_total",),
           ("sglang:time_to_first_token_seconds_count", "sglang:inter_token_latency_seconds_count",
            "sglang:time_per_output_token_seconds_count")),
    # tensorrt_llm/metrics/collector.py: num_requests_running/waiting from the iteration stats
    # (enable_iter_perf_stats); generation_tokens_total and num_requests_completed_total rise as requests finish
    Engine("TensorRT-LLM", "trtllm_num_requests_running", "trtllm_num_requests_waiting",
           ("trtllm_generation_tokens_total",), ("trtllm_num_requests_completed_total",), streams=False),
    Engine("TensorRT-LLM", "trtllm:num_requests_running", "trtllm:num_requests_waiting",
           ("trtllm:generation_tokens_total",), ("trtllm:num_requests_completed_total",), streams=False),
    # Dynamo frontend (lib/llm/src/http/service/metrics.rs): inflight_requests (queued ones included),
    # queued_requests (before the first token), output_tokens_total increased as each response chunk streams
    Engine("Dynamo", "dynamo_frontend_inflight_requests", "dynamo_frontend_queued_requests",
           ("dynamo_frontend_output_tokens_total",),
           ("dynamo_frontend_time_to_first_token_seconds_count", "dynamo_frontend_inter_token_latency_seconds_count")),
    Engine("Dynamo", "nv_llm_http_service_inflight_requests", None, (),  # the frontend before dynamo_frontend_
           ("nv_llm_http_service_time_to_first_token_seconds_count",
            "nv_llm_http_service_inter_token_latency_seconds_count")),
    # NIM for LLMs: vLLM's names without the prefix (its observability page; tests/data/endpoint_nim_llm.txt)
    Engine("NIM", "num_requests_running", "num_requests_waiting", ("generation_tokens_total",)),
    # TGI router: tgi_batch_current_size (the running batch), tgi_queue_size, tgi_batch_inference_success{method}
    # counted after every successful prefill or decode forward (it has no token counter)
    Engine("TGI", "tgi_batch_current_size", "tgi_queue_size", ("tgi_batch_inference_success",)),
    # llama.cpp server: requests_processing / requests_deferred, n_decode_total counted by every llama_decode() call
    # (tokens_predicted_total only rises when a request finishes)
    Engine("llama.cpp", "llamacpp:requests_processing", "llamacpp:requests_deferred", ("llamacpp:n_decode_total",),
           ("llamacpp:tokens_predicted_total",)),
)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One ``/metrics`` page and when it was read."""

    samples: dict[str, list[Sample]]
    at: datetime


@dataclass(frozen=True, slots=True)
class Stall:
    """``judge_stuck``'s answer: the state to publish (``stuck`` None: none this interval), its message, model and
    how long the engine has made no progress (``held_s``); ``since``: the holds to carry to the next interval."""

    stuck: bool | None
    message: str = ""
    model: str = ""
    held_s: float = 0.0
    since: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Scope:
    """What one interval shows of a model (or the whole endpoint). None: not known."""

    running: float | None
    waiting: float | None
    progress: float | None  # the rise of the engine's progress counters
    finished: float | None  # requests finished, failed ones included
    ok: float | None  # requests finished without failing
    reset: bool  # a counter went down: the server restarted, progress is not known


def _engine(page: dict[str, list[Sample]]) -> Engine | None:
    return next((e for e in ENGINES if page.get(e.running) or any(page.get(n) for n in e.progress)), None)


def _gauge(page: dict[str, list[Sample]], name: str | None) -> dict[str, float] | None:
    """Per model, the sum of a gauge's series (an engine's ranks); None: not on the page."""
    samples = page.get(name or "")
    if not samples:
        return None
    out: dict[str, float] = {}
    for s in samples:
        if 0 <= s.value < math.inf:
            out[_model(s.labels)] = out.get(_model(s.labels), 0.0) + s.value
    return out


def _rises(now: dict[str, list[Sample]], before: dict[str, list[Sample]],
           names: tuple[str, ...]) -> tuple[dict[str, float], set[str]]:
    """Per model, the rise of the counters ``names`` between two scrapes, and the models of which a series went
    down (a reset). A series absent from the previous page counts from 0: the engine was on that page already."""
    rise: dict[str, float] = {}
    reset: set[str] = set()
    for name in names:
        prev = {k: s.value for k, s in _series(before, name).items() if 0 <= s.value < math.inf}
        for key, s in _series(now, name).items():
            if not 0 <= s.value < math.inf:
                continue
            model, last = _model(s.labels), prev.get(key, 0.0)
            if s.value < last:
                reset.add(model)
            rise[model] = rise.get(model, 0.0) + max(s.value - last, 0.0)
    return rise, reset


def _scopes(engine: Engine, before: dict[str, list[Sample]] | None,
            now: dict[str, list[Sample]]) -> dict[str, _Scope]:
    """Per model (when the running gauge names more than one) and for the whole endpoint (""), what the interval
    shows. Without a previous page holding the engine only the gauges are known."""
    running, waiting = _gauge(now, engine.running), _gauge(now, engine.waiting)
    rise: dict[str, float] = {}
    reset: set[str] = set()
    counts: dict[str, tuple[float, float]] = {}
    compared = before is not None and any(before.get(n) for n in (engine.running, *engine.counters()))
    if compared and before is not None:
        rise, reset = _rises(now, before, engine.counters())
        counts = _requests(now, before)
        r = _framework(now)
        if r is not None:
            reset |= _rises(now, before, tuple(n for n in (r.finished, r.failed) if n))[1]

    def scope(models: set[str] | None) -> _Scope:  # None: every model
        def total(values: dict[str, float] | None) -> float | None:
            if values is None:
                return None
            picked = [v for m, v in values.items() if models is None or m in models]
            return sum(picked) if picked else None

        done = [c for m, c in counts.items() if models is None or m in models]
        return _Scope(running=total(running), waiting=total(waiting), progress=total(rise) if compared else None,
                      finished=sum(d for d, _ in done) if done else None,
                      ok=sum(max(d - f, 0.0) for d, f in done) if done else None,
                      reset=bool(reset) if models is None else bool(reset & models))

    out = {"": scope(None)}
    if running is not None and len(running) > 1:
        out.update({model: scope({model}) for model in running})
    return out


def _stalled(s: _Scope) -> str | None:
    """"healthy", "running" (requests ran, no token came: case a), "waiting" (requests waited, none ran, none
    finished: case b), or None: not known this interval."""
    if s.running == 0 and not s.waiting:
        return "healthy"  # idle: nothing running, nothing waiting (an engine without a queue gauge: none seen)
    if s.reset:
        return None  # a counter went down: progress is not known, and the hold restarts
    if (s.progress or 0) > 0 or (s.ok or 0) > 0:
        return "healthy"  # a token, a forward pass or a successful finish (a pooling model generates no token)
    if s.running is not None and s.running > 0 and s.progress is not None:
        return "running"
    if (s.waiting or 0) > 0 and s.running == 0 and not s.finished and (s.finished, s.progress) != (None, None):
        return "waiting"
    return None  # not enough known; or requests waiting while only failures finished (endpoint.errors tells)


def judge_stuck(before: Scrape | None, now: Scrape, since: Mapping[str, datetime], stuck_after_s: float) -> Stall:
    """``endpoint.stuck`` over the interval from ``before`` to ``now``: pure (no I/O, no clock; ``now.at`` is now).

    ``since``: per model ("" the whole endpoint), when its stall was first seen; the answer carries the holds still
    running. A stall is a fault once held ``stuck_after_s``: the worst (longest) one is reported. Healthy only when
    every judged scope is (progress, or idle); otherwise, a stall still under its hold or a scope not known (a
    counter reset, a gauge missing), no state: an open fault stays open."""
    engine = _engine(now.samples)
    if engine is None:
        return Stall(None)  # no running gauge nor progress counter of any engine we know: not judged
    prev = before.samples if before is not None else None
    dt = max((now.at - before.at).total_seconds(), 0.0) if before is not None else 0.0
    held: dict[str, datetime] = {}
    faults: list[tuple[float, str, str]] = []
    verdicts: list[str | None] = []
    scopes = _scopes(engine, prev, now.samples)
    for model, s in scopes.items():
        verdict = _stalled(s)
        if verdict == "running" and not engine.streams:
            verdict = None  # its counters move only as requests finish: a long generation looks the same
        verdicts.append(verdict)
        if verdict not in ("running", "waiting"):
            continue
        start = min(since.get(model, now.at), now.at)  # a clock that stepped back restarts the hold
        held[model] = start
        held_s = (now.at - start).total_seconds()
        if held_s >= stuck_after_s:
            what = (f"{s.running:g} requests running, 0 tokens generated" if verdict == "running"
                    else f"{s.waiting:g} requests waiting, none running or finished")
            faults.append((held_s, model, f"{engine.name} stuck: {what} in {dt:.0f} s, for {held_s:.0f} s "
                                           f"(stuck after {stuck_after_s:g} s)"))
    if faults:
        held_s, model, message = max(faults)
        if not model and len(scopes) == 1:
            running = _gauge(now.samples, engine.running) or {}
            model = next(iter(running)) if len(running) == 1 else ""
        return Stall(True, message, model, held_s, held)
    if verdicts and all(v == "healthy" for v in verdicts):
        whole = scopes[""]
        how = ("idle: nothing running or waiting" if whole.running == 0 and not whole.waiting
               else f"making progress: its progress counters +{whole.progress or 0:g}, {whole.ok or 0:g} requests "
                    f"finished in {dt:.0f} s")
        return Stall(False, f"{engine.name} {how}", since=held)
    return Stall(None, since=held)
