"""``breakfix simulate``: a month of a fleet's failures in seconds, through the real correlator,
``decide()``, guards and executor, comparing policies and baselines side by side.

``model`` (the failure model, data) -> ``trace`` (the faults, one list per seed) -> ``engine``
(discrete-event run per contender against ``fleet``, the simulated cluster, into a ``ledger``)
-> ``report`` (table, ``report.json``, plots). ``run.simulate`` ties them together for the CLI,
the benchmarks and the tests.
"""
