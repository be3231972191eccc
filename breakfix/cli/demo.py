"""``breakfix demo``: the whole pipeline on embedded defaults, start to finish; also a policy test bench.

Starts a loopback nats-server (JetStream, store under the data dir), then the sim
collector, the correlator and the remediator (``remediator.app.build_remediator`` over a
``SimCluster``) as separate NATS clients that talk only through the bus, plus a console consumer
that records what an SRE would see. It replays a scenario, waits until every plan has finished,
and returns the result for printing (``cli.render.print_demo``, or JSON with ``--format json``).

With ``--policy FILE`` the policy is honoured as written (breaker, budgets, soak, cooldowns), so a
user can test it before switching it on; without one the shipped policy runs with demo timing
(1 s soak, a breaker sized for a fleet where a quarter of the nodes fail on purpose). A scenario
may list ``failures:`` (a reset that fails, a diagnostic that fails, a reboot that does not come
back, a GPU held busy, a step that hangs), which the simulated cluster then plays.

Cleanup: a guardian process (its own session) watches the demo; if the demo dies, even by
SIGKILL, it kills the nats-server's process group and removes the temp folder. atexit does the
same for a normal or signalled exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from breakfix.bus.clock import SystemClock
from breakfix.bus.codec import decoder
from breakfix.bus.consumer import ConsumerSpec, run_consumer
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.options import NatsOptions
from breakfix.bus.protocol import Delivery
from breakfix.bus.server import EmbeddedNats
from breakfix.collectors.app import build_sim_collector
from breakfix.collectors.fleet import Fleet, build_fleet
from breakfix.collectors.sim import Scenario, load_scenario
from breakfix.correlator.app import CorrelatorConfig, build_correlator
from breakfix.remediator.app import build_remediator
from breakfix.remediator.config import RemediatorConfig
from breakfix.remediator.policy import Policy
from breakfix.remediator.simcluster import SimCluster, SimNode
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.datafile import DataFileError, load_model
from breakfix.schemas.incident import ActionRecord, Incident, IncidentChange

CLOCK = SystemClock()


class Failure(BaseModel):
    """One step the simulated cluster makes fail (``failures:`` in a demo scenario file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    node: int = Field(ge=0)
    action: Literal["reset_gpu", "validate", "reboot"]
    gpu: int | None = Field(default=None, ge=0, le=7)
    mode: Literal["fail", "busy", "hang"] = "fail"


class DemoFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    failures: tuple[Failure, ...] = ()


def load_demo_scenario(name_or_path: str) -> tuple[Scenario, tuple[Failure, ...]]:
    """A bundled scenario by name, or a file whose optional ``failures:`` list the demo plays."""
    p = Path(name_or_path)
    if not p.is_file():
        return load_scenario(name_or_path), ()
    failures = load_model(DemoFile, p).failures
    data = yaml.safe_load(p.read_text())
    if isinstance(data, dict) and "failures" in data:
        data.pop("failures")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
            yaml.safe_dump(data, tmp)
        try:
            scenario = load_scenario(tmp.name)
        except DataFileError as exc:
            raise DataFileError(p, exc.line, exc.message) from None
        finally:
            os.unlink(tmp.name)
        return scenario, failures
    return load_scenario(p), failures


@dataclass
class Console:
    """What the on-call console shows: latest incident versions, the audit trail, dead letters."""

    incidents: dict[str, Incident] = field(default_factory=dict)
    actions: list[ActionRecord] = field(default_factory=list)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)
    last_message: float = field(default_factory=CLOCK.monotonic)

    async def on_change(self, ch: IncidentChange, _m: Delivery) -> None:
        prev = self.incidents.get(ch.incident.id)
        if prev is None or ch.incident.version >= prev.version:
            self.incidents[ch.incident.id] = ch.incident
        self.last_message = CLOCK.monotonic()

    async def on_action(self, rec: ActionRecord, _m: Delivery) -> None:
        self.actions.append(rec)
        self.last_message = CLOCK.monotonic()

    async def on_dead_letter(self, _data: bytes, msg: Delivery) -> None:
        self.dead_letters.append((msg.headers.get(subjects.HDR_DLQ_SUBJECT, "?"),
                                  msg.headers.get(subjects.HDR_DLQ_REASON, "?")))


@dataclass
class DemoResult:
    scenario: Scenario
    fleet: Fleet
    cluster: SimCluster
    console: Console
    signals_sent: int
    duplicates_dropped: int
    elapsed_s: float
    nats_url: str


