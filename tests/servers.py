"""The servers tests may need, and the rule for when one is missing.

A test that needs a server (Redis, NATS, RabbitMQ, PostgreSQL) calls ``require(name)``:
on a laptop without that server it is skipped with the reason; with ``CI`` set it
fails instead, because in CI nothing may skip for lack of a service.
"""

from __future__ import annotations

import os
import socket

import pytest

SERVERS = {
    "redis": ("127.0.0.1", 6379),
    "nats": ("127.0.0.1", 4222),
    "amqp": ("127.0.0.1", 5672),
    "postgres": ("127.0.0.1", 5432),
}
IN_CI = bool(os.environ.get("CI"))


def server_up(name: str) -> bool:
    """Whether the named server accepts TCP connections on its loopback port."""
    host, port = SERVERS[name]
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str) -> None:
    """Skip (locally) or fail (in CI) when a server is unreachable."""
    if server_up(name):
        return
    host, port = SERVERS[name]
    reason = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{reason}, and CI is set: tests may not skip for a missing service")
    pytest.skip(reason)
