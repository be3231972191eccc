"""The breakfix application shell: CLI, settings, logging, and the wiring of each daemon.

This is the top layer: it builds the collectors, correlator and remediator from their
adapters (NATS, simulated cluster) and starts them. Nothing below imports it.
"""



from breakfix.cli.lazy import defer_all

defer_all()  # before the commands import nats: see breakfix.cli.lazy