def demo_policy(policy: Policy) -> Policy:
    """The demo compresses time for the shipped policy: a 1 s soak instead of minutes, and a breaker sized for a
    fleet where a quarter of the nodes fail on purpose. A policy the user gives is never changed."""
    guards = policy.guards.model_copy(update={
        "soak_s": min(policy.guards.soak_s, 1.0),
        "breaker": policy.guards.breaker.model_copy(update={"max_percent": 60.0}),
        "budget": policy.guards.budget.model_copy(update={"max_nodes": max(policy.guards.budget.max_nodes, 4)}),
    })
    return policy.model_copy(update={"guards": guards})


def sim_cluster_for(fleet: Fleet, failures: tuple[Failure, ...] = ()) -> SimCluster:
    nodes = {}
    for spec in fleet.nodes:
        pods = {f"{g.tenant.namespace}/{g.tenant.pod}": g.ref.index or 0 for g in spec.gpus if g.tenant}
        nodes[spec.name] = SimNode(spec.name, gpus=len(spec.gpus), labels=dict(spec.labels), pods=pods)
    cluster = SimCluster(nodes, controller_owned=set(fleet.controller_owned))
    for f in failures:
        name = fleet.nodes[min(f.node, len(fleet.nodes) - 1)].name
        if f.mode == "hang":
            cluster.hanging.add(f.action)
        elif f.action == "reset_gpu":
            for g in ([f.gpu] if f.gpu is not None else range(8)):
                (cluster.busy_gpus if f.mode == "busy" else cluster.failing_resets).add((name, g))
        elif f.action == "validate":
            cluster.failing_validation.add(name)
        else:
            cluster.lost_reboots.add(name)
    return cluster


_GUARDIAN = """
import os, shutil, signal, sys, time
parent, pgid, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
while os.getppid() == parent:  # reparented: the demo is gone, however it went
    time.sleep(0.2)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
if folder:
    shutil.rmtree(folder, ignore_errors=True)
"""


