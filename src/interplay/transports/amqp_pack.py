"""``amqp://`` packs: messages of one route published together travel as one AMQP message.

RabbitMQ's cost, and the client's, is per AMQP message: three frames to write, route,
store in the quorum log, deliver, parse and ack. Concurrent handlers publish many
messages of the same route at once (a batch of the publish coalescer), so those go out
together as a *pack*: one persistent, confirmed message whose AMQP ``type`` is
:data:`PACK_TYPE` and whose body is each message's length (4 bytes, big-endian) then
its bytes. The consumer unpacks it and hands the messages out one by one; the pack is
acked once each of them is settled (see :class:`~interplay.transports.amqp.AmqpTransport`
for what happens to one of them that is nacked, outlives its lease, or waits unstarted).

Measured on the benchmark's 3-hop choreography: half the client CPU per order and a
sixth or less of RabbitMQ's (``benchmarks/brokers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PACK_TYPE", "pack", "plan", "unpack"]

PACK_TYPE = "interplay.pack"
"""The AMQP ``type`` property of a pack."""
_LENGTH = 4  # bytes of the length before each message


def pack(bodies: Sequence[bytes]) -> bytes:
    """One pack's body of ``bodies``, in order."""
    return b"".join(len(body).to_bytes(_LENGTH, "big") + body for body in bodies)


def unpack(body: bytes) -> list[bytes] | None:
    """The messages of a pack's body, in order; None if it is not a well-formed pack
    (the consumer then hands the body out as it is, to be dead-lettered as undecodable)."""
    out: list[bytes] = []
    at, end = 0, len(body)
    while at < end:
        if at + _LENGTH > end:
            return None
        size = int.from_bytes(body[at:at + _LENGTH], "big")
        at += _LENGTH
        if at + size > end:
            return None
        out.append(body[at:at + size])
        at += size
    return out or None


def plan(routes: Sequence[str], bodies: Sequence[bytes], most: int, limit: int) -> list[tuple[str, list[int]]]:
    """How to publish message ``i`` (``routes[i]``, ``bodies[i]``): per AMQP message, its
    routing key and the indices of the messages it carries (one: the message as it is).

    Messages of one route go in packs of up to ``most`` whose body stays within
    ``limit`` bytes, in their order (a message larger than that alone); each route's
    messages stay in order, not the interleaving of different routes.
    """
    if most <= 1 or len(routes) < 2:
        return [(route, [i]) for i, route in enumerate(routes)]
    by_route: dict[str, list[int]] = {}
    for i, route in enumerate(routes):
        by_route.setdefault(route, []).append(i)
    out: list[tuple[str, list[int]]] = []
    for route, indices in by_route.items():
        chunk: list[int] = []
        size = 0
        for i in indices:
            grown = size + _LENGTH + len(bodies[i])
            if chunk and (len(chunk) == most or grown > limit):
                out.append((route, chunk))
                chunk, grown = [], _LENGTH + len(bodies[i])
            chunk.append(i)
            size = grown
        out.append((route, chunk))
    return out
