"""Choreography end to end through the runtime on redis:// (Redis Streams) with a SQLite store.

Needs a Redis server on 127.0.0.1:6379 (see tests/servers.py). Each test uses its own
key prefix (``?prefix=``) and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, Retry, Runtime
from interplay.message import Message
from interplay.testing import wait_until
from interplay.transports.redis import RedisTransport

from ..servers import require

REDIS = "redis://127.0.0.1:6379/0"


class Order(BaseModel):
    id: int
    amount: float = 10.0


@pytest.fixture
async def bus_url() -> AsyncIterator[str]:
    """A redis:// URL with a key prefix of this test's own (keys deleted afterwards)."""
    require("redis")
    prefix = f"iptest:{uuid.uuid4().hex[:12]}:"
    yield f"{REDIS}?prefix={prefix}"
    client = aioredis.Redis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def order_app(calls: Counter[str]) -> App:
    app = App("shop")
    payments, shipping = app.service("payments"), app.service("shipping")
    notification, orders = app.service("notification"), app.service("orders")

    @payments.on("order.created", emits="payment.completed", on_error="payment.failed")
    async def take_payment(order: Order) -> Order:
        calls["payments"] += 1
        if order.amount < 0:
            raise Reject("negative amount")
        return order

    @shipping.on("payment.completed")
    async def ship(order: Order, ctx: Context) -> None:
        calls["shipping"] += 1
        await ctx.emit("shipment.prepared", order)

    @notification.on("shipment.prepared")
    async def notify(order: Order) -> None:
        calls["notification"] += 1

    @orders.on("payment.failed", emits="order.cancelled")
    async def cancel(failure: Failure) -> dict[str, Any]:
        calls["orders"] += 1
        return {"id": failure.payload["id"], "why": failure.error}

    app.flow("order", starts="order.created", ends="shipment.prepared", fails="payment.failed", within=60)
    return app


def run(app: App, bus_url: str, sqlite_url: str, **options: Any) -> Runtime:
    return app.run(store=sqlite_url, bus=bus_url, **options)


async def dead_letters(rt: Runtime, n: int) -> bool:
    return len(await rt.dlq()) >= n


async def test_runtime_uses_redis_and_the_outbox(bus_url: str, sqlite_url: str) -> None:
    async with run(App("x"), bus_url, sqlite_url) as rt:
        assert isinstance(rt.transport, RedisTransport)
        assert rt.delivery_mode == "outbox"  # durable broker + durable store: commit, then publish


async def test_order_flow_completes_with_the_expected_trace(bus_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with run(order_app(calls), bus_url, sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=1))
        assert (await rt.wait_flow(flow_id)).status == "completed"
        await rt.settled()
        flow = await rt.trace(flow_id)
        outbox_left = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_outbox")[0])
    assert flow.name == "order"
    assert flow.shape() == (("order.created", (("payment.completed", (("shipment.prepared", ()),)),)),)
    assert [(s.service, s.outcome, s.attempt) for s in flow.roots[0].spans] == [("payments", "ok", 1)]
    assert [(s.service, s.outcome) for s in flow.find("payment.completed")[0].spans] == [("shipping", "ok")]
    assert [(s.service, s.outcome) for s in flow.find("shipment.prepared")[0].spans] == [("notification", "ok")]
    assert all(m.flow_id == flow_id for m in flow.messages)
    assert calls == Counter(payments=1, shipping=1, notification=1)
    assert outbox_left == 0  # every committed message was published and forgotten


async def test_reject_goes_to_dlq_and_emits_on_error(bus_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with run(order_app(calls), bus_url, sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=7, amount=-1))
        summary = await rt.wait_flow(flow_id)
        await rt.settled()
        flow = await rt.trace(flow_id)
        dead = await rt.dlq()
    assert summary.status == "failed"
    assert calls == Counter(payments=1, orders=1)  # never retried; compensated via on_error
    assert flow.shape() == (("order.created", (("payment.failed", (("order.cancelled", ()),)),)),)
    failure = flow.find("payment.failed")[0].message.payload
    assert (failure["error_type"], failure["service"]) == ("Reject", "payments")
    assert failure["payload"] == {"id": 7, "amount": -1.0}
    assert [(d.group, d.reason, d.attempts, d.error) for d in dead] == [
        ("payments", "rejected", 1, "Reject: negative amount")
    ]


