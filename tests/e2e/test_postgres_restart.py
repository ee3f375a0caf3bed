"""PostgreSQL restarts mid-run: the store bus and its consumers recover by themselves.

The test runs a cluster of its own (``initdb``/``pg_ctl`` as the ``postgres`` user,
on a free port, in a temporary directory) and pushes the example order flow through
the PostgreSQL store bus: two worker runtimes host the services, a third publishes,
each with its own connections, as separate processes would. Partway it restarts the
cluster cleanly (``pg_ctl restart -m fast``) and later crashes it
(``-m immediate``: every backend killed, crash recovery on start) while publishing
goes on. Every order must complete and every event must be recorded exactly once:
a publish that failed is retried with the same message id, a handling whose commit
failed comes back after its lease and the inbox skips it if the commit had landed.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from interplay import Runtime
from interplay.errors import StoreError
from interplay.examples.orders import Order, app
from interplay.message import new_id
from interplay.testing import wait_until

from ..pg import Cluster
from ..servers import IN_CI

pytestmark = pytest.mark.slow

ORDERS = 300
SERVICES = ("payments", "shipping", "notification")
COMPLETED = "SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'"


@pytest.fixture(autouse=True)
def _cluster_tools() -> None:
    if not Cluster.available():
        reason = "initdb/pg_ctl (PostgreSQL 15), runuser and root are needed to run a cluster of our own"
        if IN_CI:
            pytest.fail(f"{reason}, and CI is set: tests may not skip for a missing service")
        pytest.skip(reason)


async def count(rt: Runtime, sql: str) -> int:
    return int((await rt.store.read(lambda tx: tx.one(sql)))[0])


async def at_least(rt: Runtime, sql: str, n: int) -> bool:
    try:
        return await count(rt, sql) >= n
    except StoreError:  # the server is restarting
        return False


async def started_at(rt: Runtime) -> object:
    return (await rt.store.read(lambda tx: tx.one("SELECT pg_postmaster_start_time()")))[0]


@pytest.mark.timeout(300)
async def test_postgres_restarts_mid_run_lose_nothing_and_duplicate_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    options = {"lease": 2.0, "shutdown_grace": 2.0, "receive_timeout": 0.5}
    flow_ids: list[str] = []
    failed_publishes = 0
    try:
        await cluster.init()
        async with (
            app.run(store=cluster.url, services=["payments", "shipping"], orchestrator=False, **options) as upstream,
            app.run(store=cluster.url, services=["notification", "orders", "delivery"], orchestrator=False,
                    **options),
            app.run(store=cluster.url, services=[], orchestrator=False, **options) as client,
        ):

            async def publish_one(i: int) -> str:
                nonlocal failed_publishes
                msg_id = new_id()  # kept across retries: a publish that did commit is not doubled
                while True:
                    try:
                        return await client.publish("order.created", Order(id=i, amount=1 + i % 50), id=msg_id)
                    except StoreError:
                        failed_publishes += 1
                        await asyncio.sleep(0.1)  # the server is restarting

            async def publish(numbers: range) -> None:
                for chunk in range(numbers.start, numbers.stop, 10):  # ten at a time, concurrently
                    flow_ids.extend(await asyncio.gather(*(
                        publish_one(i) for i in range(chunk, min(chunk + 10, numbers.stop))
                    )))

            first_start = await started_at(client)
            third = ORDERS // 3
            await publish(range(third))
            for mode, numbers in (("fast", range(third, 2 * third)), ("immediate", range(2 * third, ORDERS))):
                await wait_until(lambda: at_least(upstream, COMPLETED, 1), timeout=30, message="orders flowing")
                publishing = asyncio.ensure_future(publish(numbers))
                try:
                    await wait_until(lambda n=numbers: len(flow_ids) >= n.start + 10, timeout=30,
                                     message="publishing under way")
                    await cluster.restart(mode)  # while services handle and the client publishes
                    await publishing
                finally:
                    publishing.cancel()
            assert await started_at(client) != first_start  # it really was restarted

            for flow_id in flow_ids:
                summary = await client.wait_flow(flow_id, timeout=60)
                assert summary.status == "completed", (flow_id, summary)
            await client.settled(timeout=60)
            messages = await client.store.read(lambda tx: tx.all(
                "SELECT flow_id, type, COUNT(*) FROM ip_messages GROUP BY flow_id, type"
            ))
            inbox = dict(await client.store.read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp")))
            left = await count(client, "SELECT COUNT(*) FROM ip_queue WHERE grp IN ('payments', 'shipping', "
                                       "'notification', 'orders', 'delivery')")
            redelivered = await count(client, "SELECT COUNT(*) FROM ip_spans WHERE attempt > 1")
            dead = await client.dlq()
            stuck_sessions = await count(client, "SELECT COUNT(*) FROM pg_stat_activity "
                                                 "WHERE state LIKE 'idle in transaction%'")
            locks = await count(client, "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'")
    finally:
        await cluster.stop()
        cluster.remove()
    warnings = [r.getMessage() for r in caplog.records]
    print(f"{failed_publishes} failed publishes (retried), {sum('receive failed' in w for w in warnings)} "
          f"failed receives, {redelivered} redelivered handlings")
    assert len(flow_ids) == len(set(flow_ids)) == ORDERS
    duplicated = [(flow, type_, n) for flow, type_, n in messages if n != 1]
    assert duplicated == [], "an event was recorded more than once"
    per_type = Counter(type_ for _, type_, _ in messages)
    assert per_type == {"order.created": ORDERS, "payment.completed": ORDERS, "shipment.prepared": ORDERS,
                        "customer.notified": ORDERS}
    assert {flow for flow, _, _ in messages} == set(flow_ids)
    assert inbox == dict.fromkeys(SERVICES, ORDERS)
    assert left == 0
    assert dead == []
    assert (stuck_sessions, locks) == (0, 0), "a session was left holding a transaction or a lock"
    # The services felt the restarts, and got over them by themselves.
    assert any("receive failed" in w for w in warnings)
