"""A correlator restored from its checkpoint decides exactly as the one that never stopped.

The daemon checkpoints its core's state and, after a restart or a hand-over to another replica, resumes from it
(``correlator.service``). Any difference between the restored core and the uninterrupted one is a decision that
depends on when the process last restarted: an incident opened twice, a repair's fault forgotten, an endpoint's
impact put on another incident. These tests feed random mixes of every kind of signal the correlator groups (GPU
hardware XIDs, XID 154 recovery actions, application XIDs, DBEs, NVLink, InfiniBand links under one switch,
throttles, DCGM health, endpoint SLO breaches, healthy readings) and the remediator's records (validation started,
plan completed, plan failed) to two cores, cut one of them at random points, restore it from the checkpoint's JSON
and compare every change both publish afterwards and the final state.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import orjson

from breakfix.correlator.checkpoint import Checkpoint
from breakfix.correlator.grouping import Correlator
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import TenantRef
from breakfix.schemas.incident import ActionKind, ActionOutcome, ActionRecord, Domain, StepAction
from tests.conftest import T0, sig

NODES = tuple(f"n{i}" for i in range(1, 9))
REBOOT_154 = "GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)"
RESET_154 = "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)"
Item = tuple[str, Any]


def _signal(rng: random.Random, i: int, t: float) -> Any:
    """One signal, or a list of signals observed together."""
    node, g = rng.choice(NODES), rng.randrange(4)
    healthy = rng.random() < 0.25
    pod = f"job{g}-{rng.randrange(2)}"
    k = rng.randrange(16)
    if k == 0:
        return sig(code="13", pod=pod, gpu_index=g, at=t, n=i, node=node, healthy=healthy)
    if k == 1:
        return sig(code="94", pod=pod, gpu_index=g, at=t, n=i, node=node, healthy=healthy)
    if k == 2:
        return sig(code="154", gpu_index=g, at=t, n=i, node=node, healthy=healthy,
                   message=rng.choice((REBOOT_154, RESET_154)))
    if k == 3:
        return sig(check="ecc.dbe", code=None, gpu_index=g, at=t, n=i, node=node, healthy=healthy)
    if k == 4:
        return sig(check="nvlink.down", code=None, gpu_index=g, at=t, n=i, node=node, healthy=healthy,
                   component=f"link{rng.randrange(2)}")
    if k == 5:  # a leaf switch's links, on three nodes or one
        nodes = rng.sample(NODES, 3) if rng.random() < 0.5 else [node]
        return [sig(node=n, check="ib.link_down", code=None, gpu_index=None, at=t + j, n=i, healthy=healthy,
                    component="mlx5_0/1", labels={"switch": "leaf-01", "rack": "rack-01"})
                for j, n in enumerate(nodes)]
    if k == 6:
        return sig(check="clock.hw_slowdown", code=None, gpu_index=g, at=t, n=i, node=node, healthy=healthy)
    if k == 7:
        return sig(check="dcgm.health", code=rng.choice(("DCGM_FR_VOLATILE_DBE_DETECTED", "DCGM_FR_NVLINK_DOWN")),
                   gpu_index=g, at=t, n=i, node=node, healthy=healthy)
    if k == 8:
        serving = ",".join(rng.sample(NODES, 2))
        return sig(node="router-0", check="endpoint.ttft", code=None, gpu_index=None, at=t, n=i, healthy=healthy,
                   tenant=TenantRef(namespace="team-llm", endpoint="chat"), details={"serving_nodes": serving})
    if k == 9:
        return sig(check="gpu.lost", code=None, gpu_index=g, at=t, n=i, node=node, healthy=healthy)
    if k == 10:
        return sig(code="45", gpu_index=g, at=t, n=i, node=node, healthy=healthy, pod=pod)
    code = ("48", "79", "74", "63", "95")[k - 11]
    return sig(code=code, gpu_index=g, at=t, n=i, node=node, healthy=healthy)


def mix(rng: random.Random, n: int) -> list[Item]:
    out: list[Item] = []
    t = 0.0
    for i in range(n):
        t += rng.choice((1.0, 5.0, 30.0, 90.0, 400.0))
        r = rng.random()
        if r < 0.12:
            out.append(("action", (rng.random(), rng.choice(("validate", "done", "failed")), t)))
            continue
        got = _signal(rng, i, t)
        out.extend(("signal", s) for s in (got if isinstance(got, list) else [got]))
    return out


def _record(core: Correlator, pick: float, what: str, t: float) -> list[Any]:
    """A remediator record for one of the incidents standing on their own (what the remediator plans for)."""
    tops = sorted(i.id for i in core.incidents.values() if i.parent is None and not i.status.terminal)
    if not tops:
        return []
    inc = core.incidents[tops[int(pick * len(tops))]]
    at = T0 + timedelta(seconds=t)
    kind, outcome, action = {"validate": (ActionKind.STEP, ActionOutcome.STARTED, StepAction.VALIDATE),
                             "done": (ActionKind.PLAN, ActionOutcome.COMPLETED, None),
                             "failed": (ActionKind.PLAN, ActionOutcome.FAILED, None)}[what]
    rec = ActionRecord(id=f"r-{inc.id}-{what}-{t}", cluster="c1", incident_id=inc.id, kind=kind, outcome=outcome,
                       actor="remediator", node=inc.node, domain=Domain.OPERATOR, action=action, at=at)
    return core.apply_action(rec, at)


def step(core: Correlator, item: Item) -> list[tuple[str, str, int]]:
    kind, x = item
    changes = core.ingest(x, x.observed_at) if kind == "signal" else _record(core, *x)
    return [(c.kind.value, c.incident.id, c.incident.version) for c in changes]


def restored(core: Correlator, catalog: Catalog) -> Correlator:
    """A new core from ``core``'s checkpoint as the service stores it (JSON bytes)."""
    fresh = Correlator(catalog)
    fresh.load_state(Checkpoint.decode(Checkpoint(core.to_state()).encode()).state)
    return fresh


