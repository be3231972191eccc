"""Local HTTP receivers for the notification tests: PagerDuty Events v2, Slack Block Kit, a generic
webhook, an Alertmanager webhook sink and Alertmanager's alerts API (``POST /api/v2/alerts``, to fail on demand),
each validating what it gets against the documented format.

PagerDuty: https://developer.pagerduty.com/docs/events-api-v2/trigger-events/ (202 with
``{status, message, dedup_key}``, 400 ``Invalid event``); an open dedup key absorbs repeated triggers.
Slack: https://api.slack.com/reference/block-kit/blocks (header plain_text <= 150, section text <= 3000,
fields <= 10 of <= 2000, <= 50 blocks; a bad body answers 400 ``invalid_blocks``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

PD_SEVERITIES = {"critical", "error", "warning", "info"}


def pagerduty_errors(body: Any) -> list[str]:
    errs: list[str] = []
    if not isinstance(body, dict):
        return ["body is not an object"]
    if not isinstance(body.get("routing_key"), str) or len(body["routing_key"]) != 32:
        errs.append("routing_key must be the 32-character integration key")
    action = body.get("event_action")
    if action not in ("trigger", "acknowledge", "resolve"):
        errs.append(f"event_action {action!r}")
    key = body.get("dedup_key")
    if action in ("acknowledge", "resolve") and not key:
        errs.append("dedup_key required to acknowledge or resolve")
    if key is not None and (not isinstance(key, str) or len(key) > 255):
        errs.append("dedup_key must be a string of at most 255 characters")
    if action == "trigger":
        p = body.get("payload")
        if not isinstance(p, dict):
            return [*errs, "payload required for trigger"]
        if not isinstance(p.get("summary"), str) or not 0 < len(p["summary"]) <= 1024:
            errs.append("payload.summary: 1..1024 characters")
        if not isinstance(p.get("source"), str) or not p["source"]:
            errs.append("payload.source required")
        if p.get("severity") not in PD_SEVERITIES:
            errs.append(f"payload.severity {p.get('severity')!r}")
        if "timestamp" in p:
            try:
                datetime.fromisoformat(p["timestamp"].replace("Z", "+00:00"))
            except (AttributeError, ValueError):
                errs.append("payload.timestamp must be ISO 8601")
        if "custom_details" in p and not isinstance(p["custom_details"], dict):
            errs.append("payload.custom_details must be an object")
        for link in body.get("links", []):
            if not isinstance(link, dict) or not str(link.get("href", "")).startswith("http"):
                errs.append(f"bad link {link!r}")
    return errs


def slack_errors(body: Any) -> list[str]:
    errs: list[str] = []
    if not isinstance(body, dict) or not isinstance(body.get("blocks"), list):
        return ["blocks required"]
    if not isinstance(body.get("text"), str) or not body["text"]:
        errs.append("text (the notification fallback) required")
    blocks = body["blocks"]
    if not 0 < len(blocks) <= 50:
        errs.append("1..50 blocks")
    for b in blocks:
        t = b.get("type")
        if t == "header":
            txt = b.get("text", {})
            if txt.get("type") != "plain_text" or not 0 < len(txt.get("text", "")) <= 150:
                errs.append("header: plain_text of 1..150 characters")
        elif t == "section":
            if "text" not in b and "fields" not in b:
                errs.append("section needs text or fields")
            if "text" in b and (b["text"].get("type") not in ("mrkdwn", "plain_text")
                                or not 0 < len(b["text"].get("text", "")) <= 3000):
                errs.append("section text: 1..3000 characters")
            fields = b.get("fields", [])
            if len(fields) > 10 or any(len(f.get("text", "")) > 2000 or f.get("type") not in ("mrkdwn", "plain_text")
                                       for f in fields):
                errs.append("section fields: at most 10 of at most 2000 characters")
        elif t == "context":
            if not 0 < len(b.get("elements", [])) <= 10:
                errs.append("context: 1..10 elements")
        else:
            errs.append(f"unexpected block type {t!r}")
    return errs


class Receivers:
    """One aiohttp app: ``/pagerduty``, ``/slack``, ``/webhook``, ``/am`` (Alertmanager's webhook),
    ``/api/v2/alerts`` (Alertmanager's API)."""

    def __init__(self) -> None:
        self.pd: list[dict[str, Any]] = []
        self.pd_open: dict[str, int] = {}       # dedup key -> triggers absorbed
        self.pd_incidents: list[str] = []       # dedup keys that opened a PagerDuty incident
        self.pd_resolved: list[str] = []
        self.slack: list[dict[str, Any]] = []
        self.webhook: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.am: list[dict[str, Any]] = []
        self.am_api: list[list[dict[str, Any]]] = []  # what Alertmanager's own API accepted
        self.fail_next: list[int] = []          # statuses to answer before accepting
        self.stall: set[str] = set()            # paths whose requests hang until ``release``
        self.release = asyncio.Event()
        self.hanging = 0
        self.rejected: list[str] = []

    async def _gate(self, req: web.Request) -> web.Response | None:
        if req.path in self.stall:
            self.hanging += 1
            await self.release.wait()
        if self.fail_next:
            return web.Response(status=self.fail_next.pop(0), text="try later")
        return None

    async def pagerduty(self, req: web.Request) -> web.Response:
        if (r := await self._gate(req)) is not None:
            return r
        body = await req.json()
        errs = pagerduty_errors(body)
        if errs:
            self.rejected.extend(errs)
            return web.json_response({"status": "invalid event", "message": "Event object is invalid",
                                      "errors": errs}, status=400)
        self.pd.append(body)
        key, action = body["dedup_key"], body["event_action"]
        if action == "trigger":
            if key in self.pd_open:
                self.pd_open[key] += 1
            else:
                self.pd_open[key] = 1
                self.pd_incidents.append(key)
        elif action == "resolve" and key in self.pd_open:
            del self.pd_open[key]
            self.pd_resolved.append(key)
        return web.json_response({"status": "success", "message": "Event processed", "dedup_key": key}, status=202)

    async def slack_hook(self, req: web.Request) -> web.Response:
        if (r := await self._gate(req)) is not None:
            return r
        body = await req.json()
        errs = slack_errors(body)
        if errs:
            self.rejected.extend(errs)
            return web.Response(status=400, text="invalid_blocks")
        self.slack.append(body)
        return web.Response(text="ok")

    async def generic(self, req: web.Request) -> web.Response:
        if (r := await self._gate(req)) is not None:
            return r
        self.webhook.append((dict(req.headers), await req.json()))
        return web.Response(status=204)

    async def alertmanager(self, req: web.Request) -> web.Response:
        self.am.append(await req.json())
        return web.Response(text="ok")

    async def alertmanager_api(self, req: web.Request) -> web.Response:
        if (r := await self._gate(req)) is not None:
            return r
        self.am_api.append(await req.json())
        return web.Response(text="")

    def app(self) -> web.Application:
        a = web.Application()
        a.add_routes([web.post("/pagerduty", self.pagerduty), web.post("/slack", self.slack_hook),
                      web.post("/webhook", self.generic), web.post("/am", self.alertmanager),
                      web.post("/api/v2/alerts", self.alertmanager_api)])
        return a

    async def start(self) -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def test_pagerduty_validator_rejects_what_the_events_api_rejects() -> None:
    assert pagerduty_errors({"routing_key": "k" * 32, "event_action": "resolve"}) == [
        "dedup_key required to acknowledge or resolve"]
    bad = {"routing_key": "short", "event_action": "trigger", "payload": {"summary": "", "severity": "fatal"}}
    assert len(pagerduty_errors(bad)) == 4
    good = {"routing_key": "k" * 32, "event_action": "trigger", "dedup_key": "inc-1",
            "payload": {"summary": "s", "source": "n1", "severity": "critical", "timestamp": "2026-11-23T12:00:00Z"}}
    assert pagerduty_errors(good) == []


def test_slack_validator_rejects_oversized_headers_and_unknown_blocks() -> None:
    assert slack_errors({"text": "t", "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}},
                                                 {"type": "image"}]}) == [
        "header: plain_text of 1..150 characters", "unexpected block type 'image'"]
    assert slack_errors({"text": "t", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]}) == []
