"""The correlator: groups signals into incidents and follows their lifecycle.

Input: ``Signal``s from ``breakfix.signals.>`` and ``ActionRecord``s from
``breakfix.actions.>``. Output: ``IncidentChange``s on ``breakfix.incidents.<cluster>``.
The grouping core (``correlator.grouping``) is pure; ``correlator.service`` does the I/O.

The grouping core's modules (``NATIVE_MODULES``) may also be compiled to C with mypyc
(``tools/build_native.py``, run by ``make``) into ``_native/``, beside their sources. The compiled
modules are used only when the build's stamp names these exact sources (``native_inputs``: the modules, the rules and
the schemas) and this Python, every compiled module is there and loads, and ``BREAKFIX_PURE_CORE=1`` is not set;
otherwise the sources run as they are. Both behave the same
(``tests/test_correlator_native.py`` compares them); ``CORE_BUILD`` says which one this process runs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import sysconfig
from pathlib import Path

NATIVE_MODULES = ("model", "wire", "state", "topology", "book", "patterns", "lifecycle", "grouping")
NATIVE_DIR = Path(__file__).parent / "_native"
PURE_ENV = "BREAKFIX_PURE_CORE"


def native_inputs() -> list[Path]:
    """Every source a compiled core depends on: its modules, and the rules and schemas whose types it checks."""
    here = Path(__file__).parent
    return [*(here / f"{m}.py" for m in NATIVE_MODULES), here / "rules.py",
            *sorted((here.parent / "schemas").rglob("*.py"))]


def native_files() -> list[str]:
    """The files a complete compiled core has in ``NATIVE_DIR``: one extension per module and their shared library."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return [f"{m}{suffix}" for m in (*NATIVE_MODULES, "native__mypyc")]


def sources_digest() -> str:
    """What a compiled core must have been built from: this Python and ``native_inputs``."""
    h = hashlib.sha256(f"{sys.implementation.cache_tag} {sys.version}".encode())
    root = Path(__file__).parent.parent
    for p in native_inputs():
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _choose() -> str:
    if os.environ.get(PURE_ENV) == "1":
        return f"python ({PURE_ENV}=1)"
    try:
        stamp = (NATIVE_DIR / "STAMP").read_text(encoding="utf-8").strip()
    except OSError:
        return "python (no compiled core: make native)"
    if stamp != sources_digest():
        return "python (the compiled core is older than its sources: make native)"
    missing = [f for f in native_files() if not (NATIVE_DIR / f).is_file()]
    if missing:
        return f"python (the compiled core lacks {', '.join(missing)}: make native)"
    __path__.insert(0, str(NATIVE_DIR))  # the compiled modules are found before the sources
    try:
        importlib.import_module(f"{__name__}.native__mypyc")  # their shared library: loads, or the sources run
    except ImportError as exc:
        __path__.remove(str(NATIVE_DIR))
        return f"python (the compiled core does not load: {exc}; make native)"
    return "compiled"


CORE_BUILD = _choose()
