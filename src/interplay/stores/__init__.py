"""Stores: where interplay keeps its durable state (and, by default, its bus).

:func:`open_store` picks the implementation from the URL scheme and imports its
driver only then, so a store's driver is needed only by those who use it.
"""

from __future__ import annotations

from ..errors import ConfigurationError
from .base import Store

__all__ = ["Store", "open_store"]


def open_store(url: str) -> Store:
    """Make (not yet open) the store for ``url``.

    ``sqlite:///path.db`` (the embedded default), ``memory://`` (SQLite in memory,
    not durable), ``postgresql://user@host/db``.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("sqlite", "memory"):
        from .sqlite import SqliteStore

        return SqliteStore(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresStore  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError as exc:
            raise ConfigurationError(
                f"the PostgreSQL store needs its driver: pip install 'interplay[postgres]' ({exc})"
            ) from None
        store: Store = PostgresStore(url)
        return store
    raise ConfigurationError(
        f"unknown store URL {url!r}: use sqlite:///file.db, memory:// or postgresql://..."
    )
