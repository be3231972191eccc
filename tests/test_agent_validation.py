"""The node agent's validation before capacity returns: a DCGM diagnostic passes only when the hardware tests its
run level includes passed (``agent_checks.parse_diag``), and only when every GPU the node had came back after a
reboot (``agent_inventory``). Through the agent with the stand-in executables of tests/bin: ``nvidia-smi-q``
prints a real 8-GPU ``nvidia-smi -q`` (tests/data/nvsmi_8gpu_row_remap_pending.txt) that a test edits between
readings, ``dcgmi-json`` prints a ``dcgmi diag -j`` from tests/data.

tests/data/dcgmi_diag_dcgm4_*.json are in the shape DCGM 4.x prints (NVIDIA/DCGM 4.6 dcgmi/Diag.cpp
HelperJsonBuildOutput; testing/python3/dcgm_diag_schema.json), with DCGM's own messages (dcgm_errors.h:
DCGM_FR_TEST_DISABLED_MSG "The %s test is skipped.", DCGM_FR_MEMORY_BANDWIDTH_MSG); the r3 one is an H20 NVL16
(device 230c), on which DCGM's diag-skus.yaml disables targeted_power.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from breakfix.collectors.agent import NodeAgent
from breakfix.schemas.agent import AgentAction, AgentCommand
from tests.conftest import T0

BIN = Path(__file__).resolve().parent / "bin"
DATA = Path(__file__).resolve().parent / "data"
EIGHT = (DATA / "nvsmi_8gpu_row_remap_pending.txt").read_text()
GPU3 = ("00000000:5D:00.0", "GPU-7e405d67-9c41-5f76-a071-3fbd418eac34")
GPU5 = ("00000000:AB:00.0", "GPU-90627f49-be63-7198-c293-51df63a0ce56")
NEW_CARD = "GPU-0123abcd-0000-1111-2222-333344445555"


def blocks(text: str) -> list[str]:
    return re.split(r"(?m)^(?=GPU [0-9A-F]{8}:)", text)


def without(text: str, bus: str) -> str:
    """The dump with one GPU gone: not enumerated at all (an XID 79 GPU that a warm reboot did not bring back)."""
    return "".join(b for b in blocks(text) if not b.startswith(f"GPU {bus}"))


def lost(text: str, bus: str) -> str:
    """The dump with one GPU the driver knows but cannot open: what nvidia-smi prints after an XID 79."""
    return "".join(f"Unable to determine the device handle for GPU {bus}: GPU is lost.  Reboot the system to "
                   "recover this GPU\n" if b.startswith(f"GPU {bus}") else b for b in blocks(text))


def cmd(action: AgentAction, key: str, **kw: object) -> AgentCommand:
    return AgentCommand(id=key, node="n1", action=action, incident="inc-1", issued_at=T0, **kw)


class Node:
    """One node's disk (its state dir survives the reboot), its ``nvidia-smi -q`` and its tool logs."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.state, self.q = tmp, tmp / "state", tmp / "nvidia-smi-q.txt"
        self.smi_log, self.dcgmi_log = tmp / "nvidia-smi.log", tmp / "dcgmi.log"
        monkeypatch.setenv("FAKE_NVSMI_Q", str(self.q))
        monkeypatch.setenv("FAKE_NVSMI_LOG", str(self.smi_log))
        monkeypatch.setenv("FAKE_DCGMI_LOG", str(self.dcgmi_log))
        self.monkeypatch = monkeypatch

    def shows(self, text: str) -> None:
        self.q.write_text(text)

    def diag_prints(self, fixture: str) -> str:
        self.monkeypatch.setenv("FAKE_DCGMI_JSON", str(DATA / fixture))
        return str(BIN / "dcgmi-json")

    def agent(self, boot: str = "boot-1", dcgmi: str = str(BIN / "dcgmi")) -> NodeAgent:
        """A fresh agent on this node's disk: a new process, as after a reboot."""
        return NodeAgent("n1", self.state, nvidia_smi=str(BIN / "nvidia-smi-q"), dcgmi=dcgmi, reboot_cmd=("true",),
                         boot_id=lambda: boot)

    def diagnosed(self) -> bool:
        return self.dcgmi_log.exists() and "diag" in self.dcgmi_log.read_text()

    async def reboot_then_validate(self, before: str, after: str, **validate: object) -> tuple[bool, str, str]:
        self.shows(before)
        assert (await self.agent("boot-1").handle(cmd(AgentAction.REBOOT, "inc-1:0:1:1"))).ok
        self.shows(after)
        reply = await self.agent("boot-2").handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:1", **validate))
        return reply.ok, reply.detail, reply.error


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    return Node(tmp_path, monkeypatch)


