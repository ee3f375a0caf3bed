"""redis:// passes the transport contract, plus what is specific to Redis Streams.

Needs a Redis server on 127.0.0.1:6379 (see tests/servers.py). Every test uses its own
key prefix, and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable

import pytest
import redis.asyncio as aioredis

from interplay.clock import SystemClock
from interplay.errors import TransportError
from interplay.testing import wait_until
from interplay.transports import open_transport
from interplay.transports.base import Transport
from interplay.transports.redis import RedisTransport

from ..servers import require
from .transport_contract import LEASE, TransportContract, drain, numbers, outgoing

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def _redis_up() -> None:
    require("redis")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    tag = f"iptest:{uuid.uuid4().hex[:12]}:"
    yield tag
    client = aioredis.Redis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(match=tag + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class TestRedisTransport(TransportContract):
    @pytest.fixture(autouse=True)
    def _prefix(self, prefix: str) -> None:
        self.prefix = prefix

    async def connect(self) -> Transport:
        bus = RedisTransport(f"{REDIS}?prefix={self.prefix}")
        await bus.open(SystemClock())
        return bus


# ---------------------------------------------------------------------- Redis specifics


async def _open(url: str) -> RedisTransport:
    bus = RedisTransport(url)
    await bus.open(SystemClock())
    return bus


@pytest.fixture
async def bus(prefix: str) -> AsyncIterator[RedisTransport]:
    t = await _open(f"{REDIS}?prefix={prefix}&trim_interval=0")
    yield t
    await t.close()


async def test_url_maps_to_the_redis_transport_and_keeps_redis_options(prefix: str) -> None:
    t = open_transport(f"{REDIS}?prefix={prefix}&trim_interval=7&socket_timeout=3", store=None)  # type: ignore[arg-type]
    assert isinstance(t, RedisTransport)
    assert (t.prefix, t.options.trim_interval, t.options.socket_timeout) == (prefix, 7.0, 3.0)
    assert "prefix" not in t.options.redis_url
    assert "socket_timeout=3" in t.options.redis_url
    assert "socket_connect_timeout=5" in t.options.redis_url


async def test_a_server_that_goes_quiet_cannot_hang_a_command() -> None:
    """A half-open connection (accepted, never answered) ends in TransportError, not a hang."""
    default = open_transport(REDIS, store=None)  # type: ignore[arg-type]
    assert isinstance(default, RedisTransport)
    assert "socket_timeout=5" in default.options.redis_url  # redis-py's own default is no timeout

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        quiet = open_transport(f"redis://127.0.0.1:{port}/0?socket_timeout=0.1&socket_connect_timeout=0.1", store=None)  # type: ignore[arg-type]
        with pytest.raises(TransportError, match="connect failed"):
            await asyncio.wait_for(quiet.open(SystemClock()), 30)
        assert accepted  # it did reach the silent server
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


async def test_stream_per_route_and_group_per_service(bus: RedisTransport, prefix: str) -> None:
    await bus.declare("payments", ["event.order.created"])
    out = outgoing("event.order.created", 1)
    await bus.publish([out])
    groups = await bus.redis.xinfo_groups(f"{prefix}event.order.created")
    assert [g["name"] for g in groups] == [b"payments"]
    ((_, fields),) = await bus.redis.xrange(f"{prefix}event.order.created")
    assert fields == {b"body": out.body}  # the exact envelope bytes, nothing else
    assert await bus.redis.exists(f"{prefix}@group:payments") == 1


async def test_delivery_count_stays_true_across_nack_and_claim(bus: RedisTransport, prefix: str) -> None:
    route = "event.count.me"
    sub = await bus.subscribe("g", [route], lease=0.3)
    await bus.publish([outgoing(route, 1)])
    (first,) = await drain(sub, 1, ack=False)
    await sub.nack(first, 0.0)
    (second,) = await drain(sub, 1, ack=False)  # came back through the delayed set
    assert (first.deliveries, second.deliveries) == (1, 2)
    (third,) = await drain(sub, 1, ack=False, timeout=5)  # not acked: claimed after the lease
    assert third.deliveries == 3
    assert third.message == first.message
    await sub.ack([third])
    assert await sub.receive(1, 0.5) == []
    await sub.close()


async def test_nack_survives_the_nacking_process(prefix: str) -> None:
    """The delayed set is in Redis: another consumer moves the message when it is due."""
    route = "event.nack.crash"
    dying = await _open(f"{REDIS}?prefix={prefix}&trim_interval=0")
    survivor = await _open(f"{REDIS}?prefix={prefix}&trim_interval=0")
    try:
        s_dying = await dying.subscribe("g", [route], lease=10)
        s_survivor = await survivor.subscribe("g", [route], lease=10)
        await dying.publish([outgoing(route, 5)])
        (d,) = await drain(s_dying, 1, ack=False)
        await s_dying.nack(d, 0.3)
        await dying.close()  # its timer dies with it
        (again,) = await drain(s_survivor, 1, timeout=5)
        assert numbers([again]) == [5]
        assert again.deliveries == 2
    finally:
        await survivor.close()


async def test_nack_after_losing_the_lease_does_not_duplicate(bus: RedisTransport) -> None:
    route = "event.lost.lease"
    slow = await bus.subscribe("g", [route], lease=0.2)
    fast = await bus.subscribe("g", [route], lease=0.2)
    await bus.publish([outgoing(route, 1)])
    got = await drain(slow, 1, ack=False)
    holder, other = (slow, fast) if got else (fast, slow)
    got = got or await drain(fast, 1, ack=False)
    (taken,) = await drain(other, 1, ack=False, timeout=5)  # the lease ran out: claimed
    await holder.nack(got[0], 0.0)  # too late: must not put a second copy in the group
    await other.ack([taken])
    assert await drain(holder, 1, timeout=1.0) + await drain(other, 1, timeout=0.2) == []
    await slow.close()
    await fast.close()


async def test_trim_never_drops_unacknowledged_messages(bus: RedisTransport, prefix: str) -> None:
    route = "event.trim.me"
    key = f"{prefix}{route}"
    await bus.declare("slow", [route])
    fast = await bus.subscribe("fast", [route], lease=10)
    await bus.publish([outgoing(route, n) for n in range(10)])
    got = await drain(fast, 10)
    assert len(got) == 10
    assert await bus.trim() == 0  # "slow" has read none of them
    assert await bus.redis.xlen(key) == 10
    slow = await bus.subscribe("slow", [route], lease=10)
    first_six = await drain(slow, 6, ack=False)
    await slow.ack(first_six[:3])  # 3 acked, 3 still pending, 4 unread
    await bus.trim()
    assert await bus.redis.xlen(key) == 7
    await slow.ack(first_six[3:])
    rest = await drain(slow, 4)
    assert numbers(first_six + rest) == list(range(10))
    await bus.trim()
    assert await bus.redis.xlen(key) <= 1  # at most the last delivered entry stays
    await bus.publish([outgoing(route, 10)])
    assert numbers(await drain(fast, 1)) == [10]
    await fast.close()
    await slow.close()


async def test_trim_runs_by_itself(prefix: str) -> None:
    t = await _open(f"{REDIS}?prefix={prefix}&trim_interval=0.05")
    try:
        route = "event.auto.trim"
        sub = await t.subscribe("g", [route], lease=10)
        await t.publish([outgoing(route, n) for n in range(20)])
        assert len(await drain(sub, 20)) == 20

        async def trimmed() -> bool:
            return int(await t.redis.xlen(f"{prefix}{route}")) <= 1

        await wait_until(trimmed, timeout=5, message="stream trimmed")
        await sub.close()
    finally:
        await t.close()


async def test_ephemeral_groups_are_dropped_on_close(prefix: str) -> None:
    t = await _open(f"{REDIS}?prefix={prefix}&trim_interval=0")
    route = "reply.instance-1"
    await t.declare("instance-1", [route], ephemeral=True)
    sub = await t.subscribe("instance-1", [route], lease=LEASE)
    await t.publish([outgoing(route, 1)])
    assert numbers(await drain(sub, 1)) == [1]
    await sub.close()
    await t.close()
    probe = aioredis.Redis.from_url(REDIS)
    try:
        assert await probe.keys(prefix + "*") == []
    finally:
        await probe.aclose()


async def test_drop_group_keeps_streams_other_groups_read(bus: RedisTransport, prefix: str) -> None:
    route = "event.shared"
    await bus.declare("keep", [route])
    await bus.declare("temp", [route], ephemeral=True)
    await bus.drop_group("temp")
    groups = await bus.redis.xinfo_groups(f"{prefix}{route}")
    assert [g["name"] for g in groups] == [b"keep"]
    assert await bus.redis.exists(f"{prefix}@group:temp") == 0


async def test_a_closed_consumer_leaves_no_consumer_record_behind(bus: RedisTransport, prefix: str) -> None:
    route = "event.tidy"
    sub = await bus.subscribe("g", [route], lease=LEASE)
    await bus.publish([outgoing(route, 1)])
    await drain(sub, 1)
    await sub.close()
    assert await bus.redis.xinfo_consumers(f"{prefix}{route}", "g") == []


async def test_publish_to_an_undeclared_group_fails_clearly(bus: RedisTransport) -> None:
    with pytest.raises(TransportError, match="not declared"):
        await bus.publish_to_group("nobody", "event.x", b"{}")


async def test_group_deleted_under_a_consumer_is_declared_again(bus: RedisTransport, prefix: str) -> None:
    route = "event.vanished"
    sub = await bus.subscribe("g", [route], lease=LEASE)
    await bus.redis.delete(f"{prefix}{route}", f"{prefix}@group:g")  # the server "lost" it all
    await bus.publish([outgoing(route, 1)])  # the publisher knows "g" declared it: re-creates it
    assert numbers(await drain(sub, 1, timeout=5)) == [1]
    await sub.close()


async def test_consumer_survives_its_connections_being_killed(prefix: str) -> None:
    name = "iptest-" + uuid.uuid4().hex[:8]
    t = await _open(f"{REDIS}?prefix={prefix}&trim_interval=0&client_name={name}")
    admin = aioredis.Redis.from_url(REDIS)
    route = "event.killed.conn"
    try:
        sub = await t.subscribe("g", [route], lease=5)
        receiving = asyncio.ensure_future(drain(sub, 1, timeout=10))

        async def mine(command: str = "") -> list[dict[str, str]]:
            return [c for c in await admin.client_list() if c["name"] == name and command in c["cmd"]]

        await wait_until(lambda: _nonempty(mine("xread")), timeout=5, message="consumer blocked in XREAD")
        for client in await mine():  # the blocked XREAD among them
            await admin.client_kill_filter(_id=client["id"])
        await t.publish([outgoing(route, 8)])  # redis-py reconnects by itself
        assert numbers(await receiving) == [8]
        await sub.close()
    finally:
        await admin.aclose()
        await t.close()


async def _nonempty(found: Awaitable[list[dict[str, str]]]) -> bool:
    return bool(await found)


async def test_server_down_raises_transport_error() -> None:
    t = RedisTransport("redis://127.0.0.1:1/0?socket_connect_timeout=0.2")
    with pytest.raises(TransportError, match="redis: connect failed"):
        await t.open(SystemClock())
    await t.close()


async def test_concurrent_acks_and_publishes_share_round_trips(bus: RedisTransport) -> None:
    route = "event.many"
    sub = await bus.subscribe("g", [route], lease=10)
    await asyncio.gather(*(bus.publish([outgoing(route, n)]) for n in range(200)))
    got = await drain(sub, 200, ack=False)
    await asyncio.gather(*(sub.ack([d]) for d in got))
    assert sorted(numbers(got)) == list(range(200))
    assert await sub.receive(10, 0.3) == []
    await sub.close()


async def test_a_refused_publish_fails_only_its_caller(bus: RedisTransport, prefix: str) -> None:
    route, bad = "event.fine", "event.bad"
    sub = await bus.subscribe("g", [route], lease=10)
    client = aioredis.Redis.from_url(REDIS)
    try:
        await client.set(prefix + bad, "not a stream")  # XADD to it: WRONGTYPE, for that message only
    finally:
        await client.aclose()
    # Concurrent callers share one round trip; the refusal is about one message of one caller.
    results = await asyncio.gather(
        *(bus.publish([outgoing(route, n)]) for n in range(5)),
        bus.publish([outgoing(bad, 99)]),
        bus.publish([outgoing(route, 5), outgoing(bad, 98)]),
        return_exceptions=True,
    )
    assert results[:5] == [None] * 5
    assert all(isinstance(r, TransportError) and "WRONGTYPE" in str(r) for r in results[5:])
    got = await drain(sub, 6)
    assert sorted(numbers(got)) == list(range(6))  # the refused caller's other message went out too
    await sub.close()


async def test_a_publish_larger_than_a_script_call_goes_out_whole_and_in_order(bus: RedisTransport) -> None:
    # A batch goes as script calls of at most _PUBLISH_CHUNK (500) messages each.
    route = "event.many"
    sub = await bus.subscribe("g", [route], lease=10)
    await bus.publish([outgoing(route, n) for n in range(1201)])
    got = await drain(sub, 1201)
    assert numbers(got) == list(range(1201))
    await sub.close()
