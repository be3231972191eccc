"""NVIDIA's semantics for combined signals (issue 11): the correlator core and ``decide()`` together.

Each case feeds public-contract ``Signal``s to the pure core, asks ``decide()`` for the plan of every
incident that stands on its own (not folded, not settled), and checks what an SRE would see. Every
case names the NVIDIA document it follows in its id and docstring-like ``doc`` column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from breakfix.correlator.grouping import Correlator
from breakfix.remediator.decide import ClusterView, NodeView, decide
from breakfix.remediator.policy import Policy
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.incident import Incident, IncidentScope
from breakfix.schemas.signal import Signal
from tests.conftest import sig

XID_CATALOG = "NVIDIA Xid catalog (Resolution Buckets)"
FM_GUIDE = "NVIDIA Fabric Manager User Guide App. D"
DCGM = "NVIDIA DCGM (DcgmHealthWatch.cpp, dcgm_errors.cpp)"
NVSENTINEL = "NVIDIA NVSentinel analyzer / dcgmerrorsmapping.csv"


@dataclass(frozen=True)
class Outcome:
    incidents: list[Incident]  # standing on their own: no parent, not terminal
    plans: dict[str, list[str]]  # incident id -> every action of every rung
    every: list[Incident]

    def actions(self) -> list[str]:
        return [a for p in self.plans.values() for a in p]

    def categories(self) -> list[str]:
        return sorted(i.category for i in self.incidents)


def run(catalog: Catalog, policy: Policy, signals: list[Signal]) -> Outcome:
    core = Correlator(catalog)
    for s in signals:
        core.ingest(s, s.observed_at)
    every = [t.snapshot() for t in core.incidents.values()]
    standing = [i for i in every if i.parent is None and not i.status.terminal]
    plans = {}
    for inc in standing:
        plan = decide(inc, ClusterView(), policy)
        plans[inc.id] = [s.action.value for r in (plan.ladder or ()) for s in r.steps] or \
            [s.action.value for s in plan.steps]
    return Outcome(standing, plans, every)


def xid74(gpu: int, at: float, regs: str = "0x1000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0", node: str = "n1") -> Signal:
    return sig(code="74", gpu_index=gpu, at=at, node=node,
               message=f"NVRM: Xid (PCI:0000:{18 + gpu:02x}:00): 74, NVLink: fatal error detected on link 3({regs})")


def xid154(gpu: int, at: float, action: str) -> Signal:
    return sig(code="154", gpu_index=gpu, at=at,
               message=f"NVRM: Xid (PCI:0000:{18 + gpu:02x}:00): 154, GPU recovery action changed from 0x0 (None) "
                       f"to 0x4 ({action})")


def sxid(code: str, fatal: bool, at: float, n: int = 0) -> Signal:
    word = "Fatal" if fatal else "Non-fatal"
    return sig(check="sxid", code=code, gpu_index=None, at=at, n=n, component="nvswitch0:0000:c3:00.0",
               message=f"nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): {code}, {word}, Link 28 error",
               details={"fatal": word})


def nvlink5(xid: str, sub: str, intr: int, status: int, gpu: int = 0, at: float = 0.0,
            pod: str | None = None) -> Signal:
    return sig(code=xid, gpu_index=gpu, at=at, pod=pod,
               message=f"NVRM: Xid (PCI:0018:01:00): {xid}, {sub} Fatal XC0 i0 Link 5 (0x{intr:08x} 0x{status:08x} "
                       "0x00000000 0x00000000 0x00000000 0x00000000)")


def netir_down(reason: str) -> int:
    return int("000000" + reason + "0" * 13 + "0010001", 2)


def dcgm(code: str, gpu: int = 0, at: float = 0.0) -> Signal:
    return sig(check="dcgm.health", code=code, gpu_index=gpu, at=at, message=f"dcgm health {code}")


def app(code: str, pod: str, gpu: int = 0, at: float = 0.0, node: str = "n1") -> Signal:
    return sig(code=code, pod=pod, gpu_index=gpu, at=at, node=node)


REBOOTS = {"reboot", "reprovision"}
Check = Callable[[Outcome], None]


def one(category: str, *, has: tuple[str, ...] = (), never: tuple[str, ...] = ()) -> Check:
    def check(o: Outcome) -> None:
        assert o.categories() == [category], o.categories()
        acts = o.actions()
        assert all(a in acts for a in has), acts
        assert not set(never) & set(acts), acts
    return check


def nothing_actionable(o: Outcome) -> None:
    assert not {a for a in o.actions()} - {"notify_tenant"}, o.plans


CASES = [
    # 1. the driver's verdict joins the GPU's incident
    pytest.param([sig(code="48"), xid154(0, 1, "Drain and Reset")],
                 one("gpu_drain_reset_required", has=("drain_gpu", "reset_gpu")),
                 id=f"{XID_CATALOG}: XID 154 Drain and Reset raises the XID 48 incident"),
    pytest.param([sig(code="48"), xid154(0, 1, "Node Reboot Required")], one("node_reboot_required", has=("reboot",)),
                 id=f"{XID_CATALOG}: XID 154 Node Reboot Required raises the GPU's incident, not a second one"),
    pytest.param([sig(code="94", pod="api-7d9f8c6b5-x2k4p"), xid154(0, 1, "GPU Reset Required")],
                 one("gpu_reset_required", has=("reset_gpu",)),
                 id=f"{XID_CATALOG}: XID 154 GPU Reset Required raises the one-GPU tenant incident"),
    pytest.param([sig(code="79", gpu_index=2)] + [xid74(g, 1 + g) for g in (0, 1, 3)],
                 one("node_reboot_required", has=("reboot",), never=("reset_gpu",)),
                 id=f"{XID_CATALOG}: XID 79 then peers' XID 74 fold into the 79 incident"),
    pytest.param([xid74(g, g * 0.1) for g in (0, 1, 3)] + [sig(code="79", gpu_index=2, at=2)],
                 one("node_reboot_required", has=("reboot",), never=("reset_gpu",)),
                 id=f"{XID_CATALOG}: peers' XID 74 before XID 79 fold into the 79 incident (either order)"),
    # 2. NVSwitch SXids
    pytest.param([sxid("20009", False, i, n=i) for i in range(3)], nothing_actionable,
                 id=f"{FM_GUIDE}: non-fatal SXids below the count open nothing"),
    pytest.param([sxid("20009", False, i * 10, n=i) for i in range(8)],
                 one("nvswitch_nonfatal", has=("escalate",), never=("cordon", "drain", "reboot", "reset_gpu")),
                 id=f"{FM_GUIDE}: non-fatal SXids past the count never take a node action"),
    pytest.param([sxid("24007", True, 0)] + [xid74(g, 1 + g) for g in range(4)],
                 one("nvswitch_fatal", has=("reboot",), never=("reset_gpu",)),
                 id=f"{FM_GUIDE}: a fatal SXid and the XID 74s it causes are one incident"),
    pytest.param([xid74(g, g * 0.1) for g in range(4)] + [sxid("24007", True, 1)],
                 one("nvswitch_fatal", has=("reboot",), never=("reset_gpu",)),
                 id=f"{FM_GUIDE}: XID 74s before the fatal SXid fold into it"),
    # 3. NVLink decode
    pytest.param([xid74(0, 0, "0x800001, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0")], nothing_actionable,
                 id=f"{XID_CATALOG}: WORKFLOW_NVLINK_ERR XID 74 with only ignorable bits needs no action"),
    pytest.param([xid74(g, g * 0.1) for g in range(4)],
                 lambda o: (o.categories() == ["nvlink_fault"] * 4 or pytest.fail(str(o.categories())),
                            all(p[:3] == ["cordon", "drain_gpu", "reset_gpu"] for p in o.plans.values())
                            or pytest.fail(str(o.plans))),
                 id=f"{XID_CATALOG}: WORKFLOW_NVLINK_ERR XID 74 on several GPUs is an NVLink fault, not multi-GPU"),
    pytest.param([nvlink5("145", "RLW_REMAP", 0x84, 0x1)], one("application_fault", never=("reset_gpu", "cordon")),
                 id=f"{XID_CATALOG}: XID_154_EVAL XID 145 with no XID 154 goes to the application"),
    pytest.param([nvlink5("145", "RLW_REMAP", 0x84, 0x1), xid154(0, 1, "Drain and Reset")],
                 one("gpu_drain_reset_required", has=("reset_gpu",)),
                 id=f"{XID_CATALOG}: XID_154_EVAL XID 145 with XID 154 takes the 154's action"),
    pytest.param([nvlink5("149", "NETIR_LINK_DOWN", netir_down("100110"), 0)], nothing_actionable,
                 id=f"{XID_CATALOG}: Xid 144-150 decode, XID 149 ignorable link-down reason needs no action"),
    pytest.param([nvlink5("149", "NETIR_LINK_DOWN", netir_down("000010"), 0)], one("gpu_reset_required"),
                 id=f"{XID_CATALOG}: Xid 144-150 decode, XID 149 link-down needing a reset still resets"),
    pytest.param([sig(check="nvlink.errors", code=None, component="link3", at=i, n=i) for i in range(3)],
                 one("gpu_monitor", never=("reset_gpu", "reboot", "cordon")),
                 id=f"{XID_CATALOG}: WORKFLOW_NVLINK_ERR / {NVSENTINEL}: an nvlink.errors count alone never resets"),
    # 4. application faults stay with the tenant
    pytest.param([app("31", f"api-7d9f8c6b5-{p}", gpu=g, at=i) for i, (g, p) in
                  enumerate([(0, "aaaaa"), (0, "bbbbb"), (1, "ccccc"), (1, "ddddd"), (2, "eeeee"), (2, "fffff")])],
                 one("application_fault", never=("reboot", "cordon", "drain")),
                 id=f"{NVSENTINEL}: a crash-looping Deployment's pods are one workload, not a suspect GPU"),
    pytest.param([app("43", "a-1"), app("43", "b-1", at=1)], nothing_actionable,
                 id=f"{XID_CATALOG}: XID 43 GPU remains healthy, never suspect-GPU evidence"),
    pytest.param([app("13", f"job{i}-abcde", at=i * 3600) for i in range(4)],
                 lambda o: (LEMON not in {k for i in o.every for k in i.labels} or pytest.fail("lemon")),
                 id=f"{NVSENTINEL}: application XIDs alone never make a lemon"),
    pytest.param([app("31", "train-0"), app("31", "serve-6c9d7f8b9-x2k4p", at=3600)],
                 lambda o: (o.categories() == ["application_fault", "gpu_suspect"] or pytest.fail(str(o.categories())),
                            next(p for i, p in o.plans.items() if i == next(x.id for x in o.incidents
                                                                             if x.category == "gpu_suspect"))
                            == ["cordon", "drain_gpu", "validate", "return_to_service"]
                            or pytest.fail(str(o.plans))),
                 id=f"{NVSENTINEL} / {XID_CATALOG} WORKFLOW_XID_31: XID 31 from two workloads runs diagnostics, "
                    "fences on failure"),
    pytest.param([sig(code="13", gpu_index=0), app("13", "train-0", at=130),
                  app("13", "serve-6c9d7f8b9-x2k4p", at=260)],
                 lambda o: ("gpu_suspect" in o.categories() or pytest.fail(str(o.categories()))),
                 id=f"{NVSENTINEL} / {XID_CATALOG} WORKFLOW_XID_13: an XID 13 read first without its pod still lets "
                    "two workloads make the GPU suspect"),
    pytest.param([sig(code="13", gpu_index=0)], one("application_fault", has=("escalate",), never=("cordon",)),
                 id=f"{XID_CATALOG}: RESTART_APP with no pod is tenant-unknown and reaches on-call"),
    # 5. group incidents reach their nodes
    pytest.param([sig(code="79", gpu_index=0, node=f"r{i}", at=i, labels={"rack": "rack-7"}) for i in range(4)],
                 lambda o: (o.incidents[0].scope is IncidentScope.FABRIC or pytest.fail("no fabric incident"),
                            len(o.incidents) == 1 or pytest.fail(str(o.categories())),
                            [a for a in o.actions() if a == "cordon"] == ["cordon"]  # the rack's budget: 1 of 4
                            or pytest.fail(str(o.actions())),
                            "escalate" in o.actions() or pytest.fail("no escalation")),
                 id="NVIDIA Fabric Manager guide: a rack incident fences member nodes within budget and escalates"),
    # 6. same fault, same plan, whatever the source
    pytest.param([dcgm("DCGM_FR_UNCONTAINED_ERROR")], one("gpu_reset_required", has=("reset_gpu",)),
                 id=f"{DCGM}: DCGM_FR_UNCONTAINED_ERROR plans as XID 95"),
    pytest.param([dcgm("DCGM_FR_GPU_RECOVERY_DRAIN_RESET")], one("gpu_drain_reset_required", has=("drain_gpu",)),
                 id=f"{DCGM}: DCGM_FR_GPU_RECOVERY_DRAIN_RESET plans as XID 154 Drain and Reset"),
    pytest.param([dcgm("DCGM_FR_GPU_RECOVERY_DRAIN_P2P")], one("gpu_drain_reset_required"),
                 id=f"{DCGM}: DCGM_FR_GPU_RECOVERY_DRAIN_P2P plans as XID 154 Drain P2P"),
    pytest.param([dcgm("DCGM_FR_CLOCKS_EVENT_THERMAL")], one("gpu_monitor", never=("reboot", "reprovision", "cordon")),
                 id=f"{DCGM}: a can-perform-workload code never reboots or RMAs"),
    *(pytest.param([dcgm(code)], one("gpu_monitor", never=("reboot", "reprovision", "cordon", "drain", "reset_gpu")),
                   id=f"{DCGM}: {code} (DCGM's own tooling failed) never reboots, drains or RMAs the node")
      for code in ("DCGM_FR_HOSTENGINE_CONN", "DCGM_FR_API_FAIL", "DCGM_FR_FIELD_QUERY", "DCGM_FR_CANNOT_SET_WATCHES",
                   "DCGM_FR_MEMORY_ALLOC_HOST", "DCGM_FR_NVML_API")),
    pytest.param([dcgm("DCGM_FR_CONTAINED_ERROR", at=0)], lambda o: o.every[0].category == "application_fault"
                 or pytest.fail(o.every[0].category), id=f"{DCGM}: DCGM_FR_CONTAINED_ERROR classifies as XID 94"),
    pytest.param([dcgm("DCGM_FR_UNCORRECTABLE_ROW_REMAP_LIMIT")], one("hardware_support"),
                 id=f"{DCGM}: DCGM_FR_UNCORRECTABLE_ROW_REMAP_LIMIT classifies"),
    pytest.param([dcgm("VOLATILE_DBE_DETECTED")], one("gpu_reset_required"),
                 id=f"{DCGM}: a name without the DCGM_FR_ prefix classifies"),
    pytest.param([sig(code="154", message="dcgm-exporter: last Xid 154 on gpu0: Drain and Reset")],
                 one("gpu_drain_reset_required", has=("drain_gpu", "reset_gpu")),
                 id=f"{XID_CATALOG}: dcgm-exporter's last-XID gauge 154 drains and resets like the kernel log"),
    pytest.param([sig(check="ecc.dbe", code=None), sig(check="row_remap.pending", code=None, at=1)],
                 one("gpu_drain_reset_required", has=("drain_gpu", "reset_gpu")),
                 id=f"{XID_CATALOG} WORKFLOW_XID_48: an NVML DBE with a pending remap drains and resets like 48+63"),
    pytest.param([sig(code="48"), dcgm("DCGM_FR_PENDING_ROW_REMAP", at=1)],
                 one("gpu_drain_reset_required", has=("drain_gpu", "reset_gpu")),
                 id=f"{DCGM} / {XID_CATALOG} WORKFLOW_XID_48: XID 48 with DCGM's pending row remap drains and resets"),
    pytest.param([dcgm("DCGM_FR_FALLEN_OFF_BUS", gpu=2)] + [xid74(g, 1 + g) for g in (0, 1)],
                 one("node_reboot_required", has=("reboot",), never=("reset_gpu",)),
                 id=f"{DCGM}: DCGM_FR_FALLEN_OFF_BUS folds peers' XID 74 like XID 79"),
    # 7. one fault, one incident, whichever order and source (breakfix audit of combined signals, 2026-12)
    pytest.param([sig(code="79", gpu_index=2), xid74(2, 1)], one("node_reboot_required", has=("reboot",),
                                                                   never=("reset_gpu",)),
                 id=f"{XID_CATALOG}: XID 79 then the same GPU's own XID 74 fold into the 79 incident"),
    pytest.param([dcgm("DCGM_FR_CONTAINED_ERROR")], one("application_fault", has=("reset_gpu",)),
                 id=f"{DCGM}: DCGM_FR_CONTAINED_ERROR alone resets when idle like XID 94"),
    pytest.param([app("94", "api-7d9f8c6b5-x2k4p"), dcgm("DCGM_FR_CONTAINED_ERROR", at=1)],
                 one("application_fault", has=("reset_gpu",)),
                 id=f"{DCGM}: a pod's XID 94 and DCGM's report of it are one incident with XID 94's plan"),
    pytest.param([sig(code="94"), dcgm("DCGM_FR_CONTAINED_ERROR", at=1)], one("application_fault", has=("reset_gpu",)),
                 id=f"{DCGM}: DCGM's copy of an XID 94 keeps the reset when idle"),
    pytest.param([dcgm("DCGM_FR_CONTAINED_ERROR"), app("94", "api-7d9f8c6b5-x2k4p", at=1)],
                 one("application_fault", has=("reset_gpu",)),
                 id=f"{DCGM}: DCGM's XID 94 first, then the pod's XID 94: still one incident"),
    pytest.param([sig(code="48"), xid154(0, 1, "Recover Fabric Partition")],
                 one("unknown_fault", has=("cordon", "escalate"), never=("reset_gpu", "reboot")),
                 id=f"{XID_CATALOG}: an XID 154 with an unknown recovery action makes the GPU's incident cautious"),
    pytest.param([nvlink5("145", "RLW_RXPIPE", 0x0409A4C2, 0x1)], one("gpu_reset_required", has=("reset_gpu",)),
                 id=f"{XID_CATALOG} Xid 144-150 decode: a promoted RLW_RXPIPE error (Action 2, IntrInfo V1) resets"),
    pytest.param([nvlink5("145", "RLW_RXPIPE", 0x86, 0x1)], one("gpu_reset_required", has=("reset_gpu",)),
                 id=f"{XID_CATALOG} Xid 144-150 decode: a promoted RLW_RXPIPE error (Action 2, IntrInfo V2) resets"),
    pytest.param([nvlink5("145", "RLW_RXPIPE", 0x06, 0x1)], nothing_actionable,
                 id=f"{XID_CATALOG} Xid 144-150 decode: an RLW_RXPIPE error not promoted is ignored"),
    pytest.param([sig(check="sxid", code="29999", gpu_index=None, component="nvswitch0:0004:00:00.0",
                      message="nvidia-nvswitch0: SXid (PCI:0004:00:00.0): 29999, SOE engine stalled")],
                 one("unknown_fault", has=("cordon", "escalate")),
                 id=f"{FM_GUIDE}: an unlisted SXid saying neither Fatal nor Non-fatal takes the cautious path"),
    pytest.param([sig(check="sxid", code="26006", gpu_index=None, component="nvswitch0:0004:00:00.0",
                      message="nvidia-nvswitch0: SXid (PCI:0004:00:00.0): 26006, SOE HALTED")],
                 one("nvswitch_fatal", has=("reboot",)),
                 id=f"{NVSENTINEL}: SXid 26006 SOE HALTED (RESET_FABRIC) is a fatal NVSwitch fault"),
    pytest.param([sig(check="sxid", code="26008", gpu_index=None, component="nvswitch0:0004:00:00.0",
                      message="nvidia-nvswitch0: SXid (PCI:0004:00:00.0): 26008, SOE Watchdog error")],
                 nothing_actionable, id=f"{NVSENTINEL}: SXid 26008 SOE Watchdog error (IGNORE) is only counted"),
    pytest.param([xid154(0, 0, "Drain and Reset"), nvlink5("145", "RLW_REMAP", 0x84, 0x1, at=0.5,
                                                           pod="api-7d9f8c6b5-x2k4p")],
                 one("gpu_drain_reset_required", has=("drain_gpu", "reset_gpu")),
                 id=f"{XID_CATALOG}: XID_154_EVAL after the GPU's XID 154 takes the 154's action (either order)"),
    pytest.param([xid154(0, 0, "GPU Reset Required"), app("94", "api-7d9f8c6b5-x2k4p", at=1)],
                 one("gpu_reset_required", has=("reset_gpu",)),
                 id=f"{XID_CATALOG}: a pod's XID 94 after the GPU's XID 154 joins it, no second plan"),
    pytest.param([sig(code="79"), sig(code="45", at=1)], one("node_reboot_required", has=("reboot",)),
                 id=f"{XID_CATALOG} WORKFLOW_XID_45: XID 45 after XID 79 folds into it"),
    pytest.param([app("94", "api-7d9f8c6b5-x2k4p"), sig(code="45", at=1)], one("application_fault"),
                 id=f"{XID_CATALOG} WORKFLOW_XID_45: XID 45 after a pod's XID 94 folds into it"),
    # 8. a fault that needs a human keeps the node out, whatever automatic repair joins it (every ladder ends by
    # returning the node after a passing diagnostic; CONTACT_SUPPORT and CHECK_MECHANICALS are not fixed by one)
    *(pytest.param(pair if first else pair[::-1], one("hardware_support", has=("cordon", "drain", "escalate"),
                                                      never=("reboot", "reset_gpu", "return_to_service")),
                   id=f"{XID_CATALOG}: CONTACT_SUPPORT (XID 122) and RESTART_BM ({name}) on one GPU go to support, "
                      f"{'support' if first else 'reboot'} first")
      for name, pair in (("XID 79", [sig(code="122"), sig(code="79", at=1)]),
                         ("XID 154 Node Reboot Required", [sig(code="122"), xid154(0, 1, "Node Reboot Required")]))
      for first in (True, False)),
    pytest.param([sig(code="79"), sig(code="54", at=1)],
                 one("mechanical_inspection", has=("escalate",), never=("reboot", "return_to_service")),
                 id=f"{XID_CATALOG}: CHECK_MECHANICALS (XID 54) after XID 79 on the GPU goes to a hands-on check"),
    pytest.param([sig(code="78"), sig(code="79", at=1)],
                 one("software_update", has=("reprovision",), never=("reboot",)),
                 id=f"{XID_CATALOG}: XID 79 joining an UPDATE_SWFW (XID 78) incident reprovisions, which reboots on "
                    "the way"),
    # 9. RESTART_BM repairs the whole node: one reboot plan per node, however each fault came to need it
    pytest.param([sig(code="48", gpu_index=g, at=g) for g in range(2)]
                 + [xid154(g, 10 + g, "Node Reboot Required") for g in range(2)],
                 one("node_reboot_required", has=("reboot",), never=("reset_gpu",)),
                 id=f"{XID_CATALOG}: XID 154 Node Reboot Required on two GPUs' incidents is one reboot of the node"),
    pytest.param([sig(code="48"), xid154(0, 1, "Node Reboot Required"), sig(code="79", gpu_index=3, at=2)],
                 one("node_reboot_required", has=("reboot",)),
                 id=f"{XID_CATALOG}: a GPU off the bus takes the GPU incident already needing the reboot"),
    pytest.param([app("13", "a-0"), app("31", "b-0", gpu=1, at=1)]
                 + [xid154(g, 10 + g, "Node Reboot Required") for g in range(2)],
                 one("node_reboot_required", has=("reboot",), never=("restart_pod",)),
                 id=f"{XID_CATALOG} XID_154_EVAL: two workloads' faults raised to a node reboot are one reboot"),
]
LEMON = "breakfix.io/lemon"


@pytest.mark.parametrize(("signals", "check"), CASES)
def test_combined_signals_follow_nvidia(catalog: Catalog, policy: Policy, signals: list[Signal],
                                        check: Check) -> None:
    check(run(catalog, policy, signals))


REGRESSION = [
    pytest.param([sig(code="48"), sig(code="63", at=0.1)], "gpu_drain_reset_required", ("drain_gpu", "reset_gpu"),
                 id="XID 48+63 drain and reset (WORKFLOW_XID_48)"),
    pytest.param([sig(code="79")], "node_reboot_required", ("reboot",), id="XID 79 reboots (RESTART_BM)"),
    pytest.param([app("94", "api-7d9f8c6b5-x2k4p")], "application_fault", ("notify_tenant",),
                 id="XID 94 restarts the app (RESTART_APP)"),
    pytest.param([sig(code="95")], "gpu_reset_required", ("reset_gpu",), id="XID 95 resets (RESET_GPU)"),
    pytest.param([sig(code="119")], "gpu_reset_required", ("reset_gpu",), id="XID 119 resets (RESET_GPU)"),
    pytest.param([sig(code="120")], "gpu_reset_required", ("reset_gpu",), id="XID 120 resets (RESET_GPU)"),
    pytest.param([xid154(0, 0, "GPU Reset Required")], "gpu_reset_required", ("reset_gpu",), id="XID 154 reset"),
    pytest.param([xid154(0, 0, "Drain and Reset")], "gpu_drain_reset_required", ("drain_gpu",), id="XID 154 drain"),
    pytest.param([xid154(0, 0, "Node Reboot Required")], "node_reboot_required", ("reboot",), id="XID 154 reboot"),
    pytest.param([app("13", "p-0")], "application_fault", ("notify_tenant",), id="one pod's XID 13 (RESTART_APP)"),
    pytest.param([app("13", f"job-{g}", gpu=g, at=g * 0.1) for g in range(8)], "application_fault",
                 ("notify_tenant",), id="one workload across 8 GPUs stays one tenant incident"),
    pytest.param([sig(code="173")], "unknown_fault", ("cordon", "escalate"), id="unknown code cordons, escalates"),
]


@pytest.mark.parametrize(("signals", "category", "has"), REGRESSION)
def test_single_code_results_do_not_regress(catalog: Catalog, policy: Policy, signals: list[Signal], category: str,
                                            has: tuple[str, ...]) -> None:
    """NVIDIA Xid catalog immediate buckets for single codes, as before issue 11."""
    o = run(catalog, policy, signals)
    assert o.categories() == [category]
    assert all(a in o.actions() for a in has), o.actions()
    if category == "unknown_fault":
        assert not (REBOOTS | {"reset_gpu"}) & set(o.actions())


def test_self_clearing_slowdown_resolves_before_any_action(catalog: Catalog, policy: Policy) -> None:
    """NVIDIA/DCGM THERMAL watch: a slowdown that clears is no incident left standing."""
    o = run(catalog, policy, [sig(check="clock.hw_slowdown", code=None), sig(check="clock.hw_slowdown", code=None,
                                                                            healthy=True, at=0.5)])
    assert o.incidents == []


def test_tenant_unknown_label_goes_once_a_pod_is_known(catalog: Catalog) -> None:
    """NVIDIA RESTART_APP: once the pod is known the normal tenant plan applies."""
    core = Correlator(catalog)
    for s in (sig(code="13"), sig(code="13", at=1, tenant=TenantRef(namespace="t", pod="p-0"))):
        core.ingest(s, s.observed_at)
    incs = [i.snapshot() for i in core.incidents.values()]
    assert any(i.labels.get("breakfix.io/tenant") == "unknown" for i in incs)


def test_group_plan_names_every_member_and_the_fenced_ones(catalog: Catalog, policy: Policy) -> None:
    """NVIDIA Fabric Manager guide (shared component): the group's page lists its members; the fenced ones are
    cordoned by name, at most the budgets' worth (here the rack's: 1 of its 4 nodes), never a step without a target
    node."""
    o = run(catalog, policy, [sig(code="79", gpu_index=0, node=f"r{i}", at=i, labels={"rack": "rack-7"})
                              for i in range(4)])
    plan = decide(o.incidents[0], ClusterView(), policy)
    cordons = [s.params["node"] for s in plan.steps if s.action.value == "cordon"]
    page = next(s for s in plan.steps if s.action.value == "escalate")
    assert cordons == ["r0"] and page.params["fenced"] == "r0"
    assert page.params["members"] == "r0,r1,r2,r3"


def test_dcgm_and_nvml_reports_of_one_fact_get_the_same_rule(catalog: Catalog, policy: Policy) -> None:
    """DCGM MEM watch and NVML report a pending row remap / page retirement: NVIDIA lets work continue until the
    next reset, so both wait for the GPU to go idle; neither evicts the job now."""
    for nvml, dcgm_code in (("row_remap.pending", "DCGM_FR_PENDING_ROW_REMAP"),
                            ("retired_pages.pending", "DCGM_FR_PENDING_PAGE_RETIREMENTS")):
        rules = [decide(run(catalog, policy, [s]).incidents[0], ClusterView(), policy).rule
                 for s in (sig(check=nvml, code=None), dcgm(dcgm_code))]
        assert rules == ["gpu-reset-when-idle"] * 2, (nvml, rules)


def test_a_link_down_seen_by_dcgm_or_nvml_gets_the_same_plan(catalog: Catalog, policy: Policy) -> None:
    """DCGM's NVLINK watch (DCGM_FR_NVLINK_DOWN) and NVML's link state report one fact: the same rule plans it
    (NVSentinel's mapping would reboot the node for DCGM's report and reset the GPU for NVML's)."""
    incidents = [run(catalog, policy, [s]).incidents[0] for s in
                 (sig(check="nvlink.down", code=None, component="nvlink3"), dcgm("DCGM_FR_NVLINK_DOWN"))]
    assert [i.category for i in incidents] == ["nvlink_fault"] * 2
    assert len({decide(i, ClusterView(), policy).rule for i in incidents}) == 1


def test_an_sram_threshold_seen_by_nvml_nvidia_smi_or_dcgm_is_one_hardware_support_fault_with_one_plan(
        catalog: Catalog, policy: Policy) -> None:
    """NVIDIA Xid catalog WORKFLOW_XID_48: an SRAM threshold flag set means field diag and RMA. NVML and nvidia-smi
    (``ecc.sram_threshold``) and DCGM (DCGM_FR_SRAM_THRESHOLD) report one fact: the same rule takes the node out and
    hands it to a human (cordon, drain, escalate), never a reset, a reboot or a return to service; both reports
    together are one incident counted as the NVML check."""
    incidents = [run(catalog, policy, [s]).incidents[0] for s in
                 (sig(check="ecc.sram_threshold", code=None), dcgm("DCGM_FR_SRAM_THRESHOLD"))]
    assert [i.category for i in incidents] == ["hardware_support"] * 2
    plans = [decide(i, ClusterView(), policy) for i in incidents]
    assert {p.rule for p in plans} == {"hardware-escalation"}
    for o in (run(catalog, policy, [sig(check="ecc.sram_threshold", code=None)]),
              run(catalog, policy, [dcgm("DCGM_FR_SRAM_THRESHOLD")])):
        acts = o.actions()
        assert [a for a in acts if a in ("cordon", "drain", "escalate")] == ["cordon", "drain", "escalate"], acts
        assert not (REBOOTS | {"reset_gpu", "return_to_service"}) & set(acts), acts
    both = run(catalog, policy, [sig(check="ecc.sram_threshold", code=None), dcgm("DCGM_FR_SRAM_THRESHOLD", at=1)])
    (inc,) = both.incidents
    assert inc.category == "hardware_support" and [(c.key, c.count) for c in inc.counts] == [("ecc.sram_threshold", 2)]


def resolved(core: Correlator, at: float) -> str:
    """The remediator's "plan completed" record for the only incident: it resolves."""
    from datetime import timedelta

    from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord
    from tests.conftest import T0

    iid = next(iter(core.incidents))
    core.apply_action(ActionRecord(id=f"done-{at}", cluster="c1", incident_id=iid, kind=ActionKind.PLAN,
                                   outcome=ActionOutcome.COMPLETED, actor="remediator",
                                   at=T0 + timedelta(seconds=at)), T0 + timedelta(seconds=at))
    assert core.incidents[iid].status.terminal
    return iid


@pytest.mark.parametrize(("first", "after", "flaps", "category"), [
    (sig(code="48"), sig(code="48", at=360), 1, "gpu_reset_required"),  # the same fault back: a flap
    (sig(code="48"), sig(code="45", pod="train-0", at=360), 0, "sympathetic"),  # the tenant's Ctrl-C after the repair
    (sig(code="95"), sig(code="92", at=360), 0, "informational"),  # IGNORE
    (sig(code="48"), sig(code="95", at=360), 0, "gpu_reset_required"),  # another fault: its own incident
], ids=["same-fault-reopens", "xid45-after-repair", "ignore-xid-after-repair", "another-fault-opens-its-own"])
def test_only_the_same_fault_needing_action_reopens_a_resolved_incident(
        catalog: Catalog, policy: Policy, first: Signal, after: Signal, flaps: int, category: str) -> None:
    """NVIDIA IGNORE = "No Action required"; XID 45 is the application being aborted: neither is the repaired fault
    coming back, and re-running the GPU reset for them would spend the GPU's reset budget."""
    core = Correlator(catalog)
    core.ingest(first, first.observed_at)
    iid = resolved(core, 60)
    core.ingest(after, after.observed_at)
    standing = [i.snapshot() for i in core.incidents.values() if not i.status.terminal]
    assert [(i.category, i.flaps) for i in standing] == [(category, flaps)]
    assert (standing[0].id == iid) is (flaps == 1)


def test_three_gpus_failing_together_after_a_benign_resolved_code_are_a_multi_gpu_failure(
        catalog: Catalog, policy: Policy) -> None:
    """A benign XID 63 resolved just before must not hide a host fault (XID 95 on three GPUs) behind a reopen."""
    core = Correlator(catalog)
    core.ingest(sig(code="63"), sig(code="63").observed_at)
    resolved(core, 1)
    for g in range(3):
        s = sig(code="95", gpu_index=g, at=300 + g)
        core.ingest(s, s.observed_at)
    standing = [i.snapshot() for i in core.incidents.values() if not i.status.terminal and i.parent is None]
    assert [i.category for i in standing] == ["multi_gpu_failure"]


WHOLE = ClusterView(nodes={"n1": NodeView("n1", {"nvidia.com/mig.capable": "false", "nvidia.com/gpu.replicas": "1"})})


@pytest.mark.parametrize(("view", "details", "rule", "deferred"), [
    (WHOLE, {}, "contained-error-restart", False),
    (ClusterView(), {}, "gpu-reset-when-idle", True),
    (WHOLE, {"GPU_I_ID": "3", "GPU_CI_ID": "0"}, "gpu-reset-when-idle", True),
], ids=["whole-unshared-gpu-restarts-its-app-and-resets-now", "a-gpu-not-known-whole-waits-for-it-to-go-idle",
        "an-xid-naming-a-gpu-instance-is-no-whole-gpu-whatever-the-labels"])
def test_xid94_restarts_its_app_now_on_a_whole_gpu_and_otherwise_waits(catalog: Catalog, policy: Policy,
                                                                      view: ClusterView, details: dict[str, str],
                                                                      rule: str, deferred: bool) -> None:
    """NVIDIA Xid catalog, XID 94: "the application that encountered this error must be restarted. All other
    applications running at the time of the Xid are unaffected. It is recommended to reset the GPU when convenient."
    Only where the node's labels prove the GPU whole and unshared is the application the GPU's only one."""
    core = Correlator(catalog)
    core.ingest(s := sig(code="94", pod="api-7d9f8c6b5-x2k4p", details=details), s.observed_at)
    (inc,) = [t.snapshot() for t in core.incidents.values()]
    plan = decide(inc, view, policy)
    assert plan.rule == rule and "notify_tenant" in plan.actions() and "reset_gpu" in plan.actions()
    assert any("defer_s" in st.params for st in plan.steps) is deferred
