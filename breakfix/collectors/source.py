"""Collector source plugins: the ``Source`` protocol and the registry keyed by config section.

In the manner of node-problem-detector's problem-daemon registry: every source module
registers a factory under the name of its section in the collector config
(``sources.<section>``, ``collectors.config.Sources``) with ``@register("<section>")``. The
daemon (``collectors.daemon``) asks ``build_sources`` for the plugins of every enabled section
and runs each one the same way, so adding a source touches no central switch:

- a ``Source`` is polled every ``interval`` seconds: ``read()`` fetches the raw reading (it
  runs blocking I/O in a worker thread itself), ``apply(raw, at, mono)`` turns it into a
  ``Cycle`` of signals (pure but for the rule's own memory of the previous reading), and an
  optional ``commit(raw)`` (``Commits``) runs only after the cycle's signals were published or
  spooled, which is where the kmsg source commits its read position;
- a ``Watcher`` yields cycles as events arrive (NVML's XID event wait).

The built-in sources register in ``collectors.sources``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import aiohttp

from breakfix.bus.clock import Clock
from breakfix.collectors.context import NodeContext
from breakfix.collectors.edge import Cycle
from breakfix.collectors.nvml_api import Nvml


@runtime_checkable
class Source(Protocol):
    """A polled source: read, then apply, every ``interval`` seconds."""

    name: str
    interval: float

    async def read(self) -> Any:
        """The raw reading (lines, a scrape, a sample); blocking reads go to a worker thread."""
        ...

    def apply(self, raw: Any, at: datetime, mono: float) -> Cycle:
        """The reading -> this cycle's states and events. A bad sample or line is skipped and counted."""
        ...


@runtime_checkable
class Commits(Protocol):
    """A source that records how far it got, once the cycle's signals are safe (published or spooled)."""

    def commit(self, raw: Any) -> None: ...


@runtime_checkable
class CarriesFaults(Protocol):
    """A source that judges by what it saw before, told which faults were open when the collector last stopped."""

    def carried_faults(self, keys: list[str]) -> None: ...


@runtime_checkable
class Skips(Protocol):
    """A source that counts the samples or lines it had to skip (the daemon exports the count)."""

    skipped: int


@runtime_checkable
class Watcher(Protocol):
    """An event source: yields a cycle whenever something happens, until ``stop``."""

    name: str

    def watch(self, stop: asyncio.Event) -> AsyncIterator[Cycle]: ...


def node_uptime(path: Path = Path("/proc/uptime")) -> float | None:
    """Seconds since the node booted (the first number of ``/proc/uptime``, proc(5)); None when unreadable."""
    try:
        return float(path.read_text(encoding="ascii", errors="replace").split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class SourceEnv:
    """What a factory may use to build its plugins: the node, the clock, shared clients, state."""

    ctx: NodeContext
    clock: Clock
    http: aiohttp.ClientSession
    state_dir: Path
    nvml: Nvml | None = None  # an NVML to use instead of the real library (tests, benchmarks)
    uptime: Callable[[], float | None] | None = None  # seconds since boot (``node_uptime``; None in tests: unknown)


Plugin = Source | Watcher
Factory = Callable[[Any, SourceEnv], Sequence[Plugin]]
F = TypeVar("F", bound=Factory)

REGISTRY: dict[str, Factory] = {}


def register(section: str) -> Callable[[F], F]:
    """Register a factory for ``sources.<section>``; a second factory for one section is a bug."""

    def deco(factory: F) -> F:
        if section in REGISTRY and REGISTRY[section] is not factory:
            raise ValueError(f"collector source section {section!r} is registered twice")
        REGISTRY[section] = factory
        return factory

    return deco


def build_sources(sections: object, env: SourceEnv) -> list[Plugin]:
    """The plugins of every enabled section, in registration order.

    ``sections`` is the config's ``sources`` model: one attribute per registered section, each with
    an ``enabled`` flag. A registered section the config does not know is a programming error.
    """
    out: list[Plugin] = []
    for section, factory in REGISTRY.items():
        cfg = getattr(sections, section, None)
        if cfg is None:
            raise LookupError(f"collector source {section!r} is registered but the config has no such section")
        if getattr(cfg, "enabled", False):
            out.extend(factory(cfg, env))
    return out
