"""``amqp://`` - RabbitMQ (3.10 or newer) with quorum queues, publisher confirms, manual acks.

Topology (names derive from the ``exchange`` option; our plumbing uses ``:``, which
group names never contain, so a service called ``dlq`` cannot collide with it):

* ``<exchange>``: a durable topic exchange; the routing key is the message's route.
* ``<exchange>.<group>``: a durable quorum queue per group, bound to its routes and
  to ``@<group>``, its own key (``publish_to_group``, delayed redelivery). Messages
  queue while no consumer runs. An ephemeral group (a reply route) gets a classic
  queue that expires ``ephemeral_expires`` s after its last consumer left: it
  survives a reconnect, not its process.
* ``<exchange>:delay`` (headers exchange) -> ``<exchange>:delay:<ms>``: quorum queues
  with a queue-wide TTL, dead-lettering back into ``<exchange>`` under the message's
  routing key (``@<group>`` for ``nack(delay)``, the route for ``visible_at``).
  RabbitMQ expires messages only at a queue's head, so per-message TTLs in one queue
  would hold a 0.1 s retry behind a 30 s one; per level, expiry order is FIFO order.
  Delays round *up* to 13 levels a decade (<= +25%): never back early.
* ``<exchange>:dlx`` -> ``<exchange>:dlq``: the poison backstop. A message RabbitMQ
  redelivered ``delivery_limit`` times (expired leases, consumers that died holding
  it) is dead-lettered there, ``x-death`` saying why. Retries by the runtime's policy
  never count: a delayed retry is a new message. Every process consuming a group also
  consumes ``:dlq`` and hands its messages back to their groups for the runtime to
  dead-letter into the store, parking in ``<exchange>:parked`` what it cannot hand
  back (:mod:`interplay.transports.amqp_dlq`).

Reliability: persistent messages, quorum queues, ``mandatory`` publishes awaiting
their confirms (a batch's together), at-least-once dead-lettering. A message no
queue is bound to is not an error - the route has no subscriber, as on every bus -
and is logged once per route.

Packs (:mod:`interplay.transports.amqp_pack`): messages of one route published together
(concurrent handlers' publishes share a batch) travel as one AMQP message, up to ``pack``
of them within 256 KiB; the consumer hands them out one by one and acks the pack with
the last one settled. One of them cannot be rejected alone, so what would be: a copy
goes back to ``@<group>`` (``nack``, an expired lease: its delivery counted), and then
counts as settled. Packs must not let one consumer hoard a group's work: what of a pack
waited unstarted ``_PACK_HOLD`` (1 s) goes back to the queue for any consumer - unless
RabbitMQ counts no other consumer of the queue (it would come straight back); a pack
handed back waits twice as long at its next consumer (RabbitMQ may give it to a consumer
with no room for more, even the same one: so a backlog shared by busy consumers is not
republished every second). A pack that comes back (its consumer died or was cut off
holding it) is split: each message published again on its own, so that one that kills
its consumer goes on alone. Closing a subscription puts back what of a pack is not
settled (in the queue again ``_CLOSE_DELAY``, 1 s, later), so that what was acked of it
does not come again. What packs cost: a message handed back goes to the queue's end
(not its place), and a consumer that dies holding a pack hands its acked messages out
again too (the inbox drops them).

Deliveries: ``x-delivery-count`` + 1, plus what a delayed copy carries in its
``interplay-deliveries`` header. Leases are emulated (RabbitMQ has no visibility
timeout): a message handed out and not acked within ``lease`` s (``extend`` pushes
the deadline) is rejected back for any consumer (``basic.reject``: from RabbitMQ 4.3
on, ``basic.nack`` no longer raises the delivery count); a dead consumer's unacked
messages RabbitMQ redelivers itself. Leases and TTLs use wall time; RabbitMQ's
``consumer_timeout`` (30 min by default) still caps how long extending can hold one.

URL: ``amqp[s]://user:password@host:port/vhost?exchange=interplay&prefetch=256&...``
(:class:`AmqpOptions`); other query options (``heartbeat``, ``name``, TLS files)
go to aio-pika as they are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika import DeliveryMode, ExchangeType
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError
from aiormq import spec
from aiormq.abc import AbstractChannel, ChannelFrame, DeliveredMessage
from pamqp.header import ContentHeader

from ..clock import Clock, SystemClock
from ..errors import ConfigurationError, TransportError
from . import amqp_pack
from .amqp_dlq import DELIVERIES_HEADER, ROUTE_HEADER, DeadLetterRescue, count, text
from .amqp_pack import PACK_TYPE
from .base import AbandonedSink, Delivery, Subscription, Transport
from .coalesce import Coalescer, Refused

if TYPE_CHECKING:
    from ..stores.records import Outgoing

__all__ = ["AmqpOptions", "AmqpTransport", "delay_level"]

log = logging.getLogger("interplay.transports.amqp")

DELAY_HEADER = "interplay-delay"
"""The delay level (ms) a message is parked for; the delay exchange routes on it.
(Not ``x-``: headers exchanges ignore such binding arguments.)"""

_DRIVER_ERRORS: tuple[type[BaseException], ...] = CONNECTION_EXCEPTIONS
_DELAY_STEPS = (10, 12, 15, 18, 20, 25, 30, 35, 40, 50, 60, 70, 80)  # each <= 1.25x the last
_MAX_DELAY_MS = 2**31 - 1  # RabbitMQ TTLs are 32-bit
_MAX_ROUTING_KEY = 255  # bytes (AMQP's shortstr)
_IDLE_MS = 600_000  # a delay level queue outlives its last declaration by this much
_tokens = itertools.count(1)
_message_ids = itertools.count(1)  # with _PUBLISHER_ID: unique, and far cheaper than uuid4
_PUBLISHER_ID = f"ip-{uuid.uuid4().hex[:12]}-"
_PERSISTENT = int(DeliveryMode.PERSISTENT)
_Properties = spec.Basic.Properties
_Publish = tuple[str, bytes, dict[str, Any] | None, str | None]  # routing key, body, headers, AMQP type
_PACK_BYTES = 256 * 1024  # a pack's body at most; a larger message goes alone
_PACK_HOLD = 1.0  # seconds a pack's message waits unstarted before it goes back to the queue
_MAX_HOLD = 30.0  # ... doubling each time it went back, up to this
_CLOSE_DELAY = 1.0  # seconds until what a closing consumer put back of its packs is in the queue again
_CLOSE_GRACE = 2  # timeouts a closing consumer spends at most settling what is under way
HANDBACKS_HEADER = "interplay-handbacks"
"""How many times a pack's messages went back to the queue unstarted."""


