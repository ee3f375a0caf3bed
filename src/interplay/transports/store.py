"""The store bus: messages travel through the store's own queue table.

The default when no bus is given. Handling a message, marking it in the inbox,
recording its span and queuing what it emitted are one store transaction, so the
store's durability is the bus's durability (SQLite file: survives a crash of the
process; PostgreSQL: a real multi-machine bus for teams that run nothing else).

Consumers in this process are served by the very transaction that queues rows for
them: a consumer with nothing to do leaves a claim request, and the writer claims
its rows at the end of the transaction that inserted them, before the commit, saving
a transaction per hop. Consumers in other processes notice within ``poll`` seconds
(PostgreSQL stores push a notification instead).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..clock import Clock, SystemClock
from ..errors import TransportError
from ..stores import messaging
from ..stores.records import ClaimedRow, Settlement
from ..stores.tx import Tx
from .base import Delivery, Subscription, Transport

if TYPE_CHECKING:
    from ..stores.base import Store
    from ..stores.records import Outgoing

__all__ = ["StoreBus"]


PUSHED_POLL = 0.5
"""Seconds between polls of a store bus whose store pushes wake-ups (PostgreSQL)."""


class StoreBus(Transport):
    """A bus on the store's queue table."""

    scheme = "store"
    store_bound = True

    def __init__(self, store: Store, *, poll: float = 0.05) -> None:
        self.store = store
        self.durable = store.durable
        self.poll = poll
        self._clock: Clock = SystemClock()
        self._subscriptions: list[_StoreSubscription] = []
        self._requests: list[_ClaimRequest] = []
        self._settling: list[_ClaimRequest] = []  # taken, withdrawn, waiting for the outcome
        self._lock = threading.Lock()  # requests are read on the store's writer thread
        store.add_commit_listener(self._committed)
        store.add_precommit_hook(self._claim_for_idle)

    async def open(self, clock: Clock) -> None:
        """Use ``clock`` for visibility timeouts."""
        if not self.store.supports_bus:
            raise TransportError(f"store {self.store.url} cannot serve as a bus")
        self._clock = clock
        wakeups = getattr(self.store, "listen_for_queued", None)
        if wakeups is not None:  # PostgreSQL: LISTEN/NOTIFY from other processes
            await wakeups(self._committed)
            # Commits anywhere wake us now; polling is left to find rows that become
            # visible by themselves (a nack's delay, an expired lease).
            self.poll = max(self.poll, PUSHED_POLL)

    def _committed(self, routes: set[str]) -> None:
        for sub in self._subscriptions:
            if "@" + sub.group in routes or not routes.isdisjoint(sub.routes):
                sub.wake.set()
        with self._lock:
            for req in self._requests:
                if req.taken is not None:
                    req.subscription.wake.set()
            for req in self._settling:
                req.subscription.wake.set()

    def _claim_for_idle(self, tx: Tx) -> Any:
        """Writer thread, end of a transaction: claim rows it queued for idle local consumers."""
        if not tx.routes:
            return None
        with self._lock:
            wanted = [
                r for r in self._requests
                if r.taken is None and ("@" + r.subscription.group in tx.routes or not tx.routes.isdisjoint(r.routes))
            ]
            for req in wanted:
                req.taken = PENDING
        if not wanted:
            return None

        def rolled_back() -> None:
            for req in wanted:
                req.taken = None

        try:
            claimed = [
                (req, messaging.claim(tx, self.store.CLAIM_SQL, req.subscription.group, req.limit, self._clock.now(),
                                      req.subscription.lease))
                for req in wanted
            ]
        except BaseException:  # the store never gets our callbacks: undo the marks here
            rolled_back()
            raise

        def committed() -> None:
            for req, rows in claimed:
                req.taken = rows

        return committed, rolled_back

    async def declare(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Record that ``group`` receives ``routes`` (durable: rows queue up meanwhile)."""
        await self.store.declare_routes(group, routes, ephemeral=ephemeral)

    async def publish(self, batch: Sequence[Outgoing]) -> None:
        """Queue the messages (and record them in the trace) in one transaction."""
        await self.store.publish(batch, self._clock.now(), "queue")

    async def publish_to_group(self, group: str, route: str, body: bytes) -> None:
        """Queue raw bytes for one group only (tools, tests; DLQ replay has its own op)."""
        await self.store.enqueue_raw(group, route, body, self._clock.now())

    async def drop_group(self, group: str) -> None:
        """Delete a temporary group's routes and rows."""
        await self.store.drop_group(group)

    async def subscribe(self, group: str, routes: Sequence[str], *, lease: float) -> Subscription:
        """Consume ``group``."""
        await self.declare(group, routes)
        sub = _StoreSubscription(self, group, set(routes), lease)
        self._subscriptions.append(sub)
        return sub


class _StoreSubscription(Subscription):
    def __init__(self, bus: StoreBus, group: str, routes: set[str], lease: float) -> None:
        self.bus = bus
        self.group = group
        self.routes = routes
        self.lease = lease
        self.wake = asyncio.Event()

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            self.wake.clear()
            rows = await self.bus.store.claim(self.group, max_messages, self.bus._clock.now(), self.lease)
            if rows:
                return _deliveries(rows)
            remaining = give_up - loop.time()
            if remaining <= 0:
                return []
            # Idle: ask the writer to claim for us in the next transaction that queues our rows.
            req = _ClaimRequest(self, max_messages)
            with self.bus._lock:
                self.bus._requests.append(req)
            try:
                await asyncio.wait_for(self.wake.wait(), min(remaining, self.bus.poll))
            except TimeoutError:
                pass
            finally:
                with self.bus._lock:
                    self.bus._requests.remove(req)
                    if req.taken is PENDING:
                        self.bus._settling.append(req)
            while req.taken is PENDING:  # taken by a transaction still committing: await its outcome
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), 0.05)
                except TimeoutError:
                    pass
            with self.bus._lock:
                if req in self.bus._settling:
                    self.bus._settling.remove(req)
            if req.taken:
                return _deliveries(req.taken)

    # ack/nack outside the runtime's settle path (used by tools and the conformance suite)
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        now = self.bus._clock.now()
        for d in deliveries:
            await self.bus.store.settle(self._settlement(d, "ok"), now, "queue")

    async def nack(self, delivery: Delivery, delay: float) -> None:
        now = self.bus._clock.now()
        settlement = self._settlement(delivery, "retry")
        settlement.retry_at = now + delay
        await self.bus.store.settle(settlement, now, "queue")

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        rows = [(d.queue_id, d.lease) for d in deliveries if d.queue_id is not None and d.lease is not None]
        if rows:
            await self.bus.store.extend_leases(rows, self.bus._clock.now() + lease)

    async def close(self) -> None:
        if self in self.bus._subscriptions:
            self.bus._subscriptions.remove(self)

    def _settlement(self, d: Delivery, outcome: str) -> Settlement:
        msg = d.message
        return Settlement(
            group=self.group,
            msg_id=msg.id if msg else "",
            flow_id=msg.flow_id if msg else None,
            outcome=outcome,  # type: ignore[arg-type]
            queue_id=d.queue_id,
            lease=d.lease,
        )


PENDING: list[ClaimedRow] = []  # identity marks "taken, not yet committed"


class _ClaimRequest:
    """An idle consumer's standing request, served inside the next transaction that queues for it."""

    __slots__ = ("limit", "routes", "subscription", "taken")

    def __init__(self, subscription: _StoreSubscription, limit: int) -> None:
        self.subscription = subscription
        self.routes = subscription.routes
        self.limit = limit
        self.taken: list[ClaimedRow] | None = None
        """None: open (or the transaction that took it rolled back); PENDING: taken by a
        transaction not yet committed; a list: what it claimed (maybe nothing)."""


def _deliveries(rows: list[ClaimedRow]) -> list[Delivery]:
    return [
        Delivery.from_bytes(
            r.body, r.deliveries, route=r.route, queue_id=r.queue_id, lease=r.lease, duplicate=r.duplicate,
            stored_reply=r.reply,
        )
        for r in rows
    ]
