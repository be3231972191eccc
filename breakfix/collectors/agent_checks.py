"""The node agent's admission rules, pure: what a command may say, and how often it may disrupt.

``collectors.agent`` asks ``refuse`` about every decoded ``AgentCommand`` before it acts, and
``RateLimits`` (state kept on disk by the agent) before a reset or a reboot. Nothing here reads
a clock or a file: ``now`` is a wall-clock timestamp passed in (a reboot window has to outlive
the reboot, so it cannot be monotonic time).

Rules (defence in depth; the remediator has its own caps, these hold even against a forged
command):

- only the allow-listed actions; only this node;
- a GPU is named by an index in range of the node's GPUs or by a GPU UUID of NVML's form
  (``GPU-`` and 32 hex digits in 8-4-4-4-12 groups, as ``nvidia-smi -L`` prints it), never by
  free text, so nothing option-like (``--help``) or list-like (``0,1,2,3``) reaches nvidia-smi;
- the idempotency key and the incident id use a plain charset (no shell metacharacters,
  no leading ``-``); arguments are passed to executables as argv, never through a shell;
- the diag level is 1-4 (``dcgmi diag -r``; the schema bounds it too);
- the idempotency key covers the action and its arguments (``fingerprint``): the same key with a
  different command is refused, never answered with another command's stored reply;
- at most one reboot per node per ``reboot_window_s`` and one reset per GPU per
  ``reset_window_s``, whatever the remediator asks.

And what a validation must show (``parse_diag``: the text of ``dcgmi diag -r <level> -j``, DCGM 3.x
or 4.x JSON, in; a ``DiagResult`` out, never an exception). It passes only when no test failed and
every hardware test the run level includes passed (``warn`` counts as a pass; its warnings travel in
the reply). Run levels and their tests: NVIDIA DCGM ``NvidiaValidationSuite::FillTestVectors``
(3.3 and 4.x, the same lists) and the DCGM diagnostics guide, summarised in
``shared/reference/dcgm_health_and_diag.md`` section 2: r1 runs software checks only; r2 adds
``memory`` and ``pcie``; r3 adds ``diagnostic``, ``memory_bandwidth``, ``targeted_stress`` and
``targeted_power``; r4 adds ``memtest`` and ``pulse_test``. A hardware test that was skipped
(DCGM skips tests while compute processes hold the GPU, or when a plugin is missing) or that is not
in the output did not pass, so the GPU does not return to service on r1's software checks alone.
One exception, documented because failing it would wedge remediation on whole GPU models: DCGM's
per-model allowlist (``diag-skus.yaml``, ``is_allowed: false``, e.g. ``targeted_power`` on H20
NVL16, ``pulse_test`` on several models) disables a test on a model with DCGM_FR_TEST_DISABLED
(error 48, "The <test> test is skipped[ for this GPU]."); such a skip, or one DCGM explains as not
supported on this GPU, is "not applicable" and tolerated, but only while at least one hardware test
of the level really passed: a model DCGM does not know gets every hardware test disabled (their
default is ``is_allowed: False``), and a run that tested no hardware fails. A skip for any other
reason (ECC turned off, compute processes, aborted, no reason given) fails. Tests DCGM runs only
where installed or configured (EUD and CPU EUD as root with the EUD package, ``nvbandwidth``,
``nccl_tests``, ``rist``) are not required; when they run, a failure still fails.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from breakfix.schemas.agent import AgentAction, AgentCommand, DiagTest

GPU_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@=+/-]{0,199}")
MAX_GPUS = 64  # when the node's GPU count is not known: still a bounded, plain integer


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # short label for the refusal counter: not_allowed, wrong_node, bad_argument, ...
    detail: str


def fingerprint(cmd: AgentCommand) -> str:
    """What the idempotency key stands for: the action and every argument it acts with."""
    body = {"node": cmd.node, "action": cmd.action.value, "gpu_uuid": cmd.gpu_uuid, "gpu_index": cmd.gpu_index,
            "level": cmd.level if cmd.action is AgentAction.VALIDATE else None}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def gpu_target(cmd: AgentCommand) -> str | None:
    """The ``-i`` argument for nvidia-smi: a validated UUID or a decimal index (call after ``refuse``)."""
    if cmd.gpu_uuid is not None:
        return cmd.gpu_uuid
    return str(cmd.gpu_index) if cmd.gpu_index is not None else None


def refuse(cmd: AgentCommand, *, node: str, allow: frozenset[AgentAction], gpu_count: int | None) -> Refusal | None:
    """Why this command must not run here, or None when its form is acceptable."""
    if cmd.node != node:
        return Refusal("wrong_node", f"command for {cmd.node[:100]!r} reached {node}")
    if cmd.action not in allow:
        return Refusal("not_allowed", f"{cmd.action.value} is not allowed on this node")
    if not KEY.fullmatch(cmd.id):
        return Refusal("bad_argument", "id: only letters, digits and ._:@=+/- (no shell metacharacters)")
    if cmd.incident and not KEY.fullmatch(cmd.incident):
        return Refusal("bad_argument", "incident: only letters, digits and ._:@=+/- (no shell metacharacters)")
    if cmd.gpu_uuid is not None and not GPU_UUID.fullmatch(cmd.gpu_uuid):
        return Refusal("bad_argument", f"gpu_uuid {cmd.gpu_uuid[:80]!r} is not a GPU UUID (GPU-xxxxxxxx-...)")
    if cmd.gpu_index is not None:
        limit = gpu_count if gpu_count is not None else MAX_GPUS
        if not 0 <= cmd.gpu_index < limit:
            return Refusal("bad_argument", f"gpu_index {cmd.gpu_index} is outside this node's GPUs 0-{limit - 1}")
    if cmd.gpu_uuid is not None and cmd.gpu_index is not None:
        return Refusal("bad_argument", "name the GPU by index or by UUID, not both")
    if cmd.action in (AgentAction.RESET_GPU, AgentAction.GPU_PODS) and gpu_target(cmd) is None:
        return Refusal("bad_argument", f"{cmd.action.value} needs a GPU UUID or index")
    if not 1 <= cmd.level <= 4:
        return Refusal("bad_argument", f"level {cmd.level} is not a dcgmi diag level (1-4)")
    return None


@dataclass
class RateLimits:
    """When each disruptive action last ran here (wall-clock seconds): ``reboot`` and ``reset:<gpu>``."""

    reboot_window_s: float = 3600.0
    reset_window_s: float = 300.0
    last: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def slot(cmd: AgentCommand) -> str | None:
        if cmd.action is AgentAction.REBOOT:
            return "reboot"
        if cmd.action is AgentAction.RESET_GPU:
            return f"reset:{gpu_target(cmd)}"
        return None

    def check(self, cmd: AgentCommand, now: float) -> Refusal | None:
        slot = self.slot(cmd)
        if slot is None:
            return None
        window = self.reboot_window_s if slot == "reboot" else self.reset_window_s
        last = self.last.get(slot)
        if last is not None and now - last < window:  # a clock that went back is still inside the window
            what = "reboot of this node" if slot == "reboot" else f"reset of GPU {gpu_target(cmd)}"
            return Refusal("rate_limited", f"a {what} ran {now - last:.0f}s ago; at most one per {window:g}s")
        return None

    def record(self, cmd: AgentCommand, now: float) -> None:
        slot = self.slot(cmd)
        if slot is not None:
            self.last[slot] = now
            if len(self.last) > 256:  # bounded: keep the most recent
                for k in sorted(self.last, key=self.last.__getitem__)[:len(self.last) - 256]:
                    del self.last[k]


# The hardware tests each ``dcgmi diag -r`` level includes (NVIDIA DCGM NvidiaValidationSuite::FillTestVectors, 3.3
# and 4.x), by DCGM 4's plugin names; DCGM 3's display names map onto them (``canonical_test``).
_R2 = frozenset({"memory", "pcie"})
_R3 = _R2 | {"diagnostic", "memory_bandwidth", "targeted_stress", "targeted_power"}
LEVEL_TESTS: dict[int, frozenset[str]] = {1: frozenset(), 2: _R2, 3: _R3, 4: _R3 | {"memtest", "pulse_test"}}
_DCGM3_NAMES = {"gpu_memory": "memory", "eud_test": "eud", "cpu_eud_test": "cpu_eud"}
# DCGM_FR_TEST_DISABLED (dcgm_errors.h: "This test is disabled for this GPU"), its messages in 3.x and 4.x; the L1 cache
# subtest's DCGM_FR_L1TAG_UNSUPPORTED; and a skip DCGM words as not supported / not applicable on this GPU.
TEST_DISABLED = 48
_NOT_APPLICABLE = re.compile(r"\bthe [\w .-]{1,40} test is skipped(?: for this gpu)?\.|"
                             r"does not support the l1 cache test|"
                             r"\bnot (?:supported|applicable) (?:on|for|by) this (?:gpu|sku|device|card|model)\b",
                             re.IGNORECASE)
_RANK = {"pass": 0, "warn": 1, "skip": 2, "fail": 3}
MAX_TESTS = 128
MAX_INFO = 500


def canonical_test(name: str) -> str:
    """DCGM 4's name for a test: ``memory``, ``pcie``, ...; DCGM 3's "GPU Memory" / "Targeted Stress" map onto them."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    return _DCGM3_NAMES.get(key, key)


