"""The stuck-flow watch: a declared flow past ``within`` is announced once, whoever watches.

Virtual time (one VirtualClock shared by the runtimes) moves flows past their deadline
at once; real SQLite files, and PostgreSQL where the server is up, are the store.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from pydantic import BaseModel

from interplay import App
from interplay.runtime import Runtime
from interplay.stores import open_store
from interplay.stores.postgres import PostgresStore
from interplay.stores.schema import MIGRATIONS, SCHEMA_VERSION
from interplay.stores.sqlite import SqliteStore
from interplay.testing import VirtualClock, wait_until
from interplay.tracing.stuck import FLOW_STUCK, FlowStuck

from .. import pg
from ..cli.helpers import ok, rows
from ..servers import require

WITHIN = 60.0


class Order(BaseModel):
    id: int


def stalling_app(received: list[FlowStuck]) -> App:
    """Payments answers ``order.created``; nobody handles ``payment.completed``, so an order stalls
    there (unless its id is even: then shipping ends it). ``ops`` hears of stuck flows."""
    app = App("stalls")

    @app.service("payments").on("order.created", emits="payment.completed")
    async def pay(order: Order) -> Order | None:
        return order if order.id % 2 else None

    @app.service("shipping").on("order.created", emits="shipment.prepared")
    async def ship(order: Order) -> Order | None:
        return None if order.id % 2 else order

    @app.service("ops").on(FLOW_STUCK)
    async def page_someone(stuck: FlowStuck) -> None:
        received.append(stuck)

    app.flow("order", starts="order.created", ends="shipment.prepared", within=WITHIN)
    return app


async def stuck_events(rt: Runtime) -> int:
    """How many ``interplay.flow.stuck`` messages the store holds."""
    row = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_messages WHERE type = ?", (FLOW_STUCK,)))
    return int(row[0])


async def test_a_stalled_flow_is_announced_once_with_two_runtimes_watching(sqlite_url: str) -> None:
    clock = VirtualClock()
    received: list[FlowStuck] = []
    app = stalling_app(received)
    fast = {"stuck_check_interval": 5.0}
    async with app.run(store=sqlite_url, clock=clock, **fast) as first, \
            app.run(store=sqlite_url, clock=clock, services=["ops"], **fast) as second:
        started = clock.now()
        stalled = await first.publish("order.created", Order(id=1))
        finished = await first.publish("order.created", Order(id=2))
        await first.settled()
        assert (await first.trace(finished)).status == "completed"
        await clock.advance(WITHIN - 1)
        await first.settled()
        assert [f.flow_id for f in await first.flows(status="running")] == [stalled]
        assert received == []

        async def handled_after_a_second(expected: int) -> bool:
            await clock.advance(1)  # past the deadline, the watches of both wake up and look
            return len(received) == expected

        await wait_until(lambda: handled_after_a_second(1), message="the stuck event to be handled")
        for _ in range(20):  # the watches keep looking: nothing new
            assert await handled_after_a_second(1)
        assert await asyncio.gather(first.check_stuck(), second.check_stuck()) == [[], []]
        await first.settled()
        assert await stuck_events(first) == 1
        assert len(received) == 1
        stuck = received[0]
        assert (stuck.flow_id, stuck.name, stuck.last_step, stuck.pending) == (stalled, "order", "payment.completed", 0)
        flow = await first.trace(stalled)
        # (the deadline is on the runtime's clock; `started` is the first message's time)
        assert (stuck.started, stuck.deadline) == (flow.started, started + WITHIN)
        assert stuck.detected >= stuck.deadline
        assert flow.status == "stuck"
        assert flow.last_type == "payment.completed"  # the announcement is not a step of the flow
        assert [n.type for n in flow.roots] == ["order.created", FLOW_STUCK]  # in the flow's trace
        assert [f.flow_id for f in await first.flows(status="stuck")] == [stalled]

    # `interplay flows --status stuck` lists it with the last step it reached.
    listed = rows(await asyncio.to_thread(ok, "flows", "--store", sqlite_url, "--status", "stuck"))
    assert len(listed) == 1
    flow_id, name, _started, _deadline, overdue, last_step, pending, dead, announced = listed[0]
    assert (flow_id, name, last_step, pending, dead) == (stalled, "order", "payment.completed", "0", "0")
    assert re.fullmatch(r"\d+(s|min|h|d)", overdue), overdue
    assert announced != "not yet"


async def test_concurrent_checks_of_two_runtimes_announce_each_flow_once(sqlite_url: str) -> None:
    await _race(sqlite_url)


async def test_concurrent_checks_on_postgresql(pg_url: str) -> None:
    await _race(pg_url)


async def _race(store: str) -> None:
    """Two runtimes on one store look for stuck flows many times at once: one event per flow."""
    clock = VirtualClock()
    received: list[FlowStuck] = []
    app = stalling_app(received)
    manual = {"stuck_check_interval": None}  # only the explicit checks below
    async with app.run(store=store, clock=clock, **manual) as first, \
            app.run(store=store, clock=clock, services=["ops"], **manual) as second:
        stalled = {await first.publish("order.created", Order(id=n)) for n in (1, 3, 5, 7, 9)}
        await first.settled()
        await clock.advance(WITHIN + 1)
        results = await asyncio.gather(*(rt.check_stuck() for _ in range(4) for rt in (first, second)))
        announced = [s.flow_id for result in results for s in result]
        assert sorted(announced) == sorted(stalled)  # each flow by exactly one of the eight checks
        await wait_until(lambda: len(received) == 5, message="five stuck events handled")
        await first.settled()
        assert await stuck_events(first) == 5
        assert sorted(s.flow_id for s in received) == sorted(stalled)


async def test_a_flow_ending_late_but_before_the_check_is_not_announced(sqlite_url: str) -> None:
    clock = VirtualClock()
    received: list[FlowStuck] = []
    app = stalling_app(received)
    async with app.run(store=sqlite_url, clock=clock, stuck_check_interval=None) as rt:
        flow_id = await rt.publish("order.created", Order(id=1))
        await rt.settled()
        await clock.advance(WITHIN + 1)
        await rt.publish("shipment.prepared", Order(id=1), flow_id=flow_id)  # late, but it ends the flow
        await rt.settled()
        assert await rt.check_stuck() == []
        assert (await rt.trace(flow_id)).status == "completed"
        assert await stuck_events(rt) == 0


async def test_a_flow_can_declare_that_being_stuck_fails_it(sqlite_url: str) -> None:
    clock = VirtualClock()
    app = App("strict")
    app.service("payments").on("order.created", emits="payment.completed")(_echo)
    app.flow("order", starts="order.created", ends="shipment.prepared", fails=FLOW_STUCK, within=WITHIN)
    async with app.run(store=sqlite_url, clock=clock, stuck_check_interval=None) as rt:
        flow_id = await rt.publish("order.created", Order(id=1))
        await rt.settled()
        await clock.advance(WITHIN + 1)
        assert [s.flow_id for s in await rt.check_stuck()] == [flow_id]
        flow = await rt.trace(flow_id)
        assert flow.status == "failed"
        assert flow.last_type == "payment.completed"


async def _echo(order: Order) -> Order:
    return order


def _watching() -> bool:
    return "interplay-stuck-watch" in {t.get_name() for t in asyncio.all_tasks()}


async def test_who_watches() -> None:
    app = App("calm")
    app.service("worker").on("job.created")(_echo)
    app.flow("job", starts="job.created")  # no within: nothing can get stuck
    async with app.run(store="memory://"):
        assert not _watching()
    timed = stalling_app([])
    async with timed.run(store="memory://", services=[], orchestrator=False):  # a client: publishes only
        assert not _watching()
    async with timed.run(store="memory://", services=["ops"], stuck_check_interval=None):
        assert not _watching()
    async with timed.run(store="memory://", services=["ops"]):
        assert _watching()


# ------------------------------------------------------------------------------ migration
_OLD_FLOW = (
    "INSERT INTO ip_flows (flow_id, name, kind, declared, started, deadline, status, pending, dead, last_type, "
    "updated) VALUES ('old-flow', 'order', 'flow', 1, 100, 160, 'running', 0, 0, 'payment.completed', 100)"
)


# An outbox row its writer never published (migration 6 makes outbox rows claimable).
_OLD_OUTBOX = (
    "INSERT INTO ip_outbox (route, msg_id, body, created) "
    "VALUES ('event.order.created', 'old-msg', CAST('old-body' AS {blob}), 100)"
)


def _version_1(execute: Callable[[str], object], types: dict[str, str]) -> None:
    """The schema as interplay wrote it before the stuck-flow watch (version 1), with a flow
    and a leftover outbox row in it."""
    for statement in MIGRATIONS[1]:
        execute(statement.format(**types))
    execute("INSERT INTO ip_meta (key, value) VALUES ('schema_version', '1')")
    execute(_OLD_FLOW)
    execute(_OLD_OUTBOX.format(**types))


async def _upgraded_and_watched(url: str) -> None:
    received: list[FlowStuck] = []
    async with stalling_app(received).run(store=url, stuck_check_interval=None) as rt:
        assert await rt.store.schema_version() == SCHEMA_VERSION
        store = rt.store
        assert await store.outbox_due(200, 195)  # the old row: due at once
        taken = await store.outbox_claim(200, 195, 205, 10)
        assert [(r.msg_id, r.body, r.attempts) for r in taken] == [("old-msg", b"old-body", 1)]
        assert [s.flow_id for s in await rt.check_stuck()] == ["old-flow"]
        await wait_until(lambda: len(received) == 1)
        assert received[0].last_step == "payment.completed"


async def test_a_version_1_sqlite_store_is_upgraded_and_watched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    conn = sqlite3.connect(tmp_path / "old.db")
    _version_1(conn.execute, SqliteStore(url)._ddl_types())
    conn.commit()
    conn.close()
    await _upgraded_and_watched(url)


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    require("postgres")
    with pg.database("interplay_stuck") as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A PostgreSQL store URL in a schema of this test's own (dropped afterwards)."""
    schema = pg.new_schema()
    yield f"{pg_database}?schema={schema}"
    pg.drop_schema(pg_database, schema)


async def test_a_version_1_postgresql_store_is_upgraded_by_one_of_many(pg_url: str) -> None:
    database, schema = pg_url.split("?schema=")
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
        _version_1(conn.execute, PostgresStore(pg_url)._ddl_types())
    stores = [open_store(pg_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))  # processes upgrading together: one does it
    try:
        assert {await s.schema_version() for s in stores} == {SCHEMA_VERSION}
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    await _upgraded_and_watched(pg_url)
