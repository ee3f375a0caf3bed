"""``amqp://``'s dead-letter rescue: what RabbitMQ dead-lettered goes back to its service.

A message RabbitMQ redelivered ``delivery_limit`` times (expired leases, consumers that
died holding it) is dead-lettered into ``<exchange>:dlq``, where ``interplay dlq`` would
never show it. Every process consuming a service consumes that queue too and hands each
message back to the service it died in (``@<group>``), its delivery count carried on,
so the runtime's ``max_deliveries`` dead-letters it into the store: ``interplay dlq``,
an error reply to a waiting workflow, the flow marked failed.

It is handed back at most :data:`MAX_RESCUES` times (a runtime with ``max_deliveries=0``,
or one a message kills before counting, would otherwise cycle it for ever); after that,
and when it died in no service queue of this exchange or its service's queue is gone,
it is *abandoned*: handed to the sink the runtime set (``Transport.on_abandoned``), which
dead-letters it into the store (``interplay dlq``, reason ``abandoned``), retried until
it takes it. Without a sink (the transport on its own) it is *parked* in
``<exchange>:parked`` with the reason in its ``interplay-parked`` header; a process with
a sink also drains that queue into it (what was parked before). Not by routing a group's
dead letters straight back to its queue: RabbitMQ drops a message that dead-letters into
the queue it died in as a cycle (seen on 3.10).

A hand-back that RabbitMQ does not confirm is retried in place, the message unacked,
rather than rejected back to ``:dlq``: on RabbitMQ 4 ``:dlq`` itself has a delivery
limit (20 by default), past which it would drop the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from ..errors import TransportError
from .amqp_pack import PACK_TYPE, unpack
from .base import Abandoned, AbandonedSink

if TYPE_CHECKING:
    from .amqp import AmqpTransport

__all__ = [
    "DELIVERIES_HEADER", "MAX_RESCUES", "PARKED_HEADER", "RESCUES_HEADER", "ROUTE_HEADER", "DeadLetterRescue",
    "count", "text",
]

log = logging.getLogger("interplay.transports.amqp")

DELIVERIES_HEADER = "interplay-deliveries"
"""Deliveries a republished message had before (its quorum count restarts)."""
ROUTE_HEADER = "interplay-route"
"""The route of a message sent to one group's key (``@<group>``)."""
RESCUES_HEADER = "interplay-rescues"
"""How many times a dead letter was handed back from ``:dlq`` already."""
PARKED_HEADER = "interplay-parked"
"""Why a dead letter was parked instead of handed back."""
MAX_RESCUES = 3
"""Hand-backs of one message before it is parked."""
_PREFETCH = 16  # dead letters being handed back at once
_MAX_BACKOFF = 30.0  # seconds between tries of an unconfirmed hand-back, at most


