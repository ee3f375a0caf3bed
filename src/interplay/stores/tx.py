"""The transaction handle that store ops receive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["BatchConflict", "Transaction", "Tx"]

_VERB_ORDER = {"INSERT": 0, "UPDATE": 1, "DELETE": 2}


class BatchConflict(Exception):
    """A deferred fence (:meth:`Tx.expect`) found its row changed: the batch must run op by op."""


class Tx:
    """The view of one transaction that an op gets (runs on the store's thread)."""

    __slots__ = ("_convert", "_deferred", "_lock_flow", "cur", "local_routes", "routes", "waits")

    def __init__(
        self,
        cur: Any,
        convert: Callable[[str], str],
        local_routes: set[str] | None = None,
        lock_flow: Callable[[Tx, str, bool], None] | None = None,
        *,
        batching: bool = False,
    ) -> None:
        self.cur = cur
        self._convert = convert
        self._lock_flow = lock_flow
        # sql -> (expect, rows), in order of first use; None: statements run at once
        self._deferred: dict[str, tuple[bool, list[Sequence[Any]]]] | None = {} if batching else None
        self.routes: set[str] = set()
        """Routes that received queue rows in this transaction (to wake consumers)."""
        self.local_routes: set[str] = local_routes if local_routes is not None else set()
        """Routes consumed in this process (handed over in memory, not queued)."""
        self.waits: bool | None = None
        """Whether any workflow waits at all (asked once per transaction)."""

    def lock_flow(self, flow_id: str, *, exclusive: bool) -> bool:
        """Order, per flow, registering a wait (exclusive) against emitting events (shared).

        Held until the transaction ends. Returns False where it is not needed (a store
        whose write transactions never overlap, like SQLite's).
        """
        if self._lock_flow is None:
            return False
        self._lock_flow(self, flow_id, exclusive)
        return True

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (after the deferred ones); returns the cursor (``rowcount``, ``fetchall``)."""
        if self._deferred:
            self.flush()
        self.cur.execute(self._convert(sql), params)
        return self.cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters (after the deferred ones)."""
        if self._deferred:
            self.flush()
        self.cur.executemany(self._convert(sql), rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query, or None."""
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query."""
        return list(self.execute(sql, params).fetchall())

    # Group commit puts many ops in one transaction. Their writes that nobody reads back
    # are deferred and sent together, one round trip per statement, not one per row:
    # on PostgreSQL this is most of what a workflow step costs.

    def later(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run a write whose outcome nobody reads, now or with its like before commit.

        Deferred writes run when the ops of a batch are done, or before the next
        statement that is not deferred (so reads see them), grouped: INSERTs first,
        then UPDATEs, then DELETEs, each statement's rows in the order given. Use it
        only where that order is as good as the written one.
        """
        if self._deferred is None:
            self.cur.execute(self._convert(sql), params)
        else:
            self._defer(sql, params, False)

    def expect(self, sql: str, params: Sequence[Any] = ()) -> bool:
        """A write that must change exactly one row (a fence); True if it did.

        In a batch it is deferred like :meth:`later` and True is assumed; if it then
        changes no row, :meth:`flush` raises :class:`BatchConflict` and the store runs
        the batch's ops one by one, where this returns the real answer. So an op may
        branch on False only to give up (its writes are then not kept anyway).
        """
        if self._deferred is None:
            return bool(self.execute(sql, params).rowcount)
        self._defer(sql, params, True)
        return True

    def _defer(self, sql: str, params: Sequence[Any], expect: bool) -> None:
        assert self._deferred is not None
        entry = self._deferred.get(sql)
        if entry is None:
            self._deferred[sql] = (expect, [params])
        else:
            entry[1].append(params)

    def flush(self, *, commit: bool = False) -> None:
        """Run the deferred writes (see :meth:`later`); with ``commit``, then ``COMMIT``.

        Raises:
            BatchConflict: an :meth:`expect` write changed no row (nothing is committed).
        """
        deferred = self._deferred or {}
        self._deferred = {} if self._deferred is not None else None
        if commit and any(expect for expect, _ in deferred.values()):
            self._run(deferred, commit=False)  # check the fences before committing
            self.cur.execute("COMMIT")
        else:
            self._run(deferred, commit=commit)

    def _run(self, deferred: dict[str, tuple[bool, list[Sequence[Any]]]], *, commit: bool) -> None:
        ordered = sorted(deferred.items(), key=_verb_rank)
        groups = [(self._convert(sql), rows) for sql, (_, rows) in ordered]
        run_groups = getattr(self.cur, "execute_groups", None)  # a driver that sends them all at once
        if run_groups is not None:
            counts = run_groups(groups, commit=commit)
        else:
            counts = [self._run_group(*g) for g in groups]
            if commit:
                self.cur.execute("COMMIT")
        for (sql, (expect, rows)), count in zip(ordered, counts, strict=True):
            if expect and count != len(rows):
                raise BatchConflict(sql)

    def _run_group(self, sql: str, rows: list[Sequence[Any]]) -> int:
        if len(rows) == 1:
            self.cur.execute(sql, rows[0])
        else:
            self.cur.executemany(sql, rows)
        return int(self.cur.rowcount)


def _verb_rank(item: tuple[str, Any]) -> int:
    return _VERB_ORDER.get(item[0][:6].upper(), 3)  # sorted() is stable: first use within a verb


class Transaction:
    """The store's connection, inside the transaction that records your step.

    Given to a workflow step function whose first parameter is annotated
    ``Transaction`` (or run with ``ctx.transaction``): what it writes commits together
    with the journal entry of the step, so it happens exactly once. Use ``?``
    placeholders in SQL whatever the database. Only touch the database here: the
    function may run again if the transaction has to be retried.
    """

    __slots__ = ("_tx",)

    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the number of rows it changed."""
        return int(self._tx.execute(sql, params).rowcount)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query, or None."""
        return self._tx.one(sql, params)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query."""
        return self._tx.all(sql, params)
