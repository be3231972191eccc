"""The long-running services: ``collector``, ``fleet-collector``, ``correlator``, ``correlator-fleet``,
``remediator``. Each logs JSON, stops cleanly on SIGTERM (also while still connecting to NATS) and refuses a
bad config with file:line. NATS options come from the config file's ``nats:`` section, overridden by the
``--nats --creds --tls-*`` flags (``cliutil.with_nats``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from breakfix.cli import logs
from breakfix.cli.cliutil import NatsFlags, app, daemon, fail, load, with_nats

MetricsPort = Annotated[int, typer.Option("--metrics-port", envvar="BREAKFIX_METRICS_PORT", min=0, max=65535,
                                          help="Port for /metrics, /healthz and /readyz (0: any free port).")]
OptionalPort = Annotated[int | None, typer.Option("--metrics-port", envvar="BREAKFIX_METRICS_PORT", min=0, max=65535,
                                                  help="Port for /metrics, /healthz, /readyz; overrides the config "
                                                       "file's metrics_port.")]


@app.command()
@with_nats(default_url=None)
def collector(
    config: Annotated[Path, typer.Option("--config", envvar="BREAKFIX_COLLECTOR_CONFIG", help="Collector YAML.")],
    nats: NatsFlags,
    metrics_port: OptionalPort = None,
) -> None:
    """Run the node collector daemon (JSON logs, /metrics, /healthz and /readyz)."""
    from breakfix.bus.clock import SystemClock
    from breakfix.bus.jetstream import JetStreamBus
    from breakfix.bus.options import NatsOptions
    from breakfix.collectors.app import build_collector
    from breakfix.collectors.config import load_config
    from breakfix.schemas.catalog import load_catalog

    logs.configure(json=True)
    cfg = load(lambda: load_config(config))
    if metrics_port is not None:
        cfg = cfg.model_copy(update={"metrics_port": metrics_port})
    opts = nats.options(NatsOptions.model_validate(cfg.nats.model_dump(include=set(NatsOptions.model_fields))))
    name = f"breakfix-collector-{cfg.node_name}"
    collector_daemon = build_collector(cfg, clock=SystemClock(), catalog=load(load_catalog),
                                       connect=lambda: JetStreamBus.connect(opts, name=name))
    daemon(collector_daemon.run)


@app.command()
@with_nats(default_url=None)
def remediator(
    config: Annotated[Path, typer.Option("--config", envvar="BREAKFIX_REMEDIATOR_CONFIG", help="Remediator YAML.")],
    nats: NatsFlags,
    kubeconfig: Annotated[Path | None, typer.Option(envvar="KUBECONFIG", help="A kubeconfig file (outside the "
                                                    "cluster); default: the config's, else in-cluster.")] = None,
    metrics_port: OptionalPort = None,
) -> None:
    """Run the remediator daemon: Kubernetes, the node agents and the provider hook (JSON logs)."""
    from breakfix.bus.clock import SystemClock
    from breakfix.bus.heap import settle_heap
    from breakfix.bus.jetstream import JetStreamBus
    from breakfix.bus.options import NatsOptions
    from breakfix.remediator.app import build_remediator
    from breakfix.remediator.config import load_config
    from breakfix.remediator.k8s import KubeConfigError, load_api
    from breakfix.remediator.metrics_serve import run_observed
    from breakfix.remediator.notify.service import check_secrets
    from breakfix.remediator.policy import load_policy

    logs.configure(json=True)
    cfg = load(lambda: load_config(config))
    pol = load(lambda: load_policy(cfg.policy))
    load(lambda: check_secrets(cfg.notify) if cfg.notify else None)  # a missing credential: one line, exit 2
    opts = nats.options(cfg.nats or NatsOptions(url=cfg.nats_url))
    k = cfg.kubernetes
    try:  # a missing or unusable Kubernetes configuration is one line and exit 2, before connecting anywhere
        load_api(kubeconfig=kubeconfig or k.kubeconfig, context=k.context, host=k.host, token_file=k.token_file,
                 verify_ssl=k.verify_ssl, in_cluster=k.in_cluster)
    except KubeConfigError as exc:
        raise fail(str(exc)) from None

    async def main(stop: asyncio.Event) -> None:
        bus = await JetStreamBus.connect(opts, name="breakfix-remediator", stop=stop)
        try:
            service = await build_remediator(cfg, bus=bus, clock=SystemClock(), policy=pol, kubeconfig=kubeconfig)
            settle_heap()  # start-up garbage collected, the rest frozen, the collector's passes spaced out
            port = cfg.metrics_port if metrics_port is None else metrics_port
            await run_observed(service, stop, clock=SystemClock(), notify=cfg.notify, port=port)
        finally:
            await bus.close()

    daemon(main)


@app.command("fleet-collector")
@with_nats()
def fleet_collector(
    prometheus: Annotated[str, typer.Option(envvar="BREAKFIX_PROMETHEUS_URL", help="Prometheus base URL.")],
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster the fleet belongs to.")],
    nats: NatsFlags,
    rules: Annotated[Path | None, typer.Option(help="Fleet rules YAML (default: the shipped rules).")] = None,
    interval: Annotated[float, typer.Option(min=1, help="Seconds between evaluations.")] = 30.0,
    spool_dir: Annotated[Path, typer.Option(help="Spool while NATS is away.")] = Path("/var/lib/breakfix/fleet-spool"),
    metrics_port: MetricsPort = 9474,
) -> None:
    """Evaluate PromQL health rules over the whole fleet and publish signals (JSON logs)."""
    from breakfix.bus.clock import SystemClock
    from breakfix.bus.jetstream import JetStreamBus
    from breakfix.collectors.app import build_fleet_collector
    from breakfix.collectors.metrics_serve import run_fleet_observed
    from breakfix.collectors.promfleet import FleetRules, PrometheusClient, load_fleet_rules
    from breakfix.schemas.catalog import load_catalog

    logs.configure(json=True)
    spec = load(lambda: load_fleet_rules(rules))
    fleet = FleetRules(spec, cluster=cluster, catalog=load(load_catalog))
    opts = nats.options()
    collector = build_fleet_collector(fleet, prom=PrometheusClient(prometheus), clock=SystemClock(),
                                      spool_dir=spool_dir, interval_s=interval,
                                      connect=lambda: JetStreamBus.connect(opts, name="breakfix-fleet-collector"))
    daemon(lambda stop: run_fleet_observed(collector, stop, port=metrics_port))


@app.command()
@with_nats(default_url=None)
def correlator(
    nats: NatsFlags,
    data_dir: Annotated[Path, typer.Option(envvar="BREAKFIX_DATA_DIR", help="Store for an embedded server.")] = Path(
        ".breakfix"),
    rules: Annotated[Path | None, typer.Option(envvar="BREAKFIX_CORRELATOR_RULES",
                                               help="Correlator rules YAML (default: the shipped rules).")] = None,
    partitions: Annotated[int, typer.Option(envvar="BREAKFIX_PARTITIONS", min=1,
                                            help="How many correlator partitions share the signal stream.")] = 1,
    partition: Annotated[int, typer.Option(envvar="BREAKFIX_PARTITION", min=0,
                                           help="Which partition this instance owns (0-based).")] = 0,
    checkpoint_interval: Annotated[float, typer.Option(help="Seconds between state checkpoints.")] = 1.0,
    metrics_port: MetricsPort = 9471,
) -> None:
    """Run the correlator daemon (JSON logs). State is checkpointed to the JetStream object store."""
    from breakfix.bus.clock import SystemClock
    from breakfix.bus.heap import settle_heap
    from breakfix.bus.jetstream import JetStreamBus
    from breakfix.bus.options import NatsOptions
    from breakfix.bus.server import EmbeddedNats
    from breakfix.correlator.app import CorrelatorConfig, build_correlator
    from breakfix.correlator.metrics_serve import run_observed
    from breakfix.correlator.rules import load_rules
    from breakfix.correlator.service import ServiceConfig
    from breakfix.schemas.catalog import load_catalog

    logs.configure(json=True)
    cat = load(load_catalog)
    compiled = load(lambda: load_rules(rules, cat))
    if partition >= partitions:
        raise typer.BadParameter(f"--partition {partition} must be below --partitions {partitions}")
    config = ServiceConfig(partition=partition, partitions=partitions, checkpoint_interval_s=checkpoint_interval)
    server = None if nats.url else EmbeddedNats(data_dir / "nats").start()
    opts = nats.options(NatsOptions(url=server.url) if server else None)

    async def main(stop: asyncio.Event) -> None:
        bus = await JetStreamBus.connect(opts, name=f"breakfix-{config.name}", stop=stop)
        try:
            # partitioned instances leave fabric grouping to the fleet stage (breakfix correlator-fleet)
            cfg = CorrelatorConfig(rules=compiled, catalog=cat, service=config)
            service = build_correlator(cfg, bus=bus, clock=SystemClock())
            settle_heap()  # start-up garbage collected, the rest frozen, the collector's passes spaced out
            await run_observed(service, stop, port=metrics_port)
        finally:
            await bus.close()

    try:
        daemon(main)
    finally:
        if server is not None:
            server.stop()


@app.command("correlator-fleet")
@with_nats()
def correlator_fleet(
    nats: NatsFlags,
    rules: Annotated[Path | None, typer.Option(envvar="BREAKFIX_CORRELATOR_RULES",
                                               help="Correlator rules YAML (its topology section is used).")] = None,
    metrics_port: MetricsPort = 9472,
) -> None:
    """Run the fleet stage: fabric incidents across partitioned correlators (JSON logs)."""
    from breakfix.bus.clock import SystemClock
    from breakfix.bus.jetstream import JetStreamBus
    from breakfix.correlator.app import CorrelatorConfig, build_fleet_stage
    from breakfix.correlator.metrics_serve import run_fleet_observed
    from breakfix.correlator.rules import load_rules
    from breakfix.schemas.catalog import load_catalog

    logs.configure(json=True)
    compiled = load(lambda: load_rules(rules, load(load_catalog)))
    opts = nats.options()

    async def main(stop: asyncio.Event) -> None:
        bus = await JetStreamBus.connect(opts, name="breakfix-correlator-fleet", stop=stop)
        try:
            stage = build_fleet_stage(CorrelatorConfig(rules=compiled), bus=bus, clock=SystemClock())
            await run_fleet_observed(stage, stop, port=metrics_port)
        finally:
            await bus.close()

    daemon(main)
