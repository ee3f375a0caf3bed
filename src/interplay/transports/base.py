"""The Transport interface: how messages travel between services.

Semantics every transport provides (and the conformance suite checks):

* **Routes.** A message is published to a *route*: ``event.<type>`` for an event,
  ``command.<service>.<command>`` for a command, ``reply.<instance>`` for a reply
  (see :func:`route_of`). Routes are opaque to transports.
* **Fan-out across groups.** Each consumer *group* (a service) that declared a route
  receives its own copy of every message published there after the declaration.
  Declarations are durable on durable transports: messages queue for a group while
  none of its consumers runs.
* **Competing consumers inside a group.** All consumers of one group share its
  messages; each message goes to one of them at a time.
* **Ack, nack, redelivery.** A received message is *in flight* until acked. One not
  acked within the visibility timeout (``lease``) is delivered again, possibly to
  another consumer, with its delivery count raised. ``nack(delay)`` makes it visible
  again after ``delay``. ``extend`` is the heartbeat of a long handler.
* **At least once.** Nothing acknowledged by ``publish`` is lost while the transport
  is durable; anything may arrive twice. De-duplication is the inbox's job.
* **No ordering promise** beyond what each transport documents; redelivery reorders.
* **Dead letters** are decided by the runtime (retry policy) and kept in the store.
  A broker that gives up on a message by itself (RabbitMQ's dead letters that cannot
  go back to their group) hands it to :meth:`Transport.on_abandoned`'s sink.

A transport whose ``store_bound`` is true is the store's own queue: the runtime then
acks, publishes and records in one store transaction instead of calling ack/publish.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..message import Message

if TYPE_CHECKING:
    from ..clock import Clock
    from ..stores.records import Outgoing

__all__ = ["Abandoned", "AbandonedSink", "Delivery", "Subscription", "Transport", "reply_route", "route_of"]


def route_of(message: Message) -> str:
    """The route a message is published to."""
    if message.kind == "event":
        return "event." + message.type
    if message.kind == "command":
        return "command." + message.type
    reply_to = message.headers.get("reply_to")
    if not reply_to:
        raise ValueError(f"reply {message.id} has no reply_to header")
    return reply_to


def reply_route(instance: str) -> str:
    """The route on which one runtime instance receives replies."""
    return "reply." + instance


def event_route(event: str) -> str:
    """The route of an event type."""
    return "event." + event


def command_route(target: str) -> str:
    """The route of a command, ``service.command``."""
    return "command." + target


@dataclass(slots=True)
class Delivery:
    """One received message, in flight until acked or nacked.

    Attributes:
        body: the raw bytes as received.
        message: the decoded envelope, or None when ``body`` is not one.
        error: why decoding failed, when it did.
        deliveries: how many times this message has been delivered (1 = first time).
        route: the route it arrived on, when the transport knows.
        queue_id: the queue row (store bus only).
        lease: the lease token fencing this delivery (store bus only).
        duplicate: the store bus found it in the group's inbox already.
        stored_reply: for a duplicate command, the reply sent the first time.
        handle: transport-private (a stream id, a JetStream message, ...).
    """

    body: bytes
    message: Message | None
    error: str | None
    deliveries: int
    route: str | None = None
    queue_id: int | None = None
    lease: str | None = None
    duplicate: bool = False
    stored_reply: bytes | None = None
    handle: Any = None

    @classmethod
    def from_bytes(cls, body: bytes, deliveries: int, **extra: Any) -> Delivery:
        """Decode ``body``; a bad envelope becomes a delivery with ``error`` set."""
        from ..errors import MessageDecodeError

        try:
            return cls(body, Message.decode(body), None, deliveries, **extra)
        except MessageDecodeError as exc:
            return cls(body, None, str(exc), deliveries, **extra)


@dataclass(slots=True, frozen=True)
class Abandoned:
    """A message the broker can deliver to no group any more (see :meth:`Transport.on_abandoned`)."""

    body: bytes
    route: str
    group: str
    """The group it died in; empty when it died in no group's queue."""
    reason: str
    deliveries: int


AbandonedSink = Callable[[Abandoned], Awaitable[None]]
"""Records an abandoned message for good (the runtime: in the store's DLQ); raises if it could not."""


class Subscription(ABC):
    """A consumer in one group: receive, then ack or nack each delivery."""

    group: str

    @abstractmethod
    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries; waits at most ``timeout`` for the first."""

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Done with these: never deliver them again."""

    @abstractmethod
    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Deliver this one again after ``delay`` seconds."""

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        """Keep these in flight for another ``lease`` seconds (long handlers)."""
        return None

    async def close(self) -> None:
        """Stop receiving; unacked deliveries return to the group after their lease."""
        return None


class Transport(ABC):
    """A bus. Subclasses are looked up by URL scheme in ``open_transport``.

    Attributes:
        durable: whether an acknowledged publish survives a crash of the process
            (and, for brokers, of the broker as configured).
        store_bound: this transport is the store's own queue (see module docs).
    """

    scheme: ClassVar[str]
    durable: bool = True
    store_bound: bool = False

    async def open(self, clock: Clock) -> None:
        """Connect."""
        return None

    async def close(self) -> None:
        """Disconnect."""
        return None

    @abstractmethod
    async def declare(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Make ``group`` receive messages published to ``routes`` from now on.

        Declaring only adds: a route the group declared before keeps queueing for it
        (its messages are dead-lettered as ``no_handler`` once no handler takes them).

        ``ephemeral`` groups (a runtime's reply route) need not outlive the process.
        """

    @abstractmethod
    async def publish(self, batch: Sequence[Outgoing]) -> None:
        """Publish and wait until the transport has accepted every message.

        Raises:
            TransportError: when it could not confirm; the caller retries with the
                same message ids (the outcome may be ambiguous: published or not).
        """

    @abstractmethod
    async def subscribe(self, group: str, routes: Sequence[str], *, lease: float) -> Subscription:
        """Start consuming ``group`` (declaring it for ``routes`` if needed)."""

    def body_limit(self) -> int | None:
        """The largest message body the bus takes, where it has a limit it will always
        refuse past (NATS's ``max_payload``); None where none is known. The runtime
        refuses larger messages before committing them, instead of leaving them in the
        outbox for a relay that can never publish them."""
        return None

    def route_limit(self) -> int | None:
        """The longest route (in UTF-8 bytes) the bus takes (RabbitMQ's routing keys: 255);
        None where none is known. Like :meth:`body_limit`, checked before committing."""
        return None

    def on_abandoned(self, sink: AbandonedSink | None) -> None:
        """Hand messages the broker gives up on to ``sink`` instead of keeping them aside
        (None: keep them aside again).

        The runtime records them in the store's DLQ (``interplay dlq``). Only a transport
        whose broker gives up on messages by itself uses it (RabbitMQ); the others ignore it.
        """
        return None

    async def publish_to_group(self, group: str, route: str, body: bytes) -> None:
        """Deliver one message to a single group only (DLQ replay)."""
        raise NotImplementedError(f"{type(self).__name__} cannot deliver to a single group")

    async def drop_group(self, group: str) -> None:
        """Forget an ephemeral group."""
        return None
