"""Deploy manifests parse, and every breakfix command they run exists in the CLI."""

from __future__ import annotations

from pathlib import Path

import yaml

from breakfix.cli import app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_manifests_parse_and_name_real_commands() -> None:
    commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    for path in DEPLOY.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                cmd = c.get("command") or []
                if cmd[:1] == ["breakfix"]:
                    assert cmd[1] in commands, f"{path}: breakfix {cmd[1]} does not exist"
