"""Notification channels against real receivers: Debian's prometheus-alertmanager on loopback (routing to a
local webhook the test reads), and local PagerDuty / Slack / webhook receivers that validate the documented
formats (``tests/test_notify_receivers.py``). Includes the acceptance storm: 64 nodes under one switch are one
Alertmanager group with one alert and one PagerDuty incident, resolved once when the switch recovers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from breakfix.bus.clock import SystemClock
from breakfix.bus.server import free_port
from breakfix.correlator.grouping import Correlator
from breakfix.remediator.notify.channels import HttpSender, Sender
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.core import NotifyCore
from breakfix.remediator.notify.model import Notification, NotifyAction, NotifyEvent
from breakfix.remediator.notify.sender import Dispatcher
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, StepAction
from tests.conftest import T0, make_rules, sig, wait_until
from tests.test_notify_receivers import Receivers

ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
PD_KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receivers, str]]:
    r = Receivers()
    runner, url = await r.start()
    try:
        yield r, url
    finally:
        r.release.set()
        await runner.cleanup()


def start_alertmanager(tmp_path: Path, hook: str, resolve_timeout: str = "5m") -> tuple[subprocess.Popen[bytes], str]:
    if not Path(ALERTMANAGER).exists():
        pytest.fail("prometheus-alertmanager not installed: apt-get install prometheus-alertmanager (make test does)")
    cfg = tmp_path / "am.yml"
    cfg.write_text(f"""
