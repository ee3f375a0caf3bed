"""What is RabbitMQ's own: the runtime on ``amqp://`` through connection drops.

The shared choreography suite (test_choreography.py) covers the rest on every bus; here
the test cuts the client's TCP connections through a proxy it owns, never the shared
broker, on an exchange of its own (the ``bus`` fixture's, deleted afterwards).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest

from interplay import App, NotFound, WorkflowContext, WorkflowFailed
from interplay.message import Message
from interplay.stores.records import Outgoing
from interplay.testing import wait_until
from interplay.transports.amqp import AmqpTransport
from interplay.transports.amqp_dlq import PARKED_HEADER, RESCUES_HEADER

from ..amqp_broker import dead_letter, park, take_all
from ..buses import Bus
from ..servers import SERVERS
from .apps import Order, dead_letters, die_holding_poison, order_app, poison_app

pytestmark = [pytest.mark.needs("amqp"), pytest.mark.buses("amqp")]

HOST, PORT = SERVERS["amqp"]

# Short timings so that recovery paths (relay of outbox rows, reconnects) run within the test.
FAST = {"receive_timeout": 0.2, "outbox_grace": 0.3, "outbox_relay_interval": 0.1}


def through(bus: Bus, port: int, **options: object) -> str:
    """The test's bus URL, to the proxy listening on ``port``, with more options."""
    assert isinstance(bus.target, str)
    url = urlsplit(bus.target)
    user, _, _ = url.netloc.rpartition("@")
    return urlunsplit(url._replace(netloc=f"{user}@127.0.0.1:{port}", query=f"{url.query}&{urlencode(options)}"))


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


async def test_connection_drops_lose_nothing_and_emit_each_event_once(bus: Bus) -> None:
    proxy = TcpProxy(HOST, PORT)
    port = await proxy.start()
    calls: Counter[str] = Counter()
    seen: Counter[tuple[str, int]] = Counter()
    flows: list[str] = []
    try:
        rt = bus.run(order_app(calls, seen), bus=through(bus, port, timeout=2), lease=10, **FAST)
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


async def test_a_message_rabbitmq_dead_lettered_is_dead_lettered_into_the_store(bus: Bus) -> None:
    # RabbitMQ's delivery limit (1) below the runtime's max_deliveries (2): RabbitMQ
    # dead-letters the poison message first, into its :dlq. It must not stay there,
    # unseen by `interplay dlq`: the next runtime gets it back and dead-letters it.
    assert isinstance(bus.target, str)
    calls: list[int] = []
    options: dict[str, Any] = {
        "bus": bus.target + "&delivery_limit=1", "lease": 1.0, "max_deliveries": 2, "shutdown_grace": 0.1,
    }
    flow_id = await die_holding_poison(bus, calls, 2, **options)
    async with bus.run(poison_app(calls), **options) as rt:
        await wait_until(lambda: dead_letters(rt, 1), timeout=30, message="the dead letter in the store")
        dead = await rt.dlq()
        flow = await rt.trace(flow_id)
    assert calls == [1, 2]
    assert [(d.reason, d.attempts) for d in dead] == [("too_many_deliveries", 3)]
    assert flow.status == "failed"


async def test_a_dead_letter_that_cannot_go_back_is_dead_lettered_into_the_store_not_parked(bus: Bus) -> None:
    # What RabbitMQ dead-lettered and no service can take back (it died in no service
    # queue, or its service's queue is gone) was parked in <exchange>:parked, which no
    # `interplay dlq` shows. A runtime records it in the store's DLQ instead, and drains
    # into it what was parked before (by an older interplay, or a transport on its own).
    calls: Counter[str] = Counter()

    def envelope(n: int) -> bytes:
        return Message(type="order.created", payload={"id": n, "amount": 1.0}, kind="event", source="test").encode()

    async with bus.run(order_app(calls)) as rt:
        transport = rt.transport
        assert isinstance(transport, AmqpTransport)
        exchange = transport.options.exchange
        gone = {"x-death": [{"count": 1, "reason": "delivery_limit", "queue": f"{exchange}.gone",
                             "exchange": exchange, "routing-keys": ["event.order.created"]}]}
        await park(transport.parked_name, envelope(1), {**gone, PARKED_HEADER: "parked before"})
        await dead_letter(exchange, envelope(2), {})  # died in no queue of ours
        await dead_letter(exchange, b"not an envelope", gone)  # its service's queue is gone
        await wait_until(lambda: dead_letters(rt, 3), timeout=20, message="three dead letters in the store")
        dead = await rt.dlq()
    # After the runtime closed: what it held unacked would be back in the queues by now.
    parked, dlq = await take_all(transport.parked_name), await take_all(transport.dlq_name)
    assert parked == []
    assert dlq == []
    got = {d.body: d for d in dead}
    assert {d.reason for d in dead} == {"abandoned"}
    assert (got[envelope_body(got, 1)].group, got[envelope_body(got, 1)].error) == ("gone", "Abandoned: parked before")
    assert "not a service queue" in (got[envelope_body(got, 2)].error or "")
    assert (got[b"not an envelope"].type, got[b"not an envelope"].group) == ("(invalid)", "gone")
    assert "'gone' has no queue" in (got[b"not an envelope"].error or "")
    assert calls == Counter()  # recorded, never handled


