"""Broker outage on RabbitMQ: stop the server mid-run, restart it, check everything.

The test runs a RabbitMQ node of its own (never the shared one): its own node name,
AMQP and distribution ports on loopback, data directory, config, Erlang cookie and no
plugins, and the scenario of tests/e2e/outage.py through it. Quorum queues, durable
exchanges and bindings outlive the restart on the node's data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..pg import free_port
from .outage import ServerProcess, need_server, restart_mid_run

pytestmark = pytest.mark.slow

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's; /usr/sbin's drops to its user


class RabbitMqNode(ServerProcess):
    """A RabbitMQ node of the test's own, restartable on the same ports and data."""

    ready_line = "Starting broker... completed"
    own_session = True  # its shell and the Erlang VM: stopped together (the VM shuts down cleanly on SIGTERM)
    stop_timeout = 30.0

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "rabbitmq"
        self.dir.mkdir()
        super().__init__(self.dir / "server.log")
        self.command = [str(RABBITMQ_SERVER)]
        self.port, dist = free_port(), free_port()
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (its node name)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin"),
            "HOME": str(self.dir),  # a cookie of its own
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": f"iptest{self.port}@localhost",
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "data"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }


async def test_server_restart_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    need_server(RABBITMQ_SERVER)
    node = RabbitMqNode(tmp_path)
    node.start()
    # short confirm timeouts, so publishes during the outage go to the outbox; fast reconnects
    bus = f"amqp://guest:guest@127.0.0.1:{node.port}/?exchange=outage&timeout=1&reconnect_interval=0.2"
    await restart_mid_run(node, bus, tmp_path / "orders.db", startup=60)