class DeadLetterRescue:
    """Consumes ``:dlq`` for one transport (see the module docs)."""

    def __init__(self, transport: AmqpTransport) -> None:
        self.transport = transport
        self.sink: AbandonedSink | None = None
        self._channel: AbstractRobustChannel | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Start consuming (once); if that fails, say so - the next subscribe tries again."""
        t = self.transport
        if self._channel is not None:
            return
        channel: AbstractRobustChannel | None = None
        try:
            async with t._talking(f"consuming {t.dlq_name!r}"):
                channel = await connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=_PREFETCH)
                queue = await channel.declare_queue(
                    t.dlq_name, durable=True, arguments={"x-queue-type": "quorum"}, robust=True
                )
                await queue.consume(self._rescue, no_ack=False)
                if self.sink is not None:
                    parked = await channel.declare_queue(
                        t.parked_name, durable=True, arguments={"x-queue-type": "quorum"}, robust=True
                    )
                    await parked.consume(self._unpark, no_ack=False)
        except TransportError as exc:
            log.warning("not consuming %r (dead letters wait there until a later subscribe): %s", t.dlq_name, exc)
            if channel is not None:
                await self._quietly(channel.close, "closing the dead-letter channel")
            return
        self._channel = channel

    async def close(self) -> None:
        """Stop consuming; messages being handed back return to ``:dlq``."""
        channel, self._channel = self._channel, None
        if channel is not None:
            async with self.transport._talking("closing the dead-letter consumer"):
                await channel.close()

    async def _rescue(self, message: AbstractIncomingMessage) -> None:
        """Hand one dead letter back to its group, or park it; then ack it.

        A crash in between leaves both copies: the group's inbox drops the second.
        """
        t = self.transport
        headers = dict(message.headers or {})
        group, route, deliveries = self._death(message, headers)
        rescues = count(headers.get(RESCUES_HEADER))
        if not group:
            queue = _death(headers).get("queue")
            await self._park(message, headers, f"it died in {text(queue) or 'no queue'!r}, not a service queue of "
                                               "this bus", group, route, deliveries)
            return
        if rescues >= MAX_RESCUES:
            await self._park(message, headers, f"it died in {group!r} again after {rescues} hand-backs",
                             group, route, deliveries)
            return
        copy = {DELIVERIES_HEADER: deliveries, ROUTE_HEADER: route, RESCUES_HEADER: rescues + 1}
        if await self._until_published(t.options.exchange, "@" + group, _bodies(message), copy, f"back to {group!r}"):
            await self._park(message, headers, f"service {group!r} has no queue", group, route, deliveries)
            return
        await self._quietly(message.ack, "acking a dead letter handed back")  # if not: handed back twice

    def _death(self, message: AbstractIncomingMessage, headers: dict[str, Any]) -> tuple[str, str, int]:
        """(the service group it died in or "", its route, how many deliveries it had)."""
        t = self.transport
        death = _death(headers)
        queue = text(death.get("queue"))
        prefix = t.options.exchange + "."
        group = queue.removeprefix(prefix) if queue is not None and queue.startswith(prefix) else ""
        keys = death.get("routing-keys")
        route = text(headers.get(ROUTE_HEADER)) or (text(keys[0]) if isinstance(keys, list) and keys else None)
        # a delivery_limit death is delivery_limit + 1 deliveries (RabbitMQ 4 defaults to 20);
        # a broker that carries the count over says so in x-delivery-count
        died_after = (t.options.delivery_limit or 20) + 1 if text(death.get("reason")) == "delivery_limit" else 1
        deliveries = count(headers.get(DELIVERIES_HEADER)) + max(died_after, count(headers.get("x-delivery-count")))
        return group, route or message.routing_key or "", deliveries

    async def _park(self, message: AbstractIncomingMessage, headers: dict[str, Any], why: str,
                    group: str, route: str, deliveries: int) -> None:
        t = self.transport
        if self.sink is not None:
            log.warning("a message in %r is dead-lettered into the store: %s", t.dlq_name, why)
            try:
                for body in _bodies(message):  # a crash meanwhile: recorded twice, the second dropped
                    await self._until_taken(Abandoned(body, route, group, why, deliveries))
            except _NoSink:
                pass  # parked below instead
            else:
                await self._quietly(message.ack, "acking an abandoned dead letter")
                return
        log.warning("a message in %r is parked in %r: %s", t.dlq_name, t.parked_name, why)
        if await self._until_published("", t.parked_name, _bodies(message), {**headers, PARKED_HEADER: why}, "parking"):
            log.error("%r is missing: the message stays in %r", t.parked_name, t.dlq_name)
            return  # unacked: back in :dlq when this channel closes
        await self._quietly(message.ack, "acking a parked dead letter")

    async def _unpark(self, message: AbstractIncomingMessage) -> None:
        """A message parked before (by a process without a sink): into the sink, then ack."""
        t = self.transport
        headers = dict(message.headers or {})
        group, route, deliveries = self._death(message, headers)
        why = text(headers.get(PARKED_HEADER)) or "parked"
        if route == t.parked_name:
            route = ""  # parked by queue name, and nothing says the route it came by
        try:
            for body in _bodies(message):
                await self._until_taken(Abandoned(body, route, group, why, deliveries))
        except _NoSink:
            return  # unacked: it stays parked when this channel closes
        await self._quietly(message.ack, "acking a parked message recorded")

    async def _until_taken(self, abandoned: Abandoned) -> None:
        """Hand to the sink until it takes it (backing off): the store may be down a while.

        Meanwhile the message stays unacked, holding one of the consumer's prefetch slots;
        past RabbitMQ's ``consumer_timeout`` (30 min by default) the channel is closed and
        the message delivered again, its count raised (see the README on long outages).
        """
        delay = self.transport.options.reconnect_interval
        while True:
            sink = self.sink
            if sink is None:  # the runtime closed: park it after all
                raise _NoSink
            try:
                await sink(abandoned)
                return
            except Exception as exc:  # any failure: the message waits, unacked, and we try again
                log.warning("recording an abandoned dead letter failed (retrying in %.1fs): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(_MAX_BACKOFF, delay * 2)

    async def _until_published(
        self, exchange: str, key: str, bodies: list[bytes], headers: dict[str, Any], what: str
    ) -> bool:
        """Publish each of ``bodies`` until RabbitMQ confirms (backing off); True if it
        returned them unroutable."""
        delay = self.transport.options.reconnect_interval
        while True:
            try:
                returned = await self.transport._publish_all(
                    exchange, [(key, body, headers, None) for body in bodies], f"dead letter {what}")
                return any(returned)
            except TransportError as exc:
                log.warning("handing a dead letter %s failed (retrying in %.1fs): %s", what, delay, exc)
                await asyncio.sleep(delay)
                delay = min(_MAX_BACKOFF, delay * 2)

    async def _quietly(self, action: Callable[[], Awaitable[Any]], what: str) -> None:
        """Settle or close; if that fails, the channel's end gives the message back anyway."""
        try:
            async with self.transport._talking(what):
                await action()
        except TransportError as exc:
            log.debug("%s failed: %s", what, exc)


class _NoSink(Exception):
    """The sink was taken away (its runtime closed) while a message waited for it."""


def _bodies(message: AbstractIncomingMessage) -> list[bytes]:
    """The messages ``message`` carries: those of a pack, else its body."""
    if message.type == PACK_TYPE and (bodies := unpack(message.body)) is not None:
        return bodies
    return [message.body]


def _death(headers: dict[str, Any]) -> dict[str, Any]:
    """The latest ``x-death`` entry (RabbitMQ's record of where and why it died), or {}."""
    deaths = headers.get("x-death")
    return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}


def text(value: Any) -> str | None:
    """A header value as text (RabbitMQ may hand strings over as bytes)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def count(value: Any) -> int:
    """A header's count; anything odd counts as 0."""
    try:
        return max(int(value), 0) if isinstance(value, int | str | bytes) and not isinstance(value, bool) else 0
    except ValueError:
        return 0