def envelope_body(dead: dict[bytes, Any], n: int) -> bytes:
    """The body of the dead letter whose envelope carries order ``n``."""
    return next(body for body in dead if body.startswith(b"{") and Message.decode(body).payload["id"] == n)


async def test_a_dead_letter_of_no_service_is_replayed_by_its_route(bus: Bus) -> None:
    # It died in a queue of no service: there is no group to hand it back to, so a replay
    # publishes it again as it was first published - handled where it was not yet, and
    # counted in no flow; what is not a message stays.
    calls: Counter[str] = Counter()

    def order(n: int, **fields: str) -> Message:
        return Message(type="order.created", payload={"id": n, "amount": 1.0}, kind="event", source="t", **fields)

    async with bus.run(order_app(calls)) as rt:
        transport = rt.transport
        assert isinstance(transport, AmqpTransport)
        exchange = transport.options.exchange
        handled = order(1, id="handled-" + uuid.uuid4().hex)
        flow_id = await rt.publish("order.created", handled.payload, id=handled.id)  # its flow counts it
        await rt.wait_flow(flow_id, timeout=20)
        lost = order(2)  # only ever in the dead-letter queue
        await dead_letter(exchange, order(1, id=handled.id, flow_id=flow_id).encode(), {})
        await dead_letter(exchange, lost.encode(), {})
        await dead_letter(exchange, b"not an envelope", {})
        await wait_until(lambda: dead_letters(rt, 3), timeout=20, message="three dead letters in the store")
        by_msg = {d.msg_id: d for d in await rt.dlq() if d.type != "(invalid)"}
        assert {d.group for d in by_msg.values()} == {""}
        replayed = await rt.replay([by_msg[handled.id].id, by_msg[lost.id].id])
        assert {d.msg_id for d in replayed} == {handled.id, lost.id}
        await wait_until(lambda: calls["notification"] == 2, timeout=20, message="the lost order's flow to the end")
        (junk,) = await rt.dlq()
        with pytest.raises(NotFound, match="drop it instead"):
            await rt.replay([junk.id])
        assert [d.body for d in await rt.dlq()] == [b"not an envelope"]
        flow = await rt.trace(flow_id)
        assert (flow.status, flow.pending, flow.dead) == ("completed", 0, 0)
    assert calls == Counter({"payments": 2, "shipping": 2, "notification": 2})  # order 1 once, order 2 once


async def test_a_dead_letter_of_another_apps_service_is_counted_in_no_flow_on_replay(bus: Bus) -> None:
    # Given up on in the queue of a service this app does not define: recorded in no
    # flow's counts (its flow never counted that service's copy) - nor when replayed.
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        transport = rt.transport
        assert isinstance(transport, AmqpTransport)
        exchange = transport.options.exchange
        order = Message(type="order.created", payload={"id": 3, "amount": 1.0}, kind="event", source="t")
        flow_id = await rt.publish("order.created", order.payload, id=order.id)
        await rt.wait_flow(flow_id, timeout=20)
        await transport.declare("elsewhere", ["event.order.created"])  # another app's service
        died = {"x-death": [{"count": 1, "reason": "delivery_limit", "queue": f"{exchange}.elsewhere",
                             "exchange": exchange, "routing-keys": ["event.order.created"]}], RESCUES_HEADER: 3}
        copy = Message(type="order.created", payload=order.payload, kind="event", source="t", id=order.id,
                       flow_id=flow_id)
        await dead_letter(exchange, copy.encode(), died)
        await wait_until(lambda: dead_letters(rt, 1), timeout=20, message="the dead letter in the store")
        (dead,) = await rt.dlq()
        assert (dead.group, dead.reason, dead.counted) == ("elsewhere", "abandoned", False)
        await rt.replay([dead.id])
        flow = await rt.trace(flow_id)
        assert (flow.status, flow.pending, flow.dead) == ("completed", 0, 0)
        (again,) = await take_all(transport.queue_name("elsewhere"))  # the queue of the service it died in
        assert Message.decode(again.body).id == order.id


