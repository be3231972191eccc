"""Invariants of the grouping core over random mixes of every signal kind and the remediator's records.

The mixes are ``tests/test_correlator_restore.py``'s. After every signal or record:

- a node has at most one incident standing on its own whose repair reboots it (a node reboot, a fatal NVSwitch SXid,
  a multi-GPU failure) and that is not validating: NVIDIA RESTART_BM repairs the whole node, so a second one would be
  a second reboot plan for the same node (one validating after its reboot may have a successor: it takes no new
  fault);
- every fault the index names is open on a live incident that holds it, so its healthy signal clears it.
"""

from __future__ import annotations

import random

import pytest

import tests.test_correlator_restore as mixes
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.model import NODE_CATEGORIES
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import IncidentStatus

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


@pytest.mark.parametrize("nodes", [3, 8])
def test_one_reboot_incident_per_node_and_every_indexed_fault_open_where_indexed(
        catalog: Catalog, monkeypatch: pytest.MonkeyPatch, nodes: int) -> None:
    monkeypatch.setattr(mixes, "NODES", tuple(f"n{i}" for i in range(1, nodes + 1)))
    failures: list[str] = []
    for seed in range(300):
        core = Correlator(catalog)
        for n, item in enumerate(mixes.mix(random.Random(seed), 60)):
            mixes.step(core, item)
            if found := broken(core):
                failures.append(f"seed {seed} item {n}: {found[0]}")
                break
    assert not failures, f"{len(failures)} of 300 mixes broke an invariant; first: {failures[:3]}"
