"""The compiled grouping core (mypyc, ``tools/build_native.py``) decides exactly as its Python sources.

``make`` compiles the core before the tests, so the rest of the suite runs the compiled modules; these tests pin
that it does, that an edited source or ``BREAKFIX_PURE_CORE=1`` runs the sources instead, and that both builds
publish byte-identical changes and checkpoints over the restore tests' random mixes of every signal kind and the
remediator's records, and over the benchmark's change-heavy stress mix. Each build runs in its own process.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import orjson

import breakfix.correlator as correlator
from breakfix.correlator.checkpoint import Checkpoint
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.wire import change_json
from breakfix.schemas.catalog import default_catalog
from tests.conftest import T0
from tests.test_correlator_restore import mix, state_of, step

ROOT = Path(__file__).resolve().parent.parent


def outputs_digest(seeds: int, stress: int) -> str:
    """A digest of every change each mix publishes, in full as its JSON, and of each final checkpoint (run by the
    child processes)."""
    from benchmarks.mixes import stress_mix
    from tests.test_correlator_restore import Item, _record, mix

    catalog, h = default_catalog(), hashlib.sha256()
    runs: list[list[Item]] = [mix(random.Random(seed), 60) for seed in range(seeds)]
    runs.append([("signal", s) for s in stress_mix(stress)])
    for items in runs:
        core = Correlator(catalog)
        for kind, x in items:
            changes = core.ingest(x, x.observed_at) if kind == "signal" else _record(core, *x)
            for ch in changes:
                h.update(change_json(ch.kind, ch.incident, T0))
        h.update(Checkpoint(core.to_state()).to_json())
    return h.hexdigest()


def _child(pure: bool, seeds: int = 300, stress: int = 20_000) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != correlator.PURE_ENV}
    if pure:
        env[correlator.PURE_ENV] = "1"
    code = ("import breakfix.correlator as c, breakfix.correlator.grouping as g, tests.test_correlator_native as t; "
            f"print(c.CORE_BUILD, g.__file__, sep='|'); print(t.outputs_digest({seeds}, {stress}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    build, digest = done.stdout.strip().splitlines()[-2:]
    return build, digest


def test_make_builds_the_compiled_core_and_this_process_runs_it() -> None:
    import breakfix.correlator.grouping as grouping

    assert (correlator.NATIVE_DIR / "STAMP").exists(), "no compiled core: run `make native` (make test does)"
    assert correlator.CORE_BUILD == "compiled" or os.environ.get(correlator.PURE_ENV) == "1", correlator.CORE_BUILD
    if correlator.CORE_BUILD == "compiled":
        assert Path(grouping.__file__).parent == correlator.NATIVE_DIR


def test_compiled_and_python_cores_publish_the_same_changes_and_checkpoints() -> None:
    (native, native_digest), (pure, pure_digest) = _child(pure=False), _child(pure=True)
    assert native.startswith("compiled|") and "_native" in native, native
    assert pure.startswith("python") and pure.endswith("grouping.py"), pure
    assert native_digest == pure_digest


def test_an_edited_source_runs_as_python_until_the_core_is_rebuilt(tmp_path: Path) -> None:
    """The stamp names the sources: a compiled core older than them is not used (no stale decisions)."""
    pkg = tmp_path / "breakfix"
    shutil.copytree(ROOT / "breakfix", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    grouping = pkg / "correlator" / "grouping.py"
    grouping.write_text(grouping.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    code = ("import breakfix.correlator as c, breakfix.correlator.grouping as g; "
            "print(c.CORE_BUILD, g.__file__, sep='|')")
    env = {k: v for k, v in os.environ.items() if k != correlator.PURE_ENV} | {"PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr
    build, where = done.stdout.strip().split("|")
    assert build.startswith("python (the compiled core is older than its sources"), build
    assert where == str(grouping)


def test_a_checkpoint_written_by_one_build_loads_in_the_other() -> None:
    """Upgrades and roll-backs between an image with the compiled core and one without: the same JSON."""

    catalog = default_catalog()
    core = Correlator(catalog)
    for item in mix(random.Random(11), 80):
        step(core, item)
    blob = Checkpoint(core.to_state()).to_json()
    code = ("import sys, orjson; from breakfix.correlator.grouping import Correlator; "
            "from breakfix.schemas.catalog import default_catalog; from tests.test_correlator_restore import state_of; "
            "c = Correlator(default_catalog()); c.load_state(orjson.loads(sys.stdin.buffer.read())['state']); "
            "sys.stdout.buffer.write(orjson.dumps(state_of(c), option=orjson.OPT_SORT_KEYS))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=blob, capture_output=True, timeout=120,
                          env={**os.environ, correlator.PURE_ENV: "1"}, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert orjson.loads(done.stdout) == orjson.loads(orjson.dumps(state_of(core), option=orjson.OPT_SORT_KEYS))


def test_the_stamp_covers_every_compiled_module_the_rules_and_the_schemas() -> None:
    """An edit to any of them, or another Python, makes the compiled core stale (make runs the build every time; the
    build compares the stamp)."""
    inputs = {p.relative_to(ROOT).as_posix() for p in correlator.native_inputs()}
    assert {f"breakfix/correlator/{m}.py" for m in correlator.NATIVE_MODULES} <= inputs
    assert {"breakfix/correlator/rules.py", "breakfix/schemas/signal.py", "breakfix/schemas/catalog/__init__.py"} \
        <= inputs
