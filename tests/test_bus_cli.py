"""``breakfix bus init`` / ``breakfix bus user`` and the NATS flags every command shares."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from breakfix.bus.nkeyjwt import creds_user_name, jwt_claims
from breakfix.bus.options import NatsOptions
from breakfix.bus.server import find_nats_server
from breakfix.cli.cliutil import NatsFlags
from breakfix.cli.main import app

runner = CliRunner()


def test_init_writes_a_config_nats_server_accepts_with_secrets_private(tmp_path: Path) -> None:
    d = tmp_path / "bus"
    res = runner.invoke(app, ["bus", "init", "--dir", str(d), "--cluster", "c1"])
    assert res.exit_code == 0, res.output
    conf = d / "nats-server.conf"
    check = subprocess.run([find_nats_server(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    text = conf.read_text()
    assert 'http: "127.0.0.1:8222"' in text and "verify: true" in text and "resolver: MEMORY" in text
    for secret in [*(d / "keys").iterdir(), d / "tls" / "ca.key", d / "tls" / "server.key"]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert json.loads((d / "bus.json").read_text())["cluster"] == "c1"


def test_init_puts_every_host_in_the_server_certificate(tmp_path: Path) -> None:
    from cryptography import x509

    res = runner.invoke(app, ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1", "--host", "nats.a",
                              "--hosts", "nats.b.svc, 127.0.0.1"])
    assert res.exit_code == 0, res.output
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nats.a", "nats.b.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_init_refuses_to_replace_existing_keys_in_one_line(tmp_path: Path) -> None:
    args = ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--force" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(("args", "role", "name"), [
    (["--node", "gpu-node-7"], "node", "gpu-node-7"),
    (["--role", "operator", "--name", "alice"], "operator", "alice"),
    (["--role", "remediator"], "remediator", "remediator"),
    (["--role", "correlator", "--partition", "2"], "correlator", "correlator-p2"),
    (["--role", "correlator-fleet"], "correlator", "correlator-fleet"),
    (["--role", "fleet-collector"], "fleet", "fleet-collector"),
    (["--node", "n3", "--role", "agent"], "node", "n3"),
])
def test_user_writes_creds_naming_the_identity_and_its_role(tmp_path: Path, args: list[str], role: str,
                                                            name: str) -> None:
    assert runner.invoke(app, ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1"]).exit_code == 0
    res = runner.invoke(app, ["bus", "user", "--dir", str(tmp_path), *args])
    assert res.exit_code == 0, res.output
    creds = tmp_path / "users" / f"{name}.creds"
    assert creds_user_name(creds) == name
    token = creds.read_text().splitlines()[1]
    claims = jwt_claims(token)
    meta = json.loads((tmp_path / "bus.json").read_text())
    assert claims["iss"] == meta["signing_keys"][role]  # signed by the role's scoped key
    assert claims["nats"]["issuer_account"] == meta["account"]
    assert "pub" not in claims["nats"] and "sub" not in claims["nats"]  # the template applies, not the JWT
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600


@pytest.mark.parametrize(("args", "message"), [
    (["--role", "operator"], "needs --name"),
    (["--node", "a.b"], "one subject token"),
    (["--role", "root", "--name", "x"], "unknown role"),
    ([], "either --node"),
])
def test_user_refuses_bad_requests_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    assert runner.invoke(app, ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1"]).exit_code == 0
    res = runner.invoke(app, ["bus", "user", "--dir", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_user_before_init_says_what_to_run(tmp_path: Path) -> None:
    res = runner.invoke(app, ["bus", "user", "--dir", str(tmp_path), "--node", "n1"])
    assert res.exit_code == 2 and "breakfix bus init" in res.output


def test_flags_override_the_config_files_nats_section(tmp_path: Path) -> None:
    base = NatsOptions(url="tls://nats:4222", creds=tmp_path / "a.creds", tls_ca=tmp_path / "ca.crt")
    got = NatsFlags("tls://other:4222", None, None, tmp_path / "c.crt", tmp_path / "c.key").options(base)
    assert got == NatsOptions(url="tls://other:4222", creds=tmp_path / "a.creds", tls_ca=tmp_path / "ca.crt",
                              tls_cert=tmp_path / "c.crt", tls_key=tmp_path / "c.key")


@pytest.mark.parametrize(("fields", "message"), [
    ({"tls_cert": "c.crt"}, "go together"),
    ({"url": "127.0.0.1:4222"}, "no scheme"),
])
def test_bad_nats_options_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NatsOptions.model_validate(fields)


def test_every_nats_command_takes_the_connection_flags() -> None:
    for command in (["incidents"], ["audit", "x"], ["correlator"], ["correlator-fleet"], ["remediator"],
                    ["collector"], ["fleet-collector"], ["approve", "i", "s"], ["breaker", "reset"]):
        res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (command, res.output)
        for flag in ("--nats", "--creds", "--tls-ca", "--tls-cert", "--tls-key"):
            assert flag in res.output, (command, flag)


@pytest.mark.parametrize(("args", "lifetime_s"), [
    (["--role", "operator", "--name", "alice"], 24 * 3600),  # a person: a day by default
    (["--role", "viewer", "--name", "vera", "--expires", "12h"], 12 * 3600),
    (["--role", "admin", "--name", "root", "--expires", "30m"], 30 * 60),
    (["--node", "n1", "--expires", "7d"], 7 * 86400),  # a service or node may be given one
    (["--role", "operator", "--name", "alice", "--expires", "never"], None),
    (["--node", "n1"], None),  # a node and a service: never by default
    (["--role", "console"], None),
])
def test_user_expires_says_how_long_the_creds_connect_and_when_they_end(
        tmp_path: Path, args: list[str], lifetime_s: int | None) -> None:
    from datetime import UTC, datetime

    assert runner.invoke(app, ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1"]).exit_code == 0
    before = datetime.now(UTC).timestamp()
    res = runner.invoke(app, ["bus", "user", "--dir", str(tmp_path), *args], env={"COLUMNS": "300"})
    after = datetime.now(UTC).timestamp()
    assert res.exit_code == 0, res.output
    name = next(p.stem for p in (tmp_path / "users").glob("*.creds"))
    claims = jwt_claims((tmp_path / "users" / f"{name}.creds").read_text().splitlines()[1])
    record = json.loads((tmp_path / "bus.json").read_text())["users"][name]
    if lifetime_s is None:
        assert "exp" not in claims and "expires" not in record
        assert "do not expire" in res.output
    else:
        assert before + lifetime_s <= claims["exp"] <= after + lifetime_s + 1
        assert datetime.fromisoformat(record["expires"]).timestamp() == claims["exp"]
        assert f"expire at {record['expires']}" in res.output


@pytest.mark.parametrize("value", ["59s", "0m", "367d", "99999999999999d", "-5m", "12", "1.5h", "1w", "", "forever"])
def test_user_refuses_a_bad_expires_in_one_line(tmp_path: Path, value: str) -> None:
    assert runner.invoke(app, ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1"]).exit_code == 0
    res = runner.invoke(app, ["bus", "user", "--dir", str(tmp_path), "--role", "operator", "--name", "alice",
                              f"--expires={value}"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and repr(value) in lines[0], res.output
    assert not (tmp_path / "users" / "alice.creds").exists()


def test_user_accepts_the_expiry_bounds(tmp_path: Path) -> None:
    assert runner.invoke(app, ["bus", "init", "--dir", str(tmp_path), "--cluster", "c1"]).exit_code == 0
    for value in ("60s", "1m", "366d", "NEVER"):
        res = runner.invoke(app, ["bus", "user", "--dir", str(tmp_path), "--role", "operator", "--name", "alice",
                                  "--expires", value])
        assert res.exit_code == 0, (value, res.output)