@dataclass(frozen=True, slots=True)
class DiagResult:
    """One ``dcgmi diag -j`` run judged against its level. ``problem``: no readable result, or DCGM's runtime error."""

    tests: tuple[DiagTest, ...] = ()
    failed: tuple[str, ...] = ()  # tests that said fail
    not_passed: tuple[str, ...] = ()  # hardware tests of the level that were skipped or not run, with why
    not_applicable: tuple[str, ...] = ()  # skipped: DCGM disables them on this GPU model (tolerated, reported)
    warnings: tuple[str, ...] = ()  # "<test>: <warning>" of the tests that warned (a pass)
    problem: str = ""
    level: int = 2

    @property
    def passed(self) -> bool:
        return not self.problem and bool(self.tests) and not self.failed and not self.not_passed

    def summary(self) -> tuple[str, str, dict[str, str]]:
        """The agent's reply: (detail, error, evidence); ``error`` is empty on a pass. Evidence: each test's status,
        and ``warnings``, ``not_applicable``, ``not_passed`` when there are any."""
        evidence = {t.name: t.status for t in self.tests}
        notes = []
        if self.not_applicable:
            evidence["not_applicable"] = ", ".join(self.not_applicable)
            notes.append(f"not applicable on this GPU model (DCGM disables them): {evidence['not_applicable']}")
        if self.warnings:
            evidence["warnings"] = "; ".join(self.warnings)[:1000]
            notes.append(f"warnings: {evidence['warnings']}")
        if self.passed:
            return "; ".join([f"DCGM diag r{self.level} passed ({len(self.tests)} tests)", *notes])[:1500], "", evidence
        why = [f"failed: {', '.join(self.failed)}"] if self.failed else []
        if self.not_passed:
            evidence["not_passed"] = ", ".join(self.not_passed)[:1000]
            why.append(f"did not pass (r{self.level} needs them): {evidence['not_passed']}")
        why = why or [f"did not pass: {self.problem or 'no tests'}"]
        detail = "; ".join([f"DCGM diag r{self.level} {why[0]}", *why[1:], *notes])
        return detail[:1500], f"failed: {'; '.join(why)}"[:300], evidence