@dataclass(frozen=True, slots=True)
class AmqpOptions:
    """The ``amqp://`` URL's query options (all optional)."""

    exchange: str = "interplay"
    """The topic exchange; every queue's name starts with it."""
    prefetch: int = 256
    """Most unacked AMQP messages per subscription (QoS; a pack counts as one); the first
    receive's batch size lowers it."""
    delivery_limit: int = 20
    """``x-delivery-limit`` of new group queues (poison backstop, 0 = off; existing ones: by policy)."""
    timeout: float = 10.0
    """Seconds to wait for RabbitMQ (confirms, declarations); a publish not confirmed by then
    failed, ambiguously: the caller retries it with the same message ids."""
    reconnect_interval: float = 1.0
    """Seconds between reconnection attempts after the connection dropped."""
    ephemeral_expires: float = 60.0
    """Seconds an ephemeral group's queue survives without a consumer."""
    connect_timeout: float = 10.0
    """Seconds to wait for the first connection in ``open``."""
    max_body: int = 16 * 1024 * 1024
    """The largest message body to publish: RabbitMQ's ``max_message_size`` (16 MiB by
    default from RabbitMQ 4, 128 MiB on 3.x). RabbitMQ answers a larger one by closing
    the publishing channel, failing every publish under way; the runtime refuses it
    before storing it instead (``MessageTooLarge``)."""
    pack: int = 64
    """Most messages of one route, published together, that travel as one AMQP message
    (a pack; 1 = each on its own, as a consumer of an interplay before packs needs)."""

    @classmethod
    def from_url(cls, url: str) -> tuple[AmqpOptions, str]:
        """Split ``url`` into these options and the URL to hand to aio-pika.

        Raises:
            ConfigurationError: an option is not a valid value.
        """
        parts = urlsplit(url)
        types = {f.name: {"int": int, "float": float}.get(str(f.type), str) for f in fields(cls)}
        query = parse_qsl(parts.query, keep_blank_values=True)
        try:
            options = cls(**{key: types[key](value) for key, value in query if key in types})
        except ValueError as exc:
            raise ConfigurationError(f"amqp:// options: a number is not valid ({exc})") from None
        rest = [(key, value) for key, value in query if key not in types]
        if not options.exchange or options.exchange.startswith("amq.") or len(options.exchange) > 200:
            raise ConfigurationError(f"amqp:// option exchange={options.exchange!r} is not a usable exchange name")
        if (options.prefetch < 1 or options.delivery_limit < 0 or options.timeout <= 0 or options.pack < 1
                or options.max_body < 1):
            raise ConfigurationError("amqp:// options need prefetch >= 1, delivery_limit >= 0, timeout > 0, "
                                     "pack >= 1, max_body >= 1")
        return options, urlunsplit(parts._replace(query=urlencode(rest)))


def delay_level(seconds: float) -> int:
    """The delay queue (in ms) serving ``seconds``: the next of 13 levels per decade.

    Rounding up keeps the promise "not before the delay" at the cost of up to 25%.
    """
    ms = max(1, math.ceil(round(seconds * 1000, 6)))
    scale = 1
    while _DELAY_STEPS[-1] * scale < ms:
        scale *= 10
    level = next(step * scale for step in _DELAY_STEPS if step * scale >= ms)
    return min(level, _MAX_DELAY_MS)


def redact(url: str) -> str:
    """``url`` without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn aio-pika / aiormq errors into :class:`TransportError` (the boundary)."""
    try:
        yield
    except TransportError:
        raise
    except TimeoutError as exc:
        raise TransportError(f"{what}: RabbitMQ did not answer in time") from exc
    except _DRIVER_ERRORS as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


