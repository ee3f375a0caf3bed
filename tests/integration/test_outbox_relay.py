"""The outbox relay: many runtimes on one store, and rows the broker refuses.

Leftover outbox rows (committed, never published - their writer died) are relayed by
the relay loop of every runtime sharing the store. Each row is claimed by one of them,
so the broker gets each message once however many runtimes there are (counted on the
broker: the length of the Redis stream, which no consumer reads or trims here). A row
the broker refuses waits for its retry, with backoff, and does not hold up the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from interplay import App, Runtime
from interplay.message import Message
from interplay.outbox import BATCH, OutboxRelay
from interplay.runtime import RuntimeOptions
from interplay.stores.records import Outgoing
from interplay.testing import wait_until
from interplay.transports.nats import NatsTransport
from interplay.transports.redis import RedisTransport

from .. import pg
from ..buses import Bus, open_bus, server_url
from ..servers import require

ROUTE = "event.order.created"
LEFTOVERS = 3 * BATCH  # several sweeps' worth, for several runtimes to compete for


class Order(BaseModel):
    id: int
    note: str = ""


def audit_app() -> App:
    app = App("outboxed")

    @app.service("audit").on("order.created")
    async def note(order: Order) -> None:
        return None

    return app


async def count(rt: Runtime, sql: str) -> int:
    return int(await rt.store.read(lambda tx: tx.one(sql)[0]))


async def outbox_rows(rt: Runtime) -> int:
    return await count(rt, "SELECT COUNT(*) FROM ip_outbox")


def order(rt: Runtime, i: int, *, note: str = "", type_: str = "order.created") -> Outgoing:
    msg = Message(type=type_, payload=Order(id=i, note=note).model_dump(), kind="event", source="test")
    return rt.app.topology.outgoing(msg)


async def leave_in_outbox(rt: Runtime, items: list[Outgoing]) -> list[int]:
    """Commit messages to the outbox as a process that died before publishing them would.

    Written a minute ago: their writer's grace is over, every relay may take them at once.
    """
    relay = await rt.store.publish(items, rt.clock.now() - 60, "outbox")
    return [i for _, i in relay if i is not None]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url
        return
    require("postgres")
    with pg.database("interplay_outbox") as url:
        yield url


async def test_leftover_rows_are_published_once_however_many_runtimes_relay(store_url: str) -> None:
    async with open_bus("redis", store_url) as bus:
        app = audit_app()
        # Four processes on one store and one broker; none consumes (the stream keeps
        # every entry), all relay every 50 ms.
        runtimes = [bus.run(app, services=[], orchestrator=False, outbox_relay_interval=0.05) for _ in range(4)]
        await asyncio.gather(*(rt.open() for rt in runtimes))
        rt = runtimes[0]
        assert rt.delivery_mode == "outbox"
        ids = await leave_in_outbox(rt, [order(rt, i) for i in range(LEFTOVERS)])
        assert len(ids) == LEFTOVERS
        await wait_until(lambda: _equals(outbox_rows(rt), 0), timeout=60, message="outbox drained")
        for each in runtimes:
            await each.close()  # no publish still on its way
        assert isinstance(rt.transport, RedisTransport)
        redis = aioredis.Redis.from_url(server_url("redis"))
        try:
            published = await redis.xlen(rt.transport.stream_key(ROUTE))
        finally:
            await redis.aclose()
    assert published == LEFTOVERS  # not once per runtime


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.buses("redis", "nats")
async def test_a_row_the_broker_refuses_does_not_hold_up_the_others(bus: Bus) -> None:
    app = audit_app()
    options = {"outbox_relay_interval": 0.05, "outbox_retry_max": 0.4}
    async with bus.run(app, **options) as rt:
        if isinstance(rt.transport, RedisTransport):
            # A key of the wrong type where the message's stream would be: Redis refuses
            # that one XADD (WRONGTYPE), and takes the others of the same pipeline.
            poison = order(rt, 99, type_="order.poisoned")
            key = rt.transport.stream_key(poison.route)
            await rt.transport.redis.set(key, "not a stream")
        else:
            assert isinstance(rt.transport, NatsTransport)
            # Larger than the server's max_payload: refused before anything is sent.
            poison = order(rt, 99, note="x" * (rt.transport.max_body + 1))
        good = [order(rt, i) for i in range(10)]
        ids = await leave_in_outbox(rt, [*good[:5], poison, *good[5:]])
        poison_id = ids[5]

        async def only_poison_left_and_retried() -> bool:
            rows = await rt.store.read(lambda tx: tx.all("SELECT id, attempts FROM ip_outbox"))
            return len(rows) == 1 and rows[0][0] == poison_id and rows[0][1] >= 3

        await wait_until(lambda: _equals(count(rt, "SELECT COUNT(*) FROM ip_inbox WHERE grp = 'audit'"), 10),
                         timeout=30, message="every good message handled")
        await wait_until(only_poison_left_and_retried, timeout=30, message="the refused row retried")
        if isinstance(rt.transport, RedisTransport):
            await rt.transport.redis.delete(key)  # fixed: the next retry goes through
            await wait_until(lambda: _equals(outbox_rows(rt), 0), timeout=30, message="the refused row relayed")
        handled = await count(rt, "SELECT COUNT(*) FROM ip_inbox WHERE grp = 'audit'")
    assert handled == 10


@pytest.mark.buses("nats", "amqp")
async def test_rows_the_bus_would_never_take_are_kept_aside_not_sent(bus: Bus) -> None:
    # Stored before the bus's limit was lowered: sent, each would fail its batch, and two
    # in a row would make the relay take the broker to be down and hold the rest back.
    app = audit_app()
    small = {"bus": f"{bus.target}&max_body=100000"} if bus.name == "amqp" else {}
    async with bus.run(app, outbox_relay_interval=3600, **small) as rt:  # this test sweeps itself
        limit = rt.transport.body_limit()
        assert limit is not None
        good = [order(rt, i) for i in range(10)]
        poison = [order(rt, 90 + i, note="x" * (limit + 1)) for i in range(2)]
        ids = await leave_in_outbox(rt, [*good[:5], *poison, *good[5:]])
        relay = OutboxRelay(rt)
        assert await relay.sweep() == 10  # every good row in one sweep
        assert (relay.failed, relay.kept) == (0, 2)  # the big ones never reached the bus
        left = await rt.store.read(lambda tx: tx.all("SELECT id, attempts FROM ip_outbox ORDER BY id"))
        assert [(int(i), int(a)) for i, a in left] == [(ids[5], 1), (ids[6], 1)]  # kept, retried later
        await wait_until(lambda: _equals(count(rt, "SELECT COUNT(*) FROM ip_inbox WHERE grp = 'audit'"), 10),
                         timeout=30, message="every good message handled")


def test_retries_back_off_up_to_the_maximum() -> None:
    class Stub:
        options = RuntimeOptions(outbox_relay_interval=1.0, outbox_retry_max=60.0)

    relay = OutboxRelay(Stub())  # type: ignore[arg-type]
    for attempts, expected in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)):
        delays = [relay.backoff(attempts) for _ in range(50)]
        assert all(0.8 * expected <= d <= 1.2 * expected for d in delays), (attempts, min(delays), max(delays))
    assert len({relay.backoff(3) for _ in range(10)}) > 1  # jittered: rows failed together spread out
