"""The SQLite store: the embedded default, one file holding the store and the bus.

``sqlite:///shop.db`` (relative path), ``sqlite:////var/lib/shop.db`` (absolute),
``memory://`` (an in-memory database: fast, gone with the process).

Durability: WAL with ``synchronous=FULL`` by default, so a commit survives power loss;
group commit keeps that fast. ``?synchronous=normal`` is faster and still safe against
a process crash (a power cut may lose the last transactions, never corrupt the file).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigurationError
from .base import Store

__all__ = ["SqliteStore"]

_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA", "off": "OFF"}


class SqliteStore(Store):
    """A store in one SQLite file (WAL), or in memory for ``memory://``."""

    dialect = "sqlite"

    CLAIM_SQL = (
        "UPDATE ip_queue SET visible_at = ?, lease = ?, deliveries = deliveries + 1 "
        "WHERE id IN (SELECT id FROM ip_queue WHERE grp = ? AND visible_at <= ? "
        "ORDER BY visible_at LIMIT ?) RETURNING id, msg_id, body, deliveries, route"
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        options = {k.lower(): v[-1].lower() for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"synchronous", "busy_timeout"}
        if unknown:
            raise ConfigurationError(f"unknown SQLite store option(s) {sorted(unknown)} in {url!r}")
        if parts.scheme == "memory":
            self.path = ":memory:"
        elif parts.scheme == "sqlite":
            path = unquote(parts.path)
            if parts.netloc:
                raise ConfigurationError(
                    f"invalid SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////absolute.db"
                )
            self.path = path[1:] if path.startswith("/") else path
            if not self.path:
                raise ConfigurationError(f"invalid SQLite URL {url!r}: no file path")
        else:
            raise ConfigurationError(f"not a SQLite URL: {url!r}")
        self.durable = self.path != ":memory:"
        sync = options.get("synchronous", "full")
        if sync not in _SYNC_MODES:
            raise ConfigurationError(f"synchronous must be one of {sorted(_SYNC_MODES)}, got {sync!r}")
        self.synchronous = _SYNC_MODES[sync]
        try:
            self.busy_timeout_ms = int(options.get("busy_timeout", "30000"))
        except ValueError:
            raise ConfigurationError("busy_timeout must be milliseconds (an integer)") from None

    def _connect(self, role: str) -> Any:
        if self.durable:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # each connection stays on its one thread anyway
            timeout=self.busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        if self.durable:
            mode = self._switch_to_wal(conn)
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL (got {mode})")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA cache_size = -32000")
        conn.execute("PRAGMA temp_store = MEMORY")
        if role == "reader":
            conn.execute("PRAGMA query_only = 1")
        return conn

    def _switch_to_wal(self, conn: Any) -> str:
        # Switching a file that another connection is writing to needs its lock, and
        # SQLite does not call the busy handler for it: retry until busy_timeout, as
        # every other statement waits (two processes opening a new store at once).
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 0.001
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _ddl_types(self) -> dict[str, str]:
        return {
            "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
            "blob": "BLOB",
            "real": "REAL",
            "no_rowid": " WITHOUT ROWID",
        }

    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN IMMEDIATE")

    @property
    def _error_types(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _share_reader(self) -> bool:
        return not self.durable
