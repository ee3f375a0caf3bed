"""The SQLite store: the embedded default, one file holding the store and the bus.

``sqlite:///shop.db`` (relative path), ``sqlite:////var/lib/shop.db`` (absolute),
``memory://`` (an in-memory database: fast, gone with the process).

Durability: WAL with ``synchronous=FULL`` by default, so a commit survives power loss;
group commit keeps that fast. ``?synchronous=normal`` is faster and still safe against
a process crash (a power cut may lose the last transactions, never corrupt the file).

Several processes on one file take turns at writing through a lock file beside it
(``<file>-lock``, see :class:`_WriteTurns`), not through SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from queue import SimpleQueue
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigurationError, StoreError
from .base import Store
from .tx import Tx

try:
    import fcntl
except ImportError:  # not on Windows: writers there wait in SQLite's busy handler
    fcntl = None  # type: ignore[assignment]

__all__ = ["SqliteStore"]

log = logging.getLogger("interplay.store")

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
        self._turns: _WriteTurns | None = None

    def _apply(self, ops: list[Callable[[Tx], Any]], attempt: int = 0, batching: bool = True,
               ) -> tuple[list[Any], set[str]]:
        with self._turn():
            return super()._apply(ops, attempt, batching)

    def _turn(self) -> AbstractContextManager[None]:
        """Held around every write transaction: this process's turn at the file."""
        return self._turns if self._turns is not None else contextlib.nullcontext()

    async def open(self) -> None:
        """Connect and create or upgrade the schema (see :meth:`Store.open`)."""
        try:
            await super().open()
        except BaseException:
            if self._turns is not None:  # no writer thread started to close it
                self._turns.close()
                self._turns = None
            raise

    def _migrate(self) -> None:
        with self._turn():
            super()._migrate()

    def _writer_loop(self, loop: asyncio.AbstractEventLoop, conn: Any) -> None:
        try:
            super()._writer_loop(loop, conn)
        finally:
            if self._turns is not None:  # on this thread: no transaction can be holding it now
                self._turns.close()

    def _connect(self, role: str) -> Any:
        if self.durable:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            if role == "writer" and self._turns is None and fcntl is not None:
                self._turns = _WriteTurns(os.path.abspath(self.path) + "-lock", self.busy_timeout_ms / 1000)
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

    def _locked(self, exc: Exception) -> bool:
        """SQLITE_BUSY / SQLITE_LOCKED past ``busy_timeout``."""
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    def _share_reader(self) -> bool:
        return not self.durable


class _WriteTurns:
    """Several processes' writers on one file take turns through an ``flock`` on a lock file.

    SQLite lets one connection write at a time; the others wait in its busy handler,
    which sleeps 1, 2, 5, 10 ... up to 100 ms between tries, so a write lock freed
    after 2 ms may stay unused for 20. With every process of an app group-committing
    on the same file (one process per service), that idled the writers and cost more
    than the second process gained. A writer waiting in a blocking ``flock`` instead
    is woken by the kernel the moment the lock is released (and a crashed holder
    releases it with its file descriptors). Polling ``LOCK_NB`` every 0.05-1 ms kept
    only a third of the gain, so the blocking wait runs on a thread of its own
    (``interplay-sqlite-turns``), which lets the writer give up after ``timeout`` (the
    store's ``busy_timeout``) with :class:`StoreError`, as SQLite would.

    SQLite's own locking still decides: this only orders interplay's writers; another
    program writing the file is waited for in SQLite's busy handler as before. Held
    for each write transaction (BEGIN to COMMIT or ROLLBACK) and the migration at open,
    by one thread at a time; re-entrant, as a failed batch is re-run inside the first
    attempt. Where the lock file cannot be opened (a read-only directory) or locked (a
    file system without ``flock``), writers go on without it.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._depth = 0
        self._fd: int | None = None
        self._waiter: threading.Thread | None = None
        self._requests: SimpleQueue[_Turn | None] = SimpleQueue()
        self._unanswered = 0  # turns asked of the waiter and not yet given or let go
        self._count = threading.Lock()
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
        except OSError as exc:
            log.warning("store: cannot open the write lock file %s (%s); writers wait in SQLite instead", path, exc)

    def __enter__(self) -> None:
        if self._depth == 0 and self._fd is not None:
            self._take(self._fd)
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _take(self, fd: int) -> None:
        # Not while the waiter still works on a turn given up on: its flock, on this same
        # descriptor, would succeed the moment ours did, and its unlock release ours.
        if not self._unanswered:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:  # no flock here (some network file systems)
                log.warning("store: cannot lock %s (%s); writers wait in SQLite instead", self.path, exc)
                self.close()
                return
        if self._waiter is None:
            self._waiter = threading.Thread(target=self._wait_loop, args=(fd,), name="interplay-sqlite-turns",
                                            daemon=True)
            self._waiter.start()
        turn = _Turn()
        with self._count:
            self._unanswered += 1
        self._requests.put(turn)
        if turn.given.wait(self.timeout):
            return
        with turn.lock:
            if turn.given.is_set():  # given just now
                return
            turn.abandoned = True  # the waiter lets it go when it gets it
        raise StoreError(f"store {self.path}: another process has held the write lock for over {self.timeout:g}s")

    def _wait_loop(self, fd: int) -> None:
        # The lock belongs to the file description, not to this thread: the writer that
        # asked for it releases it. This thread alone closes the descriptor once it has
        # started, so that no flock here ever names a descriptor number reused since.
        try:
            while (turn := self._requests.get()) is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as exc:  # unexpected; the writer times out and fails its batch
                    log.warning("store: waiting for the write lock %s failed: %s", self.path, exc)
                    with self._count:
                        self._unanswered -= 1
                    continue
                with turn.lock:
                    if turn.abandoned:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    with self._count:
                        self._unanswered -= 1
                    if not turn.abandoned:
                        turn.given.set()
        finally:
            os.close(fd)

    def close(self) -> None:
        """Let go of the lock file (on the thread that writes, once it has stopped)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._waiter is not None:
            self._requests.put(None)  # the waiter closes it
        else:
            os.close(fd)


class _Turn:
    """One request for the write lock, from the writer to the waiting thread."""

    __slots__ = ("abandoned", "given", "lock")

    def __init__(self) -> None:
        self.given = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False
