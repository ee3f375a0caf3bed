"""amqp:// (RabbitMQ) passes the transport contract, plus what is RabbitMQ-specific.

Every test gets its own exchange, so its queues (named after the exchange) are its
own; everything the test's transports declared is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from interplay.clock import SystemClock
from interplay.errors import ConfigurationError, TransportError
from interplay.testing import wait_until
from interplay.transports import amqp as amqp_module
from interplay.transports import open_transport
from interplay.transports.amqp import HANDBACKS_HEADER, AmqpOptions, AmqpTransport, _Tags, delay_level, redact
from interplay.transports.amqp_dlq import PARKED_HEADER, RESCUES_HEADER
from interplay.transports.amqp_pack import PACK_TYPE, pack, unpack
from interplay.transports.base import Subscription, Transport

from ..amqp_broker import BROKER, dead_letter, publish_raw, queued, take_all
from ..servers import SERVERS, require
from .transport_contract import LEASE, Connect, TransportContract, drain, numbers, outgoing

HOST, PORT = SERVERS["amqp"]


def amqp_url(exchange: str, *, port: int = PORT, **options: object) -> str:
    """A URL to the test broker (or a proxy in front of it) on its own exchange."""
    query = "&".join(f"{k}={v}" for k, v in {"exchange": exchange, "reconnect_interval": 0.2, **options}.items())
    return f"amqp://guest:guest@{HOST}:{port}/?{query}"


def unique_exchange() -> str:
    return f"ip-test-{uuid.uuid4().hex[:12]}"


async def delete_declared(transports: Iterable[AmqpTransport]) -> None:
    """Delete every queue and exchange these (closed) transports declared."""
    queues: set[str] = set()
    exchanges: set[str] = set()
    for t in transports:
        queues |= t.declared_queues
        exchanges |= t.declared_exchanges
    if not queues and not exchanges:
        return
    connection = await aio_pika.connect(BROKER)
    try:
        channel = await connection.channel()
        for name in sorted(queues):
            await channel.queue_delete(name)
        for name in sorted(exchanges):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


@contextlib.contextmanager
def counting_writes(channel: Any) -> Iterator[list[Any]]:
    """The frame batches queued for the socket of ``channel``'s connection meanwhile."""
    writes: list[Any] = []
    put = channel.write_queue.put

    async def counted(frame: Any) -> None:
        writes.append(frame)
        await put(frame)

    channel.write_queue.put = counted
    try:
        yield writes
    finally:
        channel.write_queue.put = put


async def kill(t: AmqpTransport, sub: Subscription) -> None:
    """``t``'s process dies: its connection drops, nothing settled or put back. (Its
    consumer is cancelled first, a round trip: its acks are in, as they would be by then.)"""
    await sub._queue.cancel(sub._consumer_tag)  # type: ignore[attr-defined]
    assert t._connection is not None
    await t._connection.close()


@contextlib.contextmanager
def counting_publishes(t: Transport) -> Iterator[list[Any]]:
    """The publish calls ``t`` makes meanwhile, each its list of messages."""
    assert isinstance(t, AmqpTransport)
    calls: list[Any] = []
    publish_all = t._publish_all

    async def counted(exchange: str, items: Any, what: str) -> list[bool]:
        calls.append(items)
        return await publish_all(exchange, items, what)

    t._publish_all = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        t._publish_all = publish_all  # type: ignore[method-assign]


