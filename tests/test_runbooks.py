"""Runbooks: one per incident category, and their machine-readable steps match the default policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
