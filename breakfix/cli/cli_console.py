"""``breakfix console``: the SRE web console over NATS; ``breakfix console-token``: a built-in user's token.

The console itself lives in ``breakfix.console``; this module parses options and runs it until
Ctrl-C. Without ``--auth`` it runs in lab mode (local user as admin), on loopback only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from breakfix.cli.cliutil import NatsFlags, app, daemon, fail, load, out, with_nats


@app.command()
@with_nats()
def console(
    nats: NatsFlags,
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on.")] = "127.0.0.1:8080",
    auth: Annotated[Path | None, typer.Option(envvar="BREAKFIX_CONSOLE_AUTH",
                                              help="Auth config YAML (users or proxy mode).")] = None,
    records_days: Annotated[float, typer.Option(min=1, max=90, help="Days of audit records held for the fleet, "
                                                "history and silences views.")] = 7.0,
) -> None:
    """Serve the SRE console (incidents, fleet, history, on-call actions) until Ctrl-C."""
    import getpass

    from breakfix.cli import logs
    from breakfix.console.auth import AuthConfig, load_auth
    from breakfix.console.oncall import BUS_ERRORS
    from breakfix.console.server import serve

    logs.configure(json=True, level="INFO")
    cfg = load(lambda: load_auth(auth)) if auth else AuthConfig(mode="lab", lab_user=getpass.getuser())
    opts = nats.options()

    async def main(stop: asyncio.Event) -> None:
        await serve(opts, listen=listen, auth=cfg, stop=stop, records_days=records_days,
                    announce=lambda u: out.print(f"breakfix console on {u} ({cfg.mode} mode); Ctrl-C stops it"))

    try:
        daemon(main)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except BUS_ERRORS as exc:
        raise fail(f"cannot reach NATS at {opts.url}: {exc or type(exc).__name__}") from None


@app.command("console-token")
def console_token(
    name: Annotated[str, typer.Argument(help="User name.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
) -> None:
    """Make a random token for a built-in console user; prints the token and the users: entry (argon2 hash)."""
    from breakfix.console.auth import hash_token, new_token
    from breakfix.console.verbs import Role

    if role not in {r.value for r in Role}:
        raise fail(f"--role must be viewer, operator or admin, not {role!r}")
    token = new_token()
    out.print(f"token (give it to {name}, it is not stored): {token}", highlight=False)
    out.print(f"  - {{name: {name}, role: {role}, token_hash: '{hash_token(token)}'}}", highlight=False)


DEMO_LISTEN = "127.0.0.1:8080"


def demo_console(data_dir: Path, *, serve: bool, listen: str = DEMO_LISTEN) -> None:
    """The demo's closing lines: where the console is; with ``serve``, serve it over the demo's data
    (nats-server restarted on the demo's JetStream store) until Ctrl-C."""
    import getpass

    from breakfix.bus.server import EmbeddedNats
    from breakfix.console.auth import AuthConfig
    from breakfix.console.server import serve as serve_console

    if not serve:
        out.print(f"\nconsole: [bold]breakfix demo --console[/bold] serves these incidents at http://{listen} "
                  "until Ctrl-C (or [bold]breakfix console --nats URL[/bold] on a running pipeline)")
        return
    server = EmbeddedNats(data_dir / "nats").start()
    try:
        async def main(stop: asyncio.Event) -> None:
            await serve_console(server.url, listen=listen, auth=AuthConfig(mode="lab", lab_user=getpass.getuser()),
                                stop=stop,
                                announce=lambda u: out.print(f"\nconsole: [bold]{u}[/bold] (the demo's incidents, "
                                                             "lab mode); Ctrl-C stops it"))

        daemon(main)
    except OSError as exc:
        raise fail(f"cannot serve the console on {listen}: {exc.strerror or exc}") from None
    finally:
        server.stop()
