"""Choreography end to end on every bus (tests/buses.py), each with a SQLite store file."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from interplay import App, Context, MessageTooLarge, NotFound, Retry, Runtime
from interplay.message import Message
from interplay.stores.records import Outgoing
from interplay.testing import wait_until

from ..buses import Bus
from .apps import Order, dead_letters, die_holding_poison, order_app, poison_app

ROUTE = "event.order.created"
JUNK = [b"\x00\xff garbage", b'{"v": 1, "kind": "event"}', b"\x80\x04\x95pickle"]  # no envelope

# Where a runtime puts what it publishes: in the store's own queue (one transaction),
# straight onto a bus that forgets anyway, or first in the outbox when the bus is a
# durable broker beside the store.
DELIVERY_MODES = {"store": "queue", "memory": "direct", "redis": "outbox", "amqp": "outbox", "nats": "outbox"}


PAYMENT_SPANS = "SELECT msg_id, COUNT(*) FROM ip_spans WHERE service = 'payments' GROUP BY msg_id ORDER BY msg_id"


async def test_order_flow_completes_with_the_expected_trace(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        assert rt.transport.scheme == bus.name
        assert rt.delivery_mode == DELIVERY_MODES[bus.name]
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
    assert "payment.completed" in flow.render()
    assert calls == Counter(payments=1, shipping=1, notification=1)
    assert outbox_left == 0  # every committed message was published (a broker confirmed it) and forgotten


async def test_reject_goes_to_dlq_without_retry_and_emits_on_error(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        flow_id = await rt.publish("order.created", Order(id=7, amount=-1))
        summary = await rt.wait_flow(flow_id)
        await rt.settled()
        flow = await rt.trace(flow_id)
        dead = await rt.dlq()
    assert summary.status == "failed"
    assert calls == Counter(payments=1, orders=1)  # never retried; compensated through the on_error event
    assert flow.shape() == (("order.created", (("payment.failed", (("order.cancelled", ()),)),)),)
    failure = flow.find("payment.failed")[0].message.payload
    assert (failure["error_type"], failure["service"]) == ("Reject", "payments")
    assert failure["payload"] == {"id": 7, "amount": -1.0}
    assert [(d.group, d.reason, d.attempts) for d in dead] == [("payments", "rejected", 1)]
    assert dead[0].error == "Reject: negative amount"  # its route: test_dead_letters_keep_the_route_they_came_by


async def test_garbage_bytes_go_to_dlq_and_the_consumer_keeps_going(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        for body in JUNK:
            await rt.transport.publish_to_group("payments", ROUTE, body)
        good = await rt.publish("order.created", Order(id=3))
        assert (await rt.wait_flow(good)).status == "completed"
        await wait_until(lambda: dead_letters(rt, 3), message="3 dead letters")
        await rt.settled()
        dead = await rt.dlq()
    assert sorted(d.body for d in dead) == sorted(JUNK)  # the exact bytes, kept for inspection
    assert [d.reason for d in dead] == ["invalid_envelope"] * 3
    assert {(d.group, d.attempts) for d in dead} == {("payments", 1)}  # no retry loop
    assert any("pickle" in (d.error or "") for d in dead)
    assert calls == Counter(payments=1, shipping=1, notification=1)


async def test_dead_letters_keep_the_route_they_came_by(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        for body in JUNK:
            await rt.transport.publish_to_group("payments", ROUTE, body)
        flow_id = await rt.publish("order.created", Order(id=7, amount=-1))
        assert (await rt.wait_flow(flow_id)).status == "failed"
        await wait_until(lambda: dead_letters(rt, 4), message="4 dead letters")
        await rt.settled()
        dead = await rt.dlq()
    # what a replay on a broker sends them back by, and what `interplay dlq` shows
    assert sorted((d.reason, d.group, d.route) for d in dead) == [
        *[("invalid_envelope", "payments", ROUTE)] * 3, ("rejected", "payments", ROUTE)
    ]


async def test_invalid_payload_goes_to_dlq_and_others_keep_flowing(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        bad = await rt.publish("order.created", {"id": "not-a-number"})
        good = await rt.publish("order.created", Order(id=2))
        assert (await rt.wait_flow(good)).status == "completed"
        assert (await rt.wait_flow(bad)).status == "failed"
        await rt.settled()
        dead = await rt.dlq()
        flow = await rt.trace(bad)
    assert [(d.reason, d.type, d.group) for d in dead] == [("invalid_payload", "order.created", "payments")]
    assert "id: Input should be a valid integer" in (dead[0].error or "")
    # only the good order reached a handler; the invalid one was compensated via on_error
    assert calls == Counter(payments=1, shipping=1, notification=1, orders=1)
    span = flow.roots[0].spans[0]
    assert (span.outcome, span.service) == ("invalid", "payments")
    assert "ValidationFailed" in (span.error or "")  # the flow records why


async def test_unknown_type_goes_to_dlq_as_no_handler(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        stranger = Message(type="order.teleported", payload={"id": 1}, source="elsewhere")
        await rt.transport.publish_to_group("payments", ROUTE, stranger.encode())
        good = await rt.publish("order.created", Order(id=2))
        assert (await rt.wait_flow(good)).status == "completed"
        await wait_until(lambda: dead_letters(rt, 1), message="a dead letter")
        await rt.settled()
        dead = await rt.dlq()
    assert [(d.reason, d.msg_id, d.group) for d in dead] == [("no_handler", stranger.id, "payments")]
    assert "no handler for event 'order.teleported'" in (dead[0].error or "")
    assert calls == Counter(payments=1, shipping=1, notification=1)


async def first_order_through(rt: Runtime, order_id: str) -> Message:
    """Publish order 1 under ``order_id``, wait until it went all the way; a copy of it."""
    flow_id = await rt.publish("order.created", Order(id=1), id=order_id)
    assert (await rt.wait_flow(flow_id)).status == "completed"
    await rt.settled()
    return Message(type="order.created", payload={"id": 1, "amount": 10.0}, id=order_id, flow_id=flow_id)


async def test_a_message_published_again_runs_the_handler_once(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    first, second = "0190f000-0000-7000-8000-000000000001", "0190f000-0000-7000-8000-000000000002"
    async with bus.run(order_app(calls)) as rt:
        copy = await first_order_through(rt, first)
        payments = rt.consumers["payments"]
        handled = payments.handled
        # The very same message again, later, through the runtime (a publisher retry)...
        await rt.publish("order.created", Order(id=1), id=first, flow_id=copy.flow_id)
        # ...and its bytes twice at once on the bus (a publish retried after a lost confirm).
        await rt.transport.publish([Outgoing(copy, ROUTE, copy.encode())] * 2)
        # A new order published twice at once, the copies racing each other.
        await asyncio.gather(*(rt.publish("order.created", Order(id=2), id=second) for _ in range(2)))
        # Five more deliveries, where JetStream drops a publish repeating an id within its
        # de-duplication window (Nats-Msg-Id): there only one copy of the second arrives.
        deliveries = 1 if bus.name == "nats" else 5
        await wait_until(lambda: payments.handled >= handled + deliveries, message="every copy settled")
        await rt.settled()
        emitted = await rt.store.read(
            lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type ORDER BY type")
        )
        spans = await rt.store.read(lambda tx: tx.all(PAYMENT_SPANS))
        pending = await rt.store.read(lambda tx: tx.all("SELECT pending FROM ip_flows"))
    assert payments.handled == handled + deliveries  # each copy settled (acked) once
    assert calls == Counter(payments=2, shipping=2, notification=2)
    assert dict(emitted) == {"order.created": 2, "payment.completed": 2, "shipment.prepared": 2}
    assert spans == [(first, 1), (second, 1)]
    assert pending == [(0,), (0,)]  # no copy left a count behind, nor was a dropped one waited for


async def test_redeliveries_straight_to_the_group_run_the_handler_once(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    order_id = "0190f000-0000-7000-8000-000000000001"
    async with bus.run(order_app(calls)) as rt:
        copy = await first_order_through(rt, order_id)
        payments = rt.consumers["payments"]
        handled = payments.handled
        # The same message id twice more, at once, past any broker de-duplication
        # (publish_to_group sets no Nats-Msg-Id): only the inbox can stop them.
        await asyncio.gather(*(rt.transport.publish_to_group("payments", ROUTE, copy.encode()) for _ in range(2)))
        await wait_until(lambda: payments.handled >= handled + 2, message="both copies settled")
        await rt.settled()
        spans = await rt.store.read(lambda tx: tx.all(PAYMENT_SPANS))
        pending = await rt.store.read(lambda tx: tx.all("SELECT pending FROM ip_flows"))
    assert payments.handled == handled + 2
    assert calls == Counter(payments=1, shipping=1, notification=1)
    assert spans == [(order_id, 1)]
    assert pending == [(0,)]


async def test_retries_back_off_then_dead_letter_with_on_error(bus: Bus) -> None:
    app = App("flaky")
    attempts: list[int] = []

    policy = Retry(attempts=3, backoff=0.1, jitter=False)

    @app.service("worker").on("task.created", on_error="task.failed", retry=policy)
    async def always_fails(task: dict[str, Any], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    async with bus.run(app) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await wait_until(lambda: dead_letters(rt, 1), message="a dead letter")
        await rt.settled()
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
    assert attempts == [1, 2, 3]  # on a broker, its delivery count drives the retry policy
    assert [(d.reason, d.attempts, d.error) for d in dead] == [("retries_exhausted", 3, "RuntimeError: boom 3")]
    spans = flow.roots[0].spans
    assert [s.outcome for s in spans] == ["retry", "retry", "dead"]
    assert spans[1].started - spans[0].ended >= 0.1  # redelivered after its backoff, not before
    assert spans[2].started - spans[1].ended >= 0.2
    failure = flow.find("task.failed")[0].message.payload
    assert failure["attempts"] == 3
    assert flow.status == "failed"


async def test_a_message_never_settled_is_dead_lettered_after_max_deliveries(bus: Bus) -> None:
    # A poison message: its handler never returns, as if it killed its process each
    # time. Two processes stop holding it; the third dead-letters it unhandled.
    calls: list[int] = []
    options: dict[str, Any] = {"lease": 1.0, "max_deliveries": 2, "shutdown_grace": 0.1}
    flow_id = await die_holding_poison(bus, calls, 2, **options)
    async with bus.run(poison_app(calls), **options) as rt:
        await wait_until(lambda: dead_letters(rt, 1), timeout=30, message="the dead letter")
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
    assert calls == [1, 2]
    assert [(d.reason, d.attempts) for d in dead] == [("too_many_deliveries", 3)]
    assert flow.status == "failed"


@pytest.mark.buses("nats", "amqp")  # the buses with a size they always refuse past (max_payload, 1 MiB here;
async def test_a_message_too_large_for_the_bus_is_refused_before_it_is_stored(bus: Bus) -> None:  # max_body)
    # Committed to the outbox, it would be relayed and refused forever; refused before
    # the commit, the publisher gets a clear error and a handler's handling fails.
    app = App("big")

    @app.service("worker").on("task.created", emits="task.done")
    async def inflate(task: dict[str, Any]) -> dict[str, Any]:
        return {"blob": "x" * (2 << 20)}

    small = {"bus": f"{bus.target}&max_body={1 << 20}"} if bus.name == "amqp" else {}
    async with bus.run(app, **small) as rt:
        with pytest.raises(MessageTooLarge, match=r"event 'task.created' is \d+ bytes; the bus takes at most"):
            await rt.publish("task.created", {"blob": "y" * (2 << 20)})
        flow_id = await rt.publish("task.created", {"n": 1})
        await wait_until(lambda: dead_letters(rt, 1), message="the dead letter")
        await rt.settled()
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
        stored = await rt.store.read(lambda tx: (tx.one("SELECT COUNT(*) FROM ip_outbox")[0],
                                                 tx.one("SELECT COUNT(*) FROM ip_messages")[0]))
    assert [(d.reason, d.error.split(":")[0]) for d in dead] == [("emit_too_large", "MessageTooLarge")]
    assert flow.status == "failed"
    assert [int(n) for n in stored] == [0, 1]  # no outbox row left; only the small order.created


async def test_retry_succeeds_before_the_limit(bus: Bus) -> None:
    app = App("flaky")
    attempts: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=5, backoff=0.01))
    async def sometimes(task: dict[str, Any], ctx: Context) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return task

    async with bus.run(app) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await rt.settled()
        flow = await rt.trace(flow_id)
        assert await rt.dlq() == []
    assert attempts == [1, 2, 3]
    assert flow.shape() == (("task.created", (("task.done", ()),)),)
    assert flow.status == "completed"


async def test_dlq_replay_brings_a_fixed_message_back_to_its_service(bus: Bus) -> None:
    app = App("fixable")
    broken = {"on": True}
    done: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=1))
    async def work(task: dict[str, int]) -> dict[str, int]:
        if broken["on"]:
            raise RuntimeError("bug")
        done.append(task["n"])
        return task

    async with bus.run(app) as rt:
        flow_id = await rt.publish("task.created", {"n": 42})
        await wait_until(lambda: dead_letters(rt, 1), message="a dead letter")
        await rt.settled()
        (dead,) = await rt.dlq()
        assert (await rt.trace(flow_id)).status == "failed"
        broken["on"] = False  # the fix is deployed
        # On NATS the replay comes within JetStream's de-duplication window of the original
        # publish: it must arrive all the same (so it may not reuse the id as Nats-Msg-Id).
        replayed = await rt.replay([dead.id])
        await wait_until(lambda: done == [42], message="the replayed task handled")
        assert (await rt.wait_flow(flow_id)).status == "completed"
        await rt.settled()
        flow = await rt.trace(flow_id)
        assert await rt.dlq() == []
    assert [r.msg_id for r in replayed] == [dead.msg_id]  # same message id
    assert done == [42]
    assert flow.status == "completed"
    assert flow.shape() == (("task.created", (("task.done", ()),)),)


async def test_fan_out_reaches_every_service(bus: Bus) -> None:
    app = App("fan")
    seen: Counter[str] = Counter()
    for name in ("audit", "billing", "mailer"):
        svc = app.service(name)

        def make(name: str) -> Callable[[dict[str, Any]], Any]:
            async def handler(payload: dict[str, Any]) -> None:
                seen[name] += 1

            return handler

        svc.on("user.signed_up")(make(name))
    async with bus.run(app) as rt:
        for i in range(20):
            await rt.publish("user.signed_up", {"user": i})
        await wait_until(lambda: sum(seen.values()) == 60, message="60 handlings")
        await rt.settled()
    assert seen == Counter(audit=20, billing=20, mailer=20)


async def test_two_runtimes_share_a_service_group(bus: Bus) -> None:
    """Two runtimes host the same service on one bus: each message is handled once."""
    handled: dict[str, list[int]] = {"a": [], "b": [], "client": []}

    def build(tag: str) -> App:
        app = App("work")

        @app.service("workers").on("job.queued", concurrency=4)
        async def work(job: dict[str, int]) -> None:
            handled[tag].append(job["n"])
            await asyncio.sleep(0.002)  # a handler doing work, so both consumers get a share

        return app

    # A small prefetch so neither consumer can take everything in one claim; the
    # publisher is a third process-alike, so both consumers learn of work the same way.
    async with (
        bus.run(build("a"), prefetch=4) as rt_a,
        bus.run(build("b"), prefetch=4),
        bus.run(build("client"), services=[]) as client,
    ):
        await asyncio.gather(*(client.publish("job.queued", {"n": n}) for n in range(200)))
        await wait_until(lambda: len(handled["a"]) + len(handled["b"]) >= 200, timeout=30)
        await rt_a.settled()
    everything = handled["a"] + handled["b"]
    assert sorted(everything) == list(range(200))  # each once, none lost
    assert handled["a"], "consumer a took no share"
    assert handled["b"], "consumer b took no share"


@pytest.mark.buses("store", "memory")  # how handlers are called, whatever the bus
async def test_handlers_without_payload_or_sync_handlers(bus: Bus) -> None:
    app = App("misc")
    seen: list[object] = []

    @app.service("a").on("ping", emits="pong")
    def sync_handler(payload: int) -> int:
        seen.append(payload)
        return payload + 1

    @app.service("b").on("pong")
    async def ctx_only(ctx: Context) -> None:
        seen.append(ctx.message.payload)

    async with bus.run(app) as rt:
        await rt.publish("ping", 1)
        await wait_until(lambda: len(seen) == 2)
        await rt.settled()
    assert seen == [1, 2]


async def test_unknown_flow_is_not_found(sqlite_url: str) -> None:
    async with App("x").run(store=sqlite_url) as rt:
        with pytest.raises(NotFound):
            await rt.trace("nope")
