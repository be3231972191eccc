"""Notification channels against real receivers: Debian's prometheus-alertmanager on loopback (routing to a
local webhook the test reads), and local PagerDuty / Slack / webhook receivers that validate the documented
formats (``tests/test_notify_receivers.py``). Includes the acceptance storm: 64 nodes under one switch are one
Alertmanager group with one alert and one PagerDuty incident, resolved once when the switch recovers; resolves that
fail are never lost; and the shipped Alertmanager config (``deploy/alertmanager/``) makes one cause one page."""

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
import yaml

from breakfix.bus.clock import SystemClock
from breakfix.bus.server import free_port
from breakfix.correlator.grouping import Correlator
from breakfix.remediator.notify import sender as sender_module
from breakfix.remediator.notify.channels import HttpSender, Sender, Transient
from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.core import NotifyCore
from breakfix.remediator.notify.model import Notification, NotifyAction, NotifyEvent
from breakfix.remediator.notify.sender import Dispatcher
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, StepAction, WaitingOn
from tests.conftest import T0, make_rules, sig, wait_until
from tests.test_notify_core import ESCALATED, change, inc
from tests.test_notify_core import rec as record
from tests.test_notify_receivers import Receivers

ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"  # Debian's prometheus-alertmanager ships it
AM_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "alertmanager" / "breakfix-alertmanager.yaml"
RUNBOOKS = "https://runbooks.example/breakfix/"
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


