"""The ``breakfix`` command line (typer).

``demo`` runs the whole pipeline on embedded defaults; ``replay`` correlates and decides
over a recorded JSONL of signals with no NATS; ``schema export`` regenerates the JSON
Schemas; ``correlator`` and ``remediator`` run the daemons against a NATS URL.
Data-file errors print ``file:line: message`` and exit 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from breakfix import logs
from schemas.datafile import DataFileError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GPU health and break-fix for GPU clusters.")
schema_app = typer.Typer(no_args_is_help=True, help="Wire contracts.")
app.add_typer(schema_app, name="schema")
signals_app = typer.Typer(no_args_is_help=True, help="Offline sources: print one Signal JSON per line.")
app.add_typer(signals_app, name="signals")

out = Console(width=None if sys.stdout.isatty() else 180)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 180)
T = TypeVar("T")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


def _load(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DataFileError as exc:
        raise _fail(str(exc)) from None


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(min=1, max=10_000, help="Simulated nodes (8 GPUs each).")] = 16,
    scenario: Annotated[str, typer.Option(help="Bundled scenario name or a YAML file.")] = "mixed",
    duration: Annotated[float, typer.Option(min=1, help="Stop after this many seconds at most.")] = 60.0,
    data_dir: Annotated[Path | None, typer.Option(help="Keep NATS data here (default: a temp dir).")] = None,
    policy: Annotated[Path | None, typer.Option(help="Remediation policy YAML.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Record what would be done; touch nothing.")] = False,
    speed: Annotated[float, typer.Option(min=0.1, help="Replay speed factor.")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show daemon logs.")] = False,
) -> None:
    """Run collectors, correlator and remediator over a simulated fleet and print what happened."""
    from breakfix.demo import run_demo
    from breakfix.render import print_demo
    from collectors.sim import load_scenario
    from remediator.policy import load_policy
    from schemas.catalog import load_catalog

    logs.configure(json=False, level="INFO" if verbose else "WARNING")
    catalog = _load(load_catalog)
    scen = _load(lambda: load_scenario(scenario))
    pol = _load(lambda: load_policy(policy))
    if dry_run:
        pol = pol.model_copy(update={"dry_run": True})
    out.print(f"[bold]breakfix demo[/bold]: {scen.name} - {scen.description}")

    def run(d: Path) -> None:
        result = asyncio.run(run_demo(scenario=scen, nodes=nodes, data_dir=d, catalog=catalog, policy=pol,
                                      duration_s=duration, speed=speed, progress=lambda s: out.print(f"  {s}")))
        print_demo(result, out)

    if data_dir is not None:
        run(data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="breakfix-demo-") as d:
            run(Path(d))


@app.command()
def replay(
    signals: Annotated[Path, typer.Argument(help="JSONL file, one Signal per line.")],
    policy: Annotated[Path | None, typer.Option(help="Remediation policy YAML.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    skip_invalid: Annotated[bool, typer.Option(help="Report broken lines and go on.")] = False,
) -> None:
    """Correlate recorded signals and decide plans, using each signal's observed_at as the clock."""
    from breakfix.render import incident_table
    from breakfix.replay import ReplayError
    from breakfix.replay import replay as do_replay
    from remediator.policy import load_policy
    from schemas.catalog import load_catalog

    if fmt not in ("table", "json"):
        raise _fail(f"--format must be table or json, not {fmt!r}")
    catalog = _load(load_catalog)
    pol = _load(lambda: load_policy(policy))
    errors: list[str] = []
    try:
        incidents = do_replay(signals, catalog=catalog, policy=pol, skip_invalid=skip_invalid, errors=errors)
    except ReplayError as exc:
        raise _fail(str(exc)) from None
    for e in errors:
        err.print(f"[yellow]skipped:[/yellow] {e}", highlight=False)
    if fmt == "json":
        for inc in incidents:
            sys.stdout.write(inc.model_dump_json(by_alias=True) + "\n")
    else:
        out.print(incident_table(incidents, f"Incidents from {signals}"))


@schema_app.command("export")
def schema_export() -> None:
    """Regenerate schemas/json/*.json from the pydantic models."""
    from schemas.export import export

    for p in export():
        out.print(f"wrote {p}")


@schema_app.command("check")
def schema_check() -> None:
    """Exit 1 when schemas/json is stale."""
    from schemas.export import stale

    bad = stale()
    if bad:
        err.print(f"stale JSON Schema files: {', '.join(bad)}; run 'breakfix schema export'")
        raise typer.Exit(1)
    out.print("schemas/json is up to date")


