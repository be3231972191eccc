"""Shared pieces of the ``breakfix`` command line: the typer apps, consoles, error handling.

Commands live in ``breakfix.cli.main`` (pipeline and contracts), ``breakfix.cli.cli_signals`` (offline
sources), ``breakfix.cli.cli_daemons`` (the long-running services) and ``breakfix.cli.cli_ops``
(audited human decisions). Data-file errors print ``file:line: message`` and exit 2.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from breakfix.schemas.datafile import DataFileError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GPU health and break-fix for GPU clusters.")
schema_app = typer.Typer(no_args_is_help=True, help="Wire contracts.")
app.add_typer(schema_app, name="schema")
signals_app = typer.Typer(no_args_is_help=True, help="Offline sources: print one Signal JSON per line.")
app.add_typer(signals_app, name="signals")
breaker_app = typer.Typer(help="The remediation circuit breaker.", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")

out = Console(width=None if sys.stdout.isatty() else 180)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 180)
T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


def load(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DataFileError as exc:
        raise fail(str(exc)) from None


def daemon(main: Callable[[asyncio.Event], object]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)  # type: ignore[misc]

    asyncio.run(runner())
