"""The transaction handle that store ops receive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["BatchConflict", "Transaction", "Tx"]

_VERB_ORDER = {"INSERT": 0, "UPDATE": 1, "DELETE": 2}


Groups = list[tuple[str, list[Sequence[Any]], bool]]
"""Deferred writes to send: (sql, rows, whether each row's count is wanted)."""
SendGroups = Callable[[Any, Groups, bool], list[int | list[int]]]
"""How a store sends groups (cursor, groups, then COMMIT?): per group, the rows changed
(a list, one count per row, where asked for)."""


class BatchConflict(Exception):
    """Deferred fences (:meth:`Tx.expect`) found their rows changed; ``ops`` are the
    indexes (:attr:`Tx.op`) of the ops that wrote them: those must run again alone."""

    def __init__(self, sql: str, ops: set[int]) -> None:
        super().__init__(f"{len(ops)} op(s) fenced out by: {sql}")
        self.ops = ops


class _Deferred:
    """The rows of one deferred statement, and for a fence the op of each row."""

    __slots__ = ("expect", "ops", "rows")

    def __init__(self, expect: bool) -> None:
        self.expect = expect
        self.rows: list[Sequence[Any]] = []
        self.ops: list[int] = []


class Tx:
    """The view of one transaction that an op gets (runs on the store's thread)."""

    __slots__ = ("_convert", "_deferred", "_lock_flow", "_send", "cur", "local_routes", "op", "routes", "waits")

    def __init__(
        self,
        cur: Any,
        convert: Callable[[str], str],
        local_routes: set[str] | None = None,
        lock_flow: Callable[[Tx, str, bool], None] | None = None,
        *,
        send_groups: SendGroups | None = None,
    ) -> None:
        self.cur = cur
        self._convert = convert
        self._lock_flow = lock_flow
        self._send = send_groups
        # sql -> its deferred rows, in order of first use; None: statements run at once
        self._deferred: dict[str, _Deferred] | None = {} if send_groups is not None else None
        self.op = 0
        """The index, in its batch, of the op running (set by the store; names fenced-out ops)."""
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
        """A write that must change exactly one row (a fence on a key); True if it did.

        In a batch it is deferred like :meth:`later` and True is assumed; if it then
        changes no row, :meth:`flush` raises :class:`BatchConflict` and the store runs
        that op again alone, where this returns the real answer. So an op may branch
        on False only to give up (its writes are then not kept anyway).
        """
        if self._deferred is None:
            return bool(self.execute(sql, params).rowcount)
        self._defer(sql, params, True)
        return True

    def _defer(self, sql: str, params: Sequence[Any], expect: bool) -> None:
        assert self._deferred is not None
        group = self._deferred.get(sql)
        if group is None:
            group = self._deferred[sql] = _Deferred(expect)
        elif group.expect != expect:
            raise ValueError(f"a statement is either a fence (expect) or not (later): {sql}")
        group.rows.append(params)
        if expect:
            group.ops.append(self.op)

    def flush(self, *, commit: bool = False) -> None:
        """Run the deferred writes (see :meth:`later`); with ``commit``, then ``COMMIT``.

        Raises:
            BatchConflict: an :meth:`expect` write changed no row (nothing is committed).
        """
        deferred = self._deferred
        if not deferred:
            if commit:
                self.cur.execute("COMMIT")
            return
        self._deferred = {}
        ordered = sorted(deferred.items(), key=_verb_rank)
        fences = any(group.expect for _, group in ordered)
        groups = [(self._convert(sql), group.rows, group.expect) for sql, group in ordered]
        assert self._send is not None
        counts = self._send(self.cur, groups, commit and not fences)  # fences are checked before COMMIT
        conflicts: set[int] = set()
        fenced_by = ""
        for (sql, group), count in zip(ordered, counts, strict=True):
            if group.expect and isinstance(count, list):
                failed = {op for op, n in zip(group.ops, count, strict=True) if n != 1}
                if failed:
                    conflicts |= failed
                    fenced_by = fenced_by or sql
        if conflicts:
            raise BatchConflict(fenced_by, conflicts)
        if commit and fences:
            self.cur.execute("COMMIT")


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
