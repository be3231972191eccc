"""The garbage collector's settings for a long-running daemon, applied once it is built.

Called by the CLI's daemon commands (``breakfix correlator``, ``breakfix remediator``, ``cli.cli_daemons``)
and by the benchmarks that time those daemons in-process (``benchmarks/``), so both run under the same
settings. Nothing here reads or writes anything but the interpreter's collector.

Why: CPython's cyclic collector runs a full pass over every tracked object each time the heap grows by a
quarter past ten middle passes (default thresholds 700, 10, 10). A daemon's heap is mostly state it keeps on
purpose (open incidents, plans, views), so the full passes find nothing and cost more the more it holds:
during a burst of 1,000 incidents the remediator ran 4 of them, 30-110 ms each, about a third of the burst's
0.7 s, and the correlator spent 6-14 % of a stress run in them (measured with ``gc.callbacks``). Young passes
every 10,000 allocations and full passes after 100 middle ones leave refcounting to free what the daemon
drops, as it does, and still collect cycles.
"""

from __future__ import annotations

import gc

DAEMON_GC_THRESHOLDS = (10_000, 50, 100)


def settle_heap(thresholds: tuple[int, int, int] = DAEMON_GC_THRESHOLDS) -> None:
    """Collect the start-up's garbage, freeze what is left (modules, policy, catalog, rules: the full passes skip
    it from now on) and space out the collector's passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