class TestEveryGpuCameBack:
    async def test_a_gpu_that_did_not_come_back_after_the_reboot_fails_validation_undiagnosed(self,
                                                                                             node: Node) -> None:
        ok, detail, error = await node.reboot_then_validate(EIGHT, without(EIGHT, GPU3[0]))
        assert not ok and error.startswith("failed: GPU missing") and GPU3[1] in error
        assert f"gpu3 {GPU3[1]} (0000:5d:00.0)" in detail and "1 of the 8 GPU(s)" in detail and "7 answer" in detail
        assert not node.diagnosed(), "dcgmi diag is not run on the GPUs that are left"

    @pytest.mark.parametrize("back", [False, True], ids=["slot-empty-after", "gpu-back-in-its-slot"])
    async def test_a_gpu_already_lost_before_the_reboot_is_remembered_by_its_slot(self, node: Node,
                                                                                 back: bool) -> None:
        """The first incident on a node: no inventory yet, and the XID 79 GPU is lost when the reboot is asked. The
        agent's look just before the reboot remembers its PCI slot, and the slot must answer again after it."""
        after = EIGHT if back else without(EIGHT, GPU3[0])
        ok, detail, _ = await node.reboot_then_validate(lost(EIGHT, GPU3[0]), after)
        assert ok is back and node.diagnosed() is back
        assert back or "the 8 GPU(s) this node had did not come back: GPU at 0000:5d:00.0;" in detail

    async def test_a_gpu_still_lost_after_the_reboot_is_not_back(self, node: Node) -> None:
        ok, detail, _ = await node.reboot_then_validate(EIGHT, lost(EIGHT, GPU3[0]))
        assert not ok and GPU3[1] in detail

    async def test_every_gpu_back_passes_and_a_gpu_added_is_no_failure(self, node: Node) -> None:
        ok, detail, _ = await node.reboot_then_validate(without(EIGHT, GPU3[0]), EIGHT)
        assert ok and detail.startswith("DCGM diag r2 passed") and node.diagnosed()
        saved = json.loads((node.state / "agent-gpu-inventory.json").read_text())
        assert len(saved["gpus"]) == 8 and saved["version"] == 1, "the added GPU is remembered from now on"

    async def test_a_card_replaced_in_its_slot_is_a_repair_not_a_missing_gpu(self, node: Node) -> None:
        ok, _, _ = await node.reboot_then_validate(EIGHT, EIGHT.replace(GPU3[1], NEW_CARD))
        saved = (node.state / "agent-gpu-inventory.json").read_text()
        assert ok and NEW_CARD in saved and GPU3[1] not in saved

    @pytest.mark.parametrize(("index", "ok"), [(3, True), (5, False)], ids=["another-gpu", "this-gpu"])
    async def test_validating_one_gpu_checks_that_gpu_only(self, node: Node, index: int, ok: bool) -> None:
        """After a single-GPU reset the remediator validates that GPU (``-i``): another GPU missing is another
        incident's business, the validated one missing is this one's."""
        got, detail, _ = await node.reboot_then_validate(EIGHT, without(EIGHT, GPU5[0]), gpu_index=index)
        assert got is ok
        assert node.diagnosed() is ok and (ok or GPU5[1] in detail)

    async def test_without_an_inventory_validation_proceeds_and_says_so_once(self, node: Node) -> None:
        node.shows("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n")
        a = node.agent()
        with capture_logs() as logs:
            first = await a.handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:1"))
            second = await a.handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:2"))
        assert first.ok and second.ok, "as before: the diag decides"
        assert [e["event"] for e in logs].count("agent_inventory_unknown") == 1
        assert not (node.state / "agent-gpu-inventory.json").exists()

    async def test_with_an_inventory_unreadable_gpus_fail_validation(self, node: Node) -> None:
        node.shows(EIGHT)
        assert (await node.agent().handle(cmd(AgentAction.REBOOT, "inc-1:0:1:1"))).ok
        node.shows("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n")
        reply = await node.agent("boot-2").handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:1"))
        assert not reply.ok and reply.error == "failed: GPU inventory unreadable" and "8 remembered" in reply.detail

    @pytest.mark.parametrize("junk", ["{not json", '{"version": 1, "gpus": [{"uuid": 7}]}', "[]", '"x"' * 10])
    async def test_a_corrupt_inventory_is_ignored_with_a_log_line_and_written_afresh(self, node: Node,
                                                                                     junk: str) -> None:
        node.state.mkdir(parents=True)
        (node.state / "agent-gpu-inventory.json").write_text(junk)
        node.shows(EIGHT)
        with capture_logs() as logs:
            reply = await node.agent().handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:1"))
        assert reply.ok and "agent_inventory_unreadable" in [e["event"] for e in logs]
        assert len(json.loads((node.state / "agent-gpu-inventory.json").read_text())["gpus"]) == 8

    async def test_the_inventory_lives_in_the_collectors_state_dir_beside_the_kmsg_position(self,
                                                                                           tmp_path: Path) -> None:
        from breakfix.bus.clock import ManualClock
        from breakfix.collectors.app import build_collector
        from breakfix.collectors.config import CollectorConfig

        cfg = CollectorConfig.model_validate({"cluster": "c1", "node": "n1", "state_dir": str(tmp_path / "state"),
                                              "spool": {"dir": str(tmp_path / "spool")}, "agent": {"enabled": True}})
        daemon = build_collector(cfg, clock=ManualClock(T0))
        assert daemon.agent is not None and daemon.agent.inventory.path == cfg.state_dir / "agent-gpu-inventory.json"


