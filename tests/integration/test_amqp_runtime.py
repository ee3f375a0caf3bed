"""Choreography end to end through the runtime on RabbitMQ (``amqp://``) with a SQLite store.

Each test runs on its own exchange (so on its own queues) and deletes what it declared.
The last test cuts the client's TCP connection through a proxy it owns, never the
shared broker.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, Retry, Runtime
from interplay.message import Message
from interplay.stores.records import Outgoing
from interplay.testing import wait_until
from interplay.transports.amqp import AmqpTransport

from ..contract.test_transport_amqp import HOST, PORT, amqp_url, delete_declared, unique_exchange
from ..servers import require

pytestmark = pytest.mark.needs("amqp")

# Short timings so that recovery paths (relay of outbox rows, reconnects) run within the test.
FAST = {"receive_timeout": 0.2, "outbox_grace": 0.3, "outbox_relay_interval": 0.1}


class Order(BaseModel):
    id: int
    amount: float = 10.0


def order_app(calls: Counter[str], seen: Counter[tuple[str, int]] | None = None) -> App:
    app = App("shop")
    payments, shipping = app.service("payments"), app.service("shipping")
    notification, orders = app.service("notification"), app.service("orders")

    def count(service: str, order: Order) -> None:
        calls[service] += 1
        if seen is not None:
            seen[service, order.id] += 1

    @payments.on("order.created", emits="payment.completed", on_error="payment.failed")
    async def take_payment(order: Order) -> Order:
        count("payments", order)
        if order.amount < 0:
            raise Reject("negative amount")
        return order

    @shipping.on("payment.completed")
    async def ship(order: Order, ctx: Context) -> None:
        count("shipping", order)
        await ctx.emit("shipment.prepared", order)

    @notification.on("shipment.prepared")
    async def notify(order: Order) -> None:
        count("notification", order)

    @orders.on("payment.failed", emits="order.cancelled")
    async def cancel(failure: Failure) -> dict[str, Any]:
        calls["orders"] += 1
        return {"id": failure.payload["id"], "why": failure.error}

    app.flow("order", starts="order.created", ends="shipment.prepared", fails="payment.failed", within=60)
    return app


Run = Callable[..., Runtime]


@pytest.fixture
async def run_on_amqp(sqlite_url: str) -> AsyncIterator[Run]:
    """``run(app, **options)``: a runtime on a fresh exchange; its queues are deleted afterwards."""
    require("amqp")
    exchange = unique_exchange()
    runtimes: list[Runtime] = []

    def run(app: App, *, port: int = PORT, bus_options: dict[str, object] | None = None, **options: Any) -> Runtime:
        rt = app.run(bus=amqp_url(exchange, port=port, **(bus_options or {})), store=sqlite_url, **{**FAST, **options})
        runtimes.append(rt)
        return rt

    yield run  # each test runs its runtime in `async with`, which closes it
    await delete_declared(cast(AmqpTransport, rt.transport) for rt in runtimes)


async def dlq_count(rt: Runtime, n: int) -> bool:
    return len(await rt.dlq()) >= n


def handled(rt: Runtime, service: str, n: int) -> Callable[[], bool]:
    return lambda: rt.consumers[service].handled >= n


# ---------------------------------------------------------------------- the order flow
async def test_order_flow_completes_with_the_expected_trace(run_on_amqp: Run) -> None:
    calls: Counter[str] = Counter()
    async with run_on_amqp(order_app(calls)) as rt:
        assert rt.delivery_mode == "outbox"  # a durable broker: commit first, then publish
        flow_id = await rt.publish("order.created", Order(id=1))
        assert (await rt.wait_flow(flow_id)).status == "completed"
        await wait_until(lambda: calls["notification"] == 1, message="notification handled")
        await rt.settled()
        flow = await rt.trace(flow_id)
    assert flow.name == "order"
    assert flow.shape() == (("order.created", (("payment.completed", (("shipment.prepared", ()),)),)),)
    assert [(s.service, s.outcome) for s in flow.roots[0].spans] == [("payments", "ok")]
    assert [(s.service, s.outcome) for s in flow.find("payment.completed")[0].spans] == [("shipping", "ok")]
    assert [(s.service, s.outcome) for s in flow.find("shipment.prepared")[0].spans] == [("notification", "ok")]
    assert all(m.flow_id == flow_id for m in flow.messages)
    assert calls == Counter(payments=1, shipping=1, notification=1)


async def test_reject_goes_to_dlq_and_emits_on_error(run_on_amqp: Run) -> None:
    calls: Counter[str] = Counter()
    async with run_on_amqp(order_app(calls)) as rt:
        flow_id = await rt.publish("order.created", Order(id=7, amount=-1))
        summary = await rt.wait_flow(flow_id)
        await wait_until(lambda: calls["orders"] == 1, message="compensation ran")
        await rt.settled()
        flow = await rt.trace(flow_id)
        dead = await rt.dlq()
    assert summary.status == "failed"
    assert calls["payments"] == 1  # Reject: never retried
    assert flow.shape() == (("order.created", (("payment.failed", (("order.cancelled", ()),)),)),)
    failure = flow.find("payment.failed")[0].message.payload
    assert (failure["error_type"], failure["service"]) == ("Reject", "payments")
    assert failure["payload"] == {"id": 7, "amount": -1.0}
    assert [(d.group, d.reason, d.attempts, d.route) for d in dead] == [
        ("payments", "rejected", 1, "event.order.created")
    ]
    assert dead[0].error == "Reject: negative amount"


async def test_garbage_bytes_on_the_wire_go_to_dlq_as_invalid_envelope(run_on_amqp: Run) -> None:
    calls: Counter[str] = Counter()
    async with run_on_amqp(order_app(calls)) as rt:
        junk = [b"\x00\xff garbage", b'{"v": 1, "kind": "event"}', b"\x80\x04\x95pickle"]
        for body in junk:
            await rt.transport.publish_to_group("payments", "event.order.created", body)
        good = await rt.publish("order.created", Order(id=3))
        assert (await rt.wait_flow(good)).status == "completed"  # the consumer kept going
        await wait_until(lambda: dlq_count(rt, 3), message="3 dead letters")
        dead = await rt.dlq()
    assert {d.reason for d in dead} == {"invalid_envelope"}
    assert sorted(d.body for d in dead) == sorted(junk)  # bytes kept exactly, for inspection
    assert {d.route for d in dead} == {"event.order.created"}
    assert any("pickle" in (d.error or "") for d in dead)
    assert all(d.attempts == 1 for d in dead)  # no retry loop for bytes that can never decode


async def test_invalid_payload_goes_to_dlq_with_its_reason_and_others_keep_flowing(run_on_amqp: Run) -> None:
    calls: Counter[str] = Counter()
    async with run_on_amqp(order_app(calls)) as rt:
        bad = await rt.publish("order.created", {"id": "not-a-number"})
        good = await rt.publish("order.created", Order(id=2))
        assert (await rt.wait_flow(good)).status == "completed"
        assert (await rt.wait_flow(bad)).status == "failed"
        dead = await rt.dlq()
        flow = await rt.trace(bad)
    assert [(d.reason, d.type, d.group) for d in dead] == [("invalid_payload", "order.created", "payments")]
    assert "id: Input should be a valid integer" in (dead[0].error or "")
    assert calls["payments"] == 1  # only the good order reached the handler
    span = flow.roots[0].spans[0]
    assert (span.outcome, span.service) == ("invalid", "payments")
    assert "ValidationFailed" in (span.error or "")


async def test_duplicate_deliveries_run_the_handler_once(run_on_amqp: Run) -> None:
    calls: Counter[str] = Counter()
    first_id = "0190f000-0000-7000-8000-00000000a001"
    async with run_on_amqp(order_app(calls)) as rt:
        flow_id = await rt.publish("order.created", Order(id=1), id=first_id)
        await rt.wait_flow(flow_id)
        # The same bytes again straight onto the broker: what a publisher retry after
        # a lost confirm, or a redelivery after a commit whose ack was lost, looks like.
        again = Message(type="order.created", payload={"id": 1, "amount": 10.0}, id=first_id, flow_id=flow_id)
        await rt.transport.publish([Outgoing(again, "event.order.created", again.encode())] * 2)
        # and through the runtime, twice at once, racing each other
        second_id = "0190f000-0000-7000-8000-00000000a002"
        await asyncio.gather(*[rt.publish("order.created", Order(id=2), id=second_id) for _ in range(2)])
        await wait_until(handled(rt, "payments", 5), message="payments settled all five deliveries")
        await wait_until(lambda: calls["notification"] == 2, message="both orders notified")
        emitted = await rt.store.read(
            lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type ORDER BY type")
        )
    assert calls == Counter(payments=2, shipping=2, notification=2)
    assert dict(emitted) == {"order.created": 2, "payment.completed": 2, "shipment.prepared": 2}


async def test_retries_wait_their_backoff_in_the_delay_queues_then_dead_letter(run_on_amqp: Run) -> None:
    app = App("flaky")
    attempts: list[int] = []

    policy = Retry(attempts=3, backoff=0.1, jitter=False)

    @app.service("worker").on("task.created", on_error="task.failed", retry=policy)
    async def always_fails(task: dict[str, Any], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError(f"boom {ctx.attempt}")

    async with run_on_amqp(app) as rt:
        flow_id = await rt.publish("task.created", {"n": 1})
        await wait_until(lambda: dlq_count(rt, 1), message="the task dead-lettered")
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
    assert attempts == [1, 2, 3]  # the delivery count survives the trip through the delay queue
    assert [(d.reason, d.attempts, d.error) for d in dead] == [("retries_exhausted", 3, "RuntimeError: boom 3")]
    spans = flow.roots[0].spans
    assert [s.outcome for s in spans] == ["retry", "retry", "dead"]
    assert spans[1].started - spans[0].ended >= 0.1  # not before the backoff
    assert spans[2].started - spans[1].ended >= 0.2
    assert flow.find("task.failed")[0].message.payload["attempts"] == 3


async def test_dlq_replay_sends_the_message_back_to_its_group(run_on_amqp: Run) -> None:
    app = App("fixable")
    broken = {"on": True}
    done: list[int] = []

    @app.service("worker").on("task.created", emits="task.done", retry=Retry(attempts=1))
    async def work(task: dict[str, int]) -> dict[str, int]:
        if broken["on"]:
            raise RuntimeError("bug")
        done.append(task["n"])
        return task

    async with run_on_amqp(app) as rt:
        flow_id = await rt.publish("task.created", {"n": 42})
        await wait_until(lambda: dlq_count(rt, 1))
        (dead,) = await rt.dlq()
        broken["on"] = False  # the fix is deployed
        replayed = await rt.replay([dead.id])
        await wait_until(lambda: done == [42], message="replayed task handled")
        flow = await rt.wait_flow(flow_id)
        assert await rt.dlq() == []
    assert [r.msg_id for r in replayed] == [dead.msg_id]
    assert flow.status == "completed"


# ---------------------------------------------------------------------- connection drops
class TcpProxy:
    """A loopback TCP proxy in front of the broker that a test can cut and refuse."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.accepting = True
        self.connections = 0
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        link = (writer, up_writer)
        self._links.add(link)
        pipes = [asyncio.ensure_future(_pipe(reader, up_writer)), asyncio.ensure_future(_pipe(up_reader, writer))]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes)
        finally:
            self._links.discard(link)
            self._tasks.difference_update(pipes)

    def cut(self) -> None:
        """Kill every open connection, both ways, like a network failure."""
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()

    async def close(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()  # one side gone: the whole link goes


async def test_connection_drops_lose_nothing_and_emit_each_event_once(run_on_amqp: Run) -> None:
    proxy = TcpProxy(HOST, PORT)
    port = await proxy.start()
    calls: Counter[str] = Counter()
    seen: Counter[tuple[str, int]] = Counter()
    flows: list[str] = []
    try:
        rt = run_on_amqp(order_app(calls, seen), port=port, bus_options={"timeout": 2}, lease=10)
        async with rt:

            async def publish(first: int, n: int) -> None:
                for i in range(first, first + n):
                    flows.append(await rt.publish("order.created", Order(id=i)))

            async def outbox_rows() -> int:
                return int(await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_outbox")[0]))

            # 1. cut while consumers are in the middle of the first orders
            await publish(0, 30)
            await wait_until(lambda: calls["shipping"] >= 5, message="first shipments")
            proxy.cut()
            # 2. an outage: orders published meanwhile wait in the outbox, then go out
            await wait_until(lambda: proxy.connections >= 2, message="first reconnect")
            proxy.accepting = False
            proxy.cut()
            await publish(30, 15)
            assert await outbox_rows() > 0, "nothing waited in the outbox during the outage"
            proxy.accepting = True
            await wait_until(lambda: _async_equals(outbox_rows, 0), message="outbox relayed after the outage")
            # 3. cut again while a burst is being published and consumed
            burst = asyncio.ensure_future(publish(45, 15))
            await wait_until(lambda: calls["payments"] >= 48, message="burst under way")
            proxy.cut()
            await burst

            for flow_id in flows:
                assert (await rt.wait_flow(flow_id, timeout=30)).status == "completed"
            await wait_until(lambda: calls["notification"] >= 60, timeout=30, message="every order notified")
            await wait_until(lambda: _async_equals(outbox_rows, 0), message="outbox drained")
            rows = await rt.store.read(
                lambda tx: tx.all("SELECT flow_id, type, COUNT(*) FROM ip_messages GROUP BY flow_id, type")
            )
    finally:
        await proxy.close()

    assert proxy.connections >= 4  # the client reconnected by itself after every cut
    per_flow: dict[str, dict[str, int]] = {}
    for flow_id, type_, count in rows:
        per_flow.setdefault(flow_id, {})[type_] = count
    once = {"order.created": 1, "payment.completed": 1, "shipment.prepared": 1}
    assert len(flows) == len(set(flows)) == 60
    assert {f: per_flow.get(f) for f in flows} == dict.fromkeys(flows, once)
    # every order reached every service, and (the inbox skipping redeliveries) only once
    assert seen == Counter({(service, order): 1 for service in ("payments", "shipping", "notification")
                            for order in range(60)})


async def _async_equals(probe: Callable[[], Awaitable[int]], value: int) -> bool:
    return await probe() == value
