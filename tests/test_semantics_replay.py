"""``breakfix replay --format json``: every incident shows its plan and the NVIDIA source behind it (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from breakfix.cli.main import app
from breakfix.schemas.signal import Signal
from tests.conftest import sig


@pytest.mark.parametrize(
    ("signals", "rule", "source"),
    [
        pytest.param([sig(code="79")], "node-reboot", "docs.nvidia.com/deploy/xid-errors",
                     id="NVIDIA Xid catalog: XID 79 RESTART_BM"),
        pytest.param([sig(code="48"), sig(code="63", at=0.1)], "gpu-drain-reset", "WORKFLOW_XID_48",
                     id="NVIDIA Xid catalog: WORKFLOW_XID_48 with 63"),
        pytest.param([sig(check="sxid", code="24007", gpu_index=None, details={"fatal": "Fatal"})], "nvswitch-fatal",
                     "Fabric Manager", id="NVIDIA Fabric Manager guide: fatal SXid"),
        pytest.param([sig(check="dcgm.health", code="DCGM_FR_CLOCKS_EVENT_THERMAL")], "monitor-only", "DCGM",
                     id="NVIDIA DCGM: MONITOR code"),
    ],
)
def test_replay_json_shows_plan_and_nvidia_source(tmp_path: Path, signals: list[Signal], rule: str,
                                                  source: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text("".join(s.model_dump_json(by_alias=True) + "\n" for s in signals))
    result = CliRunner().invoke(app, ["replay", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    incidents = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    assert len(incidents) == 1
    assert incidents[0]["plan"]["rule"] == rule
    assert source in incidents[0]["source"]