def start_alertmanager(tmp_path: Path, hook: str, resolve_timeout: str = "5m", *,
                       config: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    if not Path(ALERTMANAGER).exists():
        pytest.fail("prometheus-alertmanager not installed: apt-get install prometheus-alertmanager (make test does)")
    cfg = tmp_path / "am.yml"
    cfg.write_text(config or f"""
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
                                                         "resend_s": 0.3}], "default": ["am"],
                                           "runbook_base": RUNBOOKS})
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


async def test_a_resolve_that_fails_while_alertmanager_is_down_is_never_reposted_as_firing(
        receivers: tuple[Receivers, str], dispatch: Any) -> None:
    r, base = receivers  # Alertmanager's API, answering as told
    cfg = NotifyConfig.model_validate({"channels": [{"name": "am", "type": "alertmanager", "url": base,
                                                     "resend_s": 0.05, "attempts": 2, "backoff_s": 0.01}],
                                       "default": ["am"], "runbook_base": RUNBOOKS})
    d = await dispatch(cfg)
    d.submit(note("inc-1"))
    await d.idle()

    async def reposted() -> bool:
        return len(r.am_api) >= 2
    await wait_until(reposted, 10, "the firing alert re-posted")
    r.fail_next = [503] * 10  # Alertmanager restarts just as the incident resolves
    d.submit(note("inc-1", NotifyAction.RESOLVE, seq=5, event=NotifyEvent.RESOLVED))
    await d.idle()
    assert d.records[-1].outcome is ActionOutcome.FAILED  # type: ignore[attr-defined]
    r.fail_next.clear()  # back up: a re-post now would assert the alert again until the next resolve_timeout
    posted = len(r.am_api)
    await asyncio.sleep(0.4)
    assert r.am_api[posted:] == []  # nothing re-posted: Alertmanager ends the alert itself
    assert d.senders["am"].firing == {}  # type: ignore[attr-defined]


async def test_a_pagerduty_resolve_that_failed_is_tried_again_until_the_incident_closes(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers
    (tmp_path / "pd.key").write_text(PD_KEY)
    cfg = NotifyConfig.model_validate({"channels": [{"name": "pd", "type": "pagerduty", "url": f"{base}/pagerduty",
                                                     "routing_key_file": str(tmp_path / "pd.key"), "attempts": 2,
                                                     "backoff_s": 0.01, "retry_s": 0.1}], "default": ["pd"],
                                       "runbook_base": RUNBOOKS})
    d = await dispatch(cfg)
    d.submit(note("inc-1"))
    await d.idle()
    r.fail_next = [503, 503]  # PagerDuty is unreachable as the incident resolves
    d.submit(note("inc-1", NotifyAction.RESOLVE, seq=5, event=NotifyEvent.RESOLVED))
    await d.idle()
    assert r.pd_open == {"inc-1": 1} and d.records[-1].outcome is ActionOutcome.FAILED  # type: ignore[attr-defined]

    async def closed() -> bool:
        return r.pd_resolved == ["inc-1"]
    await wait_until(closed, 10, "the resolve tried again")
    assert d.retry["pd"] == {} and r.pd_incidents == ["inc-1"]
    assert [x.outcome.value for x in d.records] == ["succeeded", "failed", "succeeded"]  # type: ignore[attr-defined]


async def test_failed_resolves_wait_in_a_bounded_set_and_what_it_drops_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender_module, "RETRY_MEMORY", 2)

    class Down:
        name, kind = "hook", "webhook"

        async def send(self, n: Notification) -> None:
            raise Transient("connection refused")

        async def repost(self) -> int:
            return 0

    cfg = NotifyConfig.model_validate({"channels": [{"name": "hook", "type": "webhook", "url": "https://h.example/",
                                                     "attempts": 1, "retry_s": 3600}], "default": ["hook"],
                                       "runbook_base": RUNBOOKS})
    failures: list[str] = []
    d = Dispatcher(cfg, {"hook": Down()}, SystemClock(), on_delivery=lambda c, ok: None if ok else failures.append(c))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop), name="test-dispatch")
    try:
        for i in range(3):
            d.submit(note(f"inc-{i}", NotifyAction.RESOLVE, seq=5, event=NotifyEvent.RESOLVED))
        await d.idle()
        assert list(d.retry["hook"]) == ["inc-1", "inc-2"]  # the oldest went
        assert d.dropped == 1 and len(failures) == 4  # three failed deliveries and one drop, all counted
        d.submit(note("inc-2", seq=9))  # the incident paged again: its old resolve must not end the new page
        assert list(d.retry["hook"]) == ["inc-1"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_the_shipped_alertmanager_config_passes_amtool_check_config() -> None:
    if not Path(AMTOOL).exists():
        pytest.fail("amtool not installed: apt-get install prometheus-alertmanager (make test does)")
    checked = subprocess.run([AMTOOL, "check-config", str(AM_CONFIG)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 inhibit rules" in checked.stdout


async def test_the_shipped_alertmanager_config_inhibits_the_rules_copy_of_a_paged_cause(
        receivers: tuple[Receivers, str], tmp_path: Path, dispatch: Any) -> None:
    r, base = receivers

    def cause(alert: dict[str, Any]) -> str:
        labels = alert["labels"]
        what = labels.get("incident") or labels.get("category") or labels["component"]
        return f"{labels['alertname']}/{what}" + (f"@{labels['cluster']}" if labels.get("cluster") != "c1" else "")

    shipped = yaml.safe_load(AM_CONFIG.read_text())  # as shipped, the pager swapped for the test's webhook
    shipped["receivers"] = [{"name": x["name"], "webhook_configs": [{"url": f"{base}/am", "send_resolved": True}]}
                            for x in shipped["receivers"]]
    shipped["route"].update(group_wait="0s", group_interval="100ms")
    proc, am = start_alertmanager(tmp_path, base, config=yaml.safe_dump(shipped))
    try:
        cfg = config(am, base, tmp_path, default=("am",))
        core = NotifyCore(cfg)  # the notifier pages an escalation and a breaker trip
        core.change(change(inc(category="unknown_fault")))
        (escalation,) = core.record(record(*ESCALATED, reason="unknown fault"))
        (breaker,) = core.record(record(ActionKind.NOTIFICATION, ActionOutcome.SUCCEEDED, iid="inc-2",
                                        waiting=WaitingOn.BREAKER, details={"guard": "breaker", "held": "inc-1,inc-2"}))
        d = await dispatch(cfg)
        d.submit(escalation)
        d.submit(breaker)
        await d.idle()
        rules = [  # then the Prometheus rules fire for the same causes (labels: the rule's and its by () labels)
            {"BreakfixBreakerTripped": {"job": "breakfix-remediator", "cluster": "c1", "severity": "critical",
                                        "component": "remediator"}},
            {"BreakfixEscalatedIncidentsOpen": {"category": "unknown_fault", "cluster": "c1", "severity": "warning",
                                                "component": "correlator"}},
            {"BreakfixEscalatedIncidentsOpen": {"category": "gpu_reset_required", "cluster": "c1",
                                                "severity": "warning", "component": "correlator"}},  # nobody paged
            # another cluster's causes: nobody was paged for them, whatever c1's pages are
            {"BreakfixBreakerTripped": {"job": "breakfix-remediator", "cluster": "c2", "severity": "critical",
                                        "component": "remediator"}},
            {"BreakfixEscalatedIncidentsOpen": {"category": "unknown_fault", "cluster": "c2", "severity": "warning",
                                                "component": "correlator"}}]
        async with aiohttp.ClientSession() as http:
            posted = [{"labels": {"alertname": name, **labels}} for x in rules for name, labels in x.items()]
            async with http.post(f"{am}/api/v2/alerts", json=posted) as resp:
                assert resp.status == 200

            async def states() -> dict[str, str]:
                async with http.get(f"{am}/api/v2/alerts") as got:
                    return {cause(a): a["status"]["state"] for a in await got.json()}

            want = {"BreakfixIncident/inc-1": "active", "BreakfixBreakerTripped/breaker-c1": "active",
                    "BreakfixBreakerTripped/remediator": "suppressed",
                    "BreakfixEscalatedIncidentsOpen/unknown_fault": "suppressed",
                    "BreakfixEscalatedIncidentsOpen/gpu_reset_required": "active",
                    "BreakfixBreakerTripped/remediator@c2": "active",
                    "BreakfixEscalatedIncidentsOpen/unknown_fault@c2": "active"}

            async def inhibited() -> bool:
                return await states() == want
            await wait_until(inhibited, 10, "the rules' copies of the paged causes inhibited")

        async def backstop_sent() -> bool:
            return any(a["labels"].get("category") == "gpu_reset_required" for m in r.am for a in m["alerts"])
        await wait_until(backstop_sent, 10, "the unpaged escalation's backstop alert")
        async def others_sent() -> bool:
            return sum(a["labels"].get("cluster") == "c2" for m in r.am for a in m["alerts"]) >= 2
        await wait_until(others_sent, 10, "the other cluster's backstops")
        assert {cause(a) for m in r.am for a in m["alerts"]} == {  # one notification per cause
            "BreakfixIncident/inc-1", "BreakfixBreakerTripped/breaker-c1",
            "BreakfixEscalatedIncidentsOpen/gpu_reset_required", "BreakfixBreakerTripped/remediator@c2",
            "BreakfixEscalatedIncidentsOpen/unknown_fault@c2"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