class AmqpTransport(Transport):
    """A bus on RabbitMQ (``amqp://``, ``amqps://``); see the module docs.

    Attributes:
        options: the URL's options.
        declared_queues: names of the queues this transport declared (tools and
            tests use it to clean up what they made).
        declared_exchanges: likewise for exchanges.
        reconnects: how many times the connection was re-established.
    """

    scheme = "amqp"
    durable = True

    def __init__(self, url: str = "amqp://localhost/") -> None:
        self.options, self._driver_url = AmqpOptions.from_url(url)
        self.safe_url = redact(url)
        ex = self.options.exchange
        self._dlx, self._dlq, self._delay_exchange = f"{ex}:dlx", f"{ex}:dlq", f"{ex}:delay"
        self.parked_name = f"{ex}:parked"
        self._clock: Clock = SystemClock()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None  # confirms; owns the exchanges
        self._admin: AbstractRobustChannel | None = None  # declarations: a refusal closes only it
        self._probe: AbstractRobustChannel | None = None  # counting a queue's consumers (a 404 closes it)
        self._publishes: Coalescer[tuple[str, bytes, int]] = Coalescer("amqp", self._publish_batch)
        self._ephemeral: set[str] = set()
        self._subscriptions: set[_AmqpSubscription] = set()
        self._rescue = DeadLetterRescue(self)
        self._levels: dict[int, float] = {}  # delay level -> when we last declared it
        self._unroutable: set[str] = set()
        self.declared_queues: set[str] = set()
        self.declared_exchanges: set[str] = set()
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<AmqpTransport {self.safe_url} exchange={self.options.exchange!r}>"

    def queue_name(self, group: str) -> str:
        """The queue of ``group``."""
        return f"{self.options.exchange}.{group}"

    @property
    def dlq_name(self) -> str:
        """The queue where RabbitMQ parks messages over the delivery limit."""
        return self._dlq

    # ------------------------------------------------------------------ lifecycle
    async def open(self, clock: Clock) -> None:
        """Connect (reconnecting by itself from then on) and declare the exchanges.

        ``clock`` tells when a message's ``visible_at`` is due; leases use wall time.

        Raises:
            TransportError: RabbitMQ is unreachable or refused us.
        """
        self._clock = clock
        parts = urlsplit(self._driver_url)
        if parts.username in (None, "guest") and parts.password in (None, "guest"):
            log.warning(
                "connecting to %s with RabbitMQ's default guest credentials: "
                "create a dedicated user outside development", self.safe_url,
            )
        name = f"interplay {socket.gethostname()}-{os.getpid()}"
        with _translated(f"connecting to {self.safe_url}"):
            self._connection = await aio_pika.connect_robust(
                self._driver_url,
                reconnect_interval=self.options.reconnect_interval,
                timeout=self.options.connect_timeout,
                client_properties={"connection_name": name},
            )
            self._connection.reconnect_callbacks.add(self._reconnected)
        async with self._talking(f"declaring exchanges on {self.safe_url}"):
            self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=False)
            self._admin = await self._connection.channel(publisher_confirms=False)
            await self._declare_exchange(self.options.exchange, ExchangeType.TOPIC)
            await self._declare_exchange(self._delay_exchange, ExchangeType.HEADERS)
            await self._declare_exchange(self._dlx, ExchangeType.FANOUT)
            dlq = await self._admin.declare_queue(
                self._dlq, durable=True, arguments={"x-queue-type": "quorum"}, robust=False
            )
            self.declared_queues.add(self._dlq)
            await dlq.bind(self._dlx, "", robust=False)
            await self._admin.declare_queue(
                self.parked_name, durable=True, arguments={"x-queue-type": "quorum"}, robust=False
            )
            self.declared_queues.add(self.parked_name)

    def _reconnected(self, connection: AbstractRobustConnection | None, /) -> None:
        self.reconnects += 1
        log.info("reconnected to %s; consumers resume", self.safe_url)

    @property
    def connected(self) -> bool:
        """Whether the connection to RabbitMQ is up right now."""
        return self._connection is not None and self._connection.connected.is_set()

    async def _declare_exchange(self, name: str, kind: ExchangeType) -> None:
        assert self._publisher is not None
        await self._publisher.declare_exchange(name, kind, durable=True)  # re-declared on reconnect
        self.declared_exchanges.add(name)

    async def close(self) -> None:
        """Close every subscription and the connection (unacked messages go back).

        Raises:
            TransportError: closing failed.
        """
        try:
            closed = await asyncio.gather(*(sub.close() for sub in list(self._subscriptions)),
                                          return_exceptions=True)  # side by side: each may wait on RabbitMQ
            await self._rescue.close()
            await self._publishes.drain(self.options.timeout)  # publishes under way are confirmed
            errors = [result for result in closed if isinstance(result, BaseException)]
            for error in errors[1:]:
                log.warning("closing a consumer failed: %s", error)
            if errors:
                raise errors[0]
        finally:
            connection, self._connection = self._connection, None
            if connection is not None:
                async with self._talking(f"closing the connection to {self.safe_url}"):
                    await connection.close()

    @asynccontextmanager
    async def _talking(self, what: str) -> AsyncIterator[None]:
        # A robust channel waits for a reconnect before it talks: bound every wait.
        with _translated(what):
            async with asyncio.timeout(self.options.timeout):
                yield

    async def _probe_channel(self) -> AbstractChannel:
        """A channel of its own for passive declarations: one of a queue that is gone
        closes it (aio-pika opens it again), not a channel anything else uses."""
        if self._probe is None or self._probe.is_closed:
            self._probe = await self._ready().channel(publisher_confirms=False)
        return await self._probe.get_underlay_channel()

    def _ready(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportError(f"{self!r} is not open")
        if not self._connection.connected.is_set():
            raise TransportError(f"not connected to {self.safe_url}; reconnecting in the background")
        return self._connection

    # ------------------------------------------------------------------ topology
    def _queue_arguments(self, group: str) -> dict[str, Any]:
        if group in self._ephemeral:
            return {"x-queue-type": "classic", "x-expires": max(1000, int(self.options.ephemeral_expires * 1000))}
        limit = {"x-delivery-limit": self.options.delivery_limit} if self.options.delivery_limit else {}
        return _quorum(self._dlx, **limit)

    async def _declare_on(
        self, channel: AbstractRobustChannel, group: str, routes: Sequence[str], *, robust: bool
    ) -> AbstractRobustQueue:
        name = self.queue_name(group)
        async with self._talking(f"declaring queue {name!r}"):
            queue = await channel.declare_queue(
                name, durable=True, arguments=self._queue_arguments(group), robust=robust
            )
            for key in (*routes, "@" + group):
                await queue.bind(self.options.exchange, key, robust=robust)
        self.declared_queues.add(name)
        return queue

    async def declare(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Create ``group``'s queue (if needed) and bind it to ``routes`` and its own key.

        Raises:
            TransportError: RabbitMQ refused (e.g. the queue exists with other arguments).
        """
        if ephemeral:
            self._ephemeral.add(group)
        self._ready()
        assert self._admin is not None
        await self._declare_on(self._admin, group, routes, robust=False)

    async def drop_group(self, group: str) -> None:
        """Stop this process's consumers of ``group`` and delete its queue."""
        for sub in [s for s in self._subscriptions if s.group == group]:
            await sub.close()
        self._ready()
        assert self._admin is not None
        name = self.queue_name(group)
        async with self._talking(f"deleting queue {name!r}"):
            await self._admin.queue_delete(name)
        self._ephemeral.discard(group)
        self.declared_queues.discard(name)

    def route_limit(self) -> int:
        """RabbitMQ's routing keys are at most 255 bytes."""
        return _MAX_ROUTING_KEY

    def body_limit(self) -> int:
        """The ``max_body`` option (RabbitMQ's ``max_message_size``)."""
        return self.options.max_body

    def on_abandoned(self, sink: AbandonedSink | None) -> None:
        """Dead letters that cannot go back to their group go to ``sink``, not ``:parked``
        (see :mod:`~interplay.transports.amqp_dlq`); call before the first subscribe."""
        self._rescue.sink = sink

    async def subscribe(self, group: str, routes: Sequence[str], *, lease: float) -> Subscription:
        """Consume ``group`` on a channel of its own (declaring it for ``routes``).

        Consuming starts with the first ``receive``, whose batch size sets the prefetch.
        """
        connection = self._ready()
        async with self._talking(f"opening a channel for {group!r}"):
            channel = await connection.channel(publisher_confirms=False)
        try:
            # robust: after a reconnect aio-pika re-declares, re-binds and re-consumes
            queue = await self._declare_on(channel, group, routes, robust=True)
        except TransportError:
            async with self._talking("closing a failed channel"):
                await channel.close()
            raise
        sub = _AmqpSubscription(self, group, lease, channel, queue)
        self._subscriptions.add(sub)
        if group not in self._ephemeral:
            await self._rescue.start(connection)
        return sub

    # ------------------------------------------------------------------ publishing
    async def publish(self, batch: Sequence[Outgoing]) -> None:
        """Publish persistent, mandatory messages; return once RabbitMQ confirmed them all.

        Concurrent callers share a batch (their publishes go out back to back, the
        confirms awaited together; a caller arriving meanwhile waits for the next). A
        message whose ``visible_at`` lies ahead waits in a delay queue first, then fans
        out to the groups bound to its route at that time.

        Raises:
            TransportError: not connected, a message too large (over ``max_body``:
                nothing is published), refused, or a batch not confirmed within
                ``timeout`` (ambiguous for every caller in it: retry with the same
                message ids).
        """
        for out in batch:  # checked again per message below; here, so that none of the batch goes
            if (error := self._too_large(out.route, out.body)) is not None:
                raise error
        now = self._clock.now()
        later = [out for out in batch if out.visible_at is not None and out.visible_at > now]
        for out in later:
            await self._park(out.route, out.body, {}, (out.visible_at or now) - now)
        batch = [out for out in batch if out.visible_at is None or out.visible_at <= now]
        if batch:
            self._ready()
            await self._publishes.submit([(out.route, out.body, out.fanout) for out in batch])

    async def _publish_batch(self, items: list[tuple[str, bytes, int]]) -> None:
        exchange = self.options.exchange
        bodies = [body for _, body, _ in items]
        plan = amqp_pack.plan([route for route, _, _ in items], bodies, self.options.pack,
                              min(_PACK_BYTES, self.options.max_body))
        messages: list[_Publish] = [
            (key, bodies[indices[0]], None, None) if len(indices) == 1
            else (key, amqp_pack.pack([bodies[i] for i in indices]), None, PACK_TYPE)
            for key, indices in plan
        ]
        sent = await self._confirm_all(exchange, messages, f"publishing {len(items)}")
        results: list[Any] = [None] * len(items)
        for (_, indices), result in zip(plan, sent, strict=True):
            for i in indices:
                results[i] = result
        for (route, _, fanout), result in zip(items, results, strict=True):
            if isinstance(result, DeliveredMessage):
                self._note_unroutable(route, fanout)
        failed = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
        if failed:  # RabbitMQ refused these (nack): fail their callers only
            raise Refused(f"amqp: publishing to {exchange!r} failed", failed)

    async def publish_to_group(self, group: str, route: str, body: bytes) -> None:
        """Deliver ``body`` to ``group``'s queue only, as if it had come by ``route``.

        Raises:
            TransportError: the group has no queue, or the publish was not confirmed.
        """
        (returned,) = await self._publish_all(
            self.options.exchange, [("@" + group, body, {ROUTE_HEADER: route}, None)], f"publishing to group {group!r}"
        )
        if returned:
            raise TransportError(f"group {group!r} has no queue on exchange {self.options.exchange!r}")

    async def _publish_all(
        self, exchange: str, items: Sequence[_Publish], what: str
    ) -> list[bool]:
        """Publish each (routing key, body, headers); True where RabbitMQ returned it unroutable."""
        results = await self._confirm_all(exchange, items, what)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            with _translated(f"{what} to {exchange!r} ({len(failed)} of {len(items)} failed)"):
                raise failed[0]
        return [isinstance(r, DeliveredMessage) for r in results]

    async def _confirm_all(
        self, exchange: str, items: Sequence[_Publish], what: str
    ) -> list[Any]:
        """Publish each (routing key, body, headers) persistent and mandatory; per item,
        RabbitMQ's answer: its confirm, the message returned unroutable, or the error.

        The batch goes out as one write (:func:`_publish_frames`): RabbitMQ then takes
        it in as a batch too (a third of the server CPU per message, measured).
        """
        self._ready()
        assert self._publisher is not None
        limits = [self._too_large(key, body) for key, body, _, _ in items]  # such a one fails alone
        fits = [item for item, error in zip(items, limits, strict=True) if error is None]
        answers: list[Any] = []
        if fits:
            async with self._talking(f"{what} to {exchange!r}"):
                channel = await self._publisher.get_underlay_channel()
                confirms: Sequence[Awaitable[Any]]
                if _frames_batched(channel):
                    confirms = await _publish_frames(channel, exchange, fits)
                else:  # gather starts the publishes in order: one route keeps its order
                    confirms = [channel.basic_publish(body, exchange=exchange, routing_key=key, mandatory=True,
                                                      properties=_Properties(delivery_mode=_PERSISTENT,
                                                                             headers=headers, message_type=kind))
                                for key, body, headers, kind in fits]
                answers = await asyncio.gather(*confirms, return_exceptions=True)
        fitting = iter(answers)
        return [next(fitting) if error is None else error for error in limits]

    def _too_large(self, key: str, body: bytes) -> TransportError | None:
        """The error for a body over ``max_body`` (RabbitMQ would close the channel on it), or None."""
        if len(body) <= self.options.max_body:
            return None
        return TransportError(f"message for {key!r} too large: {len(body)} bytes, over max_body="
                              f"{self.options.max_body} (RabbitMQ's max_message_size; or publish a reference "
                              "to the data)")

    def _note_unroutable(self, route: str, fanout: int) -> None:
        # Nobody bound to the route means no subscriber: on every bus such a message
        # reaches no one, so it is not an error. Say so once per route.
        if route in self._unroutable:
            return
        if len(self._unroutable) > 1000:  # reply routes of gone runtimes add up
            self._unroutable.clear()
        self._unroutable.add(route)
        quiet = fanout == 0 or route.startswith("reply.")
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "no queue is bound to route %r on exchange %r: its messages reach no group",
            route, self.options.exchange,
        )

    async def _park(self, key: str, body: bytes, headers: dict[str, Any], delay: float) -> None:
        """Publish ``body`` to the exchange under ``key`` after ``delay`` seconds."""
        await self._park_all([(key, body, headers, None)], delay)

    async def _park_all(self, items: Sequence[_Publish], delay: float) -> None:
        """Publish ``items`` to the exchange after ``delay`` seconds, all confirmed.

        Raises:
            TransportError: not confirmed, or the delay queue is gone.
        """
        self._ready()
        level = delay_level(delay)
        await self._declare_level(level)
        returned = await self._publish_all(self._delay_exchange, [
            (key, body, {**(headers or {}), DELAY_HEADER: str(level)}, kind) for key, body, headers, kind in items
        ], f"delaying {len(items)} for {items[0][0]!r}")
        if any(returned):  # the level queue vanished under us: forget it so the next try re-declares
            self._levels.pop(level, None)
            raise TransportError(f"the delay queue for {level} ms is missing")

    async def _declare_level(self, level: int) -> None:
        loop = asyncio.get_running_loop()
        # A queue with x-expires is deleted once unused (messages in it or not); we
        # re-declare well within its idle time so it always outlives what it holds.
        last = self._levels.get(level)
        if last is not None and loop.time() - last < 60:
            return
        assert self._admin is not None
        name = f"{self._delay_exchange}:{level}"
        async with self._talking(f"declaring delay queue {name!r}"):
            # dead-lettered with the routing key it was published with: @group, or a route
            arguments = _quorum(self.options.exchange, **{"x-message-ttl": level, "x-expires": level + _IDLE_MS})
            queue = await self._admin.declare_queue(name, durable=True, arguments=arguments, robust=False)
            await queue.bind(
                self._delay_exchange, "", arguments={"x-match": "all", DELAY_HEADER: str(level)}, robust=False
            )
        self.declared_queues.add(name)
        self._levels[level] = loop.time()


def _frames_batched(channel: Any) -> TypeGuard[aiormq.Channel]:
    """Whether ``channel`` has what :func:`_publish_frames` uses (aiormq 7.2 does)."""
    return isinstance(channel, aiormq.Channel) and bool(channel.publisher_confirms) and all(
        hasattr(channel, name) for name in ("confirmations", "message_id_delivery_tag", "_split_body", "write_queue"))


async def _publish_frames(
    channel: aiormq.Channel, exchange: str, items: Sequence[_Publish]
) -> list[asyncio.Future[Any]]:
    """Write persistent, mandatory publishes as one frame batch; their confirmations.

    What aiormq's ``basic_publish`` does for one message, for many under one hold of
    the channel lock and in one write: a delivery tag and confirmation future each
    (resolved by aiormq as RabbitMQ confirms, returns or nacks them, or failed when the
    channel closes), a message id each to match a returned message to its future. An
    item that cannot be encoded (a routing key over 255 bytes, a header value AMQP has
    no type for) fails alone, never sent. Returns once the write is drained to the
    socket (back-pressure, as ``basic_publish`` waits); until it is queued, a
    cancellation takes everything back.
    """
    confirmations: list[asyncio.Future[Any]] = []
    registered: list[int] = []
    async with channel.lock:
        first = channel.delivery_tag
        payloads: list[bytes] = []
        written = channel.create_future()
        try:
            for key, body, headers, kind in items:
                confirmation = channel.create_future()
                confirmations.append(confirmation)
                message_id = f"{_PUBLISHER_ID}{next(_message_ids)}"
                try:
                    if len(key.encode()) > _MAX_ROUTING_KEY:
                        raise ValueError(f"routing key {key[:40]!r}... is over {_MAX_ROUTING_KEY} bytes")
                    header = ContentHeader(body_size=len(body), properties=_Properties(
                        delivery_mode=_PERSISTENT, headers=headers, message_id=message_id, message_type=kind))
                    publish = spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True)
                    frames: list[Any] = [publish, header, *channel._split_body(body)]
                    payloads.append(ChannelFrame.marshall(channel_number=channel.number, frames=frames).payload)
                except Exception as exc:  # this message only: it takes no delivery tag
                    confirmation.set_exception(exc)
                    continue
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                channel.confirmations[tag] = confirmation
                channel.message_id_delivery_tag[message_id] = tag
                confirmation.add_done_callback(partial(_forget_message_id, channel, message_id, tag))
                registered.append(tag)
            if payloads:
                await channel.write_queue.put(ChannelFrame(b"".join(payloads), False, written))
        except BaseException:  # not queued (cancelled while the write queue was full): take it all back
            channel.delivery_tag = first
            for tag in registered:
                channel.confirmations.pop(tag, None)
            for future in (*confirmations, written):
                future.cancel()
            raise
    if payloads:
        await written
    return confirmations


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def _quorum(dead_letters_to: str, **arguments: Any) -> dict[str, Any]:
    """Quorum queue arguments; at-least-once dead-lettering needs ``reject-publish``
    overflow (harmless: no length limit is set)."""
    return {
        "x-queue-type": "quorum", "x-dead-letter-exchange": dead_letters_to,
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish", **arguments,
    }


