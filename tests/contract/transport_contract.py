"""The Transport contract: what every bus must do, written once.

Each backend's test module subclasses :class:`TransportContract` and provides
``connect()``: a new, open transport (a new connection) to the same bus, each call.
Every test uses fresh group and route names, so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from interplay.errors import TransportError
from interplay.message import Message
from interplay.stores.records import Outgoing
from interplay.transports.base import Delivery, Subscription, Transport

LEASE = 1.0
Connect = Callable[[], Awaitable[Transport]]


def outgoing(route: str, n: int = 0, *, size: int = 0) -> Outgoing:
    msg = Message(type="contract.test", payload={"n": n, "pad": "x" * size})
    return Outgoing(message=msg, route=route, body=msg.encode(), fanout=1)


async def drain(sub: Subscription, want: int, *, timeout: float = 10.0, ack: bool = True) -> list[Delivery]:
    """Receive until ``want`` deliveries arrived (or the deadline passes)."""
    got: list[Delivery] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < want and loop.time() < deadline:
        batch = await sub.receive(want - len(got), min(0.5, max(0.01, deadline - loop.time())))
        if ack and batch:
            await sub.ack(batch)
        got.extend(batch)
    return got


def numbers(deliveries: list[Delivery]) -> list[int]:
    return [d.message.payload["n"] for d in deliveries if d.message is not None]


class TransportContract:
    """Subclass and implement ``connect``; pytest collects the inherited tests."""

    #: The largest message body the backend accepts (None: no limit below 1.2 MB). A body
    #: over it must fail with TransportError saying "too large", never hang or truncate.
    large_message_limit: int | None = None

    async def connect(self) -> Transport:
        raise NotImplementedError

    @pytest.fixture
    async def connect_bus(self) -> AsyncIterator[Connect]:
        """A factory of connections to the bus; all are closed after the test."""
        opened: list[Transport] = []

        async def make() -> Transport:
            t = await self.connect()
            opened.append(t)
            return t

        yield make
        for t in opened:
            try:
                await t.close()
            except Exception:  # already closed by the test (a "killed" consumer)
                pass

    @pytest.fixture
    def names(self) -> dict[str, str]:
        tag = uuid.uuid4().hex[:10]
        return {"route": f"event.contract.{tag}", "g1": f"g1-{tag}", "g2": f"g2-{tag}"}

    # ------------------------------------------------------------------ routing
    async def test_fan_out_gives_every_group_a_copy(self, connect_bus: Connect, names: dict[str, str]) -> None:
        t = await connect_bus()
        await t.declare(names["g1"], [names["route"]])
        await t.declare(names["g2"], [names["route"]])
        await t.publish([outgoing(names["route"], n) for n in range(10)])
        s1 = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        s2 = await t.subscribe(names["g2"], [names["route"]], lease=LEASE)
        assert sorted(numbers(await drain(s1, 10))) == list(range(10))
        assert sorted(numbers(await drain(s2, 10))) == list(range(10))
        await s1.close()
        await s2.close()

    async def test_declared_group_keeps_messages_until_it_subscribes(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        publisher = await connect_bus()
        await publisher.declare(names["g1"], [names["route"]])
        await publisher.publish([outgoing(names["route"], n) for n in range(5)])
        consumer = await connect_bus()
        sub = await consumer.subscribe(names["g1"], [names["route"]], lease=LEASE)
        assert sorted(numbers(await drain(sub, 5))) == list(range(5))
        await sub.close()

    async def test_publishing_to_a_route_nobody_declared_is_fine(self, connect_bus: Connect) -> None:
        t = await connect_bus()
        await t.publish([outgoing(f"event.nobody.{uuid.uuid4().hex[:8]}")])

    async def test_competing_consumers_share_a_group(self, connect_bus: Connect, names: dict[str, str]) -> None:
        a, b = await connect_bus(), await connect_bus()
        await a.declare(names["g1"], [names["route"]])
        sa = await a.subscribe(names["g1"], [names["route"]], lease=5.0)
        sb = await b.subscribe(names["g1"], [names["route"]], lease=5.0)
        await a.publish([outgoing(names["route"], n) for n in range(20)])
        first = await drain(sa, 10, ack=False)  # a holds ten, unacked
        second = await drain(sb, 10, ack=False)  # b must get the other ten
        assert len(first) == 10
        assert len(second) == 10
        assert sorted(numbers(first) + numbers(second)) == list(range(20))
        await sa.ack(first)
        await sb.ack(second)
        await sa.close()
        await sb.close()

    # ------------------------------------------------------------------ ack / nack / leases
    async def test_acked_messages_are_not_delivered_again(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], 1)])
        assert numbers(await drain(sub, 1)) == [1]
        await asyncio.sleep(LEASE * 1.5)
        assert await drain(sub, 1, timeout=LEASE) == []
        await sub.close()

    async def test_unacked_message_is_redelivered_after_the_lease(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], 7)])
        (first,) = await drain(sub, 1, ack=False)
        assert first.deliveries == 1
        again = await drain(sub, 1, timeout=LEASE * 6)
        assert numbers(again) == [7]
        assert again[0].deliveries == 2
        assert again[0].message is not None
        assert first.message is not None
        assert again[0].message.id == first.message.id
        await sub.close()

    async def test_consumer_killed_mid_message_hands_it_to_another(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        dying, survivor = await connect_bus(), await connect_bus()
        s_dying = await dying.subscribe(names["g1"], [names["route"]], lease=LEASE)
        s_survivor = await survivor.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await dying.publish([outgoing(names["route"], 3)])
        got = await drain(s_dying, 1, ack=False)
        if not got:  # the survivor may have won the message: then it is the one to die
            s_dying, s_survivor = s_survivor, s_dying
            dying, survivor = survivor, dying
            got = await drain(s_dying, 1, ack=False)
        assert numbers(got) == [3]
        await dying.close()  # no ack, connection gone
        again = await drain(s_survivor, 1, timeout=LEASE * 8)
        assert numbers(again) == [3]
        await s_survivor.close()

    async def test_nack_with_delay_redelivers_after_the_delay(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10.0)
        await t.publish([outgoing(names["route"], 4)])
        (d,) = await drain(sub, 1, ack=False)
        loop = asyncio.get_running_loop()
        nacked_at = loop.time()
        await sub.nack(d, 0.5)
        again = await drain(sub, 1, timeout=8)
        assert numbers(again) == [4]
        assert loop.time() - nacked_at >= 0.45
        assert again[0].deliveries == 2
        await sub.close()

    async def test_settling_out_of_order_acks_only_what_was_acked(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # Later deliveries acked while earlier ones are in progress (RabbitMQ acks runs of
        # them in one frame): one given back, or still held when its consumer goes away,
        # must come again; the acked ones must not.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], n) for n in range(6)])
        got = await drain(sub, 6, ack=False)
        by_n = {d.message.payload["n"]: d for d in got if d.message is not None}
        assert sorted(by_n) == list(range(6))
        await sub.ack([by_n[1], by_n[2]])  # 0 still in progress
        await sub.nack(by_n[0], 0)  # given back: 1 and 2 may be acked now, 0 must come again
        await sub.ack([by_n[4]])  # 3 and 5 still held when the consumer closes
        await sub.close()
        other = await (await connect_bus()).subscribe(names["g1"], [names["route"]], lease=LEASE)
        again = await drain(other, 3, timeout=8 * LEASE)
        assert sorted(numbers(again)) == [0, 3, 5]
        assert await other.receive(10, 2 * LEASE) == []
        await other.close()

    async def test_concurrent_callers_settle_exactly_their_own_deliveries(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        # Many handlers publishing and settling at once (a bus may share round trips or ack
        # runs of deliveries in one frame): every publish arrives, and what was given
        # back or still held comes again - nothing acked does.
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=3 * LEASE)  # held ones return after it
        await asyncio.gather(*(t.publish([outgoing(names["route"], n)]) for n in range(120)))
        got = await drain(sub, 120, ack=False)
        assert sorted(numbers(got)) == list(range(120))
        by_n = {d.message.payload["n"]: d for d in got if d.message is not None}
        given_back, held = {n for n in by_n if n % 7 == 3}, {n for n in by_n if n % 11 == 5}
        acked = [by_n[n] for n in sorted(by_n, key=lambda n: (n * 37) % 120) if n not in given_back | held]
        await asyncio.gather(
            *(sub.ack([d]) for d in acked[:40]),
            *(sub.nack(by_n[n], 0) for n in sorted(given_back)),
            sub.ack(acked[40:80]),
            *(sub.ack([d]) for d in acked[80:]),
        )
        await sub.close()
        other = await (await connect_bus()).subscribe(names["g1"], [names["route"]], lease=10.0)
        again = await drain(other, len(given_back | held), timeout=15 * LEASE)
        assert sorted(numbers(again)) == sorted(given_back | held)
        assert await other.receive(10, 2 * LEASE) == []
        await other.close()

    async def test_extend_keeps_a_long_handler_lease(self, connect_bus: Connect, names: dict[str, str]) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        other = await (await connect_bus()).subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish([outgoing(names["route"], 5)])
        got = await drain(sub, 1, ack=False)
        holder, watcher = (sub, other) if got else (other, sub)
        if not got:
            got = await drain(other, 1, ack=False)
        for _ in range(4):  # 2x the lease, heartbeating
            await asyncio.sleep(LEASE / 2)
            await holder.extend(got, LEASE)
        assert await watcher.receive(1, 0.05) == []
        await holder.ack(got)
        await sub.close()
        await other.close()

    # ------------------------------------------------------------------ payloads and bad input
    async def test_bytes_are_carried_exactly(self, connect_bus: Connect, names: dict[str, str]) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        out = outgoing(names["route"], 1)
        out.message.payload = {"text": "zürich ☃ \u0000 ';-- DROP TABLE", "n": 1}
        out.body = out.message.encode()
        await t.publish([out])
        (d,) = await drain(sub, 1)
        assert d.body == out.body
        assert d.message == out.message
        await sub.close()

    async def test_garbage_bytes_arrive_as_undecodable_deliveries(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=LEASE)
        await t.publish_to_group(names["g1"], names["route"], b"\x00\x01 not an envelope")
        (d,) = await drain(sub, 1)
        assert d.message is None
        assert d.error
        assert d.body == b"\x00\x01 not an envelope"
        await sub.close()

    async def test_message_over_one_mebibyte_works_or_fails_clearly(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=5.0)
        big = outgoing(names["route"], 9, size=1_200_000)
        if self.large_message_limit is not None and len(big.body) > self.large_message_limit:
            with pytest.raises(TransportError, match="too large"):
                await t.publish([big])
            return
        await t.publish([big])
        (d,) = await drain(sub, 1, timeout=15)
        assert d.body == big.body
        await sub.close()

    async def test_single_consumer_receives_one_route_in_order(
        self, connect_bus: Connect, names: dict[str, str]
    ) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=5.0)
        await t.publish([outgoing(names["route"], n) for n in range(50)])
        assert numbers(await drain(sub, 50)) == list(range(50))
        await sub.close()

    async def test_ephemeral_group_can_be_dropped(self, connect_bus: Connect, names: dict[str, str]) -> None:
        t = await connect_bus()
        route = f"reply.{names['g1']}"
        await t.declare(names["g1"], [route], ephemeral=True)
        sub = await t.subscribe(names["g1"], [route], lease=LEASE)
        await t.publish([outgoing(route, 1)])
        assert numbers(await drain(sub, 1)) == [1]
        await sub.close()
        await t.drop_group(names["g1"])

    async def test_many_messages_in_one_publish(self, connect_bus: Connect, names: dict[str, str]) -> None:
        t = await connect_bus()
        sub = await t.subscribe(names["g1"], [names["route"]], lease=10.0)
        await t.publish([outgoing(names["route"], n) for n in range(1000)])
        got = await drain(sub, 1000, timeout=30)
        assert sorted(numbers(got)) == list(range(1000))
        await sub.close()