async def test_a_command_whose_reply_to_rabbitmq_cannot_route_is_dead_lettered_not_stuck(bus: Bus) -> None:
    # A reply_to a sender made up, too long for a routing key: its reply (and the error
    # reply after it) could never be published - in the outbox it would wait for ever.
    app = App("echoing")
    said: list[str] = []

    @app.service("echo").command("say")
    async def say(text: str) -> str:
        said.append(text)
        return text

    async with bus.run(app) as rt:
        command = Message(type="echo.say", payload="hi", kind="command", source="test",
                          headers={"reply_to": "reply." + "x" * 300})
        out = Outgoing(message=command, route="command.echo.say", body=command.encode(), fanout=1)
        await rt.transport.publish([out])
        await wait_until(lambda: dead_letters(rt, 1), timeout=20, message="the command dead-lettered")
        (dead,) = await rt.dlq()
        assert (dead.msg_id, dead.reason) == (command.id, "emit_too_large")
        assert "routes of at most 255" in (dead.error or "")
        assert await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_outbox")[0]) == 0
    assert said == ["hi"]


async def test_an_abandoned_command_answers_the_workflow_waiting_for_it(bus: Bus) -> None:
    # A command that died in its service three times over is given up on: its caller
    # gets the error as a reply, as for any dead letter, instead of waiting for ever.
    app = App("ghostly")
    handled: list[int] = []

    @app.service("ghost").command("haunt")
    async def haunt(n: int) -> int:
        handled.append(n)
        return n

    @app.workflow("seance")
    async def seance(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call("ghost.haunt", n))

    async with bus.run(app, services=["ghost"]) as host, bus.run(app, services=[]) as rt:
        transport = rt.transport
        assert isinstance(transport, AmqpTransport)
        exchange = transport.options.exchange
        await host.close()  # the ghost's queue stays; nobody consumes it now
        run = await rt.start("seance", 7)
        queue = transport.queue_name("ghost")
        taken: list[Any] = []

        async def command_queued() -> bool:
            taken.extend(await take_all(queue))
            return bool(taken)

        await wait_until(command_queued, message="the command in the ghost's queue")
        (command,) = taken
        died = {"x-death": [{"count": 1, "reason": "delivery_limit", "queue": queue, "exchange": exchange,
                             "routing-keys": ["command.ghost.haunt"]}], RESCUES_HEADER: 3}
        async with bus.run(app, services=["ghost"], orchestrator=False):  # consumes :dlq
            await dead_letter(exchange, command.body, died)
            with pytest.raises(WorkflowFailed, match="Abandoned") as failed:
                await run.result(timeout=20)
        dead = await rt.dlq()
    assert "after 3 hand-backs" in failed.value.error
    assert [(d.reason, d.group, d.type) for d in dead] == [("abandoned", "ghost", "ghost.haunt")]
    assert handled == []


async def test_an_abandoned_event_fails_like_any_dead_letter_of_its_service(bus: Bus) -> None:
    # Given up on in payments (it died there again after three hand-backs): dead-lettered
    # as payments fails any message - its on_error event (payment.failed) sent, which the
    # orders service compensates - and never handled.
    calls: Counter[str] = Counter()
    async with bus.run(order_app(calls)) as rt:
        transport = rt.transport
        assert isinstance(transport, AmqpTransport)
        exchange, queue = transport.options.exchange, transport.queue_name("payments")
        order = Message(type="order.created", payload={"id": 6, "amount": 3.0}, kind="event", source="test")
        died = {"x-death": [{"count": 1, "reason": "delivery_limit", "queue": queue, "exchange": exchange,
                             "routing-keys": ["event.order.created"]}], RESCUES_HEADER: 3}
        await dead_letter(exchange, order.encode(), died)
        await wait_until(lambda: calls["orders"] == 1, timeout=20, message="the compensation of payment.failed")
        dead = await rt.dlq()
        flow = await rt.trace(order.flow_id)
    assert [(d.reason, d.group, d.type) for d in dead] == [("abandoned", "payments", "order.created")]
    assert calls["payments"] == 0
    (cancelled,) = flow.find("order.cancelled")
    assert "after 3 hand-backs" in cancelled.message.payload["why"]
