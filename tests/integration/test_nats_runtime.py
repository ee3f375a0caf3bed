"""Choreography end to end on NATS JetStream (127.0.0.1:4222) with a SQLite store file.

Every test runs on its own stream (``nats://...?stream=<unique>``; the subject prefix
follows the stream name), deleted afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, Retry, Runtime
from interplay.message import Message
from interplay.testing import wait_until

from ..servers import require

SERVER = "nats://127.0.0.1:4222"


class Order(BaseModel):
    id: int
    amount: float = 10.0


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    """A bus URL on a stream of this test's own."""
    require("nats")
    stream = f"IT_{uuid.uuid4().hex[:12]}"
    yield f"{SERVER}?stream={stream}"
    nc = await nats.connect(SERVER)
    try:
        await nc.jsm().delete_stream(stream)
    except NotFoundError:
        pass
    finally:
        await nc.close()


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


async def dead_letters(rt: Runtime, n: int) -> bool:
    return len(await rt.dlq()) >= n


async def test_order_flow_completes_with_the_expected_trace(nats_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with order_app(calls).run(bus=nats_url, store=sqlite_url) as rt:
        assert rt.delivery_mode == "outbox"  # a durable broker: commit first, then publish
        flow_id = await rt.publish("order.created", Order(id=1))
        assert (await rt.wait_flow(flow_id)).status == "completed"
        await rt.settled()
        flow = await rt.trace(flow_id)
        outbox = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_outbox")[0])
    assert flow.name == "order"
    assert flow.shape() == (
        ("order.created", (("payment.completed", (("shipment.prepared", ()),)),)),
    )
    assert [(s.service, s.outcome) for s in flow.roots[0].spans] == [("payments", "ok")]
    assert [(s.service, s.outcome) for s in flow.find("shipment.prepared")[0].spans] == [("notification", "ok")]
    assert all(m.flow_id == flow_id for m in flow.messages)
    assert calls == Counter(payments=1, shipping=1, notification=1)
    assert outbox == 0  # every committed message was confirmed by JetStream


async def test_reject_goes_to_dlq_and_emits_on_error(nats_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with order_app(calls).run(bus=nats_url, store=sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=7, amount=-1))
        summary = await rt.wait_flow(flow_id)
        await rt.settled()
        flow = await rt.trace(flow_id)
        dead = await rt.dlq()
    assert summary.status == "failed"
    assert calls == Counter(payments=1, orders=1)  # never retried; compensated via on_error
    assert flow.shape() == (("order.created", (("payment.failed", (("order.cancelled", ()),)),)),)
    failure = flow.find("payment.failed")[0].message.payload
    assert (failure["error_type"], failure["payload"]) == ("Reject", {"id": 7, "amount": -1.0})
    assert [(d.group, d.reason, d.attempts, d.route) for d in dead] == [
        ("payments", "rejected", 1, "event.order.created")
    ]


async def test_garbage_bytes_go_to_dlq_and_the_consumer_keeps_going(nats_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with order_app(calls).run(bus=nats_url, store=sqlite_url) as rt:
        for junk in (b"\x00\xff garbage", b'{"v": 1, "kind": "event"}', b"\x80\x04\x95pickle"):
            await rt.transport.publish_to_group("payments", "event.order.created", junk)
        await wait_until(lambda: dead_letters(rt, 3), message="3 dead letters")
        good = await rt.publish("order.created", Order(id=3))
        assert (await rt.wait_flow(good)).status == "completed"
        dead = await rt.dlq()
    assert [d.reason for d in dead] == ["invalid_envelope"] * 3
    assert {d.route for d in dead} == {"event.order.created"}  # carried by the direct subject
    assert any("pickle" in (d.error or "") for d in dead)
    assert all(d.attempts == 1 for d in dead)  # no retry loop for bytes that can never decode
    assert calls == Counter(payments=1, shipping=1, notification=1)


async def test_invalid_payload_goes_to_dlq_with_the_reason(nats_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    async with order_app(calls).run(bus=nats_url, store=sqlite_url) as rt:
        bad = await rt.publish("order.created", {"id": "not-a-number"})
        good = await rt.publish("order.created", Order(id=2))
        assert (await rt.wait_flow(good)).status == "completed"
        assert (await rt.wait_flow(bad)).status == "failed"
        dead = await rt.dlq()
        flow = await rt.trace(bad)
    assert [(d.reason, d.type) for d in dead] == [("invalid_payload", "order.created")]
    assert "id: Input should be a valid integer" in (dead[0].error or "")
    assert calls["payments"] == 1  # only the good order reached the handler
    span = flow.roots[0].spans[0]
    assert (span.outcome, span.service) == ("invalid", "payments")


async def test_duplicate_deliveries_run_the_handler_once(nats_url: str, sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    order_id = "0190f000-0000-7000-8000-000000000001"
    async with order_app(calls).run(bus=nats_url, store=sqlite_url) as rt:
        flow_id = await rt.publish("order.created", Order(id=1), id=order_id)
        assert (await rt.wait_flow(flow_id)).status == "completed"
        payments = rt.consumers["payments"]
        handled = payments.handled
        # The same message id twice more, at once, past the broker's de-duplication
        # (publish_to_group sets no Nats-Msg-Id): only the inbox can stop them.
        copy = Message(type="order.created", payload={"id": 1, "amount": 10.0}, id=order_id, flow_id=flow_id)
        await asyncio.gather(*(
            rt.transport.publish_to_group("payments", "event.order.created", copy.encode()) for _ in range(2)
        ))
        await wait_until(lambda: payments.handled >= handled + 2, message="both copies settled")
        # A publisher retry with the same id: JetStream stores one copy (Nats-Msg-Id).
        retry_id = "0190f000-0000-7000-8000-000000000002"
        second = await rt.publish("order.created", Order(id=2), id=retry_id)
        await rt.publish("order.created", Order(id=2), id=retry_id, flow_id=second)
        assert (await rt.wait_flow(second)).status == "completed"
        await rt.settled()  # neither the extra copies nor the dropped retry left a count behind
        emitted = await rt.store.read(
            lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type ORDER BY type")
        )
        spans = await rt.store.read(lambda tx: tx.all(
            "SELECT msg_id, COUNT(*) FROM ip_spans WHERE service = 'payments' GROUP BY msg_id ORDER BY msg_id"
        ))
    assert calls == Counter(payments=2, shipping=2, notification=2)
    assert dict(emitted) == {"order.created": 2, "payment.completed": 2, "shipment.prepared": 2}
    assert spans == [(order_id, 1), (retry_id, 1)]


async def test_a_publisher_retry_dropped_by_the_broker_leaves_nothing_pending(
    nats_url: str, sqlite_url: str
) -> None:
    calls: Counter[str] = Counter()
    async with order_app(calls).run(bus=nats_url, store=sqlite_url) as rt:
        msg_id = "0190f000-0000-7000-8000-000000000003"
        flow_id = await rt.publish("order.created", Order(id=3), id=msg_id)
        await rt.publish("order.created", Order(id=3), id=msg_id, flow_id=flow_id)
        assert (await rt.wait_flow(flow_id)).status == "completed"
        # JetStream stored the retry once (Nats-Msg-Id): the flow must not wait for a copy.
        await rt.settled(timeout=5)
        pending = await rt.store.read(lambda tx: tx.one("SELECT pending FROM ip_flows WHERE flow_id = ?",
                                                        (flow_id,))[0])
    assert pending == 0
    assert calls == Counter(payments=1, shipping=1, notification=1)


async def test_retries_use_delayed_naks_then_dead_letter(nats_url: str, sqlite_url: str) -> None:
    app = App("flaky")
    attempts: list[int] = []

    @app.service("worker").on("task.created", on_error="task.failed", retry=Retry(attempts=3, backoff=0.05))
    async def always_fails(task: dict[str, Any], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    async with app.run(bus=nats_url, store=sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await wait_until(lambda: dead_letters(rt, 1), message="dead letter")
        await rt.settled()
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
    assert attempts == [1, 2, 3]  # the broker's delivery count drives the attempts
    assert [(d.reason, d.attempts) for d in dead] == [("retries_exhausted", 3)]
    assert [s.outcome for s in flow.roots[0].spans] == ["retry", "retry", "dead"]
    assert flow.find("task.failed")[0].message.payload["attempts"] == 3


async def test_dlq_replay_is_not_taken_for_a_duplicate_publish(nats_url: str, sqlite_url: str) -> None:
    app = App("fixable")
    broken = {"on": True}
    done: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=1))
    async def work(task: dict[str, int]) -> dict[str, int]:
        if broken["on"]:
            raise RuntimeError("bug")
        done.append(task["n"])
        return task

    async with app.run(bus=nats_url, store=sqlite_url) as rt:
        flow_id = await rt.publish("task.created", {"n": 42})
        await wait_until(lambda: dead_letters(rt, 1), message="dead letter")
        (dead,) = await rt.dlq()
        broken["on"] = False
        # Within JetStream's de-duplication window of the original publish: the replay
        # must still arrive, so it may not reuse the message id as Nats-Msg-Id.
        await rt.replay([dead.id])
        await wait_until(lambda: done == [42], message="replayed task handled")
        assert (await rt.wait_flow(flow_id)).status == "completed"
        assert await rt.dlq() == []


async def test_two_runtimes_share_a_service_group(nats_url: str, tmp_path: Any) -> None:
    store_url = f"sqlite:///{tmp_path / 'shared.db'}"
    handled: dict[str, list[int]] = {"a": [], "b": []}

    def build(tag: str) -> App:
        app = App("work")

        @app.service("workers").on("job.queued", concurrency=4)
        async def work(job: dict[str, int]) -> None:
            handled[tag].append(job["n"])
            await asyncio.sleep(0.002)

        return app

    async with build("a").run(bus=nats_url, store=store_url) as rt_a, \
            build("b").run(bus=nats_url, store=store_url):
        await asyncio.gather(*(rt_a.publish("job.queued", {"n": n}) for n in range(200)))
        await wait_until(lambda: len(handled["a"]) + len(handled["b"]) >= 200, timeout=20)
        await rt_a.settled()
    assert sorted(handled["a"] + handled["b"]) == list(range(200))  # each once, none lost
    assert handled["a"], "runtime a took no share"
    assert handled["b"], "runtime b took no share"
