"""How a process reaches NATS: ``NatsOptions {url, creds, tls_ca, tls_cert, tls_key}``.

Filled from a daemon config file's ``nats:`` section or from the CLI's ``--nats --creds --tls-ca
--tls-cert --tls-key`` flags (env ``BREAKFIX_NATS``, ``BREAKFIX_NATS_CREDS``, ``BREAKFIX_NATS_CA``,
``BREAKFIX_NATS_CERT``, ``BREAKFIX_NATS_KEY``); consumed by ``bus.connect``. The creds file is a
NATS user JWT plus seed (``breakfix bus user``); the TLS files are PEM (``breakfix bus init``).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_URL = "nats://127.0.0.1:4222"


class NatsOptions(BaseModel):
    """Connection options for one process; ``url`` may list several servers separated by commas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(default=DEFAULT_URL, min_length=1, max_length=4096)
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> NatsOptions:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        for part in self.servers:
            if "://" not in part:
                raise ValueError(f"NATS URL {part!r} has no scheme (nats://, tls://)")
        return self

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def secured(self) -> bool:
        return self.creds is not None or self.tls_ca is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context that verifies the server against ``tls_ca`` (and presents our
        certificate when one is set); None when no TLS file is configured."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None and self.tls_key is not None:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return ctx

    def merged(self, **overrides: Any) -> NatsOptions:
        """These options with the non-None ``overrides`` (CLI flags over a config file's section)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return type(self).model_validate({**self.model_dump(), **changes}) if changes else self

    def describe(self) -> str:
        return self.url + (" (creds)" if self.creds else "") + (" (tls)" if self.tls_ca or self.tls_cert else "")
