"""The store's operations: thin async wrappers over the op modules' SQL.

What interplay does with a store (queue, inbox, outbox, DLQ, traces, workflow runs), each
a function of a :class:`Tx` in ``messaging.py``, ``traces.py`` or ``workflows.py`` run by
:meth:`~interplay.stores.base.Store.write` (group-committed) or ``read``. The
:class:`~interplay.stores.base.Store` inherits them; this keeps the mechanics apart.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from . import messaging, traces, workflows
from .records import (
    ClaimedRow,
    DeadLetterRecord,
    FlowRow,
    JournalEntry,
    MessageRow,
    OutboxRow,
    Outgoing,
    RunRow,
    Settlement,
    SpanRecord,
)
from .tx import Tx

__all__ = ["StoreOperations"]

T = TypeVar("T")


class StoreOperations(ABC):
    """The operations of a store, on top of its ``write``/``read`` mechanics."""

    CLAIM_SQL: ClassVar[str]
    """Leases ready queue rows: params (visible_until, lease, group, now, limit)."""
    ROW_LOCK: ClassVar[str] = ""
    """Appended to a claim's row-choosing SELECT: where write transactions run side by side
    (PostgreSQL's ``FOR UPDATE SKIP LOCKED``), competing claims skip each other's rows
    instead of waiting for and then taking them; one writer at a time (SQLite) needs none."""
    _done_lock: threading.Lock
    _outbox_done: list[int] | None  # relayed rows waiting for their DELETE

    @abstractmethod
    async def write(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` in a write transaction, group-committed with concurrent ops."""

    @abstractmethod
    def write_soon(self, op: Callable[[Tx], Any]) -> None:
        """Queue ``op`` for the next transaction without waiting for it."""

    @abstractmethod
    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` on the reader connection, in one consistent snapshot."""

    async def declare_routes(self, group: str, routes: Sequence[str], *, ephemeral: bool = False) -> None:
        """Make ``group`` receive what is published to ``routes`` (store bus topology)."""
        await self.write(lambda tx: messaging.declare_routes(tx, group, routes, ephemeral))

    async def drop_group(self, group: str) -> None:
        """Forget a temporary group and what is queued for it."""
        await self.write(lambda tx: messaging.drop_group(tx, group))

    async def publish(self, items: Sequence[Outgoing], now: float, delivery: messaging.Delivery) -> messaging.Relay:
        """Record messages in the trace and queue them (or put them in the outbox)."""
        return await self.write(lambda tx: messaging.publish(tx, items, now, delivery))

    async def claim(self, group: str, limit: int, now: float, lease_for: float) -> list[ClaimedRow]:
        """Lease up to ``limit`` ready queue rows of ``group`` (store bus)."""
        sql = self.CLAIM_SQL
        return await self.write(lambda tx: messaging.claim(tx, sql, group, limit, now, lease_for))

    async def settle(
        self, settlement: Settlement, now: float, delivery: messaging.Delivery
    ) -> tuple[messaging.SettleResult, messaging.Relay]:
        """Commit the outcome of one handling (see :func:`messaging.settle`)."""
        return await self.write(lambda tx: messaging.settle(tx, settlement, now, delivery))

    async def enqueue_raw(self, group: str, route: str, body: bytes, now: float) -> None:
        """Queue raw bytes for one group (store bus), as if they came by ``route``."""
        await self.write(lambda tx: messaging.enqueue_raw(tx, group, route, body, now))

    async def extend_leases(self, rows: Sequence[tuple[int, str]], until: float) -> int:
        """Keep queue rows leased while their handler is still running."""
        return await self.write(lambda tx: messaging.extend_leases(tx, rows, until))

    async def inbox_seen(self, group: str, ids: Sequence[str]) -> dict[str, bytes | None]:
        """Which message ids ``group`` already handled (with stored replies)."""
        return await self.read(lambda tx: messaging.inbox_seen(tx, group, ids))

    async def outbox_pending(self, older_than: float, limit: int = 500) -> list[tuple[int, str, bytes]]:
        """Outbox rows older than ``older_than`` (their writer may have died)."""
        return await self.read(lambda tx: messaging.outbox_pending(tx, older_than, limit))

    async def outbox_due(self, now: float, older_than: float) -> bool:
        """Whether any outbox row is due for relaying (a cheap look, on the reader)."""
        return await self.read(lambda tx: messaging.outbox_due(tx, now, older_than))

    async def outbox_claim(self, now: float, older_than: float, hold_until: float, limit: int) -> list[OutboxRow]:
        """Take up to ``limit`` due outbox rows for relaying, held until ``hold_until``.

        See :func:`messaging.outbox_claim` for when a row is due.
        """
        lock = self.ROW_LOCK
        return await self.write(lambda tx: messaging.outbox_claim(tx, lock, now, older_than, hold_until, limit))

    async def outbox_retry(self, retries: Sequence[tuple[int, int, float]]) -> int:
        """Set when failed rows are due again: (id, attempts of the claim, time); returns how many."""
        return await self.write(lambda tx: messaging.outbox_retry(tx, retries))

    def outbox_done(self, ids: Sequence[int]) -> None:
        """Delete relayed outbox rows, in the next transaction (nobody waits for it: a row
        left by a crash is relayed again and de-duplicated by the inbox).

        The rows of every call until that transaction takes them go in one op, so
        publishing after each commit does not add an op per commit to the writer.
        """
        if not ids:
            return
        with self._done_lock:
            pending = self._outbox_done
            if pending is not None:
                pending.extend(ids)
                return
            pending = self._outbox_done = list(ids)

        def delete(tx: Tx) -> None:
            with self._done_lock:  # from here on, later calls start a list of their own
                if self._outbox_done is pending:
                    self._outbox_done = None
            messaging.outbox_done(tx, pending)  # idempotent, if the batch runs it again

        self.write_soon(delete)

    async def dlq_list(
        self, limit: int = 50, *, group: str | None = None, flow_id: str | None = None
    ) -> list[DeadLetterRecord]:
        """Dead letters, newest first."""
        return await self.read(lambda tx: messaging.dlq_list(tx, limit, group, flow_id))

    async def dlq_replay(self, ids: Sequence[int], now: float, *, requeue: bool) -> list[DeadLetterRecord]:
        """Take dead letters back for another try (requeued on the store bus)."""
        return await self.write(lambda tx: messaging.dlq_replay(tx, ids, now, requeue))

    async def dlq_restore(self, records: Sequence[DeadLetterRecord], now: float) -> None:
        """Put back dead letters whose replay failed to publish."""
        await self.write(lambda tx: messaging.dlq_restore(tx, records, now))

    async def dlq_drop(self, ids: Sequence[int]) -> int:
        """Delete dead letters for good."""
        return await self.write(lambda tx: messaging.dlq_drop(tx, ids))

    async def purge(self, inbox_before: float, traces_before: float) -> dict[str, int]:
        """Apply retention: old inbox marks and old finished flows' traces."""
        return await self.write(lambda tx: messaging.purge(tx, inbox_before, traces_before))

    async def flow(self, flow_id: str, now: float) -> FlowRow | None:
        """One flow's summary."""
        return await self.read(lambda tx: traces.flow_row(tx, flow_id, now))

    async def flow_records(self, flow_id: str) -> tuple[list[MessageRow], list[SpanRecord]]:
        """A flow's messages and spans."""
        return await self.read(lambda tx: traces.flow_records(tx, flow_id))

    async def flows(
        self,
        now: float,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        since: float | None = None,
    ) -> list[FlowRow]:
        """Flows, newest first."""
        return await self.read(lambda tx: traces.list_flows(tx, now, status, name, limit, since))

    async def count_flows(self, now: float) -> dict[str, int]:
        """How many flows are in each status."""
        return await self.read(lambda tx: traces.count_flows(tx, now))

    # ------------------------------------------------------------------ workflows
    async def emitting(
        self, now: float, delivery: messaging.Delivery, fn: Callable[[messaging.Emitter], T]
    ) -> tuple[T, messaging.Relay]:
        """Run ``fn(emitter)`` in a write transaction; returns its result and what to relay."""

        def op(tx: Tx) -> tuple[T, messaging.Relay]:
            em = messaging.Emitter(tx, now, delivery)
            result = fn(em)
            em.changes.apply(tx, now)
            return result, em.relay

        return await self.write(op)

    async def claim_runs(self, owner: str, limit: int, now: float, lease: float) -> list[RunRow]:
        """Take over runs that nobody owns (new, or their owner stopped heartbeating)."""
        lock = self.ROW_LOCK
        return await self.write(lambda tx: workflows.claim_runs(tx, lock, owner, limit, now, lease))

    async def heartbeat_runs(self, owner: str, now: float, lease: float) -> set[str]:
        """Extend this owner's leases; returns the runs it still holds."""
        return await self.write(lambda tx: workflows.heartbeat(tx, owner, now, lease))

    async def get_run(self, run_id: str) -> RunRow | None:
        """One run."""
        return await self.read(lambda tx: workflows.get_run(tx, run_id))

    async def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[RunRow]:
        """Runs, newest first."""
        return await self.read(lambda tx: workflows.list_runs(tx, status, workflow, limit))

    async def load_journal(self, run_id: str) -> list[JournalEntry]:
        """A run's journal."""
        return await self.read(lambda tx: workflows.load_journal(tx, run_id))

    async def load_journals(self, run_ids: Sequence[str]) -> dict[str, list[JournalEntry]]:
        """Several runs' journals in one read (an orchestrator's claimed runs)."""
        return await self.read(lambda tx: workflows.load_journals(tx, run_ids))

    async def resume_run(self, run_id: str, now: float) -> RunRow | None:
        """Make a parked run claimable again."""
        return await self.write(lambda tx: workflows.resume_run(tx, run_id, now))

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""
        row = await self.read(lambda tx: tx.one("SELECT value FROM ip_meta WHERE key = ?", ("schema_version",)))
        return int(row[0]) if row else 0