async def test_garbage_bytes_go_to_dlq_and_the_consumer_keeps_going(bus_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    junk = [b"\x00\xff garbage", b'{"v": 1, "kind": "event"}', b"\x80\x04\x95pickle"]
    async with run(order_app(calls), bus_url, sqlite_url) as rt:
        for body in junk:
            await rt.transport.publish_to_group("payments", "event.order.created", body)
        good = await rt.publish("order.created", Order(id=3))
        assert (await rt.wait_flow(good)).status == "completed"
        await wait_until(lambda: dead_letters(rt, 3), message="3 dead letters")
        dead = await rt.dlq()
    assert sorted(d.body for d in dead) == sorted(junk)  # the exact bytes, kept for inspection
    assert {(d.reason, d.group, d.route, d.attempts) for d in dead} == {
        ("invalid_envelope", "payments", "event.order.created", 1)  # no retry loop
    }
    assert any("pickle" in (d.error or "") for d in dead)
    assert calls["payments"] == 1


async def test_unknown_type_and_invalid_payload_go_to_dlq_with_reasons(bus_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with run(order_app(calls), bus_url, sqlite_url) as rt:
        stranger = Message(type="order.teleported", payload={"id": 1}, source="elsewhere")
        await rt.transport.publish_to_group("payments", "event.order.created", stranger.encode())
        bad = await rt.publish("order.created", {"id": "not-a-number"})
        good = await rt.publish("order.created", Order(id=2))
        assert (await rt.wait_flow(good)).status == "completed"
        assert (await rt.wait_flow(bad)).status == "failed"
        await wait_until(lambda: dead_letters(rt, 2), message="2 dead letters")
        await rt.settled()
        dead = {d.reason: d for d in await rt.dlq()}
        bad_flow = await rt.trace(bad)
    assert set(dead) == {"no_handler", "invalid_payload"}
    assert dead["no_handler"].msg_id == stranger.id
    assert "no handler for event 'order.teleported'" in (dead["no_handler"].error or "")
    assert "id: Input should be a valid integer" in (dead["invalid_payload"].error or "")
    span = bad_flow.roots[0].spans[0]
    assert (span.service, span.outcome) == ("payments", "invalid")
    # only the good order reached a handler; the invalid one was compensated via on_error
    assert calls == Counter(payments=1, shipping=1, notification=1, orders=1)


async def test_duplicate_deliveries_run_the_handler_once(bus_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with run(order_app(calls), bus_url, sqlite_url) as rt:
        first = "0190f000-0000-7000-8000-000000000001"
        flow_id = await rt.publish("order.created", Order(id=1), id=first)
        await rt.wait_flow(flow_id)
        await rt.settled()
        # the very same message again, later (a publisher retry)
        await rt.publish("order.created", Order(id=1), id=first, flow_id=flow_id)
        # the same bytes twice on the broker, racing (redelivery, a retried XADD)
        twice = Message(type="order.created", payload={"id": 2, "amount": 5.0}, source="client")
        await rt.transport.publish([rt.app.topology.outgoing(twice)] * 2)
        await wait_until(lambda: calls["notification"] == 2, message="second order through")
        await wait_until(lambda: all_acked(rt, "payments", "event.order.created"), message="duplicates acked")
        await rt.settled()
        emitted = await rt.store.read(
            lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type ORDER BY type")
        )
    assert calls == Counter(payments=2, shipping=2, notification=2)
    assert dict(emitted) == {"payment.completed": 2, "order.created": 1, "shipment.prepared": 2}


async def all_acked(rt: Runtime, group: str, route: str) -> bool:
    """The group has read everything on the route's stream and acked it all."""
    assert isinstance(rt.transport, RedisTransport)
    for info in await rt.transport.redis.xinfo_groups(rt.transport.stream_key(route)):
        if info["name"] == group.encode():
            return bool(info["pending"] == 0 and info["lag"] == 0)
    return False


async def test_retries_back_off_through_nack_then_dead_letter(bus_url: str, sqlite_url: str) -> None:
    app = App("flaky")
    attempts: list[int] = []

    policy = Retry(attempts=3, backoff=0.2, jitter=False)

    @app.service("worker").on("task.created", on_error="task.failed", retry=policy)
    async def always_fails(task: dict[str, Any], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    async with run(app, bus_url, sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await wait_until(lambda: dead_letters(rt, 1), message="dead letter")
        await rt.settled()
        (dead,) = await rt.dlq()
        spans = (await rt.trace(flow_id)).roots[0].spans
    assert attempts == [1, 2, 3]  # the broker's delivery count drives the retry policy
    assert (dead.reason, dead.attempts, dead.error) == ("retries_exhausted", 3, "RuntimeError: boom 3")
    assert [s.outcome for s in spans] == ["retry", "retry", "dead"]
    assert spans[1].started - spans[0].ended >= 0.18  # redelivered after its backoff, not before


async def test_dlq_replay_goes_back_to_the_failed_service(bus_url: str, sqlite_url: str) -> None:
    app = App("fixable")
    broken = {"on": True}
    done: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=1))
    async def work(task: dict[str, int]) -> dict[str, int]:
        if broken["on"]:
            raise RuntimeError("bug")
        done.append(task["n"])
        return task

    async with run(app, bus_url, sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 42})
        await wait_until(lambda: dead_letters(rt, 1), message="dead letter")
        (dead,) = await rt.dlq()
        broken["on"] = False
        replayed = await rt.replay([dead.id])
        await wait_until(lambda: done == [42], message="replayed message handled")
        await rt.settled()
        flow = await rt.trace(flow_id)
    assert [r.msg_id for r in replayed] == [dead.msg_id]
    assert flow.status == "completed"


async def test_two_runtimes_share_a_group_on_redis(bus_url: str, sqlite_url: str) -> None:
    handled: dict[str, list[int]] = {"a": [], "b": []}

    def build(tag: str) -> App:
        app = App("work")

        @app.service("workers").on("job.queued", concurrency=4)
        async def work(job: dict[str, int]) -> None:
            handled[tag].append(job["n"])
            await asyncio.sleep(0.002)  # a handler doing work, so both consumers get a share

        return app

    async with run(build("a"), bus_url, sqlite_url) as rt_a, run(build("b"), bus_url, sqlite_url) as rt_b:
        await asyncio.gather(*(rt_a.publish("job.queued", {"n": n}) for n in range(200)))
        await wait_until(lambda: len(handled["a"]) + len(handled["b"]) >= 200, timeout=20)
        await rt_b.settled()
    assert sorted(handled["a"] + handled["b"]) == list(range(200))
    assert handled["a"]
    assert handled["b"]
