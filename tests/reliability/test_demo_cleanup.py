"""The demo cleans up after itself even when it dies: a SIGKILLed ``breakfix demo`` leaves no nats-server
running and no temp folder behind (its guardian process kills the server's process group and removes the
folder; atexit does the same on an ordinary exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def servers_using(folder: str) -> list[int]:
    """Pids of live processes whose command line names ``folder`` (the nats-server's store)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if folder in cmd and "nats-server" in cmd and state != "Z":
            found.append(int(entry.name))
    return found


def poll(cond: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_killed_demo_leaves_no_nats_server_and_no_temp_folder(tmp_path: Path, how: signal.Signals) -> None:
    scenario = tmp_path / "slow.yaml"
    scenario.write_text("name: slow\nnodes: 4\nevents:\n  - {at: 0.1, node: 0, gpu: 1, code: '13'}\n"
                        "  - {at: 120, node: 1, gpu: 1, code: '13'}\n")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    proc = subprocess.Popen([sys.executable, "-c", "from breakfix.cli.main import app; app()", "demo", "--scenario",
                             str(scenario), "--duration", "300", "--nodes", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "however the demo ends" in line:  # the server runs and the guardian is in place
                break
        temps = list(tmp_path.glob("breakfix-demo-*"))
        assert len(temps) == 1, "the demo made its temp folder under TMPDIR"
        temp = temps[0]
        assert servers_using(str(temp)), "the demo's nats-server runs"
        proc.send_signal(how)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    poll(lambda: not servers_using(str(temp)), 30, "the nats-server to be gone")
    poll(lambda: not temp.exists(), 30, "the temp folder to be removed")
