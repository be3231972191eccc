"""Deploy manifests parse, and every breakfix command they run exists in the CLI."""

from __future__ import annotations

from pathlib import Path

import yaml

from breakfix.cli.main import app

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


def test_example_and_deployed_collector_configs_validate() -> None:
    """The shipped example and the DaemonSet's ConfigMap are valid collector configs."""
    import os

    from breakfix.collectors.config import CollectorConfig, load_config

    root = DEPLOY.parent
    os.environ.setdefault("NODE_NAME", "gpu-node-000")
    assert load_config(root / "breakfix" / "collectors" / "examples" / "collector.yaml").cluster == "prod-a"
    cm = next(d for d in yaml.safe_load_all((DEPLOY / "collector.yaml").read_text()) if d["kind"] == "ConfigMap")
    assert CollectorConfig.model_validate(yaml.safe_load(cm["data"]["collector.yaml"])).sources.dcgm.enabled


def test_remediator_configs_validate() -> None:
    """The shipped remediator example and the Deployment's ConfigMap are valid configs."""
    from breakfix.remediator.config import RemediatorConfig, load_config

    root = DEPLOY.parent
    assert load_config(root / "breakfix" / "remediator" / "examples" / "remediator.yaml").lease.enabled
    cm = next(d for d in yaml.safe_load_all((DEPLOY / "remediator.yaml").read_text()) if d["kind"] == "ConfigMap")
    assert RemediatorConfig.model_validate(yaml.safe_load(cm["data"]["remediator.yaml"])).cluster == "prod-a"
