"""The transaction handle that store ops receive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Transaction", "Tx"]


class Tx:
    """The view of one transaction that an op gets (runs on the store's thread)."""

    __slots__ = ("_convert", "_lock_flow", "cur", "local_routes", "routes", "waits")

    def __init__(
        self,
        cur: Any,
        convert: Callable[[str], str],
        local_routes: set[str] | None = None,
        lock_flow: Callable[[Tx, str, bool], None] | None = None,
    ) -> None:
        self.cur = cur
        self._convert = convert
        self._lock_flow = lock_flow
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
        """Run one statement; returns the cursor (``rowcount``, ``fetchall``)."""
        self.cur.execute(self._convert(sql), params)
        return self.cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""
        self.cur.executemany(self._convert(sql), rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query, or None."""
        self.cur.execute(self._convert(sql), params)
        return self.cur.fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query."""
        self.cur.execute(self._convert(sql), params)
        return list(self.cur.fetchall())


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
