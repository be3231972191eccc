"""Hostile and careless files for every command that takes one (issue 12 item 5): YAML alias bombs, /dev/zero,
invalid UTF-8, deep nesting, NaN, infinity and negative numbers. Each must end in exit 2 with one line naming the
file, never a traceback, in bounded memory: the commands run in one child process under an address-space limit
(RLIMIT_AS), which imports the CLI once and invokes every case in-process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

AS_LIMIT = 1536 * 1024 * 1024

YAML_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
HOSTILE = {
    "yaml-bomb": YAML_BOMB.encode(),
    "dev-zero": None,
    "invalid-utf8": b"version: 1\nname: \xff\xfe broken\n",
    "deep-nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
    "nan": b"version: 1\ninterval_s: .nan\n",
    "inf": b"version: 1\nretry_window_s: .inf\n",
    "negative": b"version: 1\ninterval_s: -5\n",
    "huge-int": b"version: 1\nmax_records: " + b"9" * 400 + b"\n",
}
# Commands that take a YAML data file (scenario, policy, rules, configs), and how to pass it.
YAML_COMMANDS = {
    "demo-scenario": ["demo", "--scenario", "{f}"],
    "demo-policy": ["demo", "--policy", "{f}"],
    "replay-policy": ["replay", "{signals}", "--policy", "{f}"],
    "collector-config": ["collector", "--config", "{f}"],
    "remediator-config": ["remediator", "--config", "{f}"],
    "fleet-collector-rules": ["fleet-collector", "--prometheus", "http://127.0.0.1:9", "--cluster", "c",
                              "--rules", "{f}"],
    "correlator-rules": ["correlator", "--nats", "nats://127.0.0.1:9", "--rules", "{f}"],
    "correlator-fleet-rules": ["correlator-fleet", "--nats", "nats://127.0.0.1:9", "--rules", "{f}"],
}
# Commands that take an input file in a tool's format; numbers out of range there are the readers' business
# (skipped samples), so they get the kinds that are no text of any format.
TEXT_COMMANDS = {
    "replay": ["replay", "{f}"],
    "signals-kmsg": ["signals", "kmsg", "{f}", "--node", "n"],
    "signals-dcgm": ["signals", "dcgm", "{f}", "--node", "n"],
    "signals-ibstat": ["signals", "ibstat", "{f}", "--node", "n"],
    "signals-nvsmi": ["signals", "nvsmi", "{f}", "--node", "n"],
    "signals-ib": ["signals", "ib", "{f}", "--node", "n"],
}
TEXT_KINDS = ("yaml-bomb", "dev-zero", "invalid-utf8", "deep-nesting")

DRIVER = """
import json, sys
from typer.testing import CliRunner
from breakfix.cli.main import app
out = []
runner = CliRunner()
for name, args in json.loads(sys.argv[1]):
    r = runner.invoke(app, args)
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)[:300]
    out.append({"case": name, "code": r.exit_code, "stderr": r.stderr, "stdout": r.stdout[:300], "exc": exc})
print(json.dumps(out))
"""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    d = tmp_path_factory.mktemp("hostile")
    files = {}
    for kind, data in HOSTILE.items():
        if data is None:
            files[kind] = "/dev/zero"
        else:
            (d / f"{kind}.yaml").write_bytes(data)
            files[kind] = str(d / f"{kind}.yaml")
    signals = d / "empty.jsonl"
    signals.write_text("")
    cases = [(f"{cmd}:{kind}", [a.format(f=files[kind], signals=signals) for a in args])
             for cmd, args in YAML_COMMANDS.items() for kind in HOSTILE]
    cases += [(f"{cmd}:{kind}", [a.format(f=files[kind]) for a in args])
              for cmd, args in TEXT_COMMANDS.items() for kind in TEXT_KINDS]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], preexec_fn=_limit,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["case"]: r for r in json.loads(proc.stdout)}


ALL = [f"{c}:{k}" for c in YAML_COMMANDS for k in HOSTILE] + [f"{c}:{k}" for c in TEXT_COMMANDS for k in TEXT_KINDS]


@pytest.mark.parametrize("case", ALL)
def test_hostile_file_is_one_line_exit_2_in_bounded_memory(results: dict[str, dict[str, object]], case: str) -> None:
    r = results[case]
    assert r["exc"] is None, r["exc"]
    assert r["code"] == 2, r
    lines = str(r["stderr"]).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in str(r["stderr"]), r["stderr"]
    kind = case.split(":")[1]
    assert ("/dev/zero" if kind == "dev-zero" else f"{kind}.yaml") in lines[0]


@pytest.mark.parametrize(("kind", "reason"), [
    ("yaml-bomb", "aliases"), ("dev-zero", "NUL byte"), ("invalid-utf8", "not UTF-8 at byte 17"),
    ("deep-nesting", "nested deeper"), ("nan", "not a finite number"), ("inf", "not a finite number"),
    ("negative", "greater than or equal to 0"), ("huge-int", "out of range"),
])
def test_hostile_yaml_reason_names_the_problem(results: dict[str, dict[str, object]], kind: str, reason: str) -> None:
    assert reason in str(results[f"demo-policy:{kind}"]["stderr"])


def test_line_of_a_bad_number_is_named(results: dict[str, dict[str, object]]) -> None:
    assert "negative.yaml:2: interval_s" in str(results["correlator-rules:negative"]["stderr"])


@pytest.mark.parametrize(("data", "reason"), [
    (b"a" * 10, "larger than 5 bytes"), (b"ab\x00", "NUL byte at byte 2"), (b"ok\xff", "not UTF-8 at byte 2"),
], ids=["over-the-limit", "binary", "invalid-utf8"])
def test_read_text_refuses_before_reading_on(tmp_path: Path, data: bytes, reason: str) -> None:
    from breakfix.schemas.datafile import DataFileError, read_text

    f = tmp_path / "f"
    f.write_bytes(data)
    with pytest.raises(DataFileError, match=reason):
        read_text(f, 5)
