"""nats:// (JetStream) passes the transport contract, on the server at 127.0.0.1:4222.

Each test gets its own stream and subject prefix (deleted afterwards), so tests never
see each other's messages, not even through a group name they happen to share.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from interplay.clock import SystemClock
from interplay.errors import ConfigurationError, TransportError
from interplay.testing import wait_until
from interplay.transports.base import Transport
from interplay.transports.nats import NatsTransport

from ..servers import require
from .transport_contract import TransportContract, drain, numbers, outgoing

SERVER = "nats://127.0.0.1:4222"


async def delete_stream(name: str) -> None:
    nc = await nats.connect(SERVER)
    try:
        await nc.jsm().delete_stream(name)
    except NotFoundError:
        pass
    finally:
        await nc.close()


class TestNatsTransport(TransportContract):
    options = ""

    @pytest.fixture(autouse=True)
    async def _stream(self) -> AsyncIterator[None]:
        require("nats")
        self.stream = f"CT_{uuid.uuid4().hex[:12]}"
        yield
        await delete_stream(self.stream)

    async def connect(self) -> Transport:
        bus = NatsTransport(f"{SERVER}?stream={self.stream}{self.options}")
        await bus.open(SystemClock())
        # The limit is the server's max_payload (less room for headers), not a constant.
        self.large_message_limit = bus.max_body
        return bus


class TestNatsTransportInterestRetention(TestNatsTransport):
    """The opt-in ``retention=interest`` stream keeps the same contract."""

    options = "&retention=interest"


class TestNatsSpecifics:
    """What the contract cannot say: the JetStream layout this transport promises."""

    @pytest.fixture
    async def bus(self) -> AsyncIterator[NatsTransport]:
        require("nats")
        self.stream = f"NS_{uuid.uuid4().hex[:12]}"
        self.opened: list[NatsTransport] = []
        yield await self.connect()
        for t in self.opened:
            await t.close()
        await delete_stream(self.stream)

    async def connect(self, options: str = "") -> NatsTransport:
        t = NatsTransport(f"{SERVER}?stream={self.stream}{options}")
        await t.open(SystemClock())
        self.opened.append(t)
        return t

    async def consumers(self) -> dict[str, Any]:
        """Filter subject -> consumer config, for every consumer of the stream."""
        nc = await nats.connect(SERVER)
        try:
            return {c.config.filter_subject: c.config for c in await nc.jsm().consumers_info(self.stream)}
        finally:
            await nc.close()

    async def test_layout_one_stream_and_a_consumer_per_route(self, bus: NatsTransport) -> None:
        await bus.declare("billing", ["event.order.created", "command.billing.charge"])
        await bus.declare("billing", ["event.order.created", "command.billing.charge"])  # idempotent
        prefix = self.stream  # the subject prefix follows the stream name
        configs = await self.consumers()
        assert set(configs) == {
            f"{prefix}.event.order.created", f"{prefix}.command.billing.charge", f"{prefix}._group.billing"
        }
        for config in configs.values():
            assert config.durable_name
            assert config.ack_policy == "explicit"
            assert config.max_deliver == -1  # the runtime dead-letters, never the broker
            assert config.ack_wait == 30.0
            assert config.inactive_threshold is None

    async def test_declaring_only_adds_routes(self, bus: NatsTransport) -> None:
        await bus.declare("g", ["event.a", "event.b"])
        await bus.declare("g", ["event.b", "event.c"])
        await bus.publish([outgoing("event.a", 1), outgoing("event.b", 2), outgoing("event.c", 3)])
        sub = await bus.subscribe("g", ["event.b", "event.c"], lease=5.0)
        # event.a is still declared: what queued there is delivered (the runtime then
        # dead-letters it as no_handler) rather than silently kept or lost
        assert sorted(numbers(await drain(sub, 3, timeout=5.0))) == [1, 2, 3]
        assert f"{self.stream}.event.a" in await self.consumers()

    async def test_subscribe_sets_ack_wait_and_a_later_declare_keeps_it(self, bus: NatsTransport) -> None:
        await bus.subscribe("g", ["event.a"], lease=2.5)
        other_process = await self.connect()
        await other_process.declare("g", ["event.a"])  # e.g. a publisher-only runtime starting
        assert {c.ack_wait for c in (await self.consumers()).values()} == {2.5}

    async def test_republished_message_id_is_stored_once(self, bus: NatsTransport) -> None:
        sub = await bus.subscribe("g", ["event.a"], lease=5.0)
        out = outgoing("event.a", 1)
        await bus.publish([out])
        await bus.publish([out])  # a retry after an ambiguous publish: same message id
        assert numbers(await drain(sub, 2, timeout=1.0)) == [1]

    async def test_a_message_nacked_again_and_again_keeps_coming(self, bus: NatsTransport) -> None:
        sub = await bus.subscribe("g", ["event.a"], lease=5.0)
        await bus.publish([outgoing("event.a", 1)])
        for attempt in range(1, 8):
            (d,) = await drain(sub, 1, ack=False)
            assert d.deliveries == attempt
            await sub.nack(d, 0)
        (d,) = await drain(sub, 1)
        assert d.deliveries == 8

    async def test_ephemeral_groups_have_a_ttl_and_drop_only_themselves(self, bus: NatsTransport) -> None:
        await bus.declare("g", ["reply.g"], ephemeral=True)
        await bus.declare("g-x", ["reply.g-x"])  # a name that starts like the other
        await bus.subscribe("g", ["reply.g"], lease=1.0)
        configs = await self.consumers()
        assert configs[f"{self.stream}.reply.g"].inactive_threshold == 600.0
        assert configs[f"{self.stream}.reply.g"].ack_wait == 1.0
        assert configs[f"{self.stream}.reply.g-x"].inactive_threshold is None
        await bus.drop_group("g")
        assert set(await self.consumers()) == {f"{self.stream}.reply.g-x", f"{self.stream}._group.g-x"}

    async def test_a_consumer_deleted_under_a_subscription_comes_back(self, bus: NatsTransport) -> None:
        sub = await bus.subscribe("g", ["event.a"], lease=5.0)
        await bus.drop_group("g")  # an operator's mistake, or an expired ephemeral group

        async def declared_again() -> bool:  # its pulls go unanswered: it declares the group again
            assert await sub.receive(1, 0.2) == []
            return len(await self.consumers()) == 2

        await wait_until(declared_again, timeout=10, message="consumers re-created")
        await bus.publish([outgoing("event.a", 4)])
        assert numbers(await drain(sub, 1, timeout=5)) == [4]

    async def test_an_existing_stream_with_other_retention_is_refused(self, bus: NatsTransport) -> None:
        with pytest.raises(ConfigurationError, match="retention"):
            await self.connect("&retention=interest")

    @pytest.mark.parametrize("options", ["&bogus=1", "&replicas=two", "&storage=disk", "&retention=workqueue",
                                         "&timeout=0", "&stream=a.b"])
    def test_bad_url_options_are_configuration_errors(self, options: str) -> None:
        with pytest.raises(ConfigurationError):
            NatsTransport(f"{SERVER}?stream=S{options}")

    async def test_no_server_is_a_transport_error_in_time(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nobody listens here
        bus = NatsTransport(f"nats://127.0.0.1:{port}?connect_timeout=0.5")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportError, match="cannot connect"):
            await bus.open(SystemClock())
        assert loop.time() - started < 3