@app.command()
def catalog(code: Annotated[str, typer.Argument(help="XID number or DCGM_FR_* code.")]) -> None:
    """Show how breakfix classifies one fault code, and NVIDIA's source for it."""
    from schemas.catalog import load_catalog

    cat = _load(load_catalog)
    fc = cat.dcgm_code(code) if code.startswith("DCGM_FR_") else cat.xid(code)
    out.print_json(json.dumps({"code": code, "category": fc.category, "severity": fc.severity.value,
                               "domain": fc.domain.value, "nvidia_bucket": fc.bucket, "known": fc.known,
                               "title": fc.title, "source": fc.source}))


@signals_app.command("kmsg")
def signals_kmsg(
    file: Annotated[Path, typer.Argument(help="A kernel log: dmesg, dmesg -T, syslog, journalctl -k, /dev/kmsg dump.")],
    node: Annotated[str, typer.Option(help="Node the log came from.")],
    cluster: Annotated[str, typer.Option(help="Cluster name.")] = "default",
) -> None:
    """Parse NVIDIA XID, SXid and fallen-off-the-bus lines from a copied kernel log."""
    from collectors.context import NodeContext
    from collectors.kmsg import gpu_map_entry, parse_line, to_signal
    from collectors.kmsg_follow import boot_time, line_time
    from schemas.catalog import load_catalog
    from schemas.common import GpuRef

    ctx = NodeContext(cluster=cluster, node=node, catalog=_load(load_catalog))
    now = datetime.now(UTC)
    booted = boot_time()
    try:
        fh = file.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise _fail(f"{file}: cannot read: {exc.strerror or exc}") from None
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
    from collectors.context import NodeContext
    from collectors.dcgm import DcgmRules
    from schemas.catalog import load_catalog

    try:
        text = file.read_text()
    except OSError as exc:
        raise _fail(f"{file}: cannot read: {exc.strerror or exc}") from None
    rules = DcgmRules(NodeContext(cluster=cluster, node=node, catalog=_load(load_catalog)))
    try:
        cycle = rules.apply(text, datetime.now(UTC), 0.0, baseline_xids=False)
    except ValueError as exc:
        raise _fail(f"{file}: {exc}") from None
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
    from collectors.context import NodeContext
    from collectors.fabric import FabricRules, FabricThresholds, read_ports
    from schemas.catalog import load_catalog

    if not sysfs.is_dir():
        raise _fail(f"{sysfs}: not a directory")
    rules = FabricRules(NodeContext(cluster=cluster, node=node, catalog=_load(load_catalog)),
                        FabricThresholds(expected_rate_gbps=expected_rate))
    cycle = rules.apply(read_ports(sysfs), datetime.now(UTC), 0.0)
    _print_signals([s for s in cycle.states if all_states or not s.healthy])


@app.command()
def collector(
    config: Annotated[Path, typer.Option("--config", envvar="BREAKFIX_COLLECTOR_CONFIG", help="Collector YAML.")],
) -> None:
    """Run the node collector daemon (JSON logs, /metrics and /healthz)."""
    from collectors.config import load_config
    from collectors.daemon import CollectorDaemon
    from schemas.catalog import load_catalog

    logs.configure(json=True)
    cfg = _load(lambda: load_config(config))
    daemon = CollectorDaemon(cfg, _load(load_catalog))
    _daemon(daemon.run)


