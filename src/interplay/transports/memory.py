"""``memory://`` - an in-process bus: fast, and it forgets everything with the process.

For tests and scratch work. It keeps every semantic of the interface (fan-out,
competing consumers, leases and redelivery, nack with delay) except durability.
Two runtimes share one bus by passing the same ``MemoryTransport`` object as ``bus``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..clock import Clock, SystemClock
from .base import Delivery, Subscription, Transport

if TYPE_CHECKING:
    from ..stores.records import Outgoing

__all__ = ["MemoryTransport"]

_tokens = itertools.count(1)


class _Item:
    __slots__ = ("body", "deadline", "deliveries", "route", "token")

    def __init__(self, body: bytes, route: str) -> None:
        self.body = body
        self.route = route
        self.deliveries = 0
        self.token = 0
        self.deadline = 0.0


class _Group:
    def __init__(self) -> None:
        self.ready: deque[_Item] = deque()
        self.inflight: dict[int, _Item] = {}
        self.changed = asyncio.Event()

    def put(self, item: _Item) -> None:
        self.ready.append(item)
        self.changed.set()

    def reap(self, now: float) -> None:
        expired = [t for t, item in self.inflight.items() if item.deadline <= now]
        for token in expired:
            self.put(self.inflight.pop(token))


class MemoryTransport(Transport):
    """An in-memory bus (``memory://``)."""

    scheme = "memory"
    durable = False

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._groups: dict[str, _Group] = {}
        self._routes: dict[str, set[str]] = {}
        self._clock: Clock = SystemClock()
        self._later: set[asyncio.Task[None]] = set()

    async def open(self, clock: Clock) -> None:
        """Use ``clock`` for leases and delays."""
        self._clock = clock

    async def close(self) -> None:
        """Cancel pending delayed redeliveries."""
        for task in list(self._later):
            task.cancel()

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group()
        return group

    async def declare(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Route ``routes`` to ``group``."""
        self._group(group)
        for route in routes:
            self._routes.setdefault(route, set()).add(group)

    async def publish(self, batch: Sequence[Outgoing]) -> None:
        """Hand a copy to every group declared for each message's route."""
        for out in batch:
            for name in self._routes.get(out.route, ()):
                self._groups[name].put(_Item(out.body, out.route))

    async def publish_to_group(self, group: str, route: str, body: bytes) -> None:
        """Deliver to one group only."""
        self._group(group).put(_Item(body, route))

    async def drop_group(self, group: str) -> None:
        """Forget a group and its messages."""
        self._groups.pop(group, None)
        for groups in self._routes.values():
            groups.discard(group)

    async def subscribe(self, group: str, routes: Sequence[str], *, lease: float) -> Subscription:
        """Consume ``group``."""
        await self.declare(group, routes)
        return _MemorySubscription(self, group, lease)

    def _requeue_later(self, group: _Group, item: _Item, delay: float) -> None:
        async def later() -> None:
            await self._clock.sleep(delay)
            group.put(item)

        task = asyncio.get_running_loop().create_task(later())
        self._later.add(task)
        task.add_done_callback(self._later.discard)


class _MemorySubscription(Subscription):
    def __init__(self, transport: MemoryTransport, group: str, lease: float) -> None:
        self.transport = transport
        self.group = group
        self.lease = lease

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        clock = self.transport._clock
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            group = self.transport._group(self.group)
            now = clock.now()
            group.reap(now)
            if group.ready:
                out: list[Delivery] = []
                while group.ready and len(out) < max_messages:
                    item = group.ready.popleft()
                    item.deliveries += 1
                    item.token = next(_tokens)
                    item.deadline = now + self.lease
                    group.inflight[item.token] = item
                    out.append(
                        Delivery.from_bytes(item.body, item.deliveries, route=item.route, handle=item.token)
                    )
                return out
            group.changed.clear()
            remaining = give_up - loop.time()
            if remaining <= 0:
                return []
            # Wake for new messages, or in time to redeliver the next expiring lease.
            if group.inflight:
                soonest = min(item.deadline for item in group.inflight.values()) - now
                remaining = min(remaining, max(soonest, 0.001))
            try:
                await asyncio.wait_for(group.changed.wait(), remaining)
            except TimeoutError:
                pass

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        group = self.transport._group(self.group)
        for d in deliveries:
            group.inflight.pop(d.handle, None)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        group = self.transport._group(self.group)
        item = group.inflight.pop(delivery.handle, None)
        if item is None:
            return  # lease already lost; the message was (or will be) redelivered anyway
        if delay <= 0:
            group.put(item)
        else:
            self.transport._requeue_later(group, item, delay)

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        group = self.transport._group(self.group)
        until = self.transport._clock.now() + lease
        for d in deliveries:
            item = group.inflight.get(d.handle)
            if item is not None:
                item.deadline = until