class TestHardwareTestsMustPass:
    async def test_a_level_2_diag_whose_hardware_tests_were_skipped_fails(self, node: Node) -> None:
        node.shows(EIGHT)
        dcgmi = node.diag_prints("dcgmi_diag_dcgm4_r2_hardware_skipped.json")
        reply = await node.agent(dcgmi=dcgmi).handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:1", level=2))
        assert not reply.ok and reply.error.startswith("failed: did not pass (r2 needs them)")
        assert "memory (skipped)" in reply.detail and "pcie (skipped)" in reply.detail
        assert reply.evidence["memory"] == "skip" and reply.evidence["software"] == "pass"

    async def test_a_test_disabled_for_this_gpu_model_is_tolerated_and_warnings_are_reported(self,
                                                                                            node: Node) -> None:
        node.shows(EIGHT)
        dcgmi = node.diag_prints("dcgmi_diag_dcgm4_r3_power_disabled_for_sku.json")
        reply = await node.agent(dcgmi=dcgmi).handle(cmd(AgentAction.VALIDATE, "inc-1:0:2:1", level=3))
        assert reply.ok and reply.error == "" and reply.evidence["not_applicable"] == "targeted_power"
        assert reply.evidence["warnings"] == ("memory_bandwidth: GPU 1 only achieved a memory bandwidth of 3890.00 "
                                              "GB/s, failing to meet 4046.80 GB/s for test 0"), "once, not per entry"
        assert "not applicable on this GPU model" in reply.detail and "warnings: memory_bandwidth" in reply.detail
        assert reply.evidence["nccl_tests"] == "skip", "nccl_tests runs only where configured: not required"


