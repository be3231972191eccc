"""Invariants of the grouping core over random mixes of every signal kind and the remediator's records.

The mixes are ``tests/test_correlator_restore.py``'s. After every signal or record:

- a node has at most one incident standing on its own whose repair reboots it (a node reboot, a fatal NVSwitch SXid,
  a multi-GPU failure) and that is not validating: NVIDIA RESTART_BM repairs the whole node, so a second one would be
  a second reboot plan for the same node (one validating after its reboot may have a successor: it takes no new
  fault);
- every fault the index names is open on a live incident that holds it, so its healthy signal clears it;
- after a healthy signal, no live incident still holds its fault from before it (a parent's copy of its member's
  fault, an endpoint breach counted on several hardware incidents as its serving nodes moved), unless the fault
  came back later on another incident. XIDs aside: they are events, no collector sends a healthy XID, and every XID
  code of one GPU shares the GPU's ``xid`` fault key, held apart by its workload's incident and its hardware one.
"""

from __future__ import annotations

import random

import pytest

import tests.test_correlator_restore as mixes
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.model import NODE_CATEGORIES
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import IncidentStatus
from breakfix.schemas.signal import Signal

REBOOTS = NODE_CATEGORIES | {"multi_gpu_failure"}


def broken(core: Correlator) -> list[str]:
    found: list[str] = []
    standing: dict[str, list[str]] = {}
    for inc in core.incidents.values():
        if inc.node is not None and inc.parent is None and not inc.status.terminal and inc.category in REBOOTS \
                and inc.status is not IncidentStatus.VALIDATING:
            standing.setdefault(inc.node, []).append(f"{inc.id} {inc.scope.value} {inc.category}")
    found += [f"{node}: {len(incs)} reboot incidents standing: {incs}" for node, incs in standing.items()
              if len(incs) > 1]
    for fault, iid in core.state.by_fault.items():
        inc = core.incidents.get(iid)
        if inc is None or inc.status.terminal or fault not in inc.open_faults:
            found.append(f"{fault} indexed on {iid}, which does not hold it open")
    return found


def left_open(core: Correlator, healthy: Signal) -> list[str]:
    if healthy.check == "xid":
        return []
    fault, at = healthy.fault_key(), healthy.observed_at
    held = {inc.id: inc.open_faults[fault] for inc in core.incidents.values()
            if not inc.status.terminal and fault in inc.open_faults}
    if any(opened > at for opened in held.values()):
        return []  # back since on some incident: a healthy reading older than the fault clears nothing
    return [f"{fault} still open on {iid} after its healthy signal" for iid in held]


@pytest.mark.parametrize("nodes", [3, 8])
def test_one_reboot_incident_per_node_and_every_fault_open_where_indexed_and_closed_when_healthy(
        catalog: Catalog, monkeypatch: pytest.MonkeyPatch, nodes: int) -> None:
    monkeypatch.setattr(mixes, "NODES", tuple(f"n{i}" for i in range(1, nodes + 1)))
    failures: list[str] = []
    for seed in range(300):
        core = Correlator(catalog)
        for n, item in enumerate(mixes.mix(random.Random(seed), 60)):
            mixes.step(core, item)
            kind, x = item
            if found := broken(core) + (left_open(core, x) if kind == "signal" and x.healthy else []):
                failures.append(f"seed {seed} item {n}: {found[0]}")
                break
    assert not failures, f"{len(failures)} of 300 mixes broke an invariant; first: {failures[:3]}"
