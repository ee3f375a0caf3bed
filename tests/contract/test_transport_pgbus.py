"""The store bus on PostgreSQL passes the transport contract.

Every connection is a store of its own (its own writer, reader and LISTEN connection),
like separate processes; they meet in one schema per test. Polling is slowed down so
that consumers woken from other connections are woken by LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from interplay.clock import SystemClock
from interplay.stores.postgres import PostgresStore
from interplay.transports.base import Transport
from interplay.transports.store import StoreBus

from .. import pg
from ..servers import require
from .transport_contract import LEASE, TransportContract, drain, numbers, outgoing


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    require("postgres")
    with pg.database("interplay_pgbus") as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    schema = pg.new_schema()
    yield f"{pg_database}?schema={schema}"
    pg.drop_schema(pg_database, schema)


class _OwnedStoreBus(StoreBus):
    """A store bus on its own store (one per "process")."""

    async def close(self) -> None:
        await self.store.close()


async def connect(url: str, poll: float) -> StoreBus:
    store = PostgresStore(url)
    await store.open()
    bus = _OwnedStoreBus(store, poll=poll)
    await bus.open(SystemClock())
    return bus


class TestPostgresStoreBus(TransportContract):
    @pytest.fixture(autouse=True)
    def _url(self, pg_url: str) -> None:
        self.url = pg_url

    async def connect(self) -> Transport:
        # Polling stays as a safety net for rows that become visible later (a nack's
        # delay, an expired lease): nobody commits anything then, so nobody notifies.
        return await connect(self.url, poll=0.5)


async def test_a_consumer_in_another_process_is_woken_without_polling(pg_url: str) -> None:
    consumer_bus, producer_bus = await connect(pg_url, poll=60), await connect(pg_url, poll=60)
    try:
        sub = await consumer_bus.subscribe("g", ["event.wake"], lease=LEASE)
        loop = asyncio.get_running_loop()
        for n in range(3):
            receiving = asyncio.ensure_future(sub.receive(10, 30))
            await asyncio.sleep(0.2)  # a deliberate delay: the consumer must be idle, waiting
            sent = loop.time()
            await producer_bus.publish([outgoing("event.wake", n)])
            got = await asyncio.wait_for(receiving, 10)
            assert numbers(got) == [n]
            assert loop.time() - sent < 2.0  # woken by NOTIFY: the next poll is a minute away
            await sub.ack(got)
        await sub.close()
    finally:
        await consumer_bus.close()
        await producer_bus.close()


async def test_rows_queued_while_the_listener_was_down_are_not_left_waiting(pg_url: str) -> None:
    consumer_bus, producer_bus = await connect(pg_url, poll=60), await connect(pg_url, poll=60)
    try:
        sub = await consumer_bus.subscribe("g", ["event.gap"], lease=LEASE)
        assert isinstance(consumer_bus.store, PostgresStore)
        receiving = asyncio.ensure_future(drain(sub, 1, timeout=15))
        await asyncio.sleep(0.2)  # a deliberate delay: the consumer must be idle, waiting
        assert pg.terminate(pg_url.split("?")[0], "pid = %s", consumer_bus.store._listen_pid) == 1
        await producer_bus.publish([outgoing("event.gap", 5)])  # maybe before the listener is back
        assert numbers(await receiving) == [5]
        await sub.close()
    finally:
        await consumer_bus.close()
        await producer_bus.close()