@app.command()
def remediator(
    config: Annotated[Path, typer.Option("--config", envvar="BREAKFIX_REMEDIATOR_CONFIG", help="Remediator YAML.")],
) -> None:
    """Run the remediator daemon: Kubernetes, the node agents and the provider hook (JSON logs)."""
    from bus.jetstream import JetStreamBus
    from remediator.composite import ClusterActuator
    from remediator.config import load_config
    from remediator.k8s import DrainPolicy, KubernetesActuator, api_for
    from remediator.leader import LeaseElector
    from remediator.nodeagent import NodeAgentClient
    from remediator.policy import load_policy
    from remediator.provider import ProviderHook
    from remediator.service import RemediatorService
    from remediator.store import KvStore

    logs.configure(json=True)
    cfg = _load(lambda: load_config(config))
    pol = _load(lambda: load_policy(cfg.policy))
    k = cfg.kubernetes
    if k.in_cluster:
        from kubernetes import client as kclient
        from kubernetes import config as kconfig

        kconfig.load_incluster_config()  # type: ignore[no-untyped-call]
        api = kclient.ApiClient()
    else:
        token = k.token_file.read_text().strip() if k.token_file else None
        api = api_for(k.host or "http://127.0.0.1:8080", token=token, verify_ssl=k.verify_ssl)

    async def main(stop: asyncio.Event) -> None:
        bus = await JetStreamBus.connect(cfg.nats_url, name="breakfix-remediator")
        try:
            clock = lambda: datetime.now(UTC)  # noqa: E731
            k8s = KubernetesActuator(api, drain=DrainPolicy(default=k.drain_default, namespaces=k.drain_namespaces,
                                                            timeout_s=k.drain_timeout_s, parallel=k.drain_parallel))
            actuator = ClusterActuator(k8s, NodeAgentClient(bus, cfg.cluster, clock),
                                       ProviderHook(cfg.provider_url) if cfg.provider_url else None,
                                       event_namespace=k.event_namespace, reboot_wait_s=cfg.reboot_wait_s,
                                       poll_s=cfg.reboot_poll_s)
            lease = cfg.lease
            elector = LeaseElector(api, name=lease.name, namespace=lease.namespace, identity=lease.identity,
                                   lease_s=lease.lease_s) if lease.enabled else None
            store = await KvStore.open(bus.client.jetstream())
            await RemediatorService(bus, actuator, pol, clock, actor=cfg.actor, store=store, elector=elector).run(stop)
        finally:
            await bus.close()

    _daemon(main)


def _publish_decision(nats: str, record: Any) -> None:
    from bus.codec import encode
    from bus.jetstream import JetStreamBus
    from schemas import subjects as subj

    async def send() -> None:
        bus = await JetStreamBus.connect(nats, name="breakfix-cli")
        try:
            await bus.ensure_streams(subj.STREAMS)
            await bus.publish(subj.action_subject(record.cluster), encode(record), msg_id=record.id)
        finally:
            await bus.close()

    try:
        asyncio.run(send())
    except Exception as exc:
        raise _fail(f"could not publish to {nats}: {exc}") from None


@app.command()
def approve(
    incident: Annotated[str, typer.Argument(help="Incident id, e.g. inc-1a2b3c4d5e6f7a8b.")],
    step: Annotated[str, typer.Argument(help="The step waiting for approval, e.g. reprovision.")],
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster of the incident.")],
    nats: Annotated[str, typer.Option(envvar="BREAKFIX_NATS_URL", help="NATS URL.")] = "nats://127.0.0.1:4222",
    by: Annotated[str, typer.Option(envvar="USER", help="Who approves (recorded in the audit trail).")] = "unknown",
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
) -> None:
    """Approve a step that waits for a human (recorded as an audited approval)."""
    from remediator.service import APPROVE, approval_record
    from schemas.incident import StepAction

    try:
        action = StepAction(step)
    except ValueError:
        raise _fail(f"unknown step {step!r}; one of: {', '.join(a.value for a in StepAction)}") from None
    rec = approval_record(cluster=cluster, incident=incident, action=action, actor=by, reason=reason or "approved",
                          command=APPROVE, at=datetime.now(UTC))
    _publish_decision(nats, rec)
    out.print(f"approved {step} for {incident} as {by}")


