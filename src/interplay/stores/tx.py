"""The transaction handle that store ops receive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Tx"]


class Tx:
    """The view of one transaction that an op gets (runs on the store's thread)."""

    __slots__ = ("_convert", "cur", "routes")

    def __init__(self, cur: Any, convert: Callable[[str], str]) -> None:
        self.cur = cur
        self._convert = convert
        self.routes: set[str] = set()
        """Routes that received queue rows in this transaction (to wake consumers)."""

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
