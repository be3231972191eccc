"""``breakfix bus init`` and ``breakfix bus user``: keys, certificates and credentials for a secured bus.

``init`` writes an operator, the cluster's account with one scoped signing key per role, a CA and a
server certificate, and a nats-server config (TLS with client certificates, JWT auth, monitor port on
loopback) into one directory. ``user`` issues one identity: a .creds file (user JWT + seed) and a client
certificate, for a node (``--node N``) or a role (``--role R --name NAME``); a person's (operator, admin,
viewer) expire after a day unless ``--expires`` says otherwise, a service's and a node's never. ``roles`` gives
the roles of an existing bus the permissions of this version (after an upgrade) without changing any key.
Everything is written by ``breakfix.bus.authinit``; daemons and commands read the files through
``--creds --tls-*``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from breakfix.cli.cliutil import app, fail, out

bus_app = typer.Typer(no_args_is_help=True, help="Keys, certificates and credentials for a secured bus.")
app.add_typer(bus_app, name="bus")

# names the deploy manifests use for the same roles: a node's collector and agent share the node identity
ALIASES = {"collector": "node", "agent": "node", "fleet-collector": "fleet", "correlator-fleet": "correlator"}
SERVICES = ("correlator", "remediator", "fleet", "console")  # one identity each: the name defaults to the role

MIN_EXPIRY = timedelta(seconds=60)
MAX_EXPIRY = timedelta(days=366)

BusDir = Annotated[Path, typer.Option("--dir", envvar="BREAKFIX_BUS_DIR",
                                      help="Where the bus's keys, certificates and server config live.")]


@bus_app.command("init")
def bus_init(
    cluster: Annotated[str, typer.Option(envvar="BREAKFIX_CLUSTER", help="Cluster the bus serves.")],
    directory: BusDir = Path("breakfix-bus"),
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Name or IP clients use for the server (repeat); default localhost and 127.0.0.1.")] = None,
    hosts: Annotated[str | None, typer.Option(help="The same, comma-separated.")] = None,
    listen: Annotated[str, typer.Option(help="Client address and port of nats-server.")] = "0.0.0.0:4222",
    monitor_port: Annotated[int, typer.Option(min=0, max=65535,
                                              help="Monitoring port, bound to 127.0.0.1; 0 turns it off.")] = 8222,
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys (every credential changes).")] = False,
) -> None:
    """Create the operator, account, role signing keys, CA, server certificate and nats-server config."""
    from breakfix.bus.authinit import BusAuthError, init_bus

    names = tuple(dict.fromkeys([*(host or []), *(h.strip() for h in (hosts or "").split(",") if h.strip())]))
    try:
        conf = init_bus(directory, cluster=cluster, hosts=names or ("localhost", "127.0.0.1"), listen=listen,
                        monitor_port=monitor_port, force=force, now=datetime.now(UTC))
    except (BusAuthError, OSError) as exc:
        raise fail(str(exc)) from None
    out.print(f"wrote {conf} (start: nats-server -c {conf})", highlight=False)
    out.print(f"issue identities: breakfix bus user --dir {directory} --node NODE | --role ROLE --name NAME",
              highlight=False)


@bus_app.command("roles")
def bus_roles(directory: BusDir = Path("breakfix-bus")) -> None:
    """Give every role this version's permissions: re-sign the account, keep every key and credential."""
    from breakfix.bus.authinit import BusAuthError, refresh_roles

    try:
        conf = refresh_roles(directory, now=datetime.now(UTC))
    except (BusAuthError, OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    out.print(f"updated {conf}; apply it with 'nats-server --signal reload' (or a restart); issued credentials "
              "stay valid", highlight=False)


def parse_expiry(text: str) -> float | None:
    """``--expires``: ``never`` (None) or a duration (``30m``, ``12h``, ``7d``) between a minute and 366 days, in
    seconds; anything else is a one-line error (exit 2)."""
    from breakfix.cli.cli_ops import parse_duration  # the on-call verbs' durations (silence --for)

    if text.strip().lower() == "never":
        return None
    bounds = f"--expires {text!r}: between 60s and 366d, or 'never'"
    try:
        span = parse_duration(text)
    except OverflowError:  # more days than timedelta holds
        raise fail(bounds) from None
    if not MIN_EXPIRY <= span <= MAX_EXPIRY:
        raise fail(bounds)
    return span.total_seconds()


def _expiry_line(expires: datetime | None, now: datetime) -> str:
    if expires is None:
        return "the credentials do not expire (rotate them by issuing new ones)"
    left = max(0, round((expires - now).total_seconds()))
    days, rest = divmod(left, 86400)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (rest // 3600, "h"), (rest % 3600 // 60, "m")) if n]
    return f"the credentials expire at {expires.isoformat()} (in {' '.join(parts) or f'{left}s'})"


@bus_app.command("user")
def bus_user(
    directory: BusDir = Path("breakfix-bus"),
    node: Annotated[str | None, typer.Option(help="Issue a node identity (collector and agent) for NODE.")] = None,
    role: Annotated[str | None, typer.Option(
        help="correlator, fleet, remediator, operator, admin or viewer (aliases: collector and agent with "
             "--node, fleet-collector, correlator-fleet).")] = None,
    name: Annotated[str | None, typer.Option(help="The identity's name (a person's login for operator/admin).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write (default DIR/users).")] = None,
    partition: Annotated[int | None, typer.Option(min=0, help="Correlator partition (name correlator-pP).")] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", metavar="DURATION",
        help="How long the credentials connect: 30m, 12h, 7d (60s to 366d) or 'never'. Default: 24h for a person "
             "(operator, admin, viewer), never for a service or a node.")] = None,
) -> None:
    """Write NAME.creds (user JWT + seed) and a client certificate NAME.crt/NAME.key."""
    from breakfix.bus.authinit import ROLE_DEFAULT, BusAuthError, issue_user

    lifetime = ROLE_DEFAULT if expires is None else parse_expiry(expires)

    requested = role
    role = ALIASES.get(role, role) if role else None
    if node is not None and role in (None, "node"):
        role, name = "node", node
    elif node is not None or role is None:
        raise fail("give either --node NODE or --role ROLE --name NAME")
    if role == "correlator" and partition is not None:
        name = name or f"correlator-p{partition}"
    name = name or (requested if role in SERVICES else None)
    if not name:
        raise fail(f"--role {role} needs --name NAME")
    now = datetime.now(UTC)
    try:
        files = issue_user(directory, role=role, name=name, now=now, out_dir=out_dir, expires_s=lifetime)
    except (BusAuthError, OSError) as exc:
        raise fail(str(exc)) from None
    out.print(f"wrote {files.creds}, {files.cert}, {files.key}", highlight=False)
    out.print(_expiry_line(files.expires, now), highlight=False)
    out.print(f"connect with: --creds {files.creds} --tls-ca {files.ca} --tls-cert {files.cert} "
              f"--tls-key {files.key}", highlight=False)
    if files.revoked:
        out.print(f"revoked {name}'s previous credentials (user key {files.revoked}); apply it with "
                  "'nats-server --signal reload' (or a restart)", highlight=False)


@bus_app.command("revoke")
def bus_revoke(
    name: Annotated[str, typer.Option(help="The identity whose credentials end (a node's name for a node).")],
    directory: BusDir = Path("breakfix-bus"),
) -> None:
    """Revoke the credentials last issued to NAME: they stop connecting once nats-server reloads its config."""
    from breakfix.bus.authinit import BusAuthError, revoke_user

    try:
        conf = revoke_user(directory, name=name, now=datetime.now(UTC))
    except (BusAuthError, OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    out.print(f"revoked {name}'s credentials in {conf}; apply it with 'nats-server --signal reload' (or a restart); "
              f"issue new ones with 'breakfix bus user'", highlight=False)