global: {{resolve_timeout: {resolve_timeout}}}
route: {{receiver: hook, group_by: [alertname, cluster], group_wait: 0s, group_interval: 100ms, repeat_interval: 1h}}
receivers: [{{name: hook, webhook_configs: [{{url: "{hook}/am", send_resolved: true, max_alerts: 0}}]}}]
""")
    port = free_port()
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={cfg}", f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.terminate()
            raise AssertionError("alertmanager did not become ready")
        time.sleep(0.05)


@pytest.fixture
def alertmanager(tmp_path: Path, receivers: tuple[Receivers, str]) -> Iterator[str]:
    proc, url = start_alertmanager(tmp_path, receivers[1])
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def config(am: str | None, base: str, tmp_path: Path, *,
           default: tuple[str, ...] = ("am", "pd", "slack")) -> NotifyConfig:
    (tmp_path / "pd.key").write_text(PD_KEY + "\n")
    (tmp_path / "slack.url").write_text(f"{base}/slack\n")
    channels: list[dict[str, Any]] = [
        {"name": "pd", "type": "pagerduty", "url": f"{base}/pagerduty", "routing_key_file": str(tmp_path / "pd.key"),
         "backoff_s": 0.01, "timeout_s": 2},
        {"name": "slack", "type": "slack", "webhook_url_file": str(tmp_path / "slack.url"), "backoff_s": 0.01},
        {"name": "hook", "type": "webhook", "url": f"{base}/webhook", "backoff_s": 0.01}]
    if am:
        channels.append({"name": "am", "type": "alertmanager", "url": am, "resend_s": 30})
    return NotifyConfig.model_validate({"channels": channels, "default": [d for d in default if d != "am" or am],
                                        "runbook_base": "https://runbooks.example/breakfix/"})


def note(incident: str, action: NotifyAction = NotifyAction.TRIGGER, *, node: str = "n1", seq: int = 0,
         event: NotifyEvent = NotifyEvent.ESCALATED) -> Notification:
    return Notification(id=f"{incident}:{seq}:{event.value}:{action.value}", dedup_key=incident, event=event,
                        action=action, title=f"[critical] gpu_reset_required on {node}", summary="escalated: RMA",
                        cluster="c1", incident=incident, node=node, gpus=("0:GPU-0",), category="gpu_reset_required",
                        severity="critical", domain="operator", tenants=("team-a",), pods=("team-a/p0",),
                        done=("cordon: succeeded",), next="a human", runbook_url="https://runbooks.example/x.md",
                        at=T0 + timedelta(seconds=seq))


@pytest.fixture
async def dispatch() -> AsyncIterator[Any]:
    """Start a dispatcher for a config; stops everything at the end."""
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    sessions: list[aiohttp.ClientSession] = []
    records: list[ActionRecord] = []

    async def start(cfg: NotifyConfig) -> Dispatcher:
        session = aiohttp.ClientSession()
        sessions.append(session)
        senders: dict[str, Sender] = {c.name: HttpSender(c, session) for c in cfg.channels}

        async def publish(rec: ActionRecord) -> None:
            records.append(rec)

        d = Dispatcher(cfg, senders, SystemClock(), publish_record=publish)
        d.records = records  # type: ignore[attr-defined]
        stop = asyncio.Event()
        stops.append(stop)
        tasks.append(asyncio.create_task(d.run(stop), name="test-dispatch"))
        return d

    yield start
    for s in stops:
        s.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for session in sessions:
        await session.close()


async def test_alertmanager_groups_two_incidents_and_resolves_them(
        alertmanager: str, receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    d = await dispatch(config(alertmanager, base, tmp_path, default=("am",)))
    d.submit(note("inc-a", node="n1"))
    d.submit(note("inc-b", node="n2"))
    await d.idle()

    async def both_firing() -> bool:
        return any(len(m["alerts"]) == 2 and m["status"] == "firing" for m in r.am)
    await wait_until(both_firing, 10, "one firing group with both alerts")
    group = next(m for m in r.am if len(m["alerts"]) == 2)
    assert group["groupLabels"] == {"alertname": "BreakfixIncident", "cluster": "c1"}
    alert = next(a for a in group["alerts"] if a["labels"]["incident"] == "inc-a")
    assert alert["labels"] == {"alertname": "BreakfixIncident", "cluster": "c1", "node": "n1", "domain": "operator",
                               "category": "gpu_reset_required", "severity": "critical", "incident": "inc-a"}
    assert alert["annotations"]["summary"].startswith("[critical] gpu_reset_required on n1")
    assert alert["annotations"]["runbook_url"] == "https://runbooks.example/x.md"
    d.submit(note("inc-a", NotifyAction.RESOLVE, node="n1", seq=5, event=NotifyEvent.RESOLVED))
    d.submit(note("inc-b", NotifyAction.RESOLVE, node="n2", seq=5, event=NotifyEvent.RESOLVED))
    await d.idle()

    async def resolved() -> bool:
        return any(m["status"] == "resolved" for m in r.am)
    await wait_until(resolved, 10, "the group resolved")
    last = next(m for m in r.am if m["status"] == "resolved")
    assert {a["labels"]["incident"] for a in last["alerts"]} == {"inc-a", "inc-b"}
    assert {m["groupKey"] for m in r.am} == {group["groupKey"]}
    assert [x.outcome for x in d.records] == [ActionOutcome.SUCCEEDED] * 4  # type: ignore[attr-defined]
    assert d.records[0].kind is ActionKind.NOTIFICATION  # type: ignore[attr-defined]


async def test_pagerduty_trigger_acknowledge_resolve_with_dedup_key_and_idempotent_resend(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    d = await dispatch(config(None, base, tmp_path, default=("pd",)))
    first = note("inc-7")
    d.submit(first)
    d.submit(first)  # the same notification again (a replay): sent once
    d.submit(note("inc-7", event=NotifyEvent.APPROVAL))  # another event of the same incident: same PD incident
    d.submit(note("inc-7", NotifyAction.ACKNOWLEDGE, seq=2, event=NotifyEvent.ACKNOWLEDGED))
    d.submit(note("inc-7", NotifyAction.RESOLVE, seq=3, event=NotifyEvent.RESOLVED))
    await d.idle()
    assert r.rejected == []
    assert [e["event_action"] for e in r.pd] == ["trigger", "trigger", "acknowledge", "resolve"]
    assert {e["dedup_key"] for e in r.pd} == {"inc-7"} and all(e["routing_key"] == PD_KEY for e in r.pd)
    assert r.pd_incidents == ["inc-7"] and r.pd_resolved == ["inc-7"]
    payload = r.pd[0]["payload"]
    assert payload["severity"] == "critical" and payload["source"] == "n1"
    assert payload["custom_details"]["pods"] == ["team-a/p0"] and payload["custom_details"]["next"] == "a human"
    assert r.pd[0]["links"] == [{"href": "https://runbooks.example/x.md", "text": "runbook"}]


async def test_slack_gets_valid_block_kit_and_the_webhook_the_documented_schema(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    d = await dispatch(config(None, base, tmp_path, default=("slack", "hook")))
    d.submit(note("inc-9"))
    d.submit(note("inc-9", NotifyAction.RESOLVE, seq=4, event=NotifyEvent.RESOLVED))
    await d.idle()
    assert r.rejected == []
    assert [m["blocks"][0]["type"] for m in r.slack] == ["header", "header"]
    assert r.slack[0]["blocks"][0]["text"]["text"].startswith(":rotating_light:")
    assert r.slack[1]["blocks"][0]["text"]["text"].startswith(":white_check_mark:")
    headers, body = r.webhook[0]
    assert headers["Idempotency-Key"] == "inc-9:0:escalated:trigger"
    assert Notification.model_validate(body) == note("inc-9")


async def test_transient_errors_are_retried_and_a_rejected_event_is_not(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    d = await dispatch(config(None, base, tmp_path, default=("pd",)))
    r.fail_next = [503, 429]
    d.submit(note("inc-1"))
    await d.idle()
    assert r.pd_incidents == ["inc-1"]
    assert d.records[-1].outcome is ActionOutcome.SUCCEEDED  # type: ignore[attr-defined]
    assert "3 tries" in d.records[-1].reason  # type: ignore[attr-defined]
    r.fail_next = [400, 202]
    d.submit(note("inc-2"))
    await d.idle()
    assert r.pd_incidents == ["inc-1"]  # a 400 is final: no retry
    assert d.records[-1].outcome is ActionOutcome.FAILED and "permanent after 1 tries" in d.records[-1].reason  # type: ignore[attr-defined]
    assert d.failed == 1


async def test_a_stalled_channel_never_blocks_submit_or_the_other_channels(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    cfg = config(None, base, tmp_path, default=("slack", "hook")).model_copy(update={"queue_size": 5})
    d = await dispatch(cfg)
    r.stall.add("/slack")
    d.submit(note("inc-0"))

    async def slack_hangs() -> bool:
        return r.hanging == 1
    await wait_until(slack_hangs, 10, "the slack request to hang")
    for i in range(1, 10):
        assert d.submit(note(f"inc-{i}")) == (["slack", "hook"] if i <= 5 else ["hook"])

        async def hook_caught_up() -> bool:
            return len(r.webhook) == i + 1  # noqa: B023 (awaited within the iteration)
        await wait_until(hook_caught_up, 10, "the webhook to keep delivering while slack hangs")
    assert r.slack == [] and d.dropped == 4 and d.failed == 4  # 1 in flight + 5 queued; 4 dropped and counted
    r.release.set()
    await d.idle()
    assert len(r.slack) == 6


def storm_records(fabric_id: str, at: Any) -> list[ActionRecord]:
    """What the remediator publishes for the fabric incident (policy rule infrastructure-escalation)."""
    def rec(kind: ActionKind, outcome: ActionOutcome, action: StepAction | None = None, i: int = 0) -> ActionRecord:
        return ActionRecord(id=f"{fabric_id}-{kind.value}-{outcome.value}-{i}", cluster="c1", incident_id=fabric_id,
                            kind=kind, action=action, step_index=i if action else None, outcome=outcome,
                            actor="remediator", rule="infrastructure-escalation", at=at)
    return [rec(ActionKind.PLAN, ActionOutcome.PLANNED), rec(ActionKind.STEP, ActionOutcome.STARTED, StepAction.CORDON),
            rec(ActionKind.STEP, ActionOutcome.SUCCEEDED, StepAction.CORDON),
            rec(ActionKind.STEP, ActionOutcome.SUCCEEDED, StepAction.ESCALATE, 1),
            rec(ActionKind.PLAN, ActionOutcome.ESCALATED)]


async def test_fabric_storm_of_64_nodes_is_one_alertmanager_group_and_one_page_then_one_resolve(
        alertmanager: str, receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any,
        catalog: Catalog) -> None:
    r, base = receivers
    cfg = config(alertmanager, base, tmp_path, default=("am", "pd"))
    d = await dispatch(cfg)
    core = NotifyCore(cfg)
    correlator = Correlator(catalog, make_rules())
    down = [sig(node=f"gpu-{i:03d}", check="ib.link_down", code=None, gpu_index=None, at=i * 0.1,
                component="mlx5_0/1", labels={"switch": "leaf-03"}) for i in range(64)]
    for s in down:
        for ch in correlator.ingest(s, s.observed_at):
            for n in core.change(ch.to_wire(s.observed_at)):
                d.submit(n)
    (fabric,) = [i for i in correlator.incidents.values() if i.parent is None]
    assert len(fabric.members) == 64
    at = T0 + timedelta(seconds=20)
    for rec in storm_records(fabric.id, at):
        for ch in correlator.apply_action(rec, at):  # the correlator's lifecycle sees them too
            for n in core.change(ch.to_wire(at)):
                d.submit(n)
        for n in core.record(rec):
            d.submit(n)
    await d.idle()

    async def paged() -> bool:
        return bool(r.am) and bool(r.pd_incidents)
    await wait_until(paged, 10, "the page")
    up = [sig(node=f"gpu-{i:03d}", check="ib.link_down", code=None, gpu_index=None, at=60 + i * 0.1,
              component="mlx5_0/1", healthy=True) for i in range(64)]
    for s in up:  # the links come back; the escalated incident waits for the human who fixed the switch
        for ch in correlator.ingest(s, s.observed_at):
            for n in core.change(ch.to_wire(s.observed_at)):
                d.submit(n)
    release = ActionRecord(id="release-1", cluster="c1", incident_id=fabric.id, kind=ActionKind.RELEASE,
                           outcome=ActionOutcome.SUCCEEDED, actor="alice", reason="leaf-03 replaced",
                           at=T0 + timedelta(seconds=90))
    for n in core.record(release):
        d.submit(n)
    await d.idle()

    async def resolved() -> bool:
        return any(m["status"] == "resolved" for m in r.am) and bool(r.pd_resolved)
    await wait_until(resolved, 10, "the resolve")
    assert len({m["groupKey"] for m in r.am}) == 1
    assert {a["labels"]["incident"] for m in r.am for a in m["alerts"]} == {fabric.id}
    assert [m["status"] for m in r.am] == ["firing", "resolved"]
    assert [e["event_action"] for e in r.pd] == ["trigger", "resolve"]
    assert r.pd_incidents == [fabric.id] == r.pd_resolved
    assert len(r.pd[0]["payload"]["custom_details"]["nodes"]) == 50  # capped list of the 64


async def test_firing_alerts_are_re_posted_so_alertmanager_never_resolves_them_by_itself(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    proc, am = start_alertmanager(tmp_path, base, resolve_timeout="2s")  # an alert not re-posted ends after 2 s
    try:
        cfg = NotifyConfig.model_validate({"channels": [{"name": "am", "type": "alertmanager", "url": am,
                                                         "resend_s": 0.3}], "default": ["am"]})
        d = await dispatch(cfg)
        d.submit(note("inc-kept"))
        await d.idle()
        await asyncio.sleep(4.5)  # more than twice the resolve_timeout
        async with aiohttp.ClientSession() as http, http.get(f"{am}/api/v2/alerts") as resp:
            active = [a["labels"]["incident"] for a in await resp.json() if a["status"]["state"] == "active"]
        assert active == ["inc-kept"]
        assert [m["status"] for m in r.am] == ["firing"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