class TestAmqpTransport(TransportContract):
    @pytest.fixture(autouse=True)
    async def _own_exchange(self) -> AsyncIterator[None]:
        # autouse: set up before connect_bus, so torn down after it closed every transport
        require("amqp")
        self.exchange = unique_exchange()
        self.opened: list[AmqpTransport] = []
        yield
        for t in self.opened:  # those a test opened with options (closing twice is fine)
            with contextlib.suppress(Exception):
                await t.close()
        await delete_declared(self.opened)

    async def connect(self, **options: object) -> AmqpTransport:
        """A new transport on the test's exchange (URL ``options`` added), closed after the test."""
        t = AmqpTransport(amqp_url(self.exchange, **options))
        await t.open(SystemClock())
        self.opened.append(t)
        return t

    # ------------------------------------------------------------------ RabbitMQ specifics
    async def test_open_transport_maps_the_url(self) -> None:
        t = open_transport(amqp_url(self.exchange), store=None)  # type: ignore[arg-type]
        assert isinstance(t, AmqpTransport)
        assert t.options.exchange == self.exchange

    async def test_delivery_count_adds_delays_and_broker_redeliveries(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], 1)])
        counts = []
        for delay in (0.02, 0.0, 0.02):  # delay queue, broker requeue, delay queue again
            (d,) = await drain(sub, 1, ack=False)
            counts.append(d.deliveries)
            assert d.route == names["route"]
            await sub.nack(d, delay)
        (first_lease,) = await drain(sub, 1, ack=False)
        (after_lease,) = await drain(sub, 1, timeout=LEASE * 6)  # the lease expired: the broker's count
        await sub.ack([after_lease])
        assert [*counts, first_lease.deliveries, after_lease.deliveries] == [1, 2, 3, 4, 5]
        assert after_lease.route == names["route"]
        await sub.close()

    async def test_a_stale_ack_after_the_lease_expired_is_ignored(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=0.3)
        await t.publish([outgoing(names["route"], 1)])
        (stale,) = await drain(sub, 1, ack=False)
        (fresh,) = await drain(sub, 1, timeout=5)  # redelivered after the lease
        # Acking the stale delivery must not ack (or break the channel with) anything else.
        await sub.ack([stale])
        await sub.extend([stale], 10)
        await sub.nack(stale, 0)
        await sub.ack([fresh])
        await t.publish([outgoing(names["route"], 2)])
        assert numbers(await drain(sub, 1)) == [2]  # the channel still works
        assert await sub.receive(1, 0.5) == []  # and nothing came back
        await sub.close()

    async def test_declaring_again_from_another_connection_is_fine(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        a, b = await connect_bus(), await connect_bus()
        await a.declare(names["g1"], [names["route"]])
        await b.declare(names["g1"], [names["route"]])
        await a.declare(names["g1"], [names["route"], names["route"] + ".more"])
        await b.publish([outgoing(names["route"] + ".more", 5)])
        sub = await b.subscribe(names["g1"], [names["route"]], lease=LEASE)
        assert numbers(await drain(sub, 1)) == [5]
        await sub.close()

    async def test_a_message_visible_later_fans_out_when_it_is_due(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        s1 = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        s2 = await t.subscribe(names["g2"], [names["route"]], lease=LEASE)
        later = outgoing(names["route"], 2)
        later.visible_at = time.time() + 0.4
        await t.publish([later, outgoing(names["route"], 1)])
        loop = asyncio.get_running_loop()
        published_at = loop.time()
        assert numbers(await drain(s1, 1)) == [1]  # the other one is not held up
        assert numbers(await drain(s2, 1)) == [1]
        assert await s1.receive(1, 0.1) == []
        assert numbers(await drain(s1, 1)) == [2]
        assert numbers(await drain(s2, 1)) == [2]
        assert loop.time() - published_at >= 0.35
        await s1.close()
        await s2.close()

    async def test_publish_to_a_group_without_queue_fails_clearly(self, connect_bus: Connect) -> None:
        t = await connect_bus()
        with pytest.raises(TransportError, match="has no queue"):
            await t.publish_to_group(f"nobody-{uuid.uuid4().hex[:6]}", "event.x", b"{}")

    async def test_a_message_over_the_delivery_limit_comes_back_to_its_group_from_the_broker_dlq(
        self, names: dict[str, str]
    ) -> None:
        # RabbitMQ dead-letters it into :dlq; the transport hands it back to its group,
        # its delivery count carried on, for the runtime to dead-letter into the store.
        t = await self.connect(delivery_limit=2)
        try:
            sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
            poison = outgoing(names["route"], 13)
            await t.publish([poison])
            seen = []
            for _ in range(3):  # a consumer that keeps dying on it
                (delivery,) = await sub.receive(1, 5.0)
                seen.append(delivery.deliveries)
                await sub.nack(delivery, 0)
            assert seen == [1, 2, 3]  # delivery_limit=2: two redeliveries, then the DLX
            (back,) = await sub.receive(1, 10.0)
            assert (back.body, back.deliveries, back.route) == (poison.body, 4, names["route"])
            await sub.ack([back])
            await sub.close()
        finally:
            await t.close()
        assert await take_all(t.dlq_name) == []

    async def test_a_dead_letter_is_handed_back_at_most_three_times_else_parked(self) -> None:
        # What cannot go back to a service is parked in :parked (nobody consumes it), never
        # dropped and never cycled for ever: one from no service queue, one from a service
        # whose queue is gone, one handed back three times already.
        t = await self.connect()
        parked: list[AbstractIncomingMessage] = []

        async def all_parked() -> bool:
            parked.extend(await take_all(t.parked_name))
            return len(parked) >= 3

        def died_in(queue: str, **headers: Any) -> dict[str, Any]:
            death = {"count": 1, "reason": "delivery_limit", "queue": queue, "exchange": self.exchange,
                     "routing-keys": ["event.x"]}
            return {"x-death": [death], **headers}

        try:
            sub = await t.subscribe("g1", ["event.x"], lease=10)  # starts the dead-letter consumer
            await dead_letter(self.exchange, b"foreign", {})
            await dead_letter(self.exchange, b"gone", died_in(f"{self.exchange}.gone"))
            await dead_letter(self.exchange, b"thrice", died_in(f"{self.exchange}.g1", **{RESCUES_HEADER: 3}))
            await dead_letter(self.exchange, b"once", died_in(f"{self.exchange}.g1", **{RESCUES_HEADER: 0}))
            (back,) = await sub.receive(1, 10.0)
            assert (back.body, back.route, back.deliveries) == (b"once", "event.x", 22)  # 21 deaths, then this
            await sub.ack([back])
            await wait_until(all_parked, timeout=10, message="three parked dead letters")
            await sub.close()
        finally:
            await t.close()
        reasons = {m.body: str((m.headers or {}).get(PARKED_HEADER)) for m in parked}
        assert reasons.keys() == {b"foreign", b"gone", b"thrice"}
        assert "not a service queue" in reasons[b"foreign"]
        assert "'gone' has no queue" in reasons[b"gone"]
        assert "after 3 hand-backs" in reasons[b"thrice"]
        assert await take_all(t.dlq_name) == []

    async def test_concurrent_acks_go_out_together(self, connect_bus: Connect, names: dict[str, str]) -> None:
        # One batch, as few multiple acks as the deliveries still held allow (see the
        # _Tags tests below): with none held, one for all hundred.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        await asyncio.gather(*(t.publish([outgoing(names["route"], n)]) for n in range(100)))
        got = await drain(sub, 100, ack=False)
        with counting_writes(await sub._channel.get_underlay_channel()) as writes:  # type: ignore[attr-defined]
            await asyncio.gather(*(sub.ack([d]) for d in reversed(got)))
        assert 1 <= len(writes) <= 2
        await sub.close()
        other = await t.subscribe(names["g1"], [names["route"]], lease=10)
        assert await other.receive(10, 1.0) == []  # every one of them acked
        await other.close()

    async def test_closing_lets_the_acks_and_publishes_under_way_finish(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        await t.publish([outgoing(names["route"], n) for n in range(20)])
        got = await drain(sub, 20, ack=False)
        acking = [asyncio.ensure_future(sub.ack([d])) for d in got]
        await asyncio.sleep(0)  # their batch is under way
        await asyncio.wait_for(sub.close(), 10)
        assert await asyncio.gather(*acking) == [None] * 20
        publishing = [asyncio.ensure_future(t.publish([outgoing(names["route"], n)])) for n in range(20, 30)]
        await asyncio.sleep(0)
        await asyncio.wait_for(t.close(), 10)
        assert await asyncio.wait_for(asyncio.gather(*publishing), 1) == [None] * 10
        other = await (await connect_bus()).subscribe(names["g1"], [names["route"]], lease=10)
        assert sorted(numbers(await drain(other, 11, timeout=3))) == list(range(20, 30))  # no acked one again
        await other.close()

    async def test_acks_just_before_a_close_are_not_lost_by_the_quorum_queue(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # Many single acks (older deliveries are held, so no multiple ack covers them) and
        # the channel closed right after: a quorum queue drops settlements the channel
        # had not passed on yet, unless the close waits a round trip.
        t = await connect_bus()
        for attempt in range(3):  # without the round trip, each fails about half the time
            group = f"{names['g1']}-{attempt}"
            sub = await t.subscribe(group, [names["route"]], lease=10)
            await asyncio.gather(*(t.publish([outgoing(names["route"], n)]) for n in range(120)))
            by_n = {d.message.payload["n"]: d for d in await drain(sub, 120, ack=False) if d.message is not None}
            held = {n for n in by_n if n % 11 == 5}
            await sub.ack([by_n[n] for n in sorted(by_n, key=lambda n: (n * 37) % 120) if n not in held])
            await sub.close()
            other = await t.subscribe(group, [names["route"]], lease=10)
            assert sorted(numbers(await drain(other, 120, timeout=2))) == sorted(held)
            await other.close()
            await t.drop_group(group)

    async def test_a_batch_of_publishes_goes_out_in_one_write(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # RabbitMQ takes a batch written at once in as a batch: a third of its CPU per message.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        with counting_writes(await t._publisher.get_underlay_channel()) as writes:  # type: ignore[attr-defined]
            await t.publish([outgoing(names["route"], n) for n in range(50)])
        assert len(writes) == 1
        assert sorted(numbers(await drain(sub, 50))) == list(range(50))
        await sub.close()

    async def test_a_batch_timed_out_before_its_write_leaves_the_channel_in_step(
        self, names: dict[str, str]
    ) -> None:
        # Timed out while the connection's write queue stays full: its delivery tags are
        # taken back, so the confirms of the next publishes still reach their own callers.
        t = await self.connect(timeout=0.5)
        try:
            sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
            channel = await t._publisher.get_underlay_channel()  # type: ignore[union-attr]
            tag, put = channel.delivery_tag, channel.write_queue.put

            async def full(frame: Any) -> None:
                await asyncio.Event().wait()

            channel.write_queue.put = full
            with pytest.raises(TransportError, match="did not answer in time"):
                await t.publish([outgoing(names["route"], n) for n in range(5)])
            channel.write_queue.put = put
            assert (channel.delivery_tag, dict(channel.confirmations)) == (tag, {})
            await asyncio.wait_for(t.publish([outgoing(names["route"], n) for n in range(5, 8)]), 5)
            assert sorted(numbers(await drain(sub, 3))) == [5, 6, 7]
            await sub.close()
        finally:
            await t.close()

    async def test_an_ack_while_rabbitmq_closes_the_channel_leaves_the_connection_up(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # A frame written on a channel after its Channel.Close would make RabbitMQ close
        # the whole connection (504): every channel, every confirm in flight.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=30)
        await t.publish([outgoing(names["route"], n) for n in range(3)])
        got = await drain(sub, 3, ack=False)
        channel = await sub._channel.get_underlay_channel()  # type: ignore[attr-defined]
        on_close, acked = channel._on_close_frame, asyncio.Event()

        async def ack_right_after(frame: Any) -> None:
            try:
                await on_close(frame)
            finally:
                async def ack() -> None:
                    with contextlib.suppress(TransportError):
                        await sub.ack([got[1]])
                    acked.set()

                asyncio.get_running_loop().create_task(ack())

        channel._on_close_frame = ack_right_after
        await channel.basic_ack(987654)  # an unknown delivery tag: RabbitMQ closes the channel (406)
        await asyncio.wait_for(acked.wait(), 5)
        await asyncio.sleep(0.5)  # a 504 would take the connection down by now
        assert t.reconnects == 0  # type: ignore[attr-defined]
        await asyncio.wait_for(t.publish([outgoing(names["route"], 9)]), 5)
        await sub.close()

    async def test_a_message_that_cannot_be_encoded_fails_only_its_caller(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        results = await asyncio.gather(
            t.publish([outgoing(names["route"], 1)]),
            t.publish([outgoing("reply." + "x" * 300, 2)]),  # a reply_to a sender made too long
            t.publish([outgoing(names["route"], 3)]),
            return_exceptions=True,
        )
        assert results[0] is None
        assert results[2] is None
        assert isinstance(results[1], TransportError)
        assert "255 bytes" in str(results[1])
        assert sorted(numbers(await drain(sub, 2))) == [1, 3]
        await sub.close()

    async def test_a_publish_rabbitmq_refuses_fails_only_its_caller(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        full, bad = f"{self.exchange}.full", names["route"] + ".bad"
        connection = await aio_pika.connect(BROKER)
        try:  # a queue that takes nothing, bound to one route: RabbitMQ nacks what goes there
            channel = await connection.channel()
            queue = await channel.declare_queue(
                full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
            )
            await queue.bind(self.exchange, bad)
        finally:
            await connection.close()
        t.declared_queues.add(full)  # type: ignore[attr-defined]
        # Concurrent callers share a batch; the refusal is about one message of one caller.
        results = await asyncio.gather(
            *(t.publish([outgoing(names["route"], n)]) for n in range(5)),
            t.publish([outgoing(bad, 99)]),
            t.publish([outgoing(names["route"], 5), outgoing(bad, 98)]),
            return_exceptions=True,
        )
        assert results[:5] == [None] * 5
        assert all(isinstance(r, TransportError) and "publishing to" in str(r) for r in results[5:])
        assert sorted(numbers(await drain(sub, 6))) == list(range(6))  # the refused caller's other one too
        await sub.close()

    async def test_a_message_over_max_body_is_refused_before_anything_is_sent(self, names: dict[str, str]) -> None:
        # RabbitMQ would close the publishing channel on it, failing the whole batch.
        t = await self.connect(max_body=1000)
        try:
            assert t.body_limit() == 1000
            await t.declare(names["g1"], [names["route"]])
            with pytest.raises(TransportError, match="too large"):
                await t.publish([outgoing(names["route"], 1), outgoing(names["route"], 2, size=1000)])
            assert await queued(t.queue_name(names["g1"])) == 0
            with pytest.raises(TransportError, match="too large"):  # any publish: a copy, a replay
                await t.publish_to_group(names["g1"], names["route"], outgoing(names["route"], 3, size=1000).body)
            small = [outgoing(names["route"], n) for n in range(10)]
            await t.publish(small)  # in packs within max_body too
            messages = await take_all(t.queue_name(names["g1"]))
            assert all(len(m.body) <= 1000 for m in messages)
            assert [b for m in messages for b in (unpack(m.body) if m.type == PACK_TYPE else None) or [m.body]] == [
                out.body for out in small]
        finally:
            await t.close()

    async def test_without_frame_batches_publishes_go_out_one_by_one_and_still_arrive(
        self, connect_bus: Connect, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # An aiormq without what _publish_frames uses: aiormq's own basic_publish per message.
        monkeypatch.setattr(amqp_module, "_frames_batched", lambda channel: False)
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        await asyncio.gather(t.publish([outgoing(names["route"], n) for n in range(5)]),
                             t.publish([outgoing(names["route"], 5)]))
        assert sorted(numbers(await drain(sub, 6))) == list(range(6))
        await sub.close()

    # ------------------------------------------------------------------ packs
    @pytest.mark.parametrize(("pack", "messages"), [(64, 1), (4, 3), (1, 10)])
    async def test_messages_of_one_route_published_together_travel_as_packs(
        self, names: dict[str, str], pack: int, messages: int
    ) -> None:
        # RabbitMQ's cost and the client's are per AMQP message: ten messages published
        # together are one (``pack=1``: ten), and come out as ten, in order.
        t = await self.connect(pack=pack)
        try:
            await t.declare(names["g1"], [names["route"]])
            await t.publish([outgoing(names["route"], n) for n in range(10)])
            assert await queued(t.queue_name(names["g1"])) == messages
            sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
            assert numbers(await drain(sub, 10)) == list(range(10))
            await sub.close()
            assert await queued(t.queue_name(names["g1"])) == 0  # acked, each pack with its last message
        finally:
            await t.close()

    async def test_a_pack_that_comes_back_is_split_so_a_message_killing_consumers_goes_on_alone(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # The first consumer dies holding a pack: it comes back whole, and is split. The
        # second dies on message 2 after acking the others: only message 2 comes again.
        t = await connect_bus()
        await t.declare(names["g1"], [names["route"]])
        await t.publish([outgoing(names["route"], n) for n in range(5)])
        for deliveries in (1, 2):
            victim = await connect_bus()
            sub = await victim.subscribe(names["g1"], [names["route"]], lease=10)
            got = await drain(sub, 5, ack=False)
            assert sorted(numbers(got)) == list(range(5))
            assert {d.deliveries for d in got} == {deliveries}
            await sub.ack([d for d in got if numbers([d]) != [2]])
            await kill(victim, sub)
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        again = await drain(sub, 5, timeout=3)
        assert (numbers(again), again[0].deliveries) == ([2], 3)
        await sub.close()

    async def test_messages_of_a_pack_nacked_or_left_to_expire_come_again_alone(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # A pack is one AMQP message, acked with its last: one of its messages given back
        # goes back as a copy, its delivery counted; the pack is acked once all are settled.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], n) for n in range(4)])
        by_n = {d.message.payload["n"]: d for d in await drain(sub, 4, ack=False) if d.message is not None}
        await sub.nack(by_n[0], 0.3)
        await sub.nack(by_n[1], 0)
        await sub.ack([by_n[3]])  # and 2's lease runs out
        again = await drain(sub, 3, timeout=LEASE * 6)
        assert sorted(numbers(again)) == [0, 1, 2]
        assert {d.deliveries for d in again} == {2}
        assert await sub.receive(10, 2 * LEASE) == []
        await sub.close()
        assert await queued(t.queue_name(names["g1"])) == 0

    async def test_a_busy_consumer_hands_back_the_messages_of_a_pack_it_cannot_start(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # Packs must not let one consumer hoard a group's work: what it has not started
        # within a second goes back to the queue once another consumer is there - not
        # while it is the only one (they would come straight back to it).
        busy, idle = await connect_bus(), await connect_bus()
        s_busy = await busy.subscribe(names["g1"], [names["route"]], lease=10)
        assert await s_busy.receive(2, 0.1) == []  # consuming, two at a time
        await busy.publish([outgoing(names["route"], n) for n in range(6)])
        first = await drain(s_busy, 2, ack=False)
        with counting_publishes(busy) as published:
            await asyncio.sleep(2.5)
            assert published == []  # alone: the other four wait where they are
            s_idle = await idle.subscribe(names["g1"], [names["route"]], lease=10)
            rest = await drain(s_idle, 4, timeout=20)  # a hand-back may come back to busy (it has room)
        assert published  # handed back
        assert sorted(numbers(first + rest)) == list(range(6))
        assert {d.deliveries for d in rest} == {1}  # never handed out: not a delivery
        await s_busy.ack(first)
        assert await s_idle.receive(10, 1.5) == []
        await s_busy.close()
        await s_idle.close()
        assert await queued(busy.queue_name(names["g1"])) == 0  # type: ignore[attr-defined]

    async def test_a_new_pack_is_handed_back_on_time_while_one_handed_back_often_waits_longer(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        busy, idle = await connect_bus(), await connect_bus()
        s_busy = await busy.subscribe(names["g1"], [names["route"]], lease=10)
        assert await s_busy.receive(4, 0.1) == []  # consuming
        often = [outgoing(names["route"], n).body for n in (100, 101, 102)]
        await publish_raw(self.exchange, names["route"], pack(often), type=PACK_TYPE,
                          headers={HANDBACKS_HEADER: 5})  # it waits 30 s before going back again
        (started,) = await drain(s_busy, 1, ack=False)
        assert numbers([started]) == [100]
        s_idle = await idle.subscribe(names["g1"], [names["route"]], lease=10)
        assert await s_idle.receive(3, 0.1) == []  # consuming: another consumer to hand back to
        await busy.publish([outgoing(names["route"], n) for n in range(3)])
        assert sorted(numbers(await drain(s_idle, 3, timeout=15))) == [0, 1, 2]
        await s_busy.ack([started])

    async def test_closing_puts_back_what_of_a_pack_is_not_settled_and_acks_it(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # One message acked, one handed out and not, four never handed out: those five
        # come again (the handed-out one as a second delivery), the acked one not.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        await t.publish([outgoing(names["route"], n) for n in range(6)])
        acked, held = await drain(sub, 2, ack=False)
        await sub.ack([acked])
        await sub.close()
        other = await t.subscribe(names["g1"], [names["route"]], lease=10)
        again = await drain(other, 5)
        assert sorted(numbers(again)) == sorted(set(range(6)) - set(numbers([acked])))
        assert {n: d.deliveries for n, d in zip(numbers(again), again, strict=True)} == {
            n: 2 if [n] == numbers([held]) else 1 for n in numbers(again)}
        assert await other.receive(10, 1.0) == []
        await other.close()
        assert await queued(t.queue_name(names["g1"])) == 0  # type: ignore[attr-defined]

    async def test_closing_while_rabbitmq_takes_no_publishes_is_bounded_and_loses_nothing(
        self, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # As in a resource alarm (RabbitMQ blocks publishers): putting back what of a pack
        # is unsettled never gets through. Close gives up after 2 timeouts; the channel's
        # close gives the pack back whole (the inbox would drop the acked one).
        t = await self.connect(timeout=0.5)
        try:
            sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
            await t.publish([outgoing(names["route"], n) for n in range(3)])
            got = await drain(sub, 3, ack=False)
            await sub.ack(got[:1])

            async def blocked(*args: Any) -> None:
                await asyncio.sleep(3600)

            monkeypatch.setattr(t, "_park_all", blocked)
            started = time.monotonic()
            await asyncio.wait_for(sub.close(), 5)
            assert time.monotonic() - started < 2.5
            monkeypatch.undo()
            other = await t.subscribe(names["g1"], [names["route"]], lease=10)
            assert sorted(numbers(await drain(other, 3))) == [0, 1, 2]
            await other.close()
        finally:
            await t.close()

    async def test_a_dead_lettered_pack_goes_back_to_its_group_message_by_message(self) -> None:
        t = await self.connect()
        bodies = [outgoing("event.x", n).body for n in range(3)]
        death = {"count": 1, "reason": "delivery_limit", "exchange": self.exchange, "routing-keys": ["event.x"]}
        try:
            sub = await t.subscribe("g1", ["event.x"], lease=10)  # starts the dead-letter consumer
            await dead_letter(self.exchange, pack(bodies), {"x-death": [{**death, "queue": f"{self.exchange}.g1"}]},
                              type=PACK_TYPE)
            await dead_letter(self.exchange, pack(bodies[:2]),
                              {"x-death": [{**death, "queue": f"{self.exchange}.gone"}]}, type=PACK_TYPE)
            back = await drain(sub, 3)
            assert sorted(d.body for d in back) == sorted(bodies)
            assert {(d.route, d.deliveries) for d in back} == {("event.x", 22)}
            parked: list[AbstractIncomingMessage] = []

            async def both_parked() -> bool:
                parked.extend(await take_all(t.parked_name))
                return len(parked) >= 2

            await wait_until(both_parked, timeout=10, message="the two messages of the pack parked")
            assert sorted(m.body for m in parked) == sorted(bodies[:2])
            await sub.close()
        finally:
            await t.close()

    async def test_a_malformed_pack_is_handed_out_whole_as_undecodable(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # For the runtime to dead-letter with its reason; the consumer goes on.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10)
        assert await sub.receive(1, 0.1) == []
        await publish_raw(self.exchange, names["route"], b"\x00\x00\x00\x09short", type=PACK_TYPE)
        await t.publish([outgoing(names["route"], 1)])
        bad, good = await drain(sub, 2)
        assert (bad.message, bad.body) == (None, b"\x00\x00\x00\x09short")
        assert numbers([good]) == [1]
        await sub.close()

    async def test_unreachable_broker_is_a_transport_error(self) -> None:
        t = AmqpTransport(f"amqp://guest:guest@{HOST}:1/?exchange={self.exchange}&connect_timeout=2")
        with pytest.raises(TransportError, match="connecting to"):
            await t.open(SystemClock())

    async def test_guest_credentials_warn_and_passwords_never_reach_logs(
        self, caplog: pytest.LogCaptureFixture, names: dict[str, str]
    ) -> None:
        caplog.set_level(logging.DEBUG)
        t = await self.connect()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], 1)])
        await drain(sub, 1)
        await t.close()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("default guest credentials" in w for w in warnings)
        everything = "\n".join(r.getMessage() for r in caplog.records)
        assert "guest:guest" not in everything
        assert "guest:***" in everything  # the warning names the broker, redacted
        assert "guest:guest" not in repr(t)


# ---------------------------------------------------------------------- no broker needed
@pytest.mark.parametrize(
    ("seconds", "level_ms"),
    [(0.0, 10), (0.001, 10), (0.08, 80), (0.081, 100), (0.1, 100), (0.101, 120), (0.5, 500), (0.7, 700), (0.71, 800),
     (0.19, 200), (1.0, 1000), (30.0, 30000), (31.0, 35000), (41.0, 50000), (1e9, 2**31 - 1)],
)
def test_delay_levels_round_up_never_down(seconds: float, level_ms: int) -> None:
    assert delay_level(seconds) == level_ms
    if level_ms < 2**31 - 1:
        assert level_ms >= seconds * 1000
        assert level_ms <= max(10, seconds * 1000 * 1.25)


def test_url_options_are_parsed_and_the_rest_goes_to_the_driver() -> None:
    options, driver_url = AmqpOptions.from_url(
        "amqp://u:secret@h:5673/vh?exchange=shop&prefetch=16&delivery_limit=0&heartbeat=30&timeout=2.5&pack=8"
        "&max_body=1000"
    )
    assert options == AmqpOptions(exchange="shop", prefetch=16, delivery_limit=0, timeout=2.5, pack=8, max_body=1000)
    assert driver_url == "amqp://u:secret@h:5673/vh?heartbeat=30"
    assert redact("amqp://u:secret@h:5673/vh?x=1") == "amqp://u:***@h:5673/vh?x=1"
    assert redact("amqp://h/") == "amqp://h/"


@pytest.mark.parametrize(
    "query", ["prefetch=many", "prefetch=0", "exchange=amq.topic", "exchange=", "timeout=0", "pack=0", "max_body=0"]
)
def test_bad_url_options_are_configuration_errors(query: str) -> None:
    with pytest.raises(ConfigurationError):
        AmqpTransport(f"amqp://h/?{query}")


def test_one_multiple_ack_settles_only_a_run_from_the_oldest_outstanding_tag() -> None:
    tags = _Tags()
    for tag in range(1, 11):
        tags.delivered(tag)
    assert tags.plan([1, 2, 3]) == [(3, True)]
    assert tags.plan([2]) == [(2, False)]  # a lone tag needs no multiple
    assert tags.plan([2, 3, 5, 6]) == [(2, False), (3, False), (5, False), (6, False)]  # 1 still open
    tags.open -= {1, 2, 3, 4}
    assert tags.plan([5, 6, 8]) == [(6, True), (8, False)]  # 7 still open
    assert tags.plan([10, 9, 8, 7, 6, 5]) == [(10, True)]


def test_a_multiple_ack_never_covers_a_tag_not_seen_yet() -> None:
    tags = _Tags()
    for tag in (1, 2, 4, 5):  # 3 delivered, but its callback has not run yet
        tags.delivered(tag)
    assert tags.seen == 2
    assert tags.plan([1, 2, 4, 5]) == [(2, True), (4, False), (5, False)]
    tags.delivered(3)
    assert tags.seen == 5
    tags.open -= {1, 2}
    assert tags.plan([3, 4, 5]) == [(5, True)]
