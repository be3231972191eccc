"""The alert rules: promtool checks them and runs their unit tests (every alert fires when it should and
stays quiet when it should not), each links an existing runbook by an absolute URL on the documented base, each
reads only metrics breakfix exports, and the PrometheusRule manifest carries exactly the same rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from breakfix.collectors.daemon import Metrics as CollectorMetrics
from breakfix.collectors.metrics import AgentMetrics, FleetCollectorMetrics
from breakfix.correlator.metrics import CorrelatorMetrics
from breakfix.remediator.metrics import RemediatorMetrics
from tests.conftest import T0

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "breakfix-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "breakfix-rules.test.yaml"
OPERATOR_RULE = ROOT / "deploy" / "prometheus" / "prometheusrule.yaml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RUNBOOK_BASE = "https://git.example.com/breakfix/blob/main/runbooks/"  # the placeholder the README says to replace


def alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def exported_metric_names() -> set[str]:
    """Every sample name the daemons' registries can produce (counters with _total, histograms' series)."""
    names: set[str] = set()
    for registry in (CorrelatorMetrics().registry, CorrelatorMetrics("breakfix_fleet_stage").registry,
                     RemediatorMetrics(lambda: T0).registry, AgentMetrics().registry,
                     FleetCollectorMetrics().registry, CollectorMetrics().registry):
        for fam in registry.collect():
            names.add(fam.name)
            names.update(f"{fam.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count", "_created"))
    return names


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool not installed: apt-get install prometheus (make test does)")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_checks_the_rules_file() -> None:
    out = promtool("check", "rules", str(RULES), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_each_alert_links_an_existing_runbook_by_a_followable_url_and_reads_only_exported_metrics(
        alert: dict[str, Any]) -> None:
    url = alert["annotations"]["runbook_url"]  # opened from Alertmanager, PagerDuty or Slack: absolute
    assert url.startswith(f"{RUNBOOK_BASE}alerts/"), url
    assert (ROOT / "runbooks" / url.removeprefix(RUNBOOK_BASE)).is_file(), url
    assert RUNBOOK_BASE in (ROOT / "README.md").read_text(), "the README says which base to replace"
    assert alert["labels"]["severity"] in ("critical", "warning")
    used = set(re.findall(r"\bbreakfix_[a-z_]+", alert["expr"]))
    assert used and used <= exported_metric_names(), used - exported_metric_names()


def test_the_prometheusrule_manifest_carries_the_same_rules() -> None:
    doc = yaml.safe_load(OPERATOR_RULE.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


def prometheus_rule() -> str:
    """The PrometheusRule manifest for the rules file (``python -m tests.test_alert_rules`` prints it)."""
    head = OPERATOR_RULE.read_text().split("apiVersion:", 1)[0]
    doc = yaml.safe_load(OPERATOR_RULE.read_text())
    doc["spec"] = yaml.safe_load(RULES.read_text())
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)


def test_the_generator_reproduces_the_manifest() -> None:
    assert yaml.safe_load(prometheus_rule()) == yaml.safe_load(OPERATOR_RULE.read_text())


if __name__ == "__main__":
    print(prometheus_rule(), end="")