def diag(*tests: tuple[str, Sequence[Mapping[str, object]]], key: str = "DCGM Diagnostic", **root: object) -> str:
    """A ``dcgmi diag -j`` document: (name, results) per test, all in one category."""
    return json.dumps({key: {"test_categories": [{"category": "Hardware", "tests": [
        {"name": name, "results": results} for name, results in tests]}], **root}})


PASS = [{"status": "Pass"}]
SW = ("software", PASS)
R2 = (SW, ("memory", PASS), ("pcie", PASS))
R3 = (*R2, *((n, PASS) for n in ("diagnostic", "memory_bandwidth", "targeted_stress", "targeted_power")))


def skip(info: str = "", **kw: object) -> list[dict[str, object]]:
    return [{"status": "Skip", **({"info": [info]} if info else {}), **kw}]


VERDICTS = [
    pytest.param(diag(SW), 1, True, "", id="r1-software-only"),
    pytest.param(diag(*R2), 2, True, "", id="r2-all-pass"),
    pytest.param(diag(SW, ("memory", PASS)), 2, False, "pcie (not run)", id="r2-test-missing"),
    pytest.param(diag(*R2), 3, False, "diagnostic (not run), memory_bandwidth (not run), targeted_power (not run), "
                 "targeted_stress (not run)", id="r3-with-r2-tests-only"),
    pytest.param(diag(("Denylist", PASS), ("PCIe", PASS), ("GPU Memory", [{"gpu_id": "0", "status": "Pass"},
                                                                          {"gpu_id": "1", "status": "Skip"}]),
                      key="DCGM GPU Diagnostic"), 2, False, "GPU Memory (skipped)", id="dcgm3-one-gpu-skipped"),
    pytest.param(diag(SW, ("memory", skip("Skipping test Memory because ECC is not enabled on GPU 0")),
                      ("pcie", PASS)), 2, False, "ECC is not enabled", id="ecc-off-is-no-excuse"),
    pytest.param(diag(SW, ("memory", skip()), ("pcie", PASS)), 2, False, "memory (skipped)", id="skip-no-reason"),
    pytest.param(diag(*R3[:-1], ("targeted_power", skip("The targeted_power test is skipped."))), 3, True,
                 "targeted_power", id="disabled-for-model-dcgm4"),
    pytest.param(diag(*R3[:-1], ("targeted_power", skip(warnings=[{"warning": "x", "error_id": 48}]))), 3, True,
                 "targeted_power", id="disabled-for-model-by-error-48"),
    pytest.param(diag(*R3, ("Memtest", PASS), ("Pulse Test", skip("The pulse_test test is skipped for this GPU.")),
                      key="DCGM GPU Diagnostic"), 4, True, "Pulse Test", id="disabled-for-model-dcgm3"),
    pytest.param(diag(SW, ("memory", skip("The memory test is skipped.")), ("pcie", skip("The pcie test is skipped."))),
                 2, False, "no hardware test ran", id="model-dcgm-does-not-know"),
    pytest.param(diag(*R3, ("eud", skip()), ("nccl_tests", skip()), ("nvbandwidth", skip())), 3, True, "",
                 id="optional-tests-skipped"),
    pytest.param(diag(*R2, ("eud", [{"status": "Fail"}])), 2, False, "eud", id="optional-test-failed"),
    pytest.param(diag(SW, ("memory", [{"status": "Error"}]), ("pcie", PASS)), 2, False, "memory",
                 id="unknown-status-is-a-fail"),
    pytest.param(diag(runtime_error="Unable to connect to the host engine"), 2, False, "host engine",
                 id="runtime-error"),
    pytest.param("Error: unable to establish a connection", 2, False, "not JSON", id="not-json"),
    pytest.param('{"DCGM Diagnostic": ' + "[" * 100_000 + "}", 2, False, "not JSON", id="nested-past-recursion"),
]