breaker_app = typer.Typer(help="The remediation circuit breaker.", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")


@breaker_app.command("reset")
def breaker_reset(
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster whose breaker to reset.")],
    reason: Annotated[str, typer.Option(help="Why it is safe to act again (recorded).")],
    nats: Annotated[str, typer.Option(envvar="BREAKFIX_NATS_URL", help="NATS URL.")] = "nats://127.0.0.1:4222",
    by: Annotated[str, typer.Option(envvar="USER", help="Who resets it (recorded).")] = "unknown",
) -> None:
    """Close the circuit breaker so automated operator actions resume (audited)."""
    from remediator.service import BREAKER_RESET, approval_record

    rec = approval_record(cluster=cluster, incident="-", action=None, actor=by, reason=reason, command=BREAKER_RESET,
                          at=datetime.now(UTC))
    _publish_decision(nats, rec)
    out.print(f"breaker reset requested for {cluster} by {by}")


@app.command("fleet-collector")
def fleet_collector(
    prometheus: Annotated[str, typer.Option(envvar="BREAKFIX_PROMETHEUS_URL", help="Prometheus base URL.")],
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster the fleet belongs to.")],
    nats: Annotated[str, typer.Option(envvar="BREAKFIX_NATS_URL", help="NATS URL.")] = "nats://127.0.0.1:4222",
    rules: Annotated[Path | None, typer.Option(help="Fleet rules YAML (default: the shipped rules).")] = None,
    interval: Annotated[float, typer.Option(min=1, help="Seconds between evaluations.")] = 30.0,
    spool_dir: Annotated[Path, typer.Option(help="Spool while NATS is away.")] = Path("/var/lib/breakfix/fleet-spool"),
) -> None:
    """Evaluate PromQL health rules over the whole fleet and publish signals (JSON logs)."""
    from collectors.fleetd import run_fleet
    from collectors.promfleet import FleetRules, PrometheusClient, load_fleet_rules
    from schemas.catalog import load_catalog

    logs.configure(json=True)
    spec = _load(lambda: load_fleet_rules(rules))
    fleet = FleetRules(spec, cluster=cluster, catalog=_load(load_catalog))

    async def main(stop: asyncio.Event) -> None:
        await run_fleet(rules=fleet, prom=PrometheusClient(prometheus), nats_url=nats, spool_dir=spool_dir,
                        interval_s=interval, clock=lambda: datetime.now(UTC), stop=stop)

    _daemon(main)


def _daemon(main: Callable[[asyncio.Event], object]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)  # type: ignore[misc]

    asyncio.run(runner())


@app.command()
def correlator(
    nats: Annotated[str | None, typer.Option(envvar="BREAKFIX_NATS_URL",
                                             help="NATS URL; without one breakfix starts its own nats-server.")] = None,
    data_dir: Annotated[Path, typer.Option(envvar="BREAKFIX_DATA_DIR", help="Store for an embedded server.")] = Path(
        ".breakfix"),
    rules: Annotated[Path | None, typer.Option(envvar="BREAKFIX_CORRELATOR_RULES",
                                               help="Correlator rules YAML (default: the shipped rules).")] = None,
    partitions: Annotated[int, typer.Option(envvar="BREAKFIX_PARTITIONS", min=1,
                                            help="How many correlator partitions share the signal stream.")] = 1,
    partition: Annotated[int, typer.Option(envvar="BREAKFIX_PARTITION", min=0,
                                           help="Which partition this instance owns (0-based).")] = 0,
    checkpoint_interval: Annotated[float, typer.Option(help="Seconds between state checkpoints.")] = 1.0,
) -> None:
    """Run the correlator daemon (JSON logs). State is checkpointed to the JetStream object store."""
    from bus.jetstream import JetStreamBus
    from bus.server import EmbeddedNats
    from correlator.grouping import Correlator
    from correlator.rules import load_rules
    from correlator.service import CorrelatorService, ServiceConfig
    from schemas.catalog import load_catalog

    logs.configure(json=True)
    cat = _load(load_catalog)
    compiled = _load(lambda: load_rules(rules, cat))
    if partition >= partitions:
        raise typer.BadParameter(f"--partition {partition} must be below --partitions {partitions}")
    config = ServiceConfig(partition=partition, partitions=partitions, checkpoint_interval_s=checkpoint_interval)
    server = None if nats else EmbeddedNats(data_dir / "nats").start()
    url = nats or (server.url if server else "")

    async def main(stop: asyncio.Event) -> None:
        bus = await JetStreamBus.connect(url, name=f"breakfix-{config.name}")
        try:
            # partitioned instances leave fabric grouping to the fleet stage (breakfix correlator-fleet)
            core = Correlator(cat, compiled, topology=partitions == 1)
            await CorrelatorService(bus, core, lambda: datetime.now(UTC), config=config).run(stop)
        finally:
            await bus.close()

    try:
        _daemon(main)
    finally:
        if server is not None:
            server.stop()


@app.command("correlator-fleet")
def correlator_fleet(
    nats: Annotated[str, typer.Option(envvar="BREAKFIX_NATS_URL", help="NATS URL of the partitioned correlators.")],
    rules: Annotated[Path | None, typer.Option(envvar="BREAKFIX_CORRELATOR_RULES",
                                               help="Correlator rules YAML (its topology section is used).")] = None,
) -> None:
    """Run the fleet stage: fabric incidents across partitioned correlators (JSON logs)."""
    from bus.jetstream import JetStreamBus
    from correlator.fleet import FleetCorrelator, FleetService
    from correlator.rules import load_rules
    from schemas.catalog import load_catalog

    logs.configure(json=True)
    compiled = _load(lambda: load_rules(rules, _load(load_catalog)))

    async def main(stop: asyncio.Event) -> None:
        bus = await JetStreamBus.connect(nats, name="breakfix-correlator-fleet")
        try:
            await FleetService(bus, FleetCorrelator(compiled), lambda: datetime.now(UTC)).run(stop)
        finally:
            await bus.close()

    _daemon(main)


def main() -> None:  # pragma: no cover
    app()