class _Tags:
    """The delivery tags of one channel not yet acked or rejected on the wire.

    RabbitMQ numbers a channel's deliveries 1, 2, 3 ...; one ``multiple`` ack settles
    every outstanding tag up to its own. It may cover only tags we are acking: not one
    still handled, being rejected, or delivered but not yet seen by our callback.
    """

    __slots__ = ("_early", "open", "seen")

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.seen = 0  # every tag up to this one has reached us
        self._early: set[int] = set()  # tags seen past a gap (callbacks out of order)

    def delivered(self, tag: int) -> None:
        self.open.add(tag)
        if tag != self.seen + 1:
            self._early.add(tag)
            return
        self.seen = tag
        while self.seen + 1 in self._early:
            self.seen += 1
            self._early.discard(self.seen)

    def plan(self, tags: Sequence[int]) -> list[tuple[int, bool]]:
        """The (tag, multiple) acks that settle exactly ``tags``: one ``multiple`` ack
        for those below the first tag that must stay, one each for the rest."""
        acking = set(tags)
        stays = min((t for t in self.open if t not in acking), default=self.seen + 1)
        stays = min(stays, self.seen + 1)
        below = [t for t in acking if t < stays]
        plan = [(max(below), len(below) > 1)] if below else []
        return plan + [(t, False) for t in sorted(acking) if t >= stays]


