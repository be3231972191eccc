"""The correlator: groups signals into incidents and follows their lifecycle.

Input: ``Signal``s from ``breakfix.signals.>`` and ``ActionRecord``s from
``breakfix.actions.>``. Output: ``IncidentChange``s on ``breakfix.incidents.<cluster>``.
The grouping core (``correlator.grouping``) is pure; ``correlator.service`` does the I/O.

The grouping core's modules (``NATIVE_MODULES``) may also be compiled to C with mypyc
(``tools/build_native.py``, run by ``make``) into ``_native/``, beside their sources. The compiled
modules are used only when the build's stamp names these exact sources and this Python, and
``BREAKFIX_PURE_CORE=1`` is not set; otherwise the sources run as they are. Both behave the same
(``tests/test_correlator_native.py`` compares them); ``CORE_BUILD`` says which one this process runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

NATIVE_MODULES = ("model", "state", "topology", "book", "patterns", "lifecycle", "grouping")
NATIVE_DIR = Path(__file__).parent / "_native"
PURE_ENV = "BREAKFIX_PURE_CORE"


def sources_digest() -> str:
    """What a compiled core must have been built from: this Python and the modules' sources."""
    h = hashlib.sha256(f"{sys.implementation.cache_tag} {sys.version}".encode())
    here = Path(__file__).parent
    for m in NATIVE_MODULES:
        h.update(m.encode() + b"\0" + (here / f"{m}.py").read_bytes())
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
    __path__.insert(0, str(NATIVE_DIR))  # the compiled modules are found before the sources
    return "compiled"


CORE_BUILD = _choose()