def _lines(entry: dict[str, object]) -> list[tuple[str, int | None]]:
    """A result's info and warnings: (text, DCGM error id). 4.x writes info as a list, 3.x as one string."""
    out: list[tuple[str, int | None]] = []
    info = entry.get("info")
    for x in info if isinstance(info, list) else [info]:
        if isinstance(x, str) and x.strip():
            out.append((x.strip(), None))
    warnings = entry.get("warnings")
    for w in warnings if isinstance(warnings, list) else []:
        if isinstance(w, dict):
            text, eid = w.get("warning") or w.get("warnings"), w.get("error_id")
            out.append((str(text or "").strip(), eid if type(eid) is int else None))
        elif isinstance(w, str):
            out.append((w.strip(), None))
    return out


def _status(entry: dict[str, object]) -> str:
    """pass / warn / skip / fail; "Not Run" and no status are a skip, anything unknown is a fail."""
    raw = str(entry.get("status") or "").strip().lower()
    return raw if raw in _RANK else "skip" if raw in ("", "not run", "not_run") else "fail"


def _na(lines: list[tuple[str, int | None]]) -> bool:
    return any(eid == TEST_DISABLED or _NOT_APPLICABLE.search(text) for text, eid in lines)


def _test(category: object, t: dict[str, object]) -> tuple[DiagTest, bool, list[str]]:
    """One test's worst outcome over its GPUs and 4.x's ``test_summary``; whether its skip is not applicable here;
    its warnings. A skipped entry is not applicable when its own lines say so, or it has none and the summary does."""
    results = t.get("results")
    entries = [r for r in results if isinstance(r, dict)][:1024] if isinstance(results, list) else []
    summary = t.get("test_summary")
    if isinstance(summary, dict):
        entries.append(summary)
    lines = [_lines(e) for e in entries]
    summary_lines = lines[-1] if isinstance(summary, dict) else []
    statuses = [_status(e) for e in entries]
    worst = max(statuses, key=_RANK.__getitem__) if statuses else "skip"
    skipped = [ln for st, ln in zip(statuses, lines, strict=True) if st == "skip"]
    na = worst == "skip" and bool(skipped) and all(_na(ln) or (not ln and _na(summary_lines)) for ln in skipped)
    name = str(t.get("name") or "?")[:100]
    warned = list(dict.fromkeys(f"{name}: {text}" for st, ln in zip(statuses, lines, strict=True) if st == "warn"
                                for text, _ in ln if text))
    said = list(dict.fromkeys(text for ln in lines for text, _ in ln if text))
    info = "; ".join(said)[:MAX_INFO] if statuses else "not run"
    return DiagTest(category=str(category or "")[:100], name=name, status=worst, info=info), na, warned


