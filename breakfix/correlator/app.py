"""Composition roots for the correlator: the one place its objects are wired together.

``build_correlator(config, bus=..., clock=...)`` returns a ready ``CorrelatorService`` (catalog, rules,
pure core, checkpoint store) for an already-connected bus; ``build_fleet_stage`` returns the fleet
stage's ``FleetService``. The CLI (``breakfix correlator``, ``breakfix correlator-fleet``), the demo,
the benchmarks and the tests call these; NATS connection options stay the CLI's business.
``CorrelatorConfig`` is plain data: file paths are loaded and validated here (a bad file raises
``schemas.datafile.DataFileError`` naming the file and line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from breakfix.bus.clock import Clock
from breakfix.bus.protocol import Bus
from breakfix.correlator.fleet import FleetCorrelator, FleetService
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.rules import Rules, load_rules
from breakfix.correlator.service import CorrelatorService, ServiceConfig, StoreBus
from breakfix.schemas.catalog import Catalog, default_catalog


@dataclass(frozen=True)
class CorrelatorConfig:
    """What a correlator needs besides its bus and clock. ``rules``: a path, compiled ``Rules``, or None
    for the shipped rules; ``catalog``: None for the shipped catalog."""

    rules: Path | Rules | None = None
    catalog: Catalog | None = None
    service: ServiceConfig = field(default_factory=ServiceConfig)
    topology: bool | None = None  # None: on when not partitioned (the fleet stage groups across partitions)

    def load_catalog(self) -> Catalog:
        return self.catalog or default_catalog()

    def load_rules(self) -> Rules:
        if isinstance(self.rules, Rules):
            return self.rules
        return load_rules(self.rules, self.load_catalog())


def build_core(config: CorrelatorConfig | None = None) -> Correlator:
    """The pure grouping core alone (``breakfix replay``, benchmarks)."""
    cfg = config or CorrelatorConfig()
    topology = cfg.topology if cfg.topology is not None else cfg.service.partitions == 1
    return Correlator(cfg.load_catalog(), cfg.load_rules(), topology=topology)


def build_correlator(config: CorrelatorConfig | None = None, *, bus: StoreBus,
                     clock: Clock | Callable[[], datetime]) -> CorrelatorService:
    """The correlator daemon's service, wired: call ``run(stop)`` on it."""
    cfg = config or CorrelatorConfig()
    return CorrelatorService(bus, build_core(cfg), clock, config=cfg.service)


def build_fleet_stage(config: CorrelatorConfig | None = None, *, bus: Bus,
                      clock: Clock | Callable[[], datetime]) -> FleetService:
    """The fleet stage for partitioned correlators (its rules' topology section is used)."""
    cfg = config or CorrelatorConfig()
    wall = clock.now if isinstance(clock, Clock) else clock
    return FleetService(bus, FleetCorrelator(cfg.load_rules()), wall)
