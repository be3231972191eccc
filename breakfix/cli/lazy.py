"""Deferred imports for the ``breakfix`` entry point: start-up time is part of every CLI call.

nats-py imports aiohttp at start-up for its WebSocket transport (``nats.aio.transport``), and
aiohttp builds two TLS contexts as it loads: about 0.13 s of every ``breakfix incidents``, for a
transport a ``nats://`` or ``tls://`` URL never uses. ``defer`` binds such a module's name to a
stand-in whose first attribute use imports the real module and answers from it (a ``ws://`` URL,
the collector's HTTP client, a daemon's /metrics server), so behaviour is unchanged and only the
cost moves to where it is used.

Patching an attribute of the stand-in (``mock.patch("aiohttp.X")``) before aiohttp is loaded patches
the stand-in only; patch the module that uses it instead. The standard library's
``importlib.util.LazyLoader`` is not enough here: on Python 3.11 an
``import aiohttp`` statement reads the module's ``__spec__``, which makes LazyLoader load it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

DEFERRED = ("aiohttp",)
_LOADING = threading.RLock()  # one thread swaps the stand-in for the real module


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used."""

    def __getattr__(self, attr: str) -> object:  # only for what the stand-in itself lacks
        with _LOADING:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer(name: str) -> bool:
    """Make ``import name`` cheap in this process; False when it is already loaded or not installed."""
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in
    return True


def defer_all() -> None:
    for name in DEFERRED:
        defer(name)