def parse_diag(text: str, level: int) -> DiagResult:
    """``dcgmi diag -j`` output -> per-test outcomes and the verdict for run ``level``. Total: any text is a result.
    Keys: "DCGM GPU Diagnostic" (3.x) or "DCGM Diagnostic" (4.x), each with ``test_categories`` and, when the run
    could not start, ``runtime_error``."""
    try:
        doc = json.loads(text[text.find("{"):text.rfind("}") + 1])
    except (ValueError, RecursionError) as exc:
        return DiagResult(problem=f"not JSON: {str(exc)[:200]}", level=level)
    root = (doc.get("DCGM GPU Diagnostic") or doc.get("DCGM Diagnostic")) if isinstance(doc, dict) else None
    if not isinstance(root, dict):
        return DiagResult(problem="no DCGM diagnostic object in the JSON", level=level)
    tests: list[DiagTest] = []
    na: set[str] = set()
    skipped: set[str] = set()  # skipped for another reason somewhere (a test listed twice): not excused
    warnings: list[str] = []
    categories = root.get("test_categories")
    for cat in categories if isinstance(categories, list) else []:
        listed = cat.get("tests") if isinstance(cat, dict) else None
        for t in listed if isinstance(listed, list) else []:
            if isinstance(t, dict) and len(tests) < MAX_TESTS:
                test, not_applicable, warned = _test(cat.get("category"), t)
                tests.append(test)
                warnings.extend(warned)
                if test.status == "skip":
                    (na if not_applicable else skipped).add(canonical_test(test.name))
    error = root.get("runtime_error")
    problem = f"DCGM runtime error: {str(error)[:300]}" if error else "" if tests else "no tests in the result"
    return judge(tuple(tests), na - skipped, level, warnings=tuple(warnings[:50]), problem=problem)


def judge(tests: tuple[DiagTest, ...], na: set[str], level: int, *, warnings: tuple[str, ...] = (),
          problem: str = "") -> DiagResult:
    """The verdict: no test failed, and each hardware test of ``level`` passed (or warned), or is not applicable on
    this GPU model (``na``) while at least one of them did pass."""
    worst: dict[str, DiagTest] = {}
    for t in tests:
        key = canonical_test(t.name)
        if key not in worst or _RANK.get(t.status, 3) > _RANK.get(worst[key].status, 3):
            worst[key] = t
    required = LEVEL_TESTS.get(min(max(level, 1), 4), frozenset())
    not_passed: list[str] = []
    disabled: list[str] = []
    for key in sorted(required):
        got = worst.get(key)
        if got is None:
            not_passed.append(f"{key} (not run)")
        elif got.status == "skip" and key in na:
            disabled.append(got.name)
        elif got.status == "skip":
            not_passed.append(f"{got.name} (skipped{': ' + got.info[:150] if got.info else ''})")
    ran = [k for k in required if k in worst and worst[k].status in ("pass", "warn")]
    if required and disabled and not ran and not not_passed:  # nothing tested the hardware: not a pass
        not_passed = [f"{n} (disabled for this GPU model, and no hardware test ran)" for n in disabled]
        disabled = []
    return DiagResult(tests=tests, failed=tuple(t.name for t in tests if t.status == "fail"),
                      not_passed=tuple(not_passed), not_applicable=tuple(disabled), warnings=warnings,
                      problem=problem, level=level)
