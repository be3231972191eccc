"""deploy/systemd: the bare-metal units pass `systemd-analyze verify` without a warning, are hardened,
split the agent's privileges from the collector's, and their example configs validate."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
BREAKFIX = ROOT / ".venv" / "bin" / "breakfix"
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes", "DevicePolicy": "closed"}


def service(name: str) -> dict[str, str]:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / name).read_text())
    return dict(cp["Service"])


def test_units_pass_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt: systemd); the structural tests below still ran")
    names = sorted(p.name for p in UNITS.glob("*.service"))
    assert names == ["breakfix-agent.service", "breakfix-collector.service"]
    for n in names:  # the units name the installed venv; point them at this checkout's so verify finds it
        (tmp_path / n).write_text((UNITS / n).read_text().replace("/opt/breakfix/bin/breakfix", str(BREAKFIX)))
    out = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert not [ln for ln in out.stderr.splitlines() if ".service" in ln], out.stderr  # unknown keys only warn
    # systemd's own exposure score (0 best .. 10): the unprivileged collector at most 2.5, the root agent 3.0
    for n, threshold in (("breakfix-collector.service", 25), ("breakfix-agent.service", 30)):
        sec = subprocess.run([analyze, "security", "--offline=true", f"--threshold={threshold}", n], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=False)
        assert sec.returncode == 0, sec.stdout[-400:]


@pytest.mark.parametrize("unit", ["breakfix-collector.service", "breakfix-agent.service"])
def test_units_are_hardened(unit: str) -> None:
    svc = service(unit)
    for key, value in HARDENING.items():
        assert svc.get(key) == value, f"{unit}: {key}"
    assert svc["StateDirectory"].startswith("breakfix/")
    assert "--creds" in svc["ExecStart"] and "--tls-ca" in svc["ExecStart"]


def test_collector_is_a_dedicated_user_with_only_cap_syslog_and_the_agent_holds_reset_rights() -> None:
    collector, agent = service("breakfix-collector.service"), service("breakfix-agent.service")
    assert collector["User"] == "breakfix"
    assert collector["CapabilityBoundingSet"] == collector["AmbientCapabilities"] == "CAP_SYSLOG"
    assert agent["User"] == "root" and agent["CapabilityBoundingSet"] == "CAP_SYS_ADMIN"
    header = (UNITS / "breakfix-agent.service").read_text().split("[Unit]")[0]
    for why in ("nvidia-smi --gpu-reset", "CAP_SYS_ADMIN", "systemctl reboot", "dcgmi diag"):
        assert why in header, why
    assert "breakfix" in (UNITS / "breakfix.sysusers.conf").read_text().split()


def test_bare_metal_configs_validate_and_split_watching_from_acting(monkeypatch: pytest.MonkeyPatch) -> None:
    from breakfix.collectors.config import CollectorConfig

    monkeypatch.setenv("NODE_NAME", "gpu-node-000")
    collector = CollectorConfig.model_validate(yaml.safe_load((UNITS / "collector.yaml").read_text()))
    agent = CollectorConfig.model_validate(yaml.safe_load((UNITS / "agent.yaml").read_text()))
    assert not collector.agent.enabled and agent.agent.enabled
    assert agent.agent.reboot_command == ("systemctl", "reboot")
    assert collector.http_listen != agent.http_listen  # both run on one host


def test_install_doc_names_every_file_it_ships() -> None:
    doc = (UNITS / "README.md").read_text()
    for p in UNITS.iterdir():
        if p.name != "README.md":
            assert p.name in doc, p.name