@pytest.mark.parametrize(("text", "level", "passed", "words"), VERDICTS)
def test_diag_verdict_table(text: str, level: int, passed: bool, words: str) -> None:
    from breakfix.collectors.agent_checks import parse_diag

    got = parse_diag(text, level)
    detail, error, evidence = got.summary()
    assert got.passed is passed and (passed or error.startswith("failed:") or got.problem)
    assert words in (detail if not got.problem else got.problem)
    if passed and words:
        assert evidence["not_applicable"] == words


def test_inventory_rules_merge_and_missing() -> None:
    from breakfix.collectors.agent_inventory import Gpu, Reading, merge, missing

    a, b = Gpu("GPU-a", 0, "0000:18:00.0"), Gpu("GPU-b", 1, "0000:2a:00.0")
    remembered = merge((), Reading((a, b)))
    assert remembered == (a, b)
    assert missing(remembered, Reading((a,))) == (b,)
    assert missing(remembered, Reading((a,), lost=(Gpu(pci_bus_id="0000:2a:00.0"),))) == (b,), "lost is not back"
    moved = Gpu("GPU-b", 0, "0000:18:00.0")  # b moved into a's slot (renumbered bus) and a is gone: a is missing
    assert missing(remembered, Reading((moved,))) == (a,)
    swapped = Gpu("GPU-c", 1, "0000:2a:00.0")  # a new card in b's slot
    assert missing(remembered, Reading((a, swapped))) == ()
    assert merge(remembered, Reading((a, swapped))) == (a, swapped)
    assert merge(remembered, Reading((Gpu("GPU-b", 7),))) == (a, Gpu("GPU-b", 7, "0000:2a:00.0")), "-L: index only"
    assert missing(remembered, Reading(), index=1) == (b,) and missing(remembered, Reading((b,)), index=0) == (a,)


def test_a_new_card_first_seen_without_its_slot_still_counts_as_its_slots_replacement() -> None:
    """``gpu_pods`` reads ``nvidia-smi -L`` (no bus ids) before any ``-q``: the new card in b's slot must not be
    recorded slotless, or its UUID would be "known" and b reported missing on every validation from then on."""
    from breakfix.collectors.agent_inventory import Gpu, Reading, merge, missing

    a, b = Gpu("GPU-a", 0, "0000:18:00.0"), Gpu("GPU-b", 1, "0000:2a:00.0")
    remembered = merge(merge((), Reading((a, b))), Reading((Gpu("GPU-a", 0), Gpu("GPU-c", 1))))  # -L after the swap
    assert remembered == (a, b), "a slotless reading refreshes, never adds"
    now = Reading((a, Gpu("GPU-c", 1, "0000:2a:00.0")))  # the validation's -q
    assert missing(remembered, now) == ()
    assert merge(remembered, now) == (a, Gpu("GPU-c", 1, "0000:2a:00.0"))


async def test_a_child_that_outlives_its_kill_never_holds_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi on a GPU that fell off the bus can sit in uninterruptible sleep, where SIGKILL does not take: the
    agent's command runner gives up after its kill wait and answers, so a reboot or validation is never held up."""
    import asyncio

    from breakfix.collectors import agent as agent_mod

    class Stuck:
        pid = 4242

        async def communicate(self) -> tuple[bytes, bytes]:
            await asyncio.sleep(3600)
            return b"", b""

        def kill(self) -> None:
            pass  # the kernel has not delivered it: the process stays

        async def wait(self) -> int:
            await asyncio.sleep(3600)
            return -9

    async def spawn(*_argv: str, **_kw: object) -> Stuck:
        return Stuck()

    monkeypatch.setattr(agent_mod.asyncio, "create_subprocess_exec", spawn)
    monkeypatch.setattr(agent_mod, "KILL_WAIT_S", 0.05)
    rc, out = await asyncio.wait_for(agent_mod.run(["nvidia-smi", "-q"], 0.05), timeout=5)
    assert rc == 124 and "timed out" in out
