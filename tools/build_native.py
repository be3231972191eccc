"""Compile the correlator's grouping core to C with mypyc, into ``breakfix/correlator/_native/``.

Input: the core's sources (``breakfix.correlator.NATIVE_MODULES``, typed for mypy strict). Output: one
extension per module plus their shared library (group ``breakfix.correlator.native``), and a ``STAMP``
with ``breakfix.correlator.sources_digest()``, written last: ``breakfix/correlator/__init__.py`` puts
``_native/`` first on the package's path only when the stamp matches the sources it sits beside, so an
edited source runs as Python until this runs again. ``make`` runs it before the tests, the demo and the
benchmarks. Needs a C compiler and the Python headers; the build happens in a scratch directory.

    python tools/build_native.py            # build (skipped when the stamp already matches)
    python tools/build_native.py --force    # build anyway
    python tools/build_native.py --clean    # remove the compiled core (the sources run)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from breakfix.correlator import (  # noqa: E402
    CORE_BUILD,
    NATIVE_DIR,
    NATIVE_MODULES,
    PURE_ENV,
    native_files,
    sources_digest,
)

_SETUP = """
from setuptools import setup
from mypyc.build import mypycify
setup(name="breakfix-native", packages=[], script_args=["build_ext", "--inplace"],
      ext_modules=mypycify({paths!r}, opt_level="3", debug_level="0", group_name="breakfix.correlator.native"))
"""


def build() -> None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="breakfix-native-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "breakfix", work / "breakfix", ignore=shutil.ignore_patterns("__pycache__", "_native"))
        shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")  # the same mypy options (pydantic plugin)
        paths = [f"breakfix/correlator/{m}.py" for m in NATIVE_MODULES]
        (work / "setup.py").write_text(_SETUP.format(paths=paths), encoding="utf-8")
        env = {**os.environ, "MYPY_CACHE_DIR": str(work / ".mypy_cache")}
        done = subprocess.run([sys.executable, "setup.py"], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"build_native: mypyc failed (exit {done.returncode}); the sources still run as Python")
        built = sorted((work / "breakfix" / "correlator").glob(f"*{suffix}"))
        names = {p.name for p in built}
        wanted = set(native_files())
        if not wanted <= names:
            raise SystemExit(f"build_native: mypyc did not produce {sorted(wanted - names)}")
        clean()
        NATIVE_DIR.mkdir()
        for p in built:
            shutil.copy2(p, NATIVE_DIR / p.name)
    (NATIVE_DIR / "STAMP").write_text(sources_digest() + "\n", encoding="utf-8")


def clean() -> None:
    if NATIVE_DIR.exists():
        shutil.rmtree(NATIVE_DIR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="build even when the stamp matches")
    ap.add_argument("--clean", action="store_true", help="remove the compiled core")
    args = ap.parse_args()
    if args.clean:
        clean()
        return
    stamp = NATIVE_DIR / "STAMP"
    usable = CORE_BUILD == "compiled" or os.environ.get(PURE_ENV) == "1"  # stamp, modules, and it loads
    if not args.force and usable and stamp.exists() and stamp.read_text(encoding="utf-8").strip() == sources_digest():
        stamp.touch()  # for make: up to date
        print("build_native: the compiled core matches its sources")
        return
    build()
    print(f"build_native: compiled {', '.join(NATIVE_MODULES)} into {NATIVE_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
