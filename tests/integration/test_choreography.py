"""Choreography end to end, on the SQLite store bus and on memory:// (real SQLite files)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, Retry, Runtime
from interplay.testing import wait_until
from interplay.transports.memory import MemoryTransport

BUSES = ["store", "memory"]


class Order(BaseModel):
    id: int
    amount: float = 10.0


def make_runtime(app: App, bus: str, store: str, **kwargs: Any) -> Runtime:
    return app.run(store=store, bus=None if bus == "store" else "memory://", **kwargs)


@pytest.fixture(params=BUSES)
def bus(request: pytest.FixtureRequest) -> str:
    return str(request.param)


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


async def test_order_flow_trace_has_the_expected_tree(bus: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with make_runtime(order_app(calls), bus, sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=1))
        assert (await rt.wait_flow(flow_id)).status == "completed"
        await rt.settled()
        flow = await rt.trace(flow_id)
    assert flow.name == "order"
    assert flow.shape() == (
        ("order.created", (("payment.completed", (("shipment.prepared", ()),)),)),
    )
    root = flow.roots[0]
    assert [(s.service, s.outcome) for s in root.spans] == [("payments", "ok")]
    assert [(s.service, s.outcome) for s in flow.find("shipment.prepared")[0].spans] == [("notification", "ok")]
    assert all(m.flow_id == flow_id for m in flow.messages)
    assert "payment.completed" in flow.render()
    assert calls == Counter(payments=1, shipping=1, notification=1)


async def test_reject_goes_to_dlq_without_retry_and_emits_on_error(bus: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with make_runtime(order_app(calls), bus, sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=7, amount=-1))
        summary = await rt.wait_flow(flow_id)
        await rt.settled()
        flow = await rt.trace(flow_id)
        dead = await rt.dlq()
    assert summary.status == "failed"
    assert calls["payments"] == 1  # Reject: never retried
    assert calls["orders"] == 1  # the compensation ran, through the on_error event
    assert flow.shape() == (("order.created", (("payment.failed", (("order.cancelled", ()),)),)),)
    failure = flow.find("payment.failed")[0].message.payload
    assert failure["error_type"] == "Reject"
    assert failure["payload"] == {"id": 7, "amount": -1.0}
    assert failure["service"] == "payments"
    assert [(d.group, d.reason, d.attempts) for d in dead] == [("payments", "rejected", 1)]
    assert dead[0].error == "Reject: negative amount"


async def test_fan_out_reaches_every_service(bus: str, sqlite_url: str) -> None:
    app = App("fan")
    seen: Counter[str] = Counter()
    for name in ("audit", "billing", "mailer"):
        svc = app.service(name)

        def make(name: str) -> Callable[[dict[str, Any]], Any]:
            async def handler(payload: dict[str, Any]) -> None:
                seen[name] += 1

            return handler

        svc.on("user.signed_up")(make(name))
    async with make_runtime(app, bus, sqlite_url) as rt:
        for i in range(20):
            await rt.publish("user.signed_up", {"user": i})
        await wait_until(lambda: sum(seen.values()) == 60, message="60 handlings")
        await rt.settled()
    assert seen == Counter(audit=20, billing=20, mailer=20)


async def test_competing_consumers_share_a_group(tmp_path: Path) -> None:
    """Two runtimes host the same service on one store: each message is handled once."""
    store_url = f"sqlite:///{tmp_path / 'shared.db'}"
    handled: dict[str, list[int]] = {"a": [], "b": [], "client": []}

    def build(tag: str) -> App:
        app = App("work")

        @app.service("workers").on("job.queued", concurrency=4)
        async def work(job: dict[str, int]) -> None:
            handled[tag].append(job["n"])
            await asyncio.sleep(0.002)

        return app

    # A small prefetch so neither consumer can take everything in one claim; the
    # publisher is a third process-alike, so both consumers learn of work the same way.
    async with (
        build("a").run(store=store_url, prefetch=4) as rt_a,
        build("b").run(store=store_url, prefetch=4),
        build("client").run(store=store_url, services=[]) as client,
    ):
        await asyncio.gather(*(client.publish("job.queued", {"n": n}) for n in range(200)))
        await wait_until(lambda: len(handled["a"]) + len(handled["b"]) >= 200, timeout=30)
        await rt_a.settled()
    everything = handled["a"] + handled["b"]
    assert sorted(everything) == list(range(200))  # each once, none lost
    assert handled["a"], "consumer a took no share"
    assert handled["b"], "consumer b took no share"


async def test_competing_consumers_on_shared_memory_bus(tmp_path: Path) -> None:
    bus = MemoryTransport()
    store_url = f"sqlite:///{tmp_path / 'shared.db'}"
    handled: Counter[str] = Counter()

    def build(tag: str) -> App:
        app = App("work")

        @app.service("workers").on("job.queued")
        async def work(job: dict[str, int]) -> None:
            handled[tag] += 1
            await asyncio.sleep(0.001)

        return app

    async with build("a").run(store=store_url, bus=bus) as rt_a, build("b").run(store=store_url, bus=bus):
        for n in range(100):
            await rt_a.publish("job.queued", {"n": n})
        await wait_until(lambda: handled.total() == 100)
        await rt_a.settled()
    assert handled.total() == 100
    assert handled["a"]
    assert handled["b"]


async def test_retry_with_backoff_then_dlq_with_on_error(bus: str, sqlite_url: str) -> None:
    app = App("flaky")
    attempts: list[int] = []

    policy = Retry(attempts=3, backoff=0.01, jitter=False)

    @app.service("worker").on("task.created", on_error="task.failed", retry=policy)
    async def always_fails(task: dict[str, Any], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    async with make_runtime(app, bus, sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await wait_until(lambda: len(attempts) == 3)
        await rt.settled()
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
    assert attempts == [1, 2, 3]
    assert [(d.reason, d.attempts, d.error) for d in dead] == [("retries_exhausted", 3, "RuntimeError: boom 3")]
    spans = flow.roots[0].spans
    assert [s.outcome for s in spans] == ["retry", "retry", "dead"]
    assert spans[1].started - spans[0].ended >= 0.005  # waited its backoff
    failure = flow.find("task.failed")[0].message.payload
    assert failure["attempts"] == 3
    assert flow.status == "failed"


async def test_retry_succeeds_before_the_limit(bus: str, sqlite_url: str) -> None:
    app = App("flaky")
    attempts: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=5, backoff=0.01))
    async def sometimes(task: dict[str, Any], ctx: Context) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return task

    async with make_runtime(app, bus, sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await rt.settled()
        flow = await rt.trace(flow_id)
        assert await rt.dlq() == []
    assert attempts == [1, 2, 3]
    assert flow.shape() == (("task.created", (("task.done", ()),)),)
    assert flow.status == "completed"


async def test_invalid_payload_goes_to_dlq_and_others_keep_flowing(bus: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with make_runtime(order_app(calls), bus, sqlite_url) as rt:
        bad = await rt.publish("order.created", {"id": "not-a-number"})
        good = await rt.publish("order.created", Order(id=2))
        assert (await rt.wait_flow(good)).status == "completed"
        assert (await rt.wait_flow(bad)).status == "failed"
        await rt.settled()
        dead = await rt.dlq()
        flow = await rt.trace(bad)
    assert [(d.reason, d.type) for d in dead] == [("invalid_payload", "order.created")]
    assert "id: Input should be a valid integer" in (dead[0].error or "")
    assert calls["payments"] == 1  # only the good order reached the handler
    span = flow.roots[0].spans[0]
    assert (span.outcome, span.service) == ("invalid", "payments")
    assert "ValidationFailed" in (span.error or "")  # the flow records why


async def test_garbage_bytes_on_the_bus_go_to_dlq_without_crashing(bus: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with make_runtime(order_app(calls), bus, sqlite_url) as rt:
        for junk in (b"\x00\xff garbage", b'{"v": 1, "kind": "event"}', b"\x80\x04\x95pickle"):
            await rt.transport.publish_to_group("payments", "event.order.created", junk)
        good = await rt.publish("order.created", Order(id=3))
        assert (await rt.wait_flow(good)).status == "completed"
        await wait_until(lambda: _count_dlq(rt, 3), message="3 dead letters")
        dead = await rt.dlq()
    assert {d.reason for d in dead} == {"invalid_envelope"}
    assert any("pickle" in (d.error or "") for d in dead)
    assert all(d.attempts == 1 for d in dead)  # no retry loop for bytes that can never decode


async def _count_dlq(rt: Runtime, n: int) -> bool:
    return len(await rt.dlq()) >= n


async def test_same_message_delivered_twice_runs_the_handler_once(bus: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with make_runtime(order_app(calls), bus, sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=1), id="0190f000-0000-7000-8000-000000000001")
        await rt.wait_flow(flow_id)
        await rt.settled()
        # the very same message again (a redelivery, a publisher retry): skipped by the inbox
        await rt.publish("order.created", Order(id=1), id="0190f000-0000-7000-8000-000000000001", flow_id=flow_id)
        # and two copies at once, racing each other
        await asyncio.gather(*[
            rt.publish("order.created", Order(id=2), id="0190f000-0000-7000-8000-000000000002") for _ in range(2)
        ])
        await rt.settled()
        emitted = await rt.store.read(
            lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type ORDER BY type")
        )
    assert calls == Counter(payments=2, shipping=2, notification=2)
    assert dict(emitted) == {"order.created": 2, "payment.completed": 2, "shipment.prepared": 2}


async def test_dlq_replay_brings_a_fixed_message_back(bus: str, sqlite_url: str) -> None:
    app = App("fixable")
    broken = {"on": True}
    done: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=1))
    async def work(task: dict[str, int]) -> dict[str, int]:
        if broken["on"]:
            raise RuntimeError("bug")
        done.append(task["n"])
        return task

    async with make_runtime(app, bus, sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 42})
        await rt.settled()
        (dead,) = await rt.dlq()
        assert (await rt.trace(flow_id)).status == "failed"
        broken["on"] = False  # the fix is deployed
        replayed = await rt.replay([dead.id])
        await rt.settled()
        flow = await rt.trace(flow_id)
        assert await rt.dlq() == []
    assert [r.msg_id for r in replayed] == [dead.msg_id]  # same message id
    assert done == [42]
    assert flow.status == "completed"
    assert flow.shape() == (("task.created", (("task.done", ()),)),)


async def test_handlers_without_payload_or_sync_handlers(bus: str, sqlite_url: str) -> None:
    app = App("misc")
    seen: list[object] = []

    @app.service("a").on("ping", emits="pong")
    def sync_handler(payload: int) -> int:
        seen.append(payload)
        return payload + 1

    @app.service("b").on("pong")
    async def ctx_only(ctx: Context) -> None:
        seen.append(ctx.message.payload)

    async with make_runtime(app, bus, sqlite_url) as rt:
        await rt.publish("ping", 1)
        await wait_until(lambda: len(seen) == 2)
        await rt.settled()
    assert seen == [1, 2]


async def test_unknown_flow_is_not_found(sqlite_url: str) -> None:
    from interplay import NotFound

    async with App("x").run(store=sqlite_url) as rt:
        with pytest.raises(NotFound):
            await rt.trace("nope")
