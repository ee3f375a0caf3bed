"""Broker outage on NATS JetStream: stop the server mid-run, restart it, check everything.

The test runs its own ``nats-server -js`` on a free loopback port with its own store
directory, and the scenario of tests/e2e/outage.py through it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ..pg import free_port
from .outage import need_server, restart_mid_run

pytestmark = pytest.mark.slow

NATS_SERVER = Path(shutil.which("nats-server") or "/usr/sbin/nats-server")


class NatsServer:
    """A nats-server process with JetStream, restartable on the same port and store."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.store_dir = tmp_path / "jetstream"
        self.log = tmp_path / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
        return self.log.read_text().count("Server is ready") >= self.starts

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


async def test_server_restart_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    need_server(NATS_SERVER)
    server = NatsServer(tmp_path)
    server.start()
    # short publish timeouts, so publishes during the outage go to the outbox; fast reconnects
    bus = f"nats://127.0.0.1:{server.port}?stream=OUTAGE&timeout=1&reconnect_wait=0.1"
    await restart_mid_run(server, bus, tmp_path / "orders.db")
