"""Testing a policy with the demo (the whole pipeline on a real nats-server: sim collector, correlator,
remediator, simulated cluster): the policy file is honoured as written, a scenario can make steps fail, and
``--format json`` prints the incidents and the full audit trail with refusal reasons."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from breakfix.cli.demo import load_demo_scenario, run_demo
from breakfix.remediator.policy import DEFAULT_POLICY, load_policy
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ActionKind, ActionOutcome, StepAction, WaitingOn

SCENARIO = {
    "name": "policy-bench", "description": "failing steps and a tight breaker", "nodes": 6,
    "events": [
        {"at": 0.1, "node": 0, "gpu": 2, "check": "xid", "code": "48", "tenant": False},
        {"at": 0.2, "node": 1, "gpu": 0, "check": "xid", "code": "79", "tenant": False},
        {"at": 0.3, "node": 2, "gpu": 4, "check": "xid", "code": "95", "tenant": False},
        {"at": 3.0, "node": 3, "gpu": 1, "check": "xid", "code": "79", "tenant": False},
    ],
    "failures": [
        {"node": 0, "action": "reset_gpu", "gpu": 2},
        {"node": 1, "action": "reboot"},
        {"node": 2, "action": "validate"},
    ],
}


def files(tmp: Path, **guards: Any) -> tuple[Path, Path]:
    scenario = tmp / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["settle_s"] = 0.2
    data["guards"].update({"soak_s": 0.2, "budget": {"max_nodes": 10, "max_percent": 100}, "topology_budgets": [],
                           "breaker": {"max_percent": 50, "min_nodes": 4, "window_s": 600}, **guards})
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(data))
    return scenario, policy


def test_demo_honours_the_policy_and_plays_the_scenarios_failing_steps(tmp_path: Path, catalog: Catalog) -> None:
    scenario_file, policy_file = files(tmp_path)
    scenario, failures = load_demo_scenario(str(scenario_file))
    assert len(failures) == 3
    result = asyncio.run(run_demo(scenario=scenario, nodes=6, data_dir=tmp_path / "data", catalog=catalog,
                                  policy=load_policy(policy_file), duration_s=40, policy_given=True,
                                  failures=failures, malformed=False))
    recs = result.console.actions
    by_node = {n: [r for r in recs if r.node == n] for n in ("gpu-node-000", "gpu-node-001", "gpu-node-002")}
    assert any(r.action is StepAction.RESET_GPU and r.outcome is ActionOutcome.FAILED for r in by_node["gpu-node-000"])
    assert result.cluster.nodes["gpu-node-000"].reboots == 1, "the failed reset took the reboot rung"
    assert any(r.action is StepAction.REBOOT and r.outcome is ActionOutcome.FAILED for r in by_node["gpu-node-001"])
    assert result.cluster.nodes["gpu-node-001"].cordoned, "a reboot that never came back keeps the node out"
    assert any(r.action is StepAction.VALIDATE and r.outcome is ActionOutcome.FAILED for r in by_node["gpu-node-002"])
    pages = [r for r in recs if r.kind is ActionKind.NOTIFICATION]
    assert len(pages) == 1 and "4 of 6 nodes" in pages[0].reason, "the policy's breaker (50%, 4 nodes) tripped"
    refused = [r for r in recs if r.kind is ActionKind.REFUSAL and r.node == "gpu-node-003"]
    assert refused and "circuit breaker open" in refused[0].reason
    waiting = {i.node: i.waiting for i in result.console.incidents.values()}
    assert waiting["gpu-node-003"] is WaitingOn.BREAKER, "the incident shows what it waits on, not a bare open"
    assert waiting["gpu-node-002"] is WaitingOn.APPROVAL


def test_demo_json_prints_incidents_and_the_audit_trail_with_refusal_reasons(tmp_path: Path) -> None:
    scenario_file, policy_file = files(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "from breakfix.cli.main import app; app()", "demo", "--scenario",
                           str(scenario_file), "--policy", str(policy_file), "--format", "json", "--duration", "40",
                           "--nodes", "6"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert {i["node"] for i in doc["incidents"]} >= {"gpu-node-000", "gpu-node-001", "gpu-node-002", "gpu-node-003"}
    refusals = [r for r in doc["audit"] if r["kind"] == "refusal"]
    assert refusals and all(r["reason"] for r in refusals)
    assert any(r["waiting"] == "breaker" and "circuit breaker open" in r["reason"] for r in refusals)
    assert any(r["waiting"] == "approval" and "breakfix approve" in r["reason"] for r in refusals)
