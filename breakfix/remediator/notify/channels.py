"""The notification channels: pure payload builders, and one small HTTP adapter per channel.

A ``Notification`` (``notify.model``) goes out as
- Alertmanager: ``POST <url>/api/v2/alerts`` with a JSON list of alerts (labels cluster, node, category,
  severity, domain, incident; annotations summary, runbook_url, ...). A resolve re-posts the same labels
  with ``endsAt``; ``startsAt`` stays the first trigger's, since Alertmanager answers 400 "start time
  must be before end time" otherwise. Firing alerts are re-posted every ``resend_s`` because
  Alertmanager resolves an alert by itself ``resolve_timeout`` after its last post (so a resolve leaves
  the re-posted set before it is sent: one that fails still ends within ``resolve_timeout``)
  (Alertmanager API v2, https://github.com/prometheus/alertmanager/blob/main/api/v2/openapi.yaml).
- PagerDuty Events API v2: ``{routing_key, event_action: trigger|acknowledge|resolve, dedup_key, payload:
  {summary <= 1024 chars, source, severity critical|error|warning|info, timestamp, component, group,
  class, custom_details}, links}``; 202 when accepted, 429 when throttled
  (https://developer.pagerduty.com/docs/events-api-v2/trigger-events/).
- Slack incoming webhook: ``{text, blocks}`` in Block Kit (header <= 150 chars of plain_text, section
  text <= 3000, at most 10 fields of <= 2000; https://api.slack.com/reference/block-kit/blocks).
- generic webhook: the ``breakfix.notification/v1`` JSON itself, with an ``Idempotency-Key`` header.

Outbound HTTP: TLS verification always on (an extra CA bundle may be added), a timeout on every
request, redirects never followed (a 3xx is a permanent failure), credentials only from
``load_secret``. 429, 5xx, timeouts and connection errors are ``Transient`` (retried by
``notify.sender``); anything else is ``Permanent``.
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

import aiohttp

from breakfix.remediator.notify.config import (
    AlertmanagerChannel,
    Channel,
    PagerDutyChannel,
    SlackChannel,
    WebhookChannel,
    load_secret,
)
from breakfix.remediator.notify.model import Notification, NotifyAction

PD_SEVERITY = {"fatal": "critical", "critical": "critical", "warning": "warning", "info": "info"}


class Transient(Exception):
    """Worth retrying: throttled, server error, timeout, connection trouble."""


class Permanent(Exception):
    """Never worth retrying: the request itself is wrong (4xx, a redirect, a bad credential)."""


# -- pure payload builders ------------------------------------------------------------------------
def _iso(n: Notification) -> str:
    return n.at.isoformat().replace("+00:00", "Z")


def alertmanager_alert(n: Notification, spec: AlertmanagerChannel, starts_at: str | None = None) -> dict[str, Any]:
    labels = {"alertname": spec.alertname if n.event.value != "breaker" else "BreakfixBreakerTripped",
              "cluster": n.cluster, "node": n.node or ",".join(f"{k}={v}" for k, v in sorted(n.topology.items())),
              "category": n.category, "severity": n.severity, "domain": n.domain, "incident": n.dedup_key}
    annotations = {"summary": n.title, "description": n.summary, "runbook_url": n.runbook_url, "event": n.event.value,
                   "next": n.next, "done": "; ".join(n.done), "tenants": ", ".join(n.tenants),
                   "pods": ", ".join(n.pods), "gpus": ", ".join(n.gpus), "rma": n.rma, "held": ", ".join(n.held)}
    alert: dict[str, Any] = {"labels": {k: v for k, v in labels.items() if v},
                             "annotations": {k: v for k, v in annotations.items() if v},
                             "startsAt": starts_at or _iso(n)}
    if n.console_url.startswith(("http://", "https://")):
        alert["generatorURL"] = n.console_url
    if n.action is NotifyAction.RESOLVE:
        alert["endsAt"] = max(_iso(n), alert["startsAt"])
    return alert


def pagerduty_event(n: Notification, routing_key: str) -> dict[str, Any]:
    body: dict[str, Any] = {"routing_key": routing_key, "event_action": n.action.value, "dedup_key": n.dedup_key}
    if n.action is not NotifyAction.TRIGGER:
        return body
    details = {"incident": n.incident, "cluster": n.cluster, "node": n.node, "nodes": list(n.nodes),
               "gpus": list(n.gpus), "tenants": list(n.tenants), "pods": list(n.pods), "done": list(n.done),
               "next": n.next, "waiting": n.waiting, "rma": n.rma, "held": list(n.held), "event": n.event.value,
               "topology": n.topology}
    body["payload"] = {"summary": n.title[:1024], "source": n.node or n.cluster, "severity": PD_SEVERITY[n.severity],
                       "timestamp": _iso(n), "component": n.category, "group": n.cluster, "class": n.event.value,
                       "custom_details": {k: v for k, v in details.items() if v}}
    links = [{"href": n.runbook_url, "text": "runbook"}] if n.runbook_url.startswith("http") else []
    if n.console_url:
        links.append({"href": n.console_url, "text": "breakfix console"})
    if links:
        body["links"] = links
    body["client"] = "breakfix"
    return body


def slack_message(n: Notification) -> dict[str, Any]:
    def field(name: str, value: str) -> dict[str, str]:
        return {"type": "mrkdwn", "text": f"*{name}*\n{value}"[:2000]}

    icon = {"trigger": ":rotating_light:", "acknowledge": ":eyes:", "resolve": ":white_check_mark:"}[n.action.value]
    fields = [field("Cluster", n.cluster), field("Node", n.node or ", ".join(n.nodes[:10]) or "-"),
              field("Category", n.category), field("Severity", n.severity), field("Domain", n.domain),
              field("GPUs", ", ".join(n.gpus) or "-"),
              field("Blast radius", (", ".join(n.tenants) or "no tenant") + f" ({len(n.pods)} pods)"),
              field("Event", n.event.value)]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{icon} {n.title}"[:150], "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": n.summary[:3000] or n.title}},
        {"type": "section", "fields": fields[:10]},
    ]
    lines = []
    if n.done:
        lines.append("*Done:* " + "; ".join(n.done))
    if n.next:
        lines.append("*Next:* " + n.next)
    if n.rma:
        lines.append("*RMA:* " + n.rma)
    if n.held:
        lines.append("*Held:* " + ", ".join(n.held))
    if lines:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)[:3000]}})
    links = [f"<{n.runbook_url}|Runbook>" if n.runbook_url.startswith("http") else f"Runbook: {n.runbook_url}"]
    if n.console_url:
        links.append(f"<{n.console_url}|Console>")
    links.append(f"incident `{n.dedup_key}`")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(links)[:3000]}]})
    return {"text": f"{n.action.value}: {n.title}"[:3000], "blocks": blocks}


def webhook_body(n: Notification) -> dict[str, Any]:
    return n.model_dump(mode="json", by_alias=True)


# -- adapters -------------------------------------------------------------------------------------
class Sender(Protocol):
    name: str
    kind: str

    async def send(self, n: Notification) -> None: ...

    async def repost(self) -> int: ...


def _ssl(ca_file: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


class HttpSender:
    """One channel: builds its payload and POSTs it. Sessions are made per call site (``session``)."""

    def __init__(self, spec: Channel, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.name = spec.name
        self.kind: str = spec.type
        self.session = session
        self.ssl = _ssl(spec.ca_file)
        self.firing: dict[str, dict[str, Any]] = {}  # alertmanager: dedup key -> the alert as last posted
        self.secret = ""
        match spec:
            case PagerDutyChannel():
                self.secret = load_secret(spec.routing_key_file, spec.routing_key_env, f"channel {spec.name}")
            case SlackChannel():
                self.secret = load_secret(spec.webhook_url_file, spec.webhook_url_env, f"channel {spec.name}")
            case _:
                pass

    async def _post(self, url: str, body: object, headers: dict[str, str] | None = None) -> None:
        try:
            async with self.session.post(url, json=body, headers=headers, ssl=self.ssl, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s)) as resp:
                text = (await resp.text())[:300]
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise Permanent(f"{type(exc).__name__}: {exc}") from None
        if resp.status == 429 or resp.status >= 500:
            raise Transient(f"HTTP {resp.status}: {text}")
        if not 200 <= resp.status < 300:
            raise Permanent(f"HTTP {resp.status}: {text}")

    async def send(self, n: Notification) -> None:
        spec = self.spec
        match spec:
            case AlertmanagerChannel():
                prior = self.firing.get(n.dedup_key)
                alert = alertmanager_alert(n, spec, prior["startsAt"] if prior else None)
                if n.action is NotifyAction.ACKNOWLEDGE:
                    return  # Alertmanager has no ack; silences are Alertmanager's own business
                if n.action is NotifyAction.RESOLVE:  # no longer re-posted even if this post fails: Alertmanager
                    self.firing.pop(n.dedup_key, None)  # then ends the alert itself after its resolve_timeout
                await self._post(f"{spec.url.rstrip('/')}/api/v2/alerts", [alert])
                if n.action is NotifyAction.TRIGGER:
                    self.firing[n.dedup_key] = alert
            case PagerDutyChannel():
                await self._post(spec.url, pagerduty_event(n, self.secret))
            case SlackChannel():
                await self._post(self.secret, slack_message(n))
            case WebhookChannel():
                headers = {"Idempotency-Key": n.id}
                if spec.token_file is not None:
                    headers["Authorization"] = "Bearer " + load_secret(spec.token_file, None, f"channel {spec.name}")
                await self._post(spec.url, webhook_body(n), headers)

    async def repost(self) -> int:
        """Alertmanager only: post every firing alert again, so none times out while still true."""
        if not isinstance(self.spec, AlertmanagerChannel) or not self.firing:
            return 0
        await self._post(f"{self.spec.url.rstrip('/')}/api/v2/alerts", list(self.firing.values()))
        return len(self.firing)


__all__ = ["HttpSender", "Permanent", "Sender", "Transient", "alertmanager_alert", "pagerduty_event",
           "slack_message", "webhook_body"]
