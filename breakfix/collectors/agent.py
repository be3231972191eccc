"""The node agent: the remediator's hands on a node, inside the collector daemon.

Answers ``AgentCommand``s on ``breakfix.agent.<cluster>.<node>`` (core NATS request/reply) for
an allow-listed set of actions and nothing else:

- ``reset_gpu``: refused while processes hold the GPU (the injected busy-check; by default
  ``nvidia-smi --query-compute-apps``), with an ``error`` that starts ``busy:`` so the
  remediator can drain first; persistence mode, which counts as a client, is switched off for
  the reset and restored; then ``nvidia-smi --gpu-reset -i <uuid|index>``. A lost GPU fails
  cleanly (the driver says so).
- ``validate``: once the DCGM host engine answers (``dcgmi discovery -l``) and no GPU's fabric is still
  training (``nvidia-smi -q`` Fabric State NOT_STARTED / IN_PROGRESS: Fabric Manager after a boot or a
  reset on NVSwitch systems), each waited for up to ``ready_wait_s``; then every GPU the node had before
  must be back (``collectors.agent_inventory``: the GPUs remembered on disk against that ``nvidia-smi -q``
  reading; a missing one fails the validation undiagnosed); then ``dcgmi diag -r <level> -j``, parsed
  into per-test outcomes (DCGM 3 and 4 JSON) and judged by ``agent_checks.parse_diag``: no test failed
  and every hardware test the level includes passed (a skipped one did not); warnings go into the reply.
- ``reboot``: the configured command (``systemctl reboot``), after the command is recorded and the GPUs
  the node has now are added to the remembered inventory (the ones it must have after the reboot).
- ``gpu_pods`` (read-only): the pods holding a GPU or any of its MIG devices, from a fresh kubelet
  PodResources ``List`` matched against the GPU's UUID and its MIG devices' UUIDs (``nvidia-smi -L``,
  ``collectors.agent_pods``). The remediator asks before a MIG GPU's reset, so only those pods move.
  Answered afresh every time: it is never stored under its id and has no rate limit.

Before acting, every command passes ``collectors.agent_checks``: allow-list, node, every
argument validated (GPU index in range or a GPU UUID, no shell metacharacters or option-like
values; executables get argv, never a shell), and the per-node rate limits on reboots and
resets (kept on disk, so they hold across the reboot). Every refusal is logged
(``agent_refused``) and counted (``breakfix_agent_refusals_total{reason}``) and its reply's
``error`` starts ``refused:``.

Every command's id is an idempotency key kept on disk with the fingerprint of its action and
arguments: a repeated id with the same command gets the stored reply (``replayed``) and never
acts twice; the same id with another command is refused. Each reply carries the request's
``digest`` (id + fingerprint). A reboot is recorded with the boot id it started from; a repeat
after the node came back confirms the reboot happened instead of rebooting again. Facts on GPU
reset constraints: NVIDIA nvidia-smi documentation and NVSentinel's gpu-reset.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from breakfix.bus.clock import SYSTEM_CLOCK, Clock
from breakfix.collectors.agent_checks import (
    DiagResult,
    RateLimits,
    Refusal,
    fingerprint,
    gpu_target,
    parse_diag,
    refuse,
)
from breakfix.collectors.agent_clients import nvidia_clients
from breakfix.collectors.agent_inventory import (
    Gpu,
    InventoryStore,
    Reading,
    from_gpu_list,
    from_nvsmi,
    merge,
    missing,
    read_nvsmi,
)
from breakfix.collectors.agent_pods import gpu_devices, parse_gpu_list
from breakfix.collectors.gpuinfo import dra_name, read_minors
from breakfix.collectors.keyfile import write_json
from breakfix.collectors.kmsg_follow import read_boot_id
from breakfix.collectors.nvml_eval import FABRIC_SETTLING
from breakfix.collectors.nvsmi import NvsmiRead
from breakfix.schemas.agent import AgentAction, AgentCommand, AgentReply
from breakfix.schemas.common import first_error

log = structlog.get_logger("breakfix.collector.agent")
KILL_WAIT_S = 5.0  # after SIGKILL, how long a child may take to go before the agent moves on without it
INVENTORY_READ_S = 30.0  # the look at the GPUs before a reboot: a hung nvidia-smi must not hold the reboot up long


async def run(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run one executable; (exit code, stdout+stderr). A missing binary or a timeout is rc 127 / 124."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
    except (FileNotFoundError, PermissionError) as exc:
        return 127, f"{argv[0]}: {exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except TimeoutError:
        proc.kill()
        try:  # a process in uninterruptible sleep (nvidia-smi on a GPU that fell off the bus) outlives SIGKILL
            await asyncio.wait_for(proc.wait(), timeout=KILL_WAIT_S)
        except TimeoutError:
            log.warning("agent_child_unkillable", argv0=argv[0], pid=proc.pid)
        return 124, f"{argv[0]} timed out after {timeout_s:g}s"
    return proc.returncode or 0, out.decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class Holders:
    """What holds a GPU: ``known`` False when the check itself failed (then nothing is reset)."""

    known: bool
    processes: tuple[str, ...] = ()
    detail: str = ""


BusyCheck = Callable[[str], Awaitable[Holders]]
PodLister = Callable[[frozenset[str]], Awaitable[tuple[str, ...]]]  # device ids -> the pods holding any of them


def nvidia_smi_busy(nvidia_smi: str = "nvidia-smi") -> BusyCheck:
    """The default busy-check: ``nvidia-smi --query-compute-apps`` on the one GPU."""

    async def check(target: str) -> Holders:
        rc, out = await run([nvidia_smi, "--query-compute-apps=pid,process_name", "--format=csv,noheader",
                             "-i", target], 60)
        if rc != 0:
            return Holders(False, detail=out)
        return Holders(True, tuple(ln.strip() for ln in out.splitlines()
                                   if ln.strip() and "No running processes" not in ln))

    return check


def _load_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class NodeAgent:
    def __init__(self, node: str, state_dir: Path, *, nvidia_smi: str = "nvidia-smi", dcgmi: str = "dcgmi",
                 reboot_cmd: tuple[str, ...] = ("systemctl", "reboot"),
                 allow: frozenset[AgentAction] = frozenset(AgentAction),
                 boot_id: Callable[[], str] = read_boot_id, timeout_s: float = 3600.0,
                 clock: Clock = SYSTEM_CLOCK, busy: BusyCheck | None = None,
                 gpu_count: Callable[[], int | None] = lambda: None, reboot_window_s: float = 3600.0,
                 reset_window_s: float = 300.0, registry: CollectorRegistry | None = None,
                 pods: PodLister | None = None, ready_wait_s: float = 300.0, proc: Path = Path("/proc")) -> None:
        self.node = node
        self.clock = clock
        self.path = state_dir / "agent-commands.json"
        self.limits_path = state_dir / "agent-limits.json"
        self.inventory = InventoryStore(state_dir / "agent-gpu-inventory.json")  # beside kmsg-position.json
        self._inventory_unknown_said = False
        self.nvidia_smi = nvidia_smi
        self.dcgmi = dcgmi
        self.reboot_cmd = reboot_cmd
        self.allow = allow
        self.boot_id = boot_id
        self.timeout_s = timeout_s
        self.busy = busy or nvidia_smi_busy(nvidia_smi)
        self.pods = pods
        self.ready_wait_s = ready_wait_s
        self.proc = proc  # the host's /proc (hostPID): who holds the GPU when a reset is refused
        self.gpu_count = gpu_count
        self.done: dict[str, dict[str, object]] = self._load()
        last = _load_json(self.limits_path)
        self.limits = RateLimits(reboot_window_s, reset_window_s,
                                 {k: float(v) for k, v in last.items() if isinstance(v, int | float)})
        self.refusals = Counter("breakfix_agent_refusals", "Node-agent commands refused, by reason", ["reason"],
                                registry=registry if registry is not None else CollectorRegistry())
        self._lock = asyncio.Lock()
        self._queries = asyncio.Lock()  # read-only gpu_pods, apart from the acting commands' lock

    def _load(self) -> dict[str, dict[str, object]]:
        data = _load_json(self.path)
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    def _save(self) -> None:
        keep = dict(list(self.done.items())[-2000:])
        write_json(self.path, keep)
        self.done = keep

    def _reply(self, cmd: AgentCommand, ok: bool, detail: str, *, error: str = "", **kw: object) -> AgentReply:
        return AgentReply(id=cmd.id, node=self.node, action=cmd.action, ok=ok, detail=detail, error=error,
                          digest=f"{cmd.id}#{fingerprint(cmd)}", at=self.clock.now(), **kw)

    def _count(self, r: Refusal, cmd: AgentCommand | None = None) -> None:
        """Every refusal is logged and counted by reason."""
        self.refusals.labels(r.reason).inc()
        log.warning("agent_refused", node=self.node, reason=r.reason, detail=r.detail[:300],
                    action=cmd.action.value if cmd else None, id=cmd.id[:200] if cmd else None)

    def _refused(self, cmd: AgentCommand, r: Refusal) -> AgentReply:
        self._count(r, cmd)
        return self._reply(cmd, False, r.detail, error=f"refused: {r.detail}")

    async def handle_bytes(self, data: bytes) -> bytes:
        """One request -> one reply; a malformed request gets a clear error reply, never a crash."""
        try:
            cmd = AgentCommand.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            detail = f"invalid agent command: {first_error(exc)}"
            self._count(Refusal("invalid", detail))
            return json.dumps({"ok": False, "detail": detail, "error": f"refused: {detail}"}).encode()
        return (await self.handle(cmd)).model_dump_json().encode()

    async def handle(self, cmd: AgentCommand) -> AgentReply:
        why = refuse(cmd, node=self.node, allow=self.allow, gpu_count=self.gpu_count())
        if why is not None:
            return self._refused(cmd, why)
        if cmd.action is AgentAction.GPU_PODS:  # read-only: answered afresh, never stored under its id
            return await self._gpu_pods(cmd)
        async with self._lock:  # one command at a time on a node
            prior = self.done.get(cmd.id)
            if prior is not None:
                if prior.get("fingerprint", fingerprint(cmd)) != fingerprint(cmd):
                    return self._refused(cmd, Refusal("key_reuse", f"id {cmd.id} was already used for another "
                                                      "command; a key covers one action and its arguments"))
                return self._replay(cmd, prior)
            now = self.clock.now().timestamp()
            limited = self.limits.check(cmd, now)
            if limited is not None:
                return self._refused(cmd, limited)
            if cmd.action is AgentAction.RESET_GPU:
                reply = await self._reset(cmd, now)
            elif cmd.action is AgentAction.REBOOT:
                self.limits.record(cmd, now)
                write_json(self.limits_path, self.limits.last)
                self.done[cmd.id] = {"state": "rebooting", "boot_id": self.boot_id(), "fingerprint": fingerprint(cmd)}
                self._save()
                rc, out = await run([self.nvidia_smi, "-q"], INVENTORY_READ_S)  # the GPUs that must come back
                self._remember(read_nvsmi(out), "reboot")
                rc, out = await run(list(self.reboot_cmd), 60)
                if rc == 0:  # keep the boot id record: a repeat of this id checks it instead of rebooting
                    log.info("agent_command", node=self.node, action="reboot", id=cmd.id, ok=True)
                    return self._reply(cmd, True, f"reboot requested ({out or 'no output'})")
                reply = self._reply(cmd, False, f"reboot command failed rc={rc}: {out}")
            else:
                reply = await self._validate(cmd)
            self.done[cmd.id] = {"state": "done", "reply": reply.model_dump(mode="json"),
                                 "fingerprint": fingerprint(cmd)}
            self._save()
            log.info("agent_command", node=self.node, action=cmd.action.value, id=cmd.id, ok=reply.ok)
            return reply

    def _replay(self, cmd: AgentCommand, prior: dict[str, object]) -> AgentReply:
        if prior.get("state") == "rebooting":
            booted = self.boot_id() != prior.get("boot_id")
            return self._reply(cmd, booted, "rebooted (new boot id)" if booted else
                               "reboot was requested but the node has not rebooted", replayed=True)
        stored = AgentReply.model_validate(prior["reply"])
        return stored.model_copy(update={"replayed": True})

    async def _reset(self, cmd: AgentCommand, now: float) -> AgentReply:
        target = gpu_target(cmd)
        assert target is not None  # refuse() made sure
        held = await self.busy(target)
        if not held.known:
            return self._reply(cmd, False, f"cannot query GPU {target}: {held.detail}",
                               error=f"unknown: cannot tell what holds GPU {target}")
        if held.processes:
            detail = f"busy: GPU {target} is held by {len(held.processes)} process(es): {held.processes[0]}"
            return self._reply(cmd, False, detail, error=detail, evidence={"processes": str(len(held.processes))})
        self.limits.record(cmd, now)  # counts from the first real attempt, success or not
        write_json(self.limits_path, self.limits.last)
        smi = self.nvidia_smi
        rc, pm = await run([smi, "--query-gpu=persistence_mode", "--format=csv,noheader", "-i", target], 60)
        persistence = rc == 0 and pm.strip().lower() == "enabled"
        if persistence:
            await run([smi, "-pm", "0", "-i", target], 60)
        rc, out = await run([smi, "--gpu-reset", "-i", target], self.timeout_s)
        if persistence:
            await run([smi, "-pm", "1", "-i", target], 60)
        ok = rc == 0 and "successfully reset" in out.lower()
        said = " ".join(ln.strip() for ln in out.splitlines() if ln.strip())[:400]
        evidence = {"rc": str(rc), "persistence_mode_restored": str(persistence).lower()}
        if not ok and "in use by another client" in out.lower():  # monitoring clients the busy check cannot see
            clients = await asyncio.to_thread(lambda: nvidia_clients(self.proc, minor=self._minor(cmd),
                                                                     exclude=os.getpid()))
            if clients:
                evidence["gpu_clients"] = ", ".join(clients)
                said = f"{said} [device open in: {evidence['gpu_clients']}]"[:700]
        return self._reply(cmd, ok, said or f"nvidia-smi rc={rc}", error="" if ok else f"failed: nvidia-smi rc={rc}",
                           evidence=evidence)

    def _minor(self, cmd: AgentCommand) -> int | None:
        """The target GPU's device minor (``/dev/nvidia<minor>``) from the driver's procfs; its index when the
        command names no UUID or the driver does not list it (the minor is usually, not always, the index)."""
        if cmd.gpu_uuid is not None:
            minor = read_minors(self.proc / "driver" / "nvidia" / "gpus").get(cmd.gpu_uuid)
            if minor is not None:
                return minor
        return cmd.gpu_index

    async def _gpu_pods(self, cmd: AgentCommand) -> AgentReply:
        target, lister = gpu_target(cmd), self.pods
        if lister is None:
            return self._reply(cmd, False, "this node's agent cannot list pods: agent.podresources_socket is unset",
                               error="failed: no pod lister")
        async with self._queries:  # one at a time: a hung driver must not pile up nvidia-smi processes
            rc, listing = await run([self.nvidia_smi, "-L"], 15)  # within the remediator's 45 s wait, with the List
            listed = parse_gpu_list(listing) if rc == 0 else {}
            self._remember(from_gpu_list(listed), "gpu_pods")
            devices = gpu_devices(listed, index=cmd.gpu_index, uuid=cmd.gpu_uuid)
            if not devices:
                return self._reply(cmd, False, f"nvidia-smi -L does not list GPU {target} (rc={rc}): {listing[:200]}",
                                   error=f"failed: GPU {target} not listed")
            minors = await asyncio.to_thread(read_minors, self.proc / "driver" / "nvidia" / "gpus")
            dra = frozenset(dra_name(minors[d]) for d in devices if d in minors)  # NVIDIA's DRA driver: gpu-<minor>
            try:
                pods = await asyncio.wait_for(lister(devices | dra), timeout=20.0)
            except Exception as exc:  # the kubelet is away or answers badly: say so, the remediator drains the node
                return self._reply(cmd, False, f"kubelet PodResources did not answer: {exc!r}"[:400],
                                   error="failed: kubelet PodResources")
        mig = len(devices) - 1
        detail = f"{len(pods)} pod(s) hold GPU {target}" + (f" and its {mig} MIG device(s)" if mig else "")
        return self._reply(cmd, True, detail, evidence={"pods": ",".join(pods), "mig_devices": str(mig)})

    async def _engine_up(self, deadline: float) -> tuple[int, str]:
        """Wait (until ``deadline``: ``ready_wait_s`` for this and the fabric together) until the DCGM host engine
        answers ``dcgmi discovery -l``: right after a reboot
        it, and Fabric Manager on NVSwitch systems, may still be starting, and a diagnostic then fails though the
        GPUs are healthy. A missing dcgmi (rc 127) is not waited for."""
        while True:
            rc, out = await run([self.dcgmi, "discovery", "-l"], 60)
            if rc in (0, 127) or self.clock.monotonic() >= deadline:
                return rc, out
            await self.clock.sleep(min(10.0, max(0.0, deadline - self.clock.monotonic())))

    async def _fabric_trained(self, deadline: float) -> tuple[list[str], NvsmiRead | None, str]:
        """Wait (until ``deadline``) until no GPU's fabric reads NOT_STARTED or IN_PROGRESS in ``nvidia-smi -q``: on
        NVSwitch systems Fabric Manager trains the fabric after a boot or a reset, and ``dcgmi discovery`` answers
        before it is done, when a diagnostic's NVLink tests would fail healthy GPUs. Returns the GPUs still training
        at the deadline, the last reading (None when it was no ``nvidia-smi -q`` output) and what nvidia-smi said;
        an nvidia-smi that fails or prints something else is not waited for (the diag says)."""
        while True:
            rc, out = await run([self.nvidia_smi, "-q"], 60)
            read = read_nvsmi(out)  # a lost GPU can make nvidia-smi exit non-zero: its reading still lists the others
            gpus = read.gpus if read is not None and rc == 0 else []
            training = [g.sample.gpu.label() for g in gpus if g.sample.fabric is not None
                        and g.sample.fabric[0] in FABRIC_SETTLING]
            if not training or self.clock.monotonic() >= deadline:
                return training, read, f"rc={rc}: {' '.join(out.split())[:200]}"
            await self.clock.sleep(min(10.0, max(0.0, deadline - self.clock.monotonic())))

    def _remember(self, read: NvsmiRead | Reading | None, why: str, before: tuple[Gpu, ...] | None = None) -> None:
        """Add what a reading shows to the remembered GPUs (``collectors.agent_inventory``)."""
        if read is None:
            return
        reading = from_nvsmi(read) if isinstance(read, NvsmiRead) else read
        before = (self.inventory.load() or ()) if before is None else before
        after = merge(before, reading)
        if after != before and self.inventory.save(after, self.clock.now()):
            log.info("agent_inventory_saved", node=self.node, gpus=len(after), added=len(after) - len(before),
                     reading=why)

    def _gpus_missing(self, cmd: AgentCommand, remembered: tuple[Gpu, ...] | None, read: NvsmiRead | None,
                      said: str) -> AgentReply | None:
        """The failure reply when a GPU the node had before is not back, or the GPUs cannot be read to tell."""
        if not remembered:
            if not self._inventory_unknown_said:  # once per agent: the check needs one reading while things were well
                self._inventory_unknown_said = True
                log.warning("agent_inventory_unknown", node=self.node, path=str(self.inventory.path),
                            detail="no GPU inventory recorded yet: validation cannot check that every GPU came back")
            return None
        if read is None:
            return self._reply(cmd, False, f"cannot read the node's GPUs to check the {len(remembered)} remembered "
                                           f"ones came back (nvidia-smi -q {said})"[:700],
                               error="failed: GPU inventory unreadable")
        reading = from_nvsmi(read)
        gone = missing(remembered, reading, index=cmd.gpu_index)
        if not gone:
            return None
        names = ", ".join(g.label() for g in gone)
        detail = (f"{len(gone)} of the {len(remembered)} GPU(s) this node had did not come back: {names}; "
                  f"{len(reading.present)} answer now. Not diagnosed. A GPU that fell off the bus (XID 79) may "
                  f"need a cold power cycle; if it was removed on purpose, delete {self.inventory.path}")
        return self._reply(cmd, False, detail[:1500], error=f"failed: GPU missing: {names}"[:300],
                           evidence={"gpus_missing": names[:1000], "gpus_present": str(len(reading.present))})

    async def _validate(self, cmd: AgentCommand) -> AgentReply:
        # one deadline for both waits: the remediator's validate request allows the diag, ready_wait_s and a margin
        deadline = self.clock.monotonic() + self.ready_wait_s
        rc, out = await self._engine_up(deadline)
        if rc not in (0, 127):
            said = " ".join(out.split())[:300]
            return self._reply(cmd, False, f"the DCGM host engine did not answer within {self.ready_wait_s:g}s "
                                           f"(dcgmi discovery -l rc={rc}): {said}", error="failed: DCGM host engine")
        training, read, said = await self._fabric_trained(deadline)
        if training:
            return self._reply(cmd, False, f"the GPU fabric is still training after {self.ready_wait_s:g}s on "
                                           f"{', '.join(training)} (Fabric Manager not done): not diagnosed",
                               error="failed: GPU fabric not trained")
        remembered = self.inventory.load()
        gone = self._gpus_missing(cmd, remembered, read, said)
        self._remember(read, "validate", remembered or ())
        if gone is not None:
            return gone
        scope = ["-i", str(cmd.gpu_index)] if cmd.gpu_index is not None else []  # one GPU after a single-GPU reset
        rc, out = await run([self.dcgmi, "diag", "-r", str(cmd.level), *scope, "-j"], self.timeout_s)
        return self._diag_reply(cmd, rc, parse_diag(out, cmd.level))

    def _diag_reply(self, cmd: AgentCommand, rc: int, diag: DiagResult) -> AgentReply:
        if diag.problem:
            return self._reply(cmd, False, f"dcgmi diag -r {cmd.level} gave no readable result (rc={rc}): "
                                           f"{diag.problem}"[:700], error="failed: no readable dcgmi result",
                               tests=diag.tests)
        detail, error, evidence = diag.summary()
        return self._reply(cmd, diag.passed, detail, error=error, tests=diag.tests, evidence=evidence)
