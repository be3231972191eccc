"""Shared pieces of the ``breakfix`` command line: the typer apps, consoles, error handling.

Commands live in ``breakfix.cli.main`` (pipeline and contracts), ``breakfix.cli.cli_signals`` (offline
sources), ``breakfix.cli.cli_daemons`` (the long-running services), ``breakfix.cli.cli_ops``
(audited human decisions) and ``breakfix.cli.cli_bus`` (keys and credentials for the bus).
Data-file errors print ``file:line: message`` and exit 2; so does a bus that cannot be reached.
``with_nats`` gives every NATS-using command the same ``--nats --creds --tls-ca --tls-cert
--tls-key`` flags (env ``BREAKFIX_NATS``...), handed to the command as one ``NatsFlags``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import structlog
import typer
from pydantic import ValidationError
from rich.console import Console

from breakfix.bus.connect import BusConnectError
from breakfix.bus.options import DEFAULT_URL, NatsOptions
from breakfix.bus.retry import ConnectAborted
from breakfix.schemas.common import first_error
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
    err.print(f"[red]error:[/red] {' '.join(message.split())}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def load(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DataFileError as exc:
        raise fail(str(exc)) from None


def daemon(main: Callable[[asyncio.Event], object]) -> None:
    """Run ``main(stop)`` until it returns; SIGINT/SIGTERM set ``stop``. A stop while still connecting
    exits 0 at once; a bus that refuses us (credentials, TLS) is one line and exit 2."""
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)  # type: ignore[misc]

    try:
        asyncio.run(runner())
    except ConnectAborted:
        structlog.get_logger("breakfix.bus").info("stopped_before_connected")
    except BusConnectError as exc:
        raise fail(str(exc)) from None


@dataclass(frozen=True, slots=True)
class NatsFlags:
    """What the NATS flags said; ``options()`` merges them over a config file's ``nats:`` section."""

    url: str | None
    creds: Path | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None

    def options(self, base: NatsOptions | None = None) -> NatsOptions:
        try:
            return (base or NatsOptions()).merged(url=self.url, creds=self.creds, tls_ca=self.tls_ca,
                                                   tls_cert=self.tls_cert, tls_key=self.tls_key)
        except ValidationError as exc:
            raise fail(f"NATS options: {first_error(exc)}") from None


def _nats_params(default_url: str | None) -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    url_help = "NATS URL(s), comma-separated" + ("." if default_url else "; without one breakfix starts its own.")

    def opt(name: str, flag: str, env: str | list[str], help_: str, default: Any = None,
            kind: Any = Path | None) -> inspect.Parameter:
        return inspect.Parameter(name, kw, default=default, annotation=Annotated[
            kind, typer.Option(flag, envvar=env, help=help_, rich_help_panel="NATS")])

    return [
        opt("nats_url", "--nats", ["BREAKFIX_NATS", "BREAKFIX_NATS_URL"], url_help, default_url, str | None),
        opt("nats_creds", "--creds", "BREAKFIX_NATS_CREDS", "NATS user credentials (from 'breakfix bus user')."),
        opt("nats_tls_ca", "--tls-ca", "BREAKFIX_NATS_CA", "CA that signed the NATS server's certificate (PEM)."),
        opt("nats_tls_cert", "--tls-cert", "BREAKFIX_NATS_CERT", "Client certificate for NATS mutual TLS (PEM)."),
        opt("nats_tls_key", "--tls-key", "BREAKFIX_NATS_KEY", "Key of the client certificate (PEM)."),
    ]


def with_nats(default_url: str | None = DEFAULT_URL) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Give a command the NATS flags; it receives them as ``nats: NatsFlags``."""
    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "nats"]

        @functools.wraps(fn)
        def wrapper(*args: Any, nats_url: str | None, nats_creds: Path | None, nats_tls_ca: Path | None,
                    nats_tls_cert: Path | None, nats_tls_key: Path | None, **kwargs: Any) -> T:
            kwargs["nats"] = NatsFlags(nats_url, nats_creds, nats_tls_ca, nats_tls_cert, nats_tls_key)
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params + _nats_params(default_url))  # type: ignore[attr-defined]
        return wrapper

    return deco
