"""Offline sources for SREs and tests: ``breakfix signals kmsg|dcgm|ib`` print one Signal JSON per line."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from breakfix.cli.cliutil import fail, load, signals_app


@signals_app.command("kmsg")
def signals_kmsg(
    file: Annotated[Path, typer.Argument(help="A kernel log: dmesg, dmesg -T, syslog, journalctl -k, /dev/kmsg dump.")],
    node: Annotated[str, typer.Option(help="Node the log came from.")],
    cluster: Annotated[str, typer.Option(help="Cluster name.")] = "default",
) -> None:
    """Parse NVIDIA XID, SXid and fallen-off-the-bus lines from a copied kernel log."""
    from breakfix.collectors.context import NodeContext
    from breakfix.collectors.kmsg import gpu_map_entry, parse_line, to_signal
    from breakfix.collectors.kmsg_follow import boot_time, line_time
    from breakfix.schemas.catalog import load_catalog
    from breakfix.schemas.common import GpuRef

    ctx = NodeContext(cluster=cluster, node=node, catalog=load(load_catalog))
    now = datetime.now(UTC)
    booted = boot_time()
    try:
        fh = file.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise fail(f"{file}: cannot read: {exc.strerror or exc}") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            mapped = gpu_map_entry(line)
            if mapped:
                ctx.register_gpus([GpuRef(uuid=mapped[1], pci_bus_id=mapped[0])])
                continue
            ev = parse_line(line)
            if ev is not None:
                at = line_time(line, booted=booted, now=now)
                sig = to_signal(ev, ctx, observed_at=at, discriminator=f"{file.name}:{lineno}")
                sys.stdout.write(sig.model_dump_json(by_alias=True) + "\n")


def _print_signals(signals: list[Any]) -> None:
    for sig in signals:
        sys.stdout.write(sig.model_dump_json(by_alias=True) + "\n")


@signals_app.command("dcgm")
def signals_dcgm(
    file: Annotated[Path, typer.Argument(help="A saved dcgm-exporter /metrics page.")],
    node: Annotated[str, typer.Option(help="Node the page came from.")],
    cluster: Annotated[str, typer.Option(help="Cluster name.")] = "default",
    all_states: Annotated[bool, typer.Option("--all", help="Print healthy readings too.")] = False,
) -> None:
    """Health signals from one dcgm-exporter scrape (faults, and every non-zero last XID)."""
    from breakfix.collectors.context import NodeContext
    from breakfix.collectors.dcgm import DcgmRules
    from breakfix.schemas.catalog import load_catalog

    try:
        text = file.read_text()
    except OSError as exc:
        raise fail(f"{file}: cannot read: {exc.strerror or exc}") from None
    rules = DcgmRules(NodeContext(cluster=cluster, node=node, catalog=load(load_catalog)))
    try:
        cycle = rules.apply(text, datetime.now(UTC), 0.0, baseline_xids=False)
    except ValueError as exc:
        raise fail(f"{file}: {exc}") from None
    _print_signals([s for s in cycle.states if all_states or not s.healthy] + cycle.events)


@signals_app.command("ib")
def signals_ib(
    sysfs: Annotated[Path, typer.Argument(help="A /sys/class/infiniband tree (live or copied).")],
    node: Annotated[str, typer.Option(help="Node the tree came from.")],
    cluster: Annotated[str, typer.Option(help="Cluster name.")] = "default",
    expected_rate: Annotated[float | None, typer.Option(help="Expected port rate in Gb/sec.")] = None,
    all_states: Annotated[bool, typer.Option("--all", help="Print healthy readings too.")] = False,
) -> None:
    """Link state and rate of every InfiniBand port (one reading: no counter rates)."""
    from breakfix.collectors.context import NodeContext
    from breakfix.collectors.fabric import FabricRules, FabricThresholds, read_ports
    from breakfix.schemas.catalog import load_catalog

    if not sysfs.is_dir():
        raise fail(f"{sysfs}: not a directory")
    rules = FabricRules(NodeContext(cluster=cluster, node=node, catalog=load(load_catalog)),
                        FabricThresholds(expected_rate_gbps=expected_rate))
    cycle = rules.apply(read_ports(sysfs), datetime.now(UTC), 0.0)
    _print_signals([s for s in cycle.states if all_states or not s.healthy])
