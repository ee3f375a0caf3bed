"""The buses integration tests run on, each test in a namespace of its own.

A test takes the ``bus`` fixture (tests/integration/conftest.py) and runs once per bus:
the store's own queue, ``memory://``, ``redis://``, ``amqp://`` and ``nats://``. A module
or a test narrows that with ``@pytest.mark.buses("store", "memory")`` (as ``pytestmark``
for a module). An entry may be a ``pytest.param`` with marks: ``xfail_on("store", reason)``
runs a test on every bus expecting it to fail on one, for a known library bug.

Brokers get a fresh namespace per test - a Redis key prefix, a RabbitMQ exchange (its
queues are named after it), a JetStream stream (its subjects follow its name) - deleted
afterwards, so tests never see each other's messages; the ``delete_*`` helpers at the end
do that for any test making its own. A broker whose driver or server is missing is
skipped with the reason, or fails the test when ``CI`` is set (tests/servers.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest

from interplay import App, Runtime
from interplay.transports import Transport

from .servers import IN_CI, SERVERS, require

BUS_NAMES = ("store", "memory", "redis", "amqp", "nats")
"""Every bus, in the order test ids list them."""

DRIVERS = {"redis": "redis", "amqp": "aio_pika", "nats": "nats"}
"""The Python package each broker's transport needs (an ``interplay[...]`` extra)."""


class Bus:
    """One bus for one test; ``bus.run(app)`` is a runtime on it.

    Every runtime a test makes through ``run`` shares the bus (two runtimes are two
    processes on one broker) and, unless told otherwise, the test's SQLite store.

    Attributes:
        name: ``store``, ``memory``, ``redis``, ``amqp`` or ``nats``.
        target: what ``run`` passes as ``app.run(bus=...)``: None (the store's own queue),
            the test's ``MemoryTransport``, or the broker URL naming the test's namespace.
        store_url: this test's SQLite store.
        runtimes: every runtime made by ``run``, for cleanup.
    """

    def __init__(self, name: str, target: str | Transport | None, store_url: str, runtimes: list[Runtime]) -> None:
        self.name = name
        self.target = target
        self.store_url = store_url
        self.runtimes = runtimes

    def __repr__(self) -> str:
        return f"<Bus {self.name}>"

    def run(self, app: App, **options: Any) -> Runtime:
        """``app.run(bus=self.target, store=self.store_url, **options)``, cleaned up after the test.

        ``options`` may override ``bus`` (say, the target URL through a proxy) or ``store``.
        """
        rt = app.run(**{"bus": self.target, "store": self.store_url, **options})
        self.runtimes.append(rt)
        return rt


def xfail_on(name: str, reason: str) -> pytest.MarkDecorator:
    """Run a test on every bus, expecting it to fail on ``name`` for a known library bug.

    Strict: once the bug is fixed the case passes, fails the suite, and the mark goes.
    """
    if name not in BUS_NAMES:
        raise ValueError(f"unknown bus {name!r}; the buses are {', '.join(BUS_NAMES)}")
    known_bug = pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)
    return pytest.mark.buses(*(pytest.param(n, marks=known_bug) if n == name else n for n in BUS_NAMES))


def require_driver(name: str) -> None:
    """Skip (locally) or fail (in CI) when a broker's Python driver is not installed."""
    module = DRIVERS[name]
    if importlib.util.find_spec(module) is not None:
        return
    reason = f"the {name} driver ({module}) is not installed: pip install 'interplay[{name}]'"
    if IN_CI:
        pytest.fail(f"{reason}, and CI is set: tests may not skip for a missing driver")
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def open_bus(name: str, store_url: str) -> AsyncIterator[Bus]:
    """A bus in a namespace of its own, deleted (with what runtimes left in it) on exit."""
    if name not in BUS_NAMES:
        raise ValueError(f"unknown bus {name!r}; the buses are {', '.join(BUS_NAMES)}")
    if name in DRIVERS:
        require_driver(name)
        require(name)
    runtimes: list[Runtime] = []
    async with _NAMESPACES[name](runtimes) as target:
        try:
            yield Bus(name, target, store_url, runtimes)
        finally:
            for rt in runtimes:  # no-op for those the test closed (its `async with` did)
                await rt.close()


