"""The built wheel installs one top-level import name, ``breakfix``, and its entry point works."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_wheel_adds_no_top_level_package_but_breakfix(tmp_path: Path) -> None:
    """pip-installing the wheel next to other distributions cannot shadow ``schemas``, ``bus``, ..."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("breakfix-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/", 1)[0] for n in zf.namelist()}
        names = zf.namelist()
    tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert tops == {"breakfix"}
    # package data travels with the code: catalog, rules, policies, scenarios, JSON schemas
    for data in ("breakfix/schemas/catalog/xid_catalog.csv", "breakfix/correlator/rules/default.yaml",
                 "breakfix/remediator/policies/default.yaml", "breakfix/collectors/scenarios/mixed.yaml"):
        assert any(n == data for n in names), data
    # install the wheel into a fresh target folder (its dependencies come from this venv) and import from it
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".data"))} <= {"breakfix", "bin"}
    probe = subprocess.run([sys.executable, "-c", "import breakfix, breakfix.schemas.catalog as c; "
                            "print(breakfix.__file__, len(c.load_catalog().xids) > 100)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert probe.stdout.startswith(str(site)) and probe.stdout.split()[-1] == "True"
