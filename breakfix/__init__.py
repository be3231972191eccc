"""breakfix: event-driven GPU health and break-fix for GPU clusters.

One import namespace, five layers (each a sub-package, bottom first):

- ``breakfix.schemas``  - the wire contracts, subjects and the fault catalog (pure)
- ``breakfix.bus``      - the NATS JetStream boundary: protocols, adapters, fakes
- ``breakfix.collectors`` / ``breakfix.correlator`` / ``breakfix.remediator`` - the three stages,
  which never import each other and meet only through ``schemas`` and the bus
- ``breakfix.cli``      - the application shell: CLI, demo, replay and logging

import-linter enforces the layers (``pyproject.toml``).
"""

__version__ = "0.1.0"