# Each namespace yields what ``app.run(bus=...)`` takes and, on exit (the test's runtimes
# all closed by then), deletes whatever they left on the server.
Namespace = Callable[[list[Runtime]], contextlib.AbstractAsyncContextManager[str | Transport | None]]


@contextlib.asynccontextmanager
async def _store(runtimes: list[Runtime]) -> AsyncIterator[None]:
    yield None  # the store's own queue: the bus lives in the test's store file


@contextlib.asynccontextmanager
async def _memory(runtimes: list[Runtime]) -> AsyncIterator[Transport]:
    from interplay.transports.memory import MemoryTransport

    # One object for the whole test: runtimes share a memory bus only by sharing it.
    transport = MemoryTransport()
    try:
        yield transport
    finally:
        await transport.close()


@contextlib.asynccontextmanager
async def _on_server(url: str, delete: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
    try:
        yield url
    finally:
        await delete()


def _redis(runtimes: list[Runtime]) -> contextlib.AbstractAsyncContextManager[str]:
    prefix = f"iptest:{uuid.uuid4().hex[:12]}:"
    return _on_server(f"{server_url('redis')}/0?prefix={prefix}", lambda: delete_redis_keys(prefix))


def _amqp(runtimes: list[Runtime]) -> contextlib.AbstractAsyncContextManager[str]:
    url = f"{server_url('amqp')}/?exchange=ip-test-{uuid.uuid4().hex[:12]}&reconnect_interval=0.2"
    return _on_server(url, lambda: delete_amqp_declared(rt.transport for rt in runtimes))


def _nats(runtimes: list[Runtime]) -> contextlib.AbstractAsyncContextManager[str]:
    stream = f"IT_{uuid.uuid4().hex[:12]}"  # the subjects' prefix follows the stream's name
    return _on_server(f"{server_url('nats')}?stream={stream}", lambda: delete_nats_stream(stream))


_NAMESPACES: dict[str, Namespace] = {
    "store": _store, "memory": _memory, "redis": _redis, "amqp": _amqp, "nats": _nats,
}


# ---------------------------------------------------------------------- the test servers
def server_url(name: str) -> str:
    """The URL of a test server (tests/servers.py), without path or options."""
    host, port = SERVERS[name]
    credentials = "guest:guest@" if name == "amqp" else ""
    return f"{name}://{credentials}{host}:{port}"


async def delete_redis_keys(prefix: str) -> None:
    """Delete every key starting with ``prefix`` on the test Redis."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server_url("redis"))
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def delete_nats_stream(stream: str) -> None:
    """Delete a JetStream stream (and so its consumers) on the test NATS, if it exists."""
    import nats
    from nats.js.errors import NotFoundError

    connection = await nats.connect(server_url("nats"))
    try:
        with contextlib.suppress(NotFoundError):
            await connection.jsm().delete_stream(stream)
    finally:
        await connection.close()


async def delete_amqp_declared(transports: Iterable[Transport]) -> None:
    """Delete the queues and exchanges these (closed) ``amqp://`` transports declared.

    RabbitMQ cannot list queues by name over AMQP: what they declared is what to delete.
    """
    import aio_pika

    from interplay.transports.amqp import AmqpTransport

    queues: set[str] = set()
    exchanges: set[str] = set()
    for transport in transports:
        if isinstance(transport, AmqpTransport):
            queues |= transport.declared_queues
            exchanges |= transport.declared_exchanges
    if not queues and not exchanges:
        return
    connection = await aio_pika.connect(server_url("amqp") + "/")
    try:
        channel = await connection.channel()
        for queue in sorted(queues):
            await channel.queue_delete(queue)
        for exchange in sorted(exchanges):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()
