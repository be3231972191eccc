"""``breakfix bus roles``: a bus set up by an older version gets this version's role permissions from the
server itself, with every key kept, so credentials issued before the upgrade still connect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from breakfix.bus import authinit
from breakfix.bus.authinit import BusAuthError, init_bus, refresh_roles
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.server import EmbeddedNats
from breakfix.cli.main import app
from breakfix.schemas import subjects
from tests.security.conftest import NOW, SecureBus, refused

pytestmark = pytest.mark.nats

ANONYMOUS_CREATE = f"$JS.API.CONSUMER.CREATE.{subjects.INCIDENTS.name}"
STOLEN = json.dumps({"stream_name": subjects.INCIDENTS.name, "config": {
    "name": "remediator", "ack_policy": "explicit", "filter_subject": "breakfix.incidents.nowhere"}}).encode()


def older_template(role: str, cluster: str) -> dict[str, Any]:
    """A viewer as an older version made it: it could still create consumers anonymously."""
    template = REAL_TEMPLATE(role, cluster)
    if role == "viewer":
        template["pub"]["allow"] = [*template["pub"]["allow"], ANONYMOUS_CREATE]
    return template


REAL_TEMPLATE = authinit.role_template


async def answered(bus: JetStreamBus) -> bool:
    """Whether the server answered the anonymous create (allowed) rather than refusing the publish."""
    try:
        await bus._nc.request(ANONYMOUS_CREATE, STOLEN, timeout=1.0)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("apply", ["restart", "reload"])
async def test_bus_roles_gives_an_older_bus_this_versions_permissions_and_keeps_every_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, apply: str) -> None:
    monkeypatch.setattr(authinit, "role_template", older_template)
    monkeypatch.setattr(authinit, "ROLES", tuple(r for r in authinit.ROLES if r != "console"))  # added since
    conf = init_bus(tmp_path / "bus", cluster="c1", monitor_port=0, store_dir=tmp_path / "js", now=NOW)
    monkeypatch.undo()
    server = EmbeddedNats(tmp_path / "nats", config=conf).start()
    secure = SecureBus(tmp_path / "bus", server)
    try:
        setup = await secure.connect("correlator", "correlator")
        await setup.ensure_streams(subjects.STREAMS)
        await setup.close()
        before = secure.options("viewer", "vera")  # issued before the upgrade
        vera = await JetStreamBus.connect(before, name="vera")
        assert await answered(vera), "the older template let a viewer create consumers anonymously"
        await vera.close()

        refresh_roles(tmp_path / "bus", now=NOW)
        if apply == "restart":
            server.stop()
            server.start()  # same port, same JetStream store
        else:
            server.reload()  # nats-server --signal reload

        vera = await JetStreamBus.connect(before, name="vera")  # the same .creds and certificate
        try:
            with capture_logs() as logs:
                await vera.publish_core(ANONYMOUS_CREATE, STOLEN)
                await vera.flush()
                await refused(vera, logs, "publish", ANONYMOUS_CREATE)
            assert (await vera.read_stream(subjects.INCIDENTS.name, subjects.INCIDENTS_ALL)) == []
        finally:
            await vera.close()
        console = await secure.connect("console", "console")  # the role added since has its signing key
        await console.close()
    finally:
        server.stop()


def test_bus_roles_keeps_every_key_and_the_servers_settings(tmp_path: Path) -> None:
    conf = init_bus(tmp_path / "bus", cluster="c1", listen="0.0.0.0:4333", monitor_port=0, now=NOW)
    keys = {p.name: p.read_text() for p in (tmp_path / "bus" / "keys").iterdir()}
    before = conf.read_text()
    result = CliRunner().invoke(app, ["bus", "roles", "--dir", str(tmp_path / "bus")])
    assert result.exit_code == 0, result.output
    assert "reload" in result.output
    assert {p.name: p.read_text() for p in (tmp_path / "bus" / "keys").iterdir()} == keys
    after = conf.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) <= 1 and '"0.0.0.0:4333"' in after, "only the account's preload entry may change"


def test_bus_roles_keeps_revocations_and_limits_an_operator_set(tmp_path: Path) -> None:
    from breakfix.bus.nkeyjwt import Key, encode_jwt, jwt_claims

    conf = init_bus(tmp_path / "bus", cluster="c1", monitor_port=0, now=NOW)
    root = tmp_path / "bus"
    meta = json.loads((root / "bus.json").read_text())
    operator = Key.from_seed((root / "keys" / "operator.nk").read_text())
    entry = f"  {meta['account']}: "
    lines = conf.read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if line.startswith(entry))
    claims = jwt_claims(json.loads(lines[i][len(entry):]))
    revoked = {"UABC123STOLENNODE": 1795000000}
    claims["nats"]["revocations"] = revoked  # a stolen node's credential, revoked by an operator
    claims["nats"]["limits"]["conn"] = 5000
    lines[i] = f"{entry}{json.dumps(encode_jwt(claims, operator))}\n"
    conf.write_text("".join(lines))

    refresh_roles(root, now=NOW)
    after = next(line for line in conf.read_text().splitlines() if line.startswith(entry))
    nats = jwt_claims(json.loads(after[len(entry):]))["nats"]
    assert nats["revocations"] == revoked and nats["limits"]["conn"] == 5000
    assert {k["role"] for k in nats["signing_keys"]} == set(authinit.ROLES)


def test_bus_roles_refuses_keys_that_are_not_the_bus_s(tmp_path: Path) -> None:
    init_bus(tmp_path / "bus", cluster="c1", monitor_port=0, now=NOW)
    other = tmp_path / "other"
    init_bus(other, cluster="c1", monitor_port=0, now=NOW)
    (tmp_path / "bus" / "keys" / "operator.nk").write_text((other / "keys" / "operator.nk").read_text())
    before = (tmp_path / "bus" / "nats-server.conf").read_text()
    with pytest.raises(BusAuthError, match="not the one"):
        refresh_roles(tmp_path / "bus", now=NOW)
    assert (tmp_path / "bus" / "nats-server.conf").read_text() == before


def test_bus_roles_on_a_directory_without_a_bus_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BusAuthError, match="bus init"):
        refresh_roles(tmp_path / "nothing", now=NOW)
    result = CliRunner().invoke(app, ["bus", "roles", "--dir", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "bus init" in result.output



async def test_reissuing_credentials_revokes_the_old_ones_and_bus_revoke_ends_the_current(secure: SecureBus) -> None:
    """A rotation after a stolen .creds must end the stolen one: re-issuing a name revokes its previous user key,
    and 'breakfix bus revoke' ends the current one, once nats-server reloads its config."""
    import shutil

    from breakfix.bus.connect import BusRefused

    stolen = secure.options("node", "node-a")
    for f in ("creds", "tls_cert", "tls_key"):  # the thief's copy of the files
        src = Path(str(getattr(stolen, f)))
        shutil.copy(src, src.with_name("stolen-" + src.name))
    stolen = stolen.model_copy(update={f: Path(str(getattr(stolen, f))).with_name(
        "stolen-" + Path(str(getattr(stolen, f))).name) for f in ("creds", "tls_cert", "tls_key")})
    await (await JetStreamBus.connect(stolen, name="node-a")).close()
    result = CliRunner().invoke(app, ["bus", "user", "--dir", str(secure.root), "--node", "node-a"])
    assert result.exit_code == 0 and "revoked node-a's previous credentials" in result.output
    secure.server.reload()
    with pytest.raises(BusRefused, match=r"(?i)authorization violation"):
        await JetStreamBus.connect(stolen, name="node-a")
    fresh = stolen.model_copy(update={f: Path(str(getattr(stolen, f))).with_name(
        Path(str(getattr(stolen, f))).name.removeprefix("stolen-")) for f in ("creds", "tls_cert", "tls_key")})
    await (await JetStreamBus.connect(fresh, name="node-a")).close()  # the new credentials work
    assert CliRunner().invoke(app, ["bus", "revoke", "--dir", str(secure.root), "--name", "node-a"]).exit_code == 0
    secure.server.reload()
    with pytest.raises(BusRefused, match=r"(?i)authorization violation"):
        await JetStreamBus.connect(fresh, name="node-a")
    again = CliRunner().invoke(app, ["bus", "revoke", "--dir", str(secure.root), "--name", "node-a"])
    assert again.exit_code != 0 and "no credentials issued to 'node-a'" in again.output