def state_of(core: Correlator) -> dict[str, Any]:
    state: dict[str, Any] = orjson.loads(Checkpoint(core.to_state()).to_json())["state"]
    state.pop("stats")  # counters of work done, which a restored core starts again
    return state


def divergence(catalog: Catalog, seed: int, n: int = 40) -> str | None:
    """Where a core restored at two random points first differs from the uninterrupted one (None: nowhere)."""
    rng = random.Random(seed)
    items = mix(rng, n)
    live = Correlator(catalog)
    expected = [step(live, it) for it in items]
    cuts = sorted(rng.sample(range(1, len(items)), 2))
    core = Correlator(catalog)
    for i, item in enumerate(items):
        if i in cuts:
            core = restored(core, catalog)
        got = step(core, item)
        if got != expected[i]:
            return f"seed {seed}: item {i} ({item[0]}) after restores at {cuts}: {got} != {expected[i]}"
    diff = [k for k, v in state_of(live).items() if state_of(core)[k] != v]
    return f"seed {seed}: state differs in {diff} after restores at {cuts}" if diff else None


def test_a_restored_core_publishes_the_same_changes_and_ends_in_the_same_state(catalog: Catalog) -> None:
    found = [d for seed in range(400) if (d := divergence(catalog, seed)) is not None]
    assert not found, f"{len(found)} of 400 mixes diverge after a restore; first: {found[:3]}"


def test_the_mixes_exercise_folds_fabric_groups_and_endpoint_impact(catalog: Catalog) -> None:
    """The generator reaches the state a restore must carry: folded members, fabric groups, impact."""
    seen: dict[str, Any] = {}
    for seed in range(3):
        core = Correlator(catalog)
        for item in mix(random.Random(seed), 400):
            step(core, item)
            seen.update((i.id, i) for i in core.incidents.values())  # fabric incidents resolve and expire in a run
    assert any(i.parent for i in seen.values())
    assert any(i.scope.value == "fabric" for i in seen.values())
    assert any(i.impact for i in seen.values())
