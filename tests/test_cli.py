"""The command line: replay's JSON contract, and clear file:line errors instead of tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from breakfix.cli.main import app
from breakfix.schemas.incident import Incident
from tests.conftest import sig

BREAKFIX = str(Path(sys.executable).parent / "breakfix")
runner = CliRunner()


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    signals = [
        sig(code="13", pod="train-0", gpu_index=1, node="n2"),
        sig(code="48", gpu_index=3, at=1), sig(code="63", gpu_index=3, at=1.2),
        sig(code="79", gpu_index=6, node="n7", at=2),
        sig(code="173", gpu_index=0, node="n11", at=3),
        sig(code="48", gpu_index=3, at=1),  # a re-send
    ]
    return write_jsonl(tmp_path / "signals.jsonl", [s.model_dump_json(by_alias=True) for s in signals])


class TestReplay:
    def test_json_output_is_one_incident_with_plan_per_line(self, recorded: Path) -> None:
        result = runner.invoke(app, ["replay", str(recorded), "--format", "json"])
        assert result.exit_code == 0, result.output
        incidents = [Incident.model_validate_json(line) for line in result.stdout.splitlines()]
        by_cat = {i.category: i for i in incidents}
        assert set(by_cat) == {"application_fault", "gpu_drain_reset_required", "node_reboot_required",
                               "unknown_fault"}
        assert all(i.plan is not None for i in incidents)
        assert by_cat["gpu_drain_reset_required"].plan.actions() == [  # type: ignore[union-attr]
            "cordon", "drain_gpu", "reset_gpu", "validate", "return_to_service"]
        assert by_cat["gpu_drain_reset_required"].signal_count == 2, "the re-send is counted once"
        assert by_cat["unknown_fault"].plan.actions() == ["cordon", "escalate"]  # type: ignore[union-attr]
        assert json.loads(result.stdout.splitlines()[0])["schema"] == "breakfix.incident/v1"

    def test_replay_uses_observed_at_as_clock(self, tmp_path: Path) -> None:
        """A fault, its clear 5 s later, and a recurrence 2 h later (outside the flap window) are two incidents."""
        lines = [sig(check="clock.hw_slowdown", code=None).model_dump_json(by_alias=True),
                 sig(check="clock.hw_slowdown", code=None, healthy=True, at=5).model_dump_json(by_alias=True),
                 sig(check="clock.hw_slowdown", code=None, at=timedelta(hours=2).total_seconds())
                 .model_dump_json(by_alias=True)]
        result = runner.invoke(app, ["replay", str(write_jsonl(tmp_path / "s.jsonl", lines)), "--format", "json"])
        statuses = [Incident.model_validate_json(x).status.value for x in result.stdout.splitlines()]
        assert statuses == ["resolved", "open"]

    def test_table_output(self, recorded: Path) -> None:
        result = runner.invoke(app, ["replay", str(recorded)])
        assert result.exit_code == 0
        assert "gpu_drain_reset_required" in result.stdout

    def test_broken_line_names_file_and_line(self, recorded: Path) -> None:
        lines = recorded.read_text().splitlines()
        lines.insert(2, '{"schema": "breakfix.signal/v1", "id": ')
        bad = write_jsonl(recorded, lines)
        proc = subprocess.run([BREAKFIX, "replay", str(bad), "--format", "json"], capture_output=True, text=True)
        assert proc.returncode == 2
        assert f"{bad}:3: invalid signal" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""

    def test_skip_invalid_reports_and_goes_on(self, recorded: Path) -> None:
        lines = recorded.read_text().splitlines()
        lines.insert(1, "not json")
        result = runner.invoke(app, ["replay", str(write_jsonl(recorded, lines)), "--format", "json",
                                     "--skip-invalid"])
        assert result.exit_code == 0
        assert len(result.stdout.splitlines()) == 4
        assert ":2: invalid signal" in result.stderr


class TestBadInput:
    def test_malformed_scenario_names_file_and_line(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: bad\nnodes: 4\nevents:\n  - {at: 0.1, node: 1, gpu: 2, code: '48'}\n"
                       "  - {at: -1, node: 1, code: '48'}\n")
        proc = subprocess.run([BREAKFIX, "demo", "--scenario", str(bad)], capture_output=True, text=True)
        assert proc.returncode == 2
        assert f"{bad}:5: events.1.at" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_policy_with_unknown_action_names_file_and_line(self, tmp_path: Path, recorded: Path) -> None:
        bad = tmp_path / "policy.yaml"
        bad.write_text("version: 1\nrules:\n  - name: r\n    domain: operator\n    reason: x\n"
                       "    match: {categories: [gpu_reset_required]}\n    steps:\n      - action: yeet_gpu\n")
        proc = subprocess.run([BREAKFIX, "replay", str(recorded), "--policy", str(bad)], capture_output=True,
                              text=True)
        assert proc.returncode == 2
        assert f"{bad}:8: rules.0.steps.0.action" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_unknown_scenario_lists_bundled_ones(self) -> None:
        result = runner.invoke(app, ["demo", "--scenario", "nope"])
        assert result.exit_code == 2
        assert "mixed" in result.stderr

    def test_missing_signals_file(self, tmp_path: Path) -> None:
        result = runner.invoke(app, ["replay", str(tmp_path / "none.jsonl")])
        assert result.exit_code == 2
        assert "cannot read" in result.stderr


class TestSchemaAndCatalog:
    def test_schema_check_passes_on_committed_files(self) -> None:
        assert runner.invoke(app, ["schema", "check"]).exit_code == 0

    def test_catalog_shows_source(self) -> None:
        result = runner.invoke(app, ["catalog", "79"])
        assert result.exit_code == 0
        assert "node_reboot_required" in result.stdout and "docs.nvidia.com" in result.stdout


class TestFirstFiveMinutes:
    def test_version_prints_the_package_version(self) -> None:
        result = runner.invoke(app, ["--version"])
        assert result.exit_code == 0 and result.stdout.startswith("breakfix ")

    def test_catalog_human_summary_names_mnemonic_buckets_architectures_and_runbook(self) -> None:
        result = runner.invoke(app, ["catalog", "48"])
        assert result.exit_code == 0
        for part in ("ROBUST_CHANNEL_GPU_ECC_DBE", "immediate WORKFLOW_XID_48", "investigatory WORKFLOW_XID_48",
                     "A100, H100", "runbooks/gpu_reset_required.md"):
            assert part in result.stdout

    def test_catalog_json_on_request(self) -> None:
        result = runner.invoke(app, ["catalog", "xid79", "--format", "json"])
        data = json.loads(result.stdout)
        assert (data["mnemonic"], data["immediate_bucket"], data["runbook"]) == (
            "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", "RESTART_BM", "runbooks/node_reboot_required.md")
        assert "H100" in data["architectures"]

    @pytest.mark.parametrize("code", ["abc", "nvlink", "", "DCGM_XYZ"])
    def test_catalog_input_that_is_no_code_is_an_error_with_a_hint(self, code: str) -> None:
        result = runner.invoke(app, ["catalog", code])
        assert result.exit_code == 2 and "XID number" in result.stderr

    def test_unknown_xid_number_is_the_cautious_path(self) -> None:
        result = runner.invoke(app, ["catalog", "173"])
        assert result.exit_code == 0 and "unknown_fault" in result.stdout

    def test_status_in_brackets_survives_and_table_fits_80_columns(self) -> None:
        from io import StringIO

        from rich.console import Console

        from breakfix.cli.render import incident_table, plural
        from breakfix.schemas.incident import Incident

        inc = Incident.model_validate({
            "id": "inc-7f3a2b1c", "cluster": "c1", "scope": "gpu", "category": "gpu_reset_required",
            "domain": "operator", "severity": "critical", "status": "resolved", "node": "node-017",
            "first_seen": "2026-01-01T00:00:00Z", "last_seen": "2026-01-01T00:00:00Z"})
        buf = StringIO()
        console = Console(file=buf, width=80)
        console.print(incident_table([inc], "Incidents [resolved]"))
        text = buf.getvalue()
        assert "inc-7f3a2b1c" in text and "[resolved]" in text
        assert max(len(x) for x in text.splitlines()) <= 80
        assert (plural(1, "incident"), plural(2, "incident")) == ("1 incident", "2 incidents")
