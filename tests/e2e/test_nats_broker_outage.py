"""Broker outage on NATS JetStream: stop the server mid-run, restart it, check everything.

The test runs its own ``nats-server -js`` on a free loopback port with its own store
directory, and the scenario of tests/e2e/outage.py through it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..pg import free_port
from .outage import ServerProcess, need_server, restart_mid_run

pytestmark = pytest.mark.slow

NATS_SERVER = Path(shutil.which("nats-server") or "/usr/sbin/nats-server")


class NatsServer(ServerProcess):
    """A nats-server process with JetStream, restartable on the same port and store."""

    ready_line = "Server is ready"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path / "nats-server.log")
        self.port = free_port()
        store_dir = tmp_path / "jetstream"
        self.command = [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store_dir)]


async def test_server_restart_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    need_server(NATS_SERVER)
    server = NatsServer(tmp_path)
    server.start()
    # short publish timeouts, so publishes during the outage go to the outbox; fast reconnects
    bus = f"nats://127.0.0.1:{server.port}?stream=OUTAGE&timeout=1&reconnect_wait=0.1"
    await restart_mid_run(server, bus, tmp_path / "orders.db")
