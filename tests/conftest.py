"""Shared fixtures: the shipped catalog and policy, a fixed clock, signal builders, a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from breakfix.bus.server import EmbeddedNats
from breakfix.correlator.rules import DEFAULT_RULES, Rules, RulesFile
from breakfix.remediator.policy import Policy, load_policy
from breakfix.schemas.catalog import Catalog, default_catalog
from breakfix.schemas.common import GpuRef, TenantRef
from breakfix.schemas.signal import Signal, SignalSource, make_signal_id

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return default_catalog()


@pytest.fixture(scope="session")
def policy() -> Policy:
    return load_policy()


def make_rules(**sections: Any) -> Rules:
    """The shipped correlator rules with some sections' keys replaced (``windows={"flap_s": 60}``)."""
    data = yaml.safe_load(DEFAULT_RULES.read_text())
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return Rules.compile(RulesFile.model_validate(data), default_catalog())


def gpu(index: int) -> GpuRef:
    return GpuRef(index=index, uuid=f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd",
                  pci_bus_id=f"0000:{18 + index:02x}:00.0")


def sig(*, node: str = "n1", check: str = "xid", code: str | None = "48", gpu_index: int | None = 0,
        at: float = 0.0, healthy: bool = False, pod: str | None = None, ns: str = "team-a",
        message: str = "", n: int = 0, tenant: TenantRef | None = None, **kw: Any) -> Signal:
    """A signal at T0 + ``at`` seconds; ``n`` makes otherwise identical observations distinct."""
    observed = T0 + timedelta(seconds=at)
    g = gpu(gpu_index) if gpu_index is not None else None
    return Signal(
        id=make_signal_id(cluster="c1", node=node, source="sim", check=check, code=code, healthy=healthy,
                          observed_at=observed, gpu=g, discriminator=str(n)),
        cluster="c1", node=node, source=SignalSource.SIM, check=check, code=code, healthy=healthy, gpu=g,
        tenant=tenant or (TenantRef(namespace=ns, pod=pod) if pod else None), message=message or f"{check} {code}",
        observed_at=observed, **kw,
    )


async def wait_until(cond: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A real loopback nats-server with JetStream, started and stopped by the test."""
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()