@dataclass(slots=True, eq=False)
class _Pack:
    """A pack being handled: acked once each of its messages is settled."""

    message: AbstractIncomingMessage
    left: int
    """Its messages not settled yet (acked, handed back to the queue or parked)."""
    waiting: int
    """Its messages still in the buffer, not handed out."""
    since: float
    """When it arrived (loop time), or when it was last found waiting with no other consumer."""
    hold: float
    """How long its messages may wait unstarted before they go back to the queue."""


@dataclass(slots=True)
class _Held:
    """A message handed out by ``receive``, leased until acked, nacked or expired."""

    message: AbstractIncomingMessage
    timer: asyncio.TimerHandle
    body: bytes
    pack: _Pack | None


_Buffered = tuple[AbstractIncomingMessage, bytes, _Pack | None]


class _AmqpSubscription(Subscription):
    """A consumer of one group: aio-pika pushes into a buffer, ``receive`` pulls from it."""

    def __init__(
        self, transport: AmqpTransport, group: str, lease: float, channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
    ) -> None:
        self.transport = transport
        self.group = group
        self.lease = lease
        self._channel = channel
        self._queue = queue
        self._buffer: deque[_Buffered] = deque()
        self._arrived = asyncio.Event()
        self._held: dict[int, _Held] = {}
        self._packs: dict[_Pack, None] = {}  # packs with messages in the buffer, oldest first
        self._aging: asyncio.Task[None] | None = None
        self._new_pack = asyncio.Event()  # wakes _age: a pack may be due sooner than it sleeps
        self._tags: dict[AbstractChannel, _Tags] = {}  # per channel delivering to us (one at a time)
        self._acks: Coalescer[AbstractIncomingMessage] = Coalescer("amqp", self._ack_batch)
        self._returns: set[asyncio.Task[None]] = set()
        self._consumer_tag: str | None = None
        self._closed = False

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        tags = self._tags_of(message)
        if tags is not None and message.delivery_tag is not None:
            tags.delivered(message.delivery_tag)
        if self._closed:
            return  # unacked: closing the channel gives it back
        if message.type == PACK_TYPE and (bodies := amqp_pack.unpack(message.body)) is not None:
            if (message.redelivered and await self._split(message, bodies)) or self._closed:
                return
            handbacks = min(count((message.headers or {}).get(HANDBACKS_HEADER)), 5)
            hold = min(_PACK_HOLD * 2**handbacks, _MAX_HOLD)
            pack = _Pack(message, len(bodies), len(bodies), asyncio.get_running_loop().time(), hold)
            self._buffer.extend((message, body, pack) for body in bodies)
            self._waiting(pack)
        else:  # a pack that is not well-formed goes out whole, to be dead-lettered as undecodable
            self._buffer.append((message, message.body, None))
        self._arrived.set()

    async def _split(self, message: AbstractIncomingMessage, bodies: list[bytes]) -> bool:
        """A pack that came back (its consumer died or closed holding it): publish each of
        its messages again on its own, so that one that kills its consumer does not take
        the others along again; then ack the pack. False if that failed: it is handed out as
        it is (what was handled of it already, the inbox drops).
        """
        try:
            await self._put_back([self._copy([body], _so_far(message)) for body in bodies],
                                 "splitting a pack that came back")
        except TransportError as exc:
            log.info("%s: %s; handling the pack whole", self.group, exc)
            return False
        try:
            await self._acks.submit([message])
        except TransportError as exc:  # it comes back again: its messages twice, the inbox drops one
            log.info("%s: acking a pack split up failed: %s", self.group, exc)
        return True

    def _copy(self, bodies: list[bytes], headers: dict[str, Any]) -> _Publish:
        """A message putting ``bodies`` back in this group's queue: a pack if several."""
        key = "@" + self.group
        if len(bodies) > 1:
            return key, amqp_pack.pack(bodies), headers, PACK_TYPE
        return key, bodies[0], headers, None

    async def _put_back(self, copies: list[_Publish], what: str) -> None:
        """Publish ``copies`` (of :meth:`_copy`), all confirmed.

        Raises:
            TransportError: not confirmed, or the group's queue is gone.
        """
        t = self.transport
        if any(await t._publish_all(t.options.exchange, copies, f"{what} on {self._queue.name!r}")):
            raise TransportError(f"{what}: group {self.group!r} has no queue")

    def _waiting(self, pack: _Pack) -> None:
        """``pack`` has messages in the buffer: watch how long they wait."""
        self._packs[pack] = None
        if self._aging is None or self._aging.done():
            self._aging = asyncio.get_running_loop().create_task(self._age())
        else:
            self._new_pack.set()

    async def _age(self) -> None:
        """While packs wait in the buffer, hand back what of them waited unstarted longer
        than their hold, so that other consumers of the group get work this one cannot
        start yet; a pack handed back waits twice as long at its next consumer. Nothing
        goes back while this is the group's only consumer (it would come straight back)."""
        loop = asyncio.get_running_loop()
        while self._packs and not self._closed:
            self._new_pack.clear()
            wait = min(p.since + p.hold for p in self._packs) - loop.time()
            if wait > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._new_pack.wait(), wait)
                continue
            alone = await self._alone()
            now = loop.time()
            due = [p for p in self._packs if p.since + p.hold <= now]
            if alone:
                for pack in due:  # looked at again after another hold
                    del self._packs[pack]
                    pack.since = now
                    self._packs[pack] = None
                continue
            bodies: dict[_Pack, list[bytes]] = {p: [] for p in due}
            kept: deque[_Buffered] = deque()
            for entry in self._buffer:
                if entry[2] is not None and (mine := bodies.get(entry[2])) is not None:
                    mine.append(entry[1])
                else:
                    kept.append(entry)
            self._buffer = kept
            for pack in due:
                del self._packs[pack]
                pack.waiting = 0
            await self._hand_back(bodies)

    async def _alone(self) -> bool:
        """Whether this is the group's only consumer, as RabbitMQ counts them now (True if
        it cannot tell: then nothing goes back yet)."""
        try:
            async with self.transport._talking(f"counting the consumers of {self._queue.name!r}"):
                channel = await self.transport._probe_channel()
                declared = await channel.queue_declare(self._queue.name, passive=True)
        except TransportError as exc:
            log.debug("%s: %s", self.group, exc)
            return True
        return (declared.consumer_count or 0) <= 1

    async def _hand_back(self, packs: dict[_Pack, list[bytes]]) -> None:
        """Publish the unstarted ``packs`` messages again, a pack each; then count them settled.
        If that fails, they wait here again (if their channel is gone, the pack comes back
        whole anyway)."""
        packs = {p: bodies for p, bodies in packs.items() if bodies and _channel_open(p.message)}
        if not packs:
            return
        copies = [self._copy(bodies, {**_so_far(pack.message), HANDBACKS_HEADER: 1 + count(
            (pack.message.headers or {}).get(HANDBACKS_HEADER))}) for pack, bodies in packs.items()]
        try:
            await self._put_back(copies, "handing back messages not started")
        except Exception as exc:  # TransportError, or one RabbitMQ cannot take: they stay here
            if self._closed:
                return  # their packs come back whole
            log.info("%s: %s; they wait here again", self.group, exc)
            now = asyncio.get_running_loop().time()
            for pack, bodies in packs.items():
                if _channel_open(pack.message):
                    pack.waiting, pack.since = len(bodies), now
                    self._buffer.extend((pack.message, body, pack) for body in bodies)
                    self._waiting(pack)
            self._arrived.set()
            return
        await asyncio.gather(*(self._count_settled(pack, len(bodies)) for pack, bodies in packs.items()))

    async def _close_packs(self, packs: dict[_Pack, tuple[list[bytes], list[bytes]]]) -> None:
        """On close: put back what of ``packs`` is not settled (handed out, waiting), then ack
        them - so that what was acked of them does not come again. If that fails, closing
        the channel gives the packs back whole (the inbox drops what was handled).

        The copies go back through a delay queue (``_CLOSE_DELAY``): straight into the
        group's queue, they would come to this consumer, still consuming until the acks
        are in, and back from it with their count raised. (The acks are in once the
        consumer is cancelled, a round trip; acks after a cancel RabbitMQ may drop.)"""
        t = self.transport
        packs = {p: unsettled for p, unsettled in packs.items() if _channel_open(p.message)}
        if not packs or not t.connected:
            return
        copies = [self._copy(bodies, _so_far(pack.message, delivered=delivered))
                  for pack, (handed_out, waiting) in packs.items()
                  for bodies, delivered in ((handed_out, True), (waiting, False)) if bodies]
        try:
            await t._park_all(copies, _CLOSE_DELAY)
        except TransportError as exc:
            log.info("%s: putting back the unsettled messages of packs failed (they come back whole): %s",
                     self.group, exc)
            return
        await asyncio.gather(*(self._count_settled(pack, len(handed_out) + len(waiting))
                               for pack, (handed_out, waiting) in packs.items()))  # acked together

    async def _count_settled(self, pack: _Pack, n: int) -> None:
        """``n`` messages of ``pack`` are settled; ack it with the last. (If that ack fails, a
        later ``multiple`` ack may cover it; else the pack comes back when the channel
        closes, and is split: the inbox drops what was handled.)"""
        if (done := _settled_in(pack, n)) is not None:
            try:
                await self._acks.submit([done])
            except TransportError as exc:
                log.info("%s: acking a pack whose messages are settled failed: %s", self.group, exc)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._returns.add(task)
        task.add_done_callback(self._returns.discard)

    async def _start(self, max_messages: int, timeout: float) -> bool:
        """Start consuming, waiting up to ``timeout`` for the connection; False if it is down."""
        connection = self.transport._connection
        if connection is None:
            raise TransportError(f"{self.transport!r} is closed")
        try:
            await asyncio.wait_for(connection.connected.wait(), timeout)
        except TimeoutError:
            return False
        prefetch = max(1, min(self.transport.options.prefetch, max_messages))
        async with self.transport._talking(f"starting to consume {self._queue.name!r}"):
            await self._channel.set_qos(prefetch_count=prefetch)  # kept by the robust channel
            self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
        return True

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries; waits at most ``timeout`` for the first.

        While the connection is down this returns nothing: the reconnect restores
        the consumer, and messages it held come again.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        if self._consumer_tag is None and not self._closed and not await self._start(max_messages, timeout):
            return []
        while not self._closed:
            if out := self._take(max_messages):
                return out
            if (remaining := give_up - loop.time()) <= 0:
                break
            self._arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return []

    def _take(self, max_messages: int) -> list[Delivery]:
        out: list[Delivery] = []
        while self._buffer and len(out) < max_messages:
            message, body, pack = self._buffer.popleft()
            if pack is not None:
                pack.waiting -= 1
                if pack.waiting == 0:
                    self._packs.pop(pack, None)
            if not _channel_open(message):
                continue  # its channel died: RabbitMQ redelivers it on the new one
            headers = message.headers or {}
            deliveries = count(headers.get(DELIVERIES_HEADER)) + count(headers.get("x-delivery-count")) + 1
            route = text(headers.get(ROUTE_HEADER)) or message.routing_key
            token = next(_tokens)
            self._held[token] = _Held(message, self._lease_timer(token, self.lease), body, pack)
            out.append(Delivery.from_bytes(body, deliveries, route=route, handle=token))
        return out

    def _lease_timer(self, token: int, lease: float) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(lease, self._expire, token)

    def _expire(self, token: int) -> None:
        held = self._held.pop(token, None)
        if held is not None:  # the lease ran out: give the message back for any consumer of the group
            self._background(self._give_back(token, held))

    async def _give_back(self, token: int, held: _Held) -> None:
        if held.pack is None:
            try:
                await self._settle(held.message, partial(held.message.reject, requeue=True),
                                   "returning an expired lease")
            except TransportError as exc:
                log.info("%s: %s (RabbitMQ redelivers it when the channel closes)", self.group, exc)
            return
        # One message of a pack cannot be rejected: a copy goes back, its delivery counted.
        if not _channel_open(held.message):
            return  # the channel is gone: the pack comes back whole
        try:
            await self._put_back([self._copy([held.body], _so_far(held.message, delivered=True))],
                                 "returning an expired lease")
        except TransportError as exc:
            if _channel_open(held.message) and not self._closed:
                log.info("%s: %s; trying again after another lease", self.group, exc)
                held.timer = self._lease_timer(token, self.lease)
                self._held[token] = held
            return
        await self._count_settled(held.pack, 1)

    def _release(self, delivery: Delivery) -> _Held | None:
        held = self._held.pop(delivery.handle, None) if isinstance(delivery.handle, int) else None
        if held is not None:
            held.timer.cancel()
        return held

    async def _settle(
        self, message: AbstractIncomingMessage, action: Callable[[], Awaitable[Any]], what: str
    ) -> None:
        """Ack or reject ``message``, waiting at most ``timeout``: aiormq never wakes a
        settle queued on a connection that died meanwhile."""
        try:
            if _channel_open(message):
                async with self.transport._talking(f"{what} on {self._queue.name!r}"):
                    await action()
                self._settled(message)
                return
        except TransportError as exc:
            if _channel_open(message) and not isinstance(exc.__cause__, ChannelInvalidStateError):
                raise
        # The channel that delivered it is gone, and with it the delivery:
        # RabbitMQ has put the message back already (the inbox drops the copy).
        log.debug("%s: %s after its channel closed; it will be redelivered", self.group, what)

    def _tags_of(self, message: AbstractIncomingMessage) -> _Tags | None:
        """The tags of the channel that delivered ``message`` (None: that channel closed)."""
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            return None
        tags = self._tags.get(channel)
        if tags is None:
            for gone in [c for c in self._tags if c.is_closed]:  # a reconnect replaced it
                del self._tags[gone]
            tags = self._tags[channel] = _Tags()
        return tags

    def _settled(self, message: AbstractIncomingMessage) -> None:
        tags = self._tags_of(message)
        if tags is not None:
            tags.open.discard(message.delivery_tag or 0)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge; a delivery whose lease already expired is left alone (it was given back).

        Concurrent callers share a batch, acked with as few ``multiple`` acks as the
        deliveries still handled allow; a pack is acked with its last message.
        """
        messages: list[AbstractIncomingMessage] = []
        for d in deliveries:
            held = self._release(d)
            if held is None:
                continue
            if held.pack is None:
                messages.append(held.message)
            elif (done := _settled_in(held.pack, 1)) is not None:
                messages.append(done)
        if messages:
            await self._acks.submit(messages)

    async def _ack_batch(self, messages: list[AbstractIncomingMessage]) -> None:
        by_channel: dict[AbstractChannel, list[int]] = {}
        for message in messages:
            if _channel_open(message) and message.delivery_tag is not None:
                by_channel.setdefault(message.channel, []).append(message.delivery_tag)
            # else: its channel is gone, and with it the delivery (redelivered; the inbox drops it)
        failed: TransportError | None = None
        for channel, acking in by_channel.items():  # one channel but around a reconnect
            tags = self._tags.setdefault(channel, _Tags())
            try:
                async with self.transport._talking(f"acking {len(acking)} on {self._queue.name!r}"):
                    *before, (last, multiple) = tags.plan(acking)
                    for tag, many in before:  # queued back to back; the last one waits for the socket
                        await channel.basic_ack(tag, multiple=many, wait=False)
                    await channel.basic_ack(last, multiple=multiple)
            except TransportError as exc:
                if not channel.is_closed and not isinstance(exc.__cause__, ChannelInvalidStateError):
                    failed = exc
                else:
                    log.debug("%s: acking after the channel closed; redelivered instead", self.group)
            finally:
                # Whether or not the acks got out, a later multiple ack may cover these:
                # acking them is what was meant.
                tags.open.difference_update(acking)
        if failed is not None:
            raise failed

    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Give the message back now, or after ``delay`` through a delay queue.

        A delayed message is a new copy carrying its delivery count; the original is
        acked only after RabbitMQ confirmed the copy (so a crash in between means a
        duplicate, never a loss).
        """
        held = self._release(delivery)
        if held is None:
            return  # lease already lost; the message was (or will be) redelivered anyway
        if delay <= 0 and held.pack is None:
            await self._settle(held.message, partial(held.message.reject, requeue=True), "rejecting")
            return
        if delay <= 0 and not _channel_open(held.message):
            return  # the channel is gone: the pack comes back whole
        route = delivery.route or held.message.routing_key or ""
        headers = {DELIVERIES_HEADER: delivery.deliveries, ROUTE_HEADER: route}
        try:
            if delay > 0:
                await self.transport._park("@" + self.group, held.body, headers, delay)
            else:  # one message of a pack cannot be rejected: a copy goes back
                await self._put_back([self._copy([held.body], headers)], "giving back a message of a pack")
        except BaseException:  # failed or cancelled: the message is still ours, and still comes back
            if not self._closed:
                held.timer = self._lease_timer(delivery.handle, self.lease)
                self._held[delivery.handle] = held
            raise
        if held.pack is None:
            await self._settle(held.message, held.message.ack, "acking a delayed message")
        else:
            await self._count_settled(held.pack, 1)

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        """Push the lease of these deliveries ``lease`` seconds from now."""
        for d in deliveries:
            held = self._release(d)
            if held is not None:
                held.timer = self._lease_timer(d.handle, lease)
                self._held[d.handle] = held

    async def close(self) -> None:
        """Stop consuming; closing the channel gives every unacked message back at once."""
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        self.transport._subscriptions.discard(self)
        if self._aging is not None:  # a hand-back under way: its packs are not acked, they come back whole
            self._aging.cancel()
            await asyncio.gather(self._aging, return_exceptions=True)
        unsettled: dict[_Pack, tuple[list[bytes], list[bytes]]] = {}  # handed out, waiting
        for held in self._held.values():
            held.timer.cancel()
            if held.pack is not None:
                unsettled.setdefault(held.pack, ([], []))[0].append(held.body)
        for _, body, pack in self._buffer:
            if pack is not None:
                unsettled.setdefault(pack, ([], []))[1].append(body)
        self._held.clear()
        self._buffer.clear()
        self._packs.clear()
        timeout = self.transport.options.timeout
        try:
            async with asyncio.timeout(_CLOSE_GRACE * timeout):  # each step is bounded; so is their sum
                await self._acks.drain(timeout)  # acks under way go out first
                if self._returns:
                    await asyncio.gather(*self._returns, return_exceptions=True)
                await self._close_packs(unsettled)
                if self._consumer_tag is not None and self.transport.connected:
                    # A round trip before the close: a quorum queue drops the settlements a
                    # channel had not passed on yet when it closes (acked, yet redelivered).
                    with suppress(TransportError):  # closing gives everything back all the same
                        async with self.transport._talking(f"cancelling the consumer of {self._queue.name!r}"):
                            await self._queue.cancel(self._consumer_tag)
        except TimeoutError:
            self._acks.cancel()
            log.warning("%s: settling what was under way took over %.1f s; closing the channel gives it back",
                        self.group, _CLOSE_GRACE * timeout)
        async with self.transport._talking(f"closing the consumer of {self._queue.name!r}"):
            await self._channel.close()


def _settled_in(pack: _Pack, n: int) -> AbstractIncomingMessage | None:
    """Count ``n`` more messages of ``pack`` settled; the pack to ack if that was the last."""
    pack.left -= n
    return pack.message if pack.left == 0 else None


def _so_far(message: AbstractIncomingMessage, *, delivered: bool = False) -> dict[str, Any]:
    """Headers for copies of ``message``'s contents put back: the route, and the deliveries
    so far (a copy's own count starts again): before this one, or with this one if they
    were ``delivered`` (handed out)."""
    headers = message.headers or {}
    return {
        DELIVERIES_HEADER: count(headers.get(DELIVERIES_HEADER)) + count(headers.get("x-delivery-count"))
        + delivered,
        ROUTE_HEADER: text(headers.get(ROUTE_HEADER)) or message.routing_key or "",
    }


def _channel_open(message: AbstractIncomingMessage) -> bool:
    try:
        return not message.channel.is_closed
    except ChannelInvalidStateError:
        return False
