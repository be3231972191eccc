"""Runbooks: one per incident category, and their machine-readable steps match the default policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from breakfix.bus.server import EmbeddedNats
from breakfix.remediator.policy import Policy
from breakfix.schemas.catalog import default_catalog

RUNBOOKS = Path(__file__).resolve().parent.parent / "runbooks"
CATEGORIES = sorted(default_catalog().classes.categories)


def front_matter(path: Path) -> dict:  # type: ignore[type-arg]
    text = path.read_text()
    assert text.startswith("---\n"), f"{path} has no front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_has_a_runbook_whose_steps_match_the_policy(category: str, policy: Policy) -> None:
    path = RUNBOOKS / f"{category}.md"
    assert path.exists(), f"missing runbook for {category}"
    fm = front_matter(path)
    assert fm["category"] == category
    rule = next(r for r in policy.rules if r.name == fm["policy_rule"])
    assert category in rule.match.categories
    rungs = rule.rungs()
    first = rungs[0].steps if rungs else ()
    assert [s["action"] for s in fm["steps"]] == [s.action.value for s in first]
    if len(rungs) > 1:
        assert fm.get("ladder") == [r.name for r in rungs], f"{path}: front matter must name the ladder's rungs"
    assert "## What the on-call SRE does" in path.read_text()


def test_no_runbook_without_a_category() -> None:
    assert sorted(p.stem for p in RUNBOOKS.glob("*.md")) == CATEGORIES


SECTIONS = ("## What it means", "## What breakfix does", "## What the on-call SRE does", "## NVIDIA source",
            "## Check by hand", "## Release or escalate", "## RMA ticket")
ALERT_SECTIONS = ("## What it means", "## What breakfix already did, and does next", "## Check by hand",
                  "## Release or escalate", "## RMA ticket")


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_runbook_has_what_on_call_needs_at_3am(category: str) -> None:
    text = (RUNBOOKS / f"{category}.md").read_text()
    assert [s for s in SECTIONS if s not in text] == []
    source = text.split("## NVIDIA source", 1)[1].split("\n## ", 1)[0]
    assert "https://docs.nvidia.com/" in source, "cite NVIDIA's source"
    checks = text.split("## Check by hand", 1)[1].split("\n## ", 1)[0]
    assert any(cmd in checks for cmd in ("nvidia-smi", "dcgmi diag", "ibstat")), "a hardware check by hand"
    assert any(cmd in checks for cmd in ("kubectl", "breakfix audit", "breakfix incidents", "journalctl")), \
        "a cluster-side check"
    release = text.split("## Release or escalate", 1)[1].split("\n## ", 1)[0]
    front = front_matter(RUNBOOKS / f"{category}.md")
    if front["domain"] == "operator":
        assert "breakfix release <incident> --reason" in release, "say how to hand the node back"


def alert_names() -> set[str]:
    rules = yaml.safe_load((RUNBOOKS.parent / "deploy" / "prometheus" / "breakfix-rules.yaml").read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_has_exactly_one_runbook_with_the_on_call_sections() -> None:
    seen = {}
    for path in sorted((RUNBOOKS / "alerts").glob("*.md")):
        fm = front_matter(path)
        seen[fm["alert"]] = path
        text = path.read_text()
        assert [s for s in ALERT_SECTIONS if s not in text] == [], path
        assert "```" in text, f"{path}: commands to check by hand"
    assert set(seen) == alert_names()


def test_breakfix_audit_links_the_incidents_runbook(nats_server: EmbeddedNats) -> None:
    import asyncio

    from tests.test_cli_oncall import _seed, app, runner

    asyncio.run(_seed(nats_server.url))
    story = runner.invoke(app, ["audit", "inc-open", "--nats", nats_server.url])
    assert story.exit_code == 0, story.output
    (line,) = [ln.strip() for ln in story.output.splitlines() if ln.strip().startswith("runbook:")]
    assert (RUNBOOKS.parent / line.removeprefix("runbook: ")).is_file(), line
