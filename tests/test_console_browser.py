"""The console in a real browser (Debian's chromium, driven by Playwright, never a downloaded build)
against a live pipeline on a real nats-server: correlator, remediator, simulated cluster.

Screenshots of every view go under the test's tmp dir; with BREAKFIX_DOCS_SCREENSHOT=1 the incident
list is also written to docs/console.png for the README.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from breakfix.bus.server import EmbeddedNats
from breakfix.console import verbs
from breakfix.console.oncall import read_records
from breakfix.remediator.policy import Policy
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ActionKind, ActionOutcome, IncidentStatus
from tests.conftest import wait_until
from tests.console_fixtures import TOKENS
from tests.console_pipeline import Pipeline, pipeline, xid

pytestmark = [pytest.mark.nats, pytest.mark.timeout(180)]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is required (make system-deps installs it)"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def live(nats_server: EmbeddedNats, catalog: Catalog, policy: Policy) -> AsyncIterator[Pipeline]:
    async with pipeline(nats_server.url, catalog, policy) as p:
        yield p


async def login(browser: Browser, base: str, name: str, *, width: int = 1280) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    await page.goto(f"{base}/login")
    await page.fill("input[name=name]", name)
    await page.fill("input[name=token]", TOKENS[name])
    await page.click("button.primary")
    await page.wait_for_url(f"{base}/incidents")
    return page


async def incident_of(live: Pipeline, node: str, status: IncidentStatus | None = None) -> str:
    def found() -> list[str]:
        return [i.id for i in live.console.state.incidents.values()
                if i.node == node and i.parent is None and (status is None or i.status is status)]

    async def has() -> bool:
        return bool(found())

    await wait_until(has, 20, f"an incident on {node}")
    return found()[0]


async def waiting_for_approval(live: Pipeline, iid: str) -> None:
    async def waits() -> bool:
        inc = live.console.state.incidents.get(iid)
        return inc is not None and verbs.waiting_step(inc, live.console.state.records_of(iid)) is not None

    await wait_until(waits, 20, f"{iid} waiting for approval")


async def test_list_shows_open_incidents_and_a_new_one_appears_live(live: Pipeline, browser: Browser,
                                                                   tmp_path: Path) -> None:
    await live.signal(xid("gpu-node-001", "79"))
    first = await incident_of(live, "gpu-node-001")
    page = await login(browser, live.console.url, "olga")
    await expect(page.locator(f"tr[data-incident={first}]")).to_be_visible()
    await expect(page.locator("#live.on")).to_be_visible()  # the event stream is connected
    await live.signal(xid("gpu-node-006", "173", gpu=5))
    second = await incident_of(live, "gpu-node-006")
    await expect(page.locator(f"tr[data-incident={second}]")).to_be_visible(timeout=10_000)  # no reload
    assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1
    row = page.locator(f"tr[data-incident={second}]")
    await expect(row).to_contain_text("unknown_fault")
    await page.screenshot(path=tmp_path / "incidents.png", full_page=True)
    if os.environ.get("BREAKFIX_DOCS_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "incidents.png", ROOT / "docs" / "console.png")
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone
    await expect(page.locator(f"tr[data-incident={first}]")).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 400
    await page.screenshot(path=tmp_path / "incidents-phone.png", full_page=True)


async def test_a_viewer_is_refused_and_an_operator_approval_lets_the_remediator_proceed_under_a_silence(
        live: Pipeline, browser: Browser, tmp_path: Path) -> None:
    await live.signal(xid("gpu-node-002", "79"))
    iid = await incident_of(live, "gpu-node-002")
    await waiting_for_approval(live, iid)
    # a viewer sees the waiting step but no buttons, and a forged POST is refused
    viewer = await login(browser, live.console.url, "vera")
    await expect(viewer.locator(f"tr[data-incident={iid}] .waiting")).to_have_text("approval")
    await viewer.goto(f"{live.console.url}/incidents/{iid}")
    await expect(viewer.locator("ol.ladder li.current")).to_contain_text("reboot")
    await expect(viewer.locator("#approve")).to_have_count(0)
    status = await viewer.evaluate(
        """async (iid) => (await fetch(`/incidents/${iid}/approve`, {method: 'POST',
             headers: {'X-CSRF-Token': document.body.dataset.csrf, 'Content-Type': 'application/x-www-form-urlencoded'},
             body: 'cluster=c1'})).status""", iid)
    assert status == 403 and live.cluster.nodes["gpu-node-002"].reboots == 0
    await viewer.screenshot(path=tmp_path / "incident-viewer.png", full_page=True)
    page = await login(browser, live.console.url, "olga")
    await page.goto(f"{live.console.url}/incidents/{iid}")
    await expect(page.locator("ol.ladder li.current")).to_contain_text("reboot")
    await page.screenshot(path=tmp_path / "incident-waiting.png", full_page=True)
    # silence the node's notifications first: remediation must still run
    await page.fill("form[action='/silences'] input[name=reason]", "node in a maintenance window")
    await page.click("#silence")
    await expect(page.locator("#flash")).to_contain_text("silence: recorded")
    await page.goto(f"{live.console.url}/incidents/{iid}")
    await expect(page.locator("p.silenced")).to_contain_text("remediation still runs")
    await page.fill("form[action$='/approve'] input[name=reason]", "reboot is fine, jobs drained")
    await page.click("#approve")
    await expect(page.locator("#flash")).to_contain_text("approve: recorded")

    async def rebooted_and_back() -> bool:
        n = live.cluster.nodes["gpu-node-002"]
        return n.reboots == 1 and not n.cordoned

    await wait_until(rebooted_and_back, 30, "the approved reboot, validation and return to service")
    await page.goto(f"{live.console.url}/incidents/{iid}")
    audit = page.locator("table.audit")
    await expect(audit).to_contain_text("olga")
    await expect(audit).to_contain_text("return_to_service")
    await page.screenshot(path=tmp_path / "incident-approved.png", full_page=True)
    records = await read_records(live.bus, cluster="c1", incident=iid)
    (approval,) = [r for r in records if r.kind is ActionKind.APPROVAL]
    assert (approval.actor, approval.outcome, approval.action and approval.action.value) == (
        "olga", ActionOutcome.APPROVED, "reboot")
    (sil,) = [r for r in records if r.kind is ActionKind.SILENCE]
    matcher = json.loads(sil.details["matcher"])
    assert matcher == {"cluster": "c1", "node": "gpu-node-002", "category": "node_reboot_required"}
    assert verbs.matches(matcher, live.console.state.incidents[iid])
    # no notifier on main yet: the remediator sent no NOTIFICATION record, silenced or not
    assert not [r for r in records if r.kind is ActionKind.NOTIFICATION]
    assert [r for r in records if r.action and r.action.value == "reboot" and r.outcome is ActionOutcome.SUCCEEDED]


async def test_release_is_audited_and_fleet_and_history_render_their_charts(live: Pipeline, browser: Browser,
                                                                            tmp_path: Path) -> None:
    await live.signal(xid("gpu-node-004", "173", gpu=3))
    iid = await incident_of(live, "gpu-node-004", IncidentStatus.ESCALATED)
    page = await login(browser, live.console.url, "olga")
    await page.goto(f"{live.console.url}/incidents/{iid}")
    await page.fill("form[action$='/release'] input[name=reason]", "reseated the GPU, fieldiag passed")
    await page.click("#release")
    await expect(page.locator("#flash")).to_contain_text("release: recorded")
    await page.goto(f"{live.console.url}/incidents/{iid}")
    await expect(page.locator("table.audit")).to_contain_text("reseated the GPU")
    await page.screenshot(path=tmp_path / "incident-release.png", full_page=True)
    (rel,) = [r for r in await read_records(live.bus, cluster="c1", incident=iid) if r.kind is ActionKind.RELEASE]
    assert (rel.outcome, rel.actor, rel.node, rel.details) == (ActionOutcome.REQUESTED, "olga", "gpu-node-004", {})
    # the remediator acts on the release: it validates the node, then returns it to service
    async def returned() -> bool:
        return not live.cluster.nodes["gpu-node-004"].cordoned

    await wait_until(returned, 20, "the released node back in service")
    done = await read_records(live.bus, cluster="c1", incident=iid)
    assert [r for r in done if r.action and r.action.value == "validate" and r.outcome is ActionOutcome.SUCCEEDED]
    await page.goto(f"{live.console.url}/fleet")
    node = page.locator(".node", has_text="gpu-node-004")
    await expect(node.locator(".cell.cordoned")).to_have_count(0)  # nothing holds the node any more
    await expect(page.locator("p.breaker")).to_contain_text("closed")
    await page.screenshot(path=tmp_path / "fleet.png", full_page=True)
    await page.goto(f"{live.console.url}/history?days=30")
    for chart in ("#chart-per-day svg", "#chart-ttr svg", "#chart-share svg"):
        await expect(page.locator(chart)).to_be_visible()
    await expect(page.locator("#chart-per-day svg rect").first).to_be_visible()
    await expect(page.locator("table", has_text="evidence")).to_contain_text(iid)  # the RMA list
    await expect(page.get_by_role("link", name="CSV")).to_be_visible()
    await page.screenshot(path=tmp_path / "history.png", full_page=True)
    await page.goto(f"{live.console.url}/silences")
    await page.screenshot(path=tmp_path / "silences.png", full_page=True)
