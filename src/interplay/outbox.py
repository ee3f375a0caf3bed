"""The outbox relay: publishes what committed to the outbox but never reached the broker.

On a broker bus, a handling's emitted messages (and ``rt.publish``'s) are committed to
``ip_outbox`` and published right after the commit by the process that wrote them.
Rows left behind - that publish failed, or its process died between the commit and the
publish - are published by the relay loop of any process sharing the store:

* **Claimed, not just read.** A sweep takes due rows in a write transaction (on
  PostgreSQL with ``FOR UPDATE SKIP LOCKED``), holding them for ``outbox_grace``
  seconds, so of many processes one relays a given row: broker traffic does not grow
  with the number of processes. A relay that dies while holding rows leaves them to the
  others once the hold lapses.
* **At least once, same ids.** A row is deleted only after the broker confirmed it; a
  crash in between publishes it again with the same message id (NATS drops the copy by
  ``Nats-Msg-Id``; consumers' inbox absorbs the rest).
* **Backoff.** A row whose publish failed is due again after ``outbox_relay_interval``
  seconds, doubling with each attempt up to ``outbox_retry_max`` (with jitter), instead
  of at every sweep.
* **One bad row does not hold up the others.** A row the bus would never take (larger
  than its limit, or a route too long: the runtime refuses such messages before storing
  them, so only one stored before a limit was lowered) is not sent but kept, retried
  with backoff, an error logged at its 1st, 2nd, 4th, 8th ... try: raise the limit and
  it goes (a route too long for the bus cannot go: delete its ``ip_outbox`` row). When a batch
  fails, its rows are published one by one: those the broker takes are done, only the
  ones it refuses wait for their retry (a Redis key of the wrong type). Two refusals in
  a row look like the broker is down: the rest of the batch then waits too.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from .errors import TransportError
from .message import Message
from .stores.records import OutboxRow, Outgoing

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["OutboxRelay"]

log = logging.getLogger("interplay.outbox")

BATCH = 500
"""Rows one sweep takes at most (a full batch, all published, is followed by another)."""
GIVE_UP_AFTER = 2
"""Refusals in a row, when publishing a failed batch one by one, after which the broker
is taken to be down: the rest of the batch is not tried but waits for its retry."""


class OutboxRelay:
    """Relays leftover outbox rows of the runtime's store to its bus."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.relayed = 0
        """Messages this relay published (and had deleted from the outbox)."""
        self.failed = 0
        """Publish attempts of single rows that failed."""
        self.kept = 0
        """Times a row was not sent because the bus would never take it (too large)."""

    def backoff(self, attempts: int) -> float:
        """Seconds until a row that failed its ``attempts``-th relay is tried again."""
        options = self.rt.options
        base = max(options.outbox_relay_interval, 0.01)
        delay = min(options.outbox_retry_max, base * 2.0 ** min(attempts - 1, 32))
        return delay * random.uniform(0.8, 1.2)  # rows failed together spread out again

    async def sweep(self) -> int:
        """Relay due rows until none is left (or some fail); returns how many were published."""
        total = 0
        while True:
            published, full = await self._sweep_once()
            total += published
            if not full:
                return total

    async def _sweep_once(self) -> tuple[int, bool]:
        rt = self.rt
        store, grace = rt.store, rt.options.outbox_grace
        now = rt.clock.now()
        if not await store.outbox_due(now, now - grace):
            return 0, False
        rows = await store.outbox_claim(now, now - grace, now + grace, BATCH)
        if not rows:  # another process took them first
            return 0, False
        batch: list[tuple[OutboxRow, Outgoing]] = []
        failed: list[OutboxRow] = []
        for row in rows:
            try:
                out = Outgoing(message=Message.decode(row.body), route=row.route, body=row.body)
            except Exception as exc:  # written by interplay, so never expected; keep it, say so
                log.error("outbox row %d (message %s to %s) cannot be decoded: %s", row.id, row.msg_id, row.route, exc)
                failed.append(row)
                continue
            if (why := rt.too_large([out])) is not None:  # sent, it would fail its batch: kept aside
                self.kept += 1
                loud = (row.attempts & (row.attempts - 1)) == 0  # attempts 1, 2, 4, 8 ...: not every minute
                log.log(logging.ERROR if loud else logging.DEBUG, "outbox: message %s to %s is kept, not published "
                        "(attempt %d): %s", row.msg_id, row.route, row.attempts, why)
                failed.append(row)
                continue
            batch.append((row, out))
        done, refused = await self._publish(batch, now + grace)
        full = len(rows) == BATCH and not refused  # rows kept aside are due later: the next claim skips them
        failed.extend(refused)
        if done:
            store.outbox_done([row.id for row in done])
            self.relayed += len(done)
            log.info("relayed %d message(s) left in the outbox", len(done))
        if failed:
            later = rt.clock.now()
            retries = [(row.id, row.attempts, later + self.backoff(row.attempts)) for row in failed]
            await store.outbox_retry(retries)
        return len(done), full

    async def _publish(
        self, batch: list[tuple[OutboxRow, Outgoing]], hold_until: float
    ) -> tuple[list[OutboxRow], list[OutboxRow]]:
        """Publish the batch; returns (published rows, the others)."""
        if not batch:
            return [], []
        transport = self.rt.transport
        try:
            await transport.publish([out for _, out in batch])
            return [row for row, _ in batch], []
        except TransportError as exc:
            if len(batch) == 1:
                self._refused(batch[0][0], exc)
                return [], [batch[0][0]]
            log.warning("outbox relay of %d message(s) failed (%s); publishing them one by one", len(batch), exc)
        done: list[OutboxRow] = []
        refused: list[OutboxRow] = []
        streak = 0
        for i, (row, out) in enumerate(batch):
            if self.rt.clock.now() >= hold_until:  # the rest may be another process's by now
                refused.extend(r for r, _ in batch[i:])
                break
            try:
                await transport.publish([out])
            except TransportError as exc:
                self._refused(row, exc)
                refused.append(row)
                streak += 1
                if streak >= GIVE_UP_AFTER:
                    rest = [r for r, _ in batch[i + 1:]]
                    if rest:
                        log.warning("the bus refuses the outbox relay (%s); %d more message(s) wait for a retry",
                                    exc, len(rest))
                    refused.extend(rest)
                    break
            else:
                done.append(row)
                streak = 0
        return done, refused

    def _refused(self, row: OutboxRow, exc: TransportError) -> None:
        self.failed += 1
        log.warning("outbox: message %s to %s not published (attempt %d): %s", row.msg_id, row.route,
                    row.attempts, exc)
