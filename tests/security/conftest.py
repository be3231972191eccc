"""Shared fixtures for tests/security: a nats-server with TLS (client certificates required) and JWT
auth from ``breakfix bus init``, identities from ``breakfix bus user``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from breakfix.bus.authinit import init_bus, issue_user
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.options import NatsOptions
from breakfix.bus.server import EmbeddedNats
from breakfix.schemas import subjects
from tests.conftest import wait_until

NOW = datetime.now(UTC)


@dataclass
class SecureBus:
    root: Path
    server: EmbeddedNats

    def options(self, role: str, name: str, **overrides: Any) -> NatsOptions:
        files = issue_user(self.root, role=role, name=name, now=NOW, out_dir=self.root / "users")
        base = {"url": self.server.url, "creds": files.creds, "tls_ca": files.ca, "tls_cert": files.cert,
                "tls_key": files.key}
        return NatsOptions.model_validate({**base, **overrides})

    async def connect(self, role: str, name: str) -> JetStreamBus:
        return await JetStreamBus.connect(self.options(role, name), name=name)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBus]:
    conf = init_bus(tmp_path / "bus", cluster="c1", monitor_port=0, store_dir=tmp_path / "js", now=NOW)
    server = EmbeddedNats(tmp_path / "nats", config=conf).start()
    try:
        yield SecureBus(tmp_path / "bus", server)
    finally:
        server.stop()


@pytest.fixture
async def streams(secure: SecureBus) -> AsyncIterator[JetStreamBus]:
    """The correlator's connection; it creates the streams as it does at start-up."""
    bus = await secure.connect("correlator", "correlator")
    await bus.ensure_streams(subjects.STREAMS)
    try:
        yield bus
    finally:
        await bus.close()


async def refused(bus: JetStreamBus, logs: list[dict[str, Any]], what: str, subject: str) -> None:
    """Wait for the server's permissions violation for ``what`` (publish/subscription) on ``subject``."""
    needle = f'permissions violation for {what} to "{subject.lower()}"'

    async def seen() -> bool:
        return any(e["event"] == "nats_error" and needle in e["error"].lower() for e in logs)

    await wait_until(seen, 5, needle)
