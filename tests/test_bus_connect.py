"""Connecting to NATS is bounded and stop-aware: a CLI command fails in one line, a daemon retries with
backoff (one log line per attempt) and leaves promptly on SIGTERM, connection events are logged."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from structlog.testing import capture_logs

from breakfix.bus.connect import BusRefused, BusUnavailable, connect_client, open_client
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.options import NatsOptions
from breakfix.bus.retry import ConnectAborted, transient_connect_error
from breakfix.bus.server import EmbeddedNats, free_port
from tests.conftest import wait_until

BREAKFIX = [str(Path(sys.executable).parent / "breakfix")]


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A listening TCP socket that never says a word (a hung server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(10)
        yield s


@pytest.fixture
def silent_port(silent: socket.socket) -> int:
    return int(silent.getsockname()[1])


class TestCli:
    def test_unreachable_server_fails_in_one_line_with_exit_2(self) -> None:
        """The bound is the acceptance's 5 s; the run takes well under a second."""
        proc = subprocess.run([*BREAKFIX, "incidents", "--nats", "nats://127.0.0.1:1"], capture_output=True,
                              text=True, timeout=5)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "cannot connect to nats://127.0.0.1:1" in lines[0]
        assert "Traceback" not in proc.stderr + proc.stdout

    def test_hung_server_fails_in_one_line_with_exit_2(self, silent_port: int) -> None:
        """A server that accepts and never answers costs one bounded attempt (4 s) plus start-up."""
        proc = subprocess.run([*BREAKFIX, "incidents", "--nats", f"nats://127.0.0.1:{silent_port}"],
                              capture_output=True, text=True, timeout=15)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "no answer within" in proc.stderr or "cannot connect" in proc.stderr

    def test_missing_creds_file_fails_in_one_line(self, tmp_path: Path) -> None:
        proc = subprocess.run([*BREAKFIX, "incidents", "--nats", "nats://127.0.0.1:1", "--creds",
                               str(tmp_path / "nope.creds")], capture_output=True, text=True, timeout=5)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and "nope.creds does not exist" in proc.stderr


class TestDaemon:
    @pytest.mark.parametrize("target", ["refused", "hung"])
    def test_sigterm_while_connecting_exits_within_2s(self, target: str, silent: socket.socket) -> None:
        """SIGTERM ends a connecting daemon at once: in the backoff after a refused attempt (logged, one line
        per attempt), or in the middle of an attempt against a server that never answers."""
        port = free_port() if target == "refused" else int(silent.getsockname()[1])
        proc = subprocess.Popen([*BREAKFIX, "correlator-fleet", "--nats", f"nats://127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        held: list[socket.socket] = []
        try:
            assert proc.stderr is not None
            if target == "refused":
                first = proc.stderr.readline()  # blocks until the first failed attempt is logged
                assert "nats_connect_retry" in first and '"attempt": 1' in first, first
            else:
                held.append(silent.accept()[0])  # the daemon is inside its first attempt now
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=2)
        finally:
            for conn in held:
                conn.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert rc == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest


class TestConnect:
    async def test_one_attempt_against_refused_port_raises_unavailable(self) -> None:
        with pytest.raises(BusUnavailable, match=r"cannot connect to nats://127\.0\.0\.1:1"):
            await open_client(NatsOptions(url="nats://127.0.0.1:1"), name="t")  # raises

    async def test_daemon_connect_logs_each_attempt_and_stops_when_told(self) -> None:
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(connect_client(NatsOptions(url=f"nats://127.0.0.1:{free_port()}"),
                                                      name="t", stop=stop), name="connect-under-test")

            async def two_attempts() -> bool:
                return sum(e["event"] == "nats_connect_retry" for e in logs) >= 2

            await wait_until(two_attempts, 10, "two logged connect attempts")
            stop.set()
            with pytest.raises(ConnectAborted):
                await asyncio.wait_for(task, 2)
        attempts = [e["attempt"] for e in logs if e["event"] == "nats_connect_retry"]
        assert attempts[:2] == [1, 2]

    async def test_daemon_connect_waits_for_a_server_that_comes_up(self, tmp_path: Path) -> None:
        server = EmbeddedNats(tmp_path / "nats")
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(JetStreamBus.connect(server.url, name="t", stop=stop), name="connect-late")

            async def failed_once() -> bool:
                return any(e["event"] == "nats_connect_retry" for e in logs)

            await wait_until(failed_once, 10, "a failed attempt")
            server.start()
            try:
                bus = await asyncio.wait_for(task, 20)
                await bus.ensure_kv("late")
                assert await bus.kv_keys("late") == []
                await bus.close()
            finally:
                server.stop()

    async def test_missing_creds_is_permanent_not_retried(self, tmp_path: Path) -> None:
        stop = asyncio.Event()
        with capture_logs() as logs, pytest.raises(BusRefused, match="does not exist"):
            await connect_client(NatsOptions(url="nats://127.0.0.1:1", creds=tmp_path / "x.creds"), name="t",
                                 stop=stop)
        assert not [e for e in logs if e["event"] == "nats_connect_retry"]

    @pytest.mark.parametrize(("exc", "transient"), [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (BusUnavailable("x"), True),
        (BusRefused("x"), False),
        (FileNotFoundError("x.creds"), False),
        (nats.errors.Error("nats: 'Authorization Violation'"), False),
        (nats.errors.NoServersError(), True),
    ])
    def test_only_transient_errors_are_retried(self, exc: BaseException, transient: bool) -> None:
        assert transient_connect_error(exc) is transient

    async def test_lost_server_is_logged_as_disconnect_then_reconnect(self, tmp_path: Path) -> None:
        server = EmbeddedNats(tmp_path / "nats").start()
        bus = await JetStreamBus.connect(server.url, name="t")
        try:
            with capture_logs() as logs:
                server.stop()

                async def logged(event: str) -> bool:
                    return any(e["event"] == event for e in logs)

                await wait_until(lambda: logged("nats_disconnected"), 10, "the disconnect to be logged")
                server.start()
                await wait_until(lambda: logged("nats_reconnected"), 20, "the reconnect to be logged")
        finally:
            await bus.close()
            server.stop()
