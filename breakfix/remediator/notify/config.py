"""The ``notify`` section of the remediator config: channels, routes and timing, validated at start-up.

Read with the rest of ``breakfix remediator --config FILE`` (``remediator.config.RemediatorConfig.notify``);
an absent section means no channel (the demo then says "escalated (no notification channel configured)").
Credentials never sit in the config text: a PagerDuty routing key and a Slack webhook URL come from
a file (a mounted Kubernetes Secret) or an environment variable, read once by ``load_secret``.

```yaml
notify:
  runbook_base: https://git.example.com/breakfix/blob/main/runbooks/
  console_url: https://breakfix.example.com          # incident links, once the console exists
  channels:
    - {name: am, type: alertmanager, url: http://alertmanager.monitoring:9093}
    - {name: pd, type: pagerduty, routing_key_file: /var/run/secrets/breakfix/pagerduty}
    - {name: slack, type: slack, webhook_url_env: BREAKFIX_SLACK_WEBHOOK}
  routes:                                            # first match wins; no match -> default
    - {severities: [fatal, critical], domains: [operator], channels: [am, pd, slack]}
  default: [am]
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import DataFileError

_STRICT = ConfigDict(frozen=True, extra="forbid")
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class SecretError(DataFileError):
    """A credential file or variable is missing or empty (``str()``: where, then why; the CLI exits 2 on it)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(where, None, message)


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _http_url(url: str) -> str:
    if not _is_http_url(url):
        raise ValueError(f"expected an http(s) URL, got {url!r}")
    return url


class ChannelBase(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    timeout_s: float = Field(10.0, gt=0, le=120)
    attempts: int = Field(5, ge=1, le=20, description="Tries per notification (transient errors only).")
    backoff_s: float = Field(0.5, gt=0, le=60, description="First retry delay; doubles up to backoff_max_s.")
    backoff_max_s: float = Field(30.0, gt=0, le=600)
    ca_file: Path | None = Field(None, description="Extra CA bundle for a private endpoint (verification stays on).")


class AlertmanagerChannel(ChannelBase):
    type: Literal["alertmanager"]
    url: str = Field(description="Alertmanager base URL; alerts go to <url>/api/v2/alerts.")
    resend_s: float = Field(60.0, gt=0, le=3600, description="Re-post firing alerts this often (must stay below "
                                                              "Alertmanager's resolve_timeout, 5m by default).")
    alertname: str = "BreakfixIncident"

    @model_validator(mode="after")
    def _url(self) -> AlertmanagerChannel:
        _http_url(self.url)
        return self


RETRY_HELP = "A resolve that did not get through (transient errors, a full queue) is tried again this often."


class PagerDutyChannel(ChannelBase):
    type: Literal["pagerduty"]
    url: str = PAGERDUTY_EVENTS_URL
    routing_key_file: Path | None = None
    routing_key_env: str | None = None
    retry_s: float = Field(60.0, gt=0, le=3600, description=RETRY_HELP)

    @model_validator(mode="after")
    def _one_source(self) -> PagerDutyChannel:
        _http_url(self.url)
        if (self.routing_key_file is None) == (self.routing_key_env is None):
            raise ValueError("give exactly one of routing_key_file or routing_key_env (never the key itself)")
        return self


class SlackChannel(ChannelBase):
    type: Literal["slack"]
    webhook_url_file: Path | None = None
    webhook_url_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SlackChannel:
        if (self.webhook_url_file is None) == (self.webhook_url_env is None):
            raise ValueError("give exactly one of webhook_url_file or webhook_url_env (never the URL itself)")
        return self


class WebhookChannel(ChannelBase):
    type: Literal["webhook"]
    url: str
    token_file: Path | None = Field(None, description="Optional bearer token, sent as Authorization.")
    retry_s: float = Field(60.0, gt=0, le=3600, description=RETRY_HELP)

    @model_validator(mode="after")
    def _url(self) -> WebhookChannel:
        _http_url(self.url)
        return self


Channel = AlertmanagerChannel | PagerDutyChannel | SlackChannel | WebhookChannel


class Route(BaseModel):
    model_config = _STRICT
    severities: frozenset[Severity] = frozenset()
    domains: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    channels: tuple[str, ...] = Field(min_length=1)


class NotifyConfig(BaseModel):
    model_config = _STRICT
    channels: tuple[Channel, ...] = ()
    routes: tuple[Route, ...] = ()
    default: tuple[str, ...] = Field(default=(), description="Channels for what no route matches.")
    runbook_base: str = Field("runbooks/", description="Prefix of runbook links: <runbook_base><category>.md; with a "
                              "channel, an http(s) URL where on-call opens this repository's runbooks/")
    console_url: str = Field("", description="The console's base URL; empty until there is one.")
    queue_size: int = Field(1000, ge=1, le=100_000, description="Notifications waiting per channel before drops.")
    wait_limit_s: float = Field(1800.0, gt=0, description="A budget or guard wait longer than this notifies.")
    max_pods: int = Field(20, ge=0, le=200, description="Pods listed in a notification's blast radius.")

    @model_validator(mode="after")
    def _names(self) -> NotifyConfig:
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"channel names must be unique: {names}")
        for used in [*self.default, *(c for r in self.routes for c in r.channels)]:
            if used not in names:
                raise ValueError(f"route names unknown channel {used!r} (known: {names})")
        return self

    @model_validator(mode="after")
    def _runbook_base(self) -> NotifyConfig:
        if self.channels and not _is_http_url(self.runbook_base):  # a page's runbook link must open on a phone
            raise ValueError(f"runbook_base must be an http(s) URL where on-call opens runbooks/ (e.g. "
                             f"https://git.example.com/breakfix/blob/main/runbooks/), got {self.runbook_base!r}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.channels)


def load_secret(file: Path | None, env: str | None, what: str) -> str:
    """A credential from a file (a mounted Secret; surrounding whitespace dropped) or an environment variable."""
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(str(file), f"{what}: cannot read: {exc.strerror or exc}") from None
    else:
        value = os.environ.get(env or "", "").strip()
        if not value:
            raise SecretError(f"${env}", f"{what}: environment variable is not set")
    if not value:
        raise SecretError(str(file), f"{what}: is empty")
    return value


__all__ = ["AlertmanagerChannel", "Channel", "NotifyConfig", "PagerDutyChannel", "Route", "SecretError",
           "SlackChannel", "WebhookChannel", "load_secret"]
