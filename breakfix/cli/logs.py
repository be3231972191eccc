"""structlog set-up: JSON lines for daemons, readable text for the CLI.

Daemon loggers bind ``node``, ``gpu`` and ``incident`` where they know them.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def configure(*, json: bool, level: str = "INFO") -> None:
    """``BREAKFIX_LOG_LEVEL`` in the environment overrides ``level`` (daemons under load run WARNING)."""
    level = os.environ.get("BREAKFIX_LOG_LEVEL", level)
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # Resolve sys.stderr at each use: a test runner may swap and close streams.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