def guard_cleanup(server: EmbeddedNats, temp_dir: Path | None) -> Callable[[], None]:
    """Make sure the nats-server and the temp folder go when this process goes, however it goes."""
    proc = getattr(server, "_proc", None)
    if proc is None:
        return lambda: None
    guardian = subprocess.Popen([sys.executable, "-c", _GUARDIAN, str(os.getpid()), str(proc.pid),
                                 str(temp_dir or "")], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            server.stop(timeout_s=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            guardian.kill()
            guardian.wait(2)

    atexit.register(cleanup)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return cleanup


def _exit_on_sigterm(_sig: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks and atexit: server stopped, folder removed


async def run_demo(*, scenario: Scenario, nodes: int, data_dir: Path, catalog: Catalog, policy: Policy,
                   duration_s: float, speed: float = 1.0, malformed: bool = True, policy_given: bool = False,
                   failures: tuple[Failure, ...] = (), temp_dir: Path | None = None, secure: bool = False,
                   progress: Callable[[str], None] = lambda _s: None) -> DemoResult:
    started = CLOCK.monotonic()
    if not policy_given:
        policy = demo_policy(policy)
        progress(f"demo timing: soak {policy.guards.soak_s:g}s, breaker at {policy.guards.breaker.max_percent:g}% of "
                 "nodes (remediator/policies/default.yaml has the production values)")
    else:
        progress(f"policy as given: soak {policy.guards.soak_s:g}s, breaker {policy.guards.breaker.max_percent:g}%, "
                 f"cooldown {policy.guards.cooldown_s:g}s, budget max({policy.guards.budget.max_nodes}, "
                 f"{policy.guards.budget.max_percent:g}%)")
    fleet = build_fleet(max(nodes, scenario.nodes))
    cluster = sim_cluster_for(fleet, failures)
    server, identity = _server(data_dir, fleet.cluster, secure=secure)
    progress(f"starting nats-server (JetStream{', TLS and JWT identities' if secure else ''}) in {server.store_dir}")
    server.start()
    cleanup = guard_cleanup(server, temp_dir)
    progress(f"nats-server on {server.url}; stopped and its folder removed however the demo ends")
    buses: list[JetStreamBus] = []
    stop = asyncio.Event()
    try:
        async def bus(name: str, role: str, user: str | None = None) -> JetStreamBus:
            b = await JetStreamBus.connect(identity(server.url, role, user or role) if secure else server.url,
                                           name=name)
            buses.append(b)
            return b

        collector_bus = await bus("breakfix-collector-sim", "fleet")  # one process publishes for every sim node
        correlator_bus = await bus("breakfix-correlator", "correlator")
        await correlator_bus.ensure_streams(subjects.STREAMS)
        correlator = build_correlator(CorrelatorConfig(catalog=catalog), bus=correlator_bus, clock=CLOCK)
        config = RemediatorConfig(cluster=fleet.cluster, actor="remediator/demo")
        remediator = await build_remediator(config, bus=await bus("breakfix-remediator", "remediator"), clock=CLOCK,
                                            cluster_api=cluster, policy=policy, catalog=catalog, retry_refused_s=1.0)
        console = Console()
        console_bus = await bus("breakfix-console", "viewer", "console")
        # a reader's durables carry its own name (bus.permissions): one per stream, "console" on each
        specs: list[ConsumerSpec[Any]] = [
            ConsumerSpec(subjects.INCIDENTS.name, "console", subjects.INCIDENTS_ALL, decoder(IncidentChange),
                         console.on_change),
            ConsumerSpec(subjects.ACTIONS.name, "console", subjects.ACTIONS_ALL, decoder(ActionRecord),
                         console.on_action),
            ConsumerSpec(subjects.DEAD_LETTERS.name, "console", subjects.DLQ_ALL, lambda b: b,
                         console.on_dead_letter),
        ]
        async with asyncio.TaskGroup() as tg:
            tg.create_task(correlator.run(stop), name="correlator")
            tg.create_task(remediator.run(stop), name="remediator")
            for spec in specs:
                tg.create_task(run_consumer(console_bus, spec, stop=stop), name=f"console-{spec.stream}")
            sim = build_sim_collector(scenario, fleet, bus=collector_bus, clock=CLOCK, catalog=catalog, speed=speed)
            timed = sim.timed
            progress(f"replaying scenario {scenario.name!r}: {len(timed)} signals over {len(fleet.nodes)} nodes")
            if malformed:
                progress("publishing one malformed signal, as a broken collector would; it must be dead-lettered")
                await collector_bus.publish(subjects.signal_subject(fleet.cluster, "gpu-node-bad"),
                                            b'{"schema": "breakfix.signal/v1", "node": 42}')
            sent = await sim.run()
            deadline = started + duration_s
            while CLOCK.monotonic() < deadline:
                await asyncio.sleep(0.2)
                busy = any(not t.done() for t in remediator.tasks.values())
                quiet = CLOCK.monotonic() - console.last_message > max(1.0, policy.settle_s + 0.5)
                if not busy and quiet:
                    break
            stop.set()
        return DemoResult(scenario, fleet, cluster, console, sent, sim.publisher.duplicates,
                          CLOCK.monotonic() - started, server.url)
    finally:
        for b in buses:
            with contextlib.suppress(Exception):
                await b.close()
        server.stop()
        cleanup()


def _server(data_dir: Path, cluster: str, *, secure: bool
            ) -> tuple[EmbeddedNats, Callable[[str, str, str], NatsOptions]]:
    """The demo's nats-server. With ``secure``: ``breakfix bus init`` in ``data_dir/bus`` (TLS with client
    certificates, JWT identities with the production permission templates), and one identity per process."""
    if not secure:
        return EmbeddedNats(data_dir / "nats"), lambda url, _role, _name: NatsOptions(url=url)
    from breakfix.bus.authinit import init_bus, issue_user

    root = data_dir / "bus"
    conf = init_bus(root, cluster=cluster, monitor_port=0, store_dir=data_dir / "nats" / "js", now=CLOCK.now(),
                    force=True)

    def identity(url: str, role: str, name: str) -> NatsOptions:
        files = issue_user(root, role=role, name=name, now=CLOCK.now(), out_dir=root / "users")
        return NatsOptions(url=url, creds=files.creds, tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key)

    return EmbeddedNats(data_dir / "nats", config=conf), identity


def demo_json(result: DemoResult) -> str:
    """Incidents and the full audit trail (refusal reasons included), one JSON document."""
    import json

    incidents = sorted(result.console.incidents.values(), key=lambda i: (i.first_seen, i.id))
    return json.dumps({
        "scenario": result.scenario.name,
        "incidents": [i.model_dump(mode="json", by_alias=True) for i in incidents],
        "audit": [r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in result.console.actions],
        "dead_letters": [{"subject": s, "reason": r} for s, r in result.console.dead_letters],
        "signals_sent": result.signals_sent, "elapsed_s": round(result.elapsed_s, 3),
    }, indent=2)


def temp_data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="breakfix-demo-"))

