"""The Store: interplay's durable state, and the group commit that keeps it fast.

A store is a SQL database reached through a synchronous DB-API driver. All writes
go through one writer connection on one thread: callers hand it *ops* (functions of a
:class:`Tx`) and every op that arrives while a transaction is committing joins the
next one. So a hundred handlers finishing at once cost one fsync, not a hundred, and
each op still commits atomically (an op that fails is retried alone, so it cannot take
its neighbours down). Over a network (PostgreSQL), the writes no op of a batch reads
back are deferred and sent together, each statement once for all its rows
(:meth:`Tx.later`), so a batch costs a few round trips however many ops it holds.
Reads use a second connection, so traces and listings never wait for the writer.

Dialects (``sqlite.py``, ``postgres.py``) hold only what differs: connecting, the DDL
types, the placeholder style and how to lock rows; every statement lives here or in
the op modules, written once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from abc import abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, SimpleQueue
from typing import Any, ClassVar, TypeVar

from ..errors import SchemaVersionError, StoreError
from .operations import StoreOperations
from .schema import MIGRATIONS, SCHEMA_VERSION
from .tx import BatchConflict, Groups, Tx

__all__ = ["Store", "Tx"]

T = TypeVar("T")
PrecommitResult = tuple[Callable[[], None], Callable[[], None]] | None
"""(after commit, after rollback), both run on the writer thread."""
log = logging.getLogger("interplay.store")

MAX_BATCH = 1000
"""Ops per transaction; more wait for the next one (bounds commit latency)."""


class Store(StoreOperations):
    """Base of the SQL stores. Subclasses provide the dialect hooks below.

    Attributes:
        url: the URL it was opened with (credentials removed).
        durable: whether a commit survives the process (False for ``memory://``).
    """

    dialect: ClassVar[str]
    DEFER: ClassVar[bool] = False
    """Whether a batch defers its unread writes to send them together (:meth:`Tx.later`):
    worth it where each statement is a network round trip (PostgreSQL), not in process
    (SQLite, where it was measured no faster and the plain order is simpler)."""
    durable: bool = True
    supports_bus: bool = True
    """Whether the store can also be the bus (its queue table)."""

    def __init__(self, url: str) -> None:
        self.url = _redact(url)
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._writer_done: asyncio.Future[None] | None = None
        self._more_writers: list[tuple[ThreadPoolExecutor, asyncio.Future[None]]] = []
        self._local = threading.local()  # each writer thread's connection
        self._listeners: list[Callable[[set[str]], None]] = []
        self._precommit: list[Callable[[Tx], PrecommitResult]] = []
        self.local_routes: set[str] = set()
        """Routes consumed inside this process: messages to them are handed over in
        memory after commit instead of being queued (a runtime's reply route)."""
        self._writer: Any = None
        self._reader: Any = None
        self._wexec: ThreadPoolExecutor | None = None
        self._rexec: ThreadPoolExecutor | None = None
        self._sql_cache: dict[str, str] = {}
        self._done_lock = threading.Lock()
        self._outbox_done: list[int] | None = None  # relayed rows waiting for their DELETE
        self._opened = False
        self._closed = False

    # ------------------------------------------------------------------ dialect hooks
    @abstractmethod
    def _connect(self, role: str) -> Any:
        """Open a DB-API connection for ``writer`` or ``reader`` (runs on its thread)."""

    @abstractmethod
    def _ddl_types(self) -> dict[str, str]:
        """Fill-ins for the DDL templates: serial, blob, real, no_rowid."""

    @abstractmethod
    def _begin(self, cur: Any) -> None:
        """Start a write transaction (taking the write lock where that matters)."""

    @property
    def _error_types(self) -> tuple[type[BaseException], ...]:
        """Driver exceptions translated to StoreError."""
        return ()

    def _paramstyle(self, sql: str) -> str:
        return sql

    def _flow_lock(self) -> Callable[[Tx, str, bool], None] | None:
        """How a transaction locks a flow (see :meth:`Tx.lock_flow`); None where write
        transactions never overlap (SQLite: one writer at a time)."""
        return None

    def _transient(self, exc: Exception) -> bool:
        """Whether a transaction that failed with ``exc`` may just run again (a deadlock victim)."""
        return False

    def _locked(self, exc: Exception) -> bool:
        """Whether ``exc`` only says another connection holds the write lock (the
        connection itself is fine)."""
        return False

    def _cut_off(self, exc: Exception) -> bool:
        """Whether ``exc`` means the connection was lost (so a COMMIT sent may have committed)."""
        return False

    def _share_reader(self) -> bool:
        """True when reads must use the writer's connection (an in-memory database)."""
        return False

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Connect and create or upgrade the schema."""
        if self._opened:
            return
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix=f"interplay-{self.dialect}-writer")
        loop = asyncio.get_running_loop()
        try:
            self._writer = await loop.run_in_executor(self._wexec, self._connect, "writer")
            await loop.run_in_executor(self._wexec, self._migrate)
            if self._share_reader():
                self._reader = self._writer  # reads then go through the writer's queue
            else:
                self._rexec = ThreadPoolExecutor(1, thread_name_prefix=f"interplay-{self.dialect}-reader")
                self._reader = await loop.run_in_executor(self._rexec, self._connect, "reader")
        except self._error_types as exc:
            self._close_connections()
            self._shutdown_threads()
            raise StoreError(f"cannot open store {self.url}: {exc}") from exc
        except BaseException:
            self._close_connections()
            self._shutdown_threads()
            raise
        self._writer_done = self._start_writer(loop, self._writer, "writer")
        # More writers share the queue where the database runs transactions side by side
        # and each one mostly waits on the network (PostgreSQL): throughput, not order.
        for i in range(1, self._writer_count()):
            ex = ThreadPoolExecutor(1, thread_name_prefix=f"interplay-{self.dialect}-writer{i}")
            try:
                conn = await loop.run_in_executor(ex, self._connect, "writer")
            except self._error_types as exc:
                ex.shutdown(wait=False)
                log.warning("store %s: an extra writer could not connect (%s); going on with fewer", self.url, exc)
                break
            self._more_writers.append((ex, self._start_writer(loop, conn, f"writer{i}")))
        self._opened = True

    async def close(self) -> None:
        """Finish pending writes and disconnect."""
        if self._closed or not self._opened:
            return
        self._closed = True
        for _ in range(1 + len(self._more_writers)):
            self._queue.put(_STOP)
        if self._writer_done is not None:
            await asyncio.shield(self._writer_done)
        for ex, done in self._more_writers:
            await asyncio.shield(done)
            ex.shutdown(wait=False)
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._reader is not self._writer:
            await loop.run_in_executor(self._rexec, _close_quietly, self._reader)
        if self._writer is not None:
            await loop.run_in_executor(self._wexec, _close_quietly, self._writer)
        self._shutdown_threads()

    def _close_connections(self) -> None:
        # After a failed open (a newer schema, say): a driver may warn about, or keep
        # server resources for, a connection left to the garbage collector.
        for conn in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            _close_quietly(conn)
        self._reader = self._writer = None

    def _shutdown_threads(self) -> None:
        for ex in {self._rexec, self._wexec} - {None}:
            assert ex is not None
            ex.shutdown(wait=True)

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_commit_listener(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener(routes)`` on the event loop after each committed batch
        (``routes``: those that received queue rows in it, possibly none)."""
        self._listeners.append(listener)

    def add_precommit_hook(self, hook: Callable[[Tx], PrecommitResult]) -> None:
        """Run ``hook(tx)`` on the writer thread at the end of every write transaction.

        It may do more work in the transaction (the store bus claims rows for idle
        local consumers there, saving them a transaction); it returns what to run
        after the commit and after a rollback (or None).
        """
        self._precommit.append(hook)

    # ------------------------------------------------------------------ mechanics
    async def write(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` in a write transaction, group-committed with concurrent ops."""
        if not self._opened or self._closed:
            raise StoreError(f"store {self.url} is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((op, fut, True))
        return await fut

    def write_soon(self, op: Callable[[Tx], Any]) -> None:
        """Queue ``op`` for the next transaction without waiting for it (nor for its errors)."""
        if self._opened and not self._closed:
            self._queue.put((op, None, True))

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` on the reader connection, in one consistent snapshot."""
        if not self._opened or self._closed:
            raise StoreError(f"store {self.url} is not open")
        loop = asyncio.get_running_loop()
        if self._rexec is None:  # one connection for both (an in-memory database)
            fut: asyncio.Future[T] = loop.create_future()
            self._queue.put((fn, fut, False))
            return await fut
        return await loop.run_in_executor(self._rexec, self._run_read, fn)

    def _run_read(self, fn: Callable[[Tx], T]) -> T:
        conn = self._reader
        cur = conn.cursor()
        try:
            cur.execute("BEGIN")
            try:
                return fn(Tx(cur, self._convert))
            finally:
                cur.execute("ROLLBACK")
        except self._error_types as exc:
            raise StoreError(f"store read failed: {exc}") from exc
        finally:
            cur.close()

    def _start_writer(self, loop: asyncio.AbstractEventLoop, conn: Any, name: str) -> asyncio.Future[None]:
        """Run a writer loop on its own daemon thread; the future resolves when it stops.

        Daemon: a store its owner forgot to close must not keep the process from exiting
        (what was not committed was never confirmed to anyone).
        """
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self._writer_loop(loop, conn)
            finally:
                self._post(loop, finished)

        threading.Thread(target=run, name=f"interplay-{self.dialect}-{name}", daemon=True).start()
        return done

    def _writer_count(self) -> int:
        """How many writer connections take ops from the queue (1 where only one may write)."""
        return 1

    def _writer_loop(self, loop: asyncio.AbstractEventLoop, conn: Any) -> None:
        """The writer thread: take every op waiting, commit them as one transaction, repeat.

        The next transaction starts the moment the previous one committed, while the
        event loop is still handing out the results: the writer never waits for it.
        """
        self._local.conn = conn
        queue = self._queue
        stopping = False
        while not stopping:
            item = queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    item = queue.get_nowait()
                except Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            writes = [(op, fut) for op, fut, is_write in batch if is_write]
            reads = [(fn, fut) for fn, fut, is_write in batch if not is_write]
            if writes:
                try:
                    results, routes = self._apply([op for op, _ in writes])
                except BaseException as exc:  # a bug or a dead connection: fail the batch, keep going
                    err = exc if isinstance(exc, Exception) else StoreError("store writer stopped")
                    results, routes = [_Failed(err)] * len(writes), set()
                self._post(loop, self._hand_results, writes, results, routes)
            for fn, fut in reads:
                try:
                    outcome: Any = self._run_read(fn)
                except Exception as exc:
                    outcome = _Failed(exc)
                self._post(loop, self._hand_results, [(fn, fut)], [outcome], None)
        if conn is not self._writer:  # an extra writer: its connection ends with it
            _close_quietly(self._local.conn)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody waits for these results any more
            pass

    def _hand_results(self, batch: list[tuple[Any, asyncio.Future[Any] | None]], results: list[Any],
                 routes: set[str] | None) -> None:
        for (_, fut), result in zip(batch, results, strict=True):
            if fut is None:
                if isinstance(result, _Failed):
                    log.warning("store %s: a background write failed: %s", self.url, result.error)
                continue
            if fut.done():
                continue
            if isinstance(result, _Failed):
                fut.set_exception(result.error)
            else:
                fut.set_result(result)
        if routes is not None:
            for listener in self._listeners:
                listener(routes)

    def _apply(self, ops: list[Callable[[Tx], Any]], attempt: int = 0, batching: bool = True,
               ) -> tuple[list[Any], set[str]]:
        cur = self._local.conn.cursor()
        # Where DEFER says so, the ops' unread writes are deferred and sent together before
        # commit (Tx.later). Ops whose fences fail there (BatchConflict) run again alone,
        # without deferring, so that they see the real answer; the others again together.
        send = self._send_groups if batching and self.DEFER else None
        tx = Tx(cur, self._convert, self.local_routes, self._flow_lock(), send_groups=send)
        after: list[PrecommitResult] = []
        committing = began = False
        try:
            self._begin(cur)
            began = True
            results = []
            for i, op in enumerate(ops):
                tx.op = i
                results.append(op(tx))
            # Before the hooks, so that a failed fence shows here and not inside a hook
            # (one that raises has not handed back its rollback callback yet).
            tx.flush()
            after = [hook(tx) for hook in self._precommit]
            committing = True
            tx.flush(commit=True)
            for outcome in after:
                if outcome is not None:
                    outcome[0]()
            return results, tx.routes
        except Exception as exc:
            in_doubt = committing and self._cut_off(exc)  # asked before reconnecting
            for outcome in after:
                if outcome is not None:
                    outcome[1]()
            try:
                if began:
                    cur.execute("ROLLBACK")
                elif not self._locked(exc):  # BEGIN failed: no transaction; the connection may be bad
                    self._reconnect_writer()
            except Exception:  # the connection may be gone; reconnect below
                self._reconnect_writer()
            if in_doubt:
                # The COMMIT may have gone through: running the ops again could apply
                # them twice (fan-out rows), or tell them a lie ("stale", "exists").
                err = StoreError(f"store commit outcome unknown (connection lost): {exc}")
                err.__cause__ = exc
                return [_Failed(err)] * len(ops), set()
            if not began:
                # No op ran, so no op is to blame (SQLite locked by another program; a
                # dialect whose BEGIN goes out at once and found the connection dead).
                # Once more together, then give up: each op alone would wait out a lock again.
                if attempt == 0:
                    return self._apply(ops, 1, batching)
                return [_Failed(self._translate(exc))] * len(ops), set()
            if len(ops) == 1 and not isinstance(exc, BatchConflict):
                if attempt < 2 and self._transient(exc):  # ops are safe to run twice
                    return self._apply(ops, attempt + 1, batching)
                return [_Failed(self._translate(exc))], set()
            # Run the culprits alone: those a fence named (without deferring, to see the
            # real answer), else every op (one failed).
            alone = exc.ops if isinstance(exc, BatchConflict) else set(range(len(ops)))
            out: list[Any] = [None] * len(ops)
            routes: set[str] = set()
            rest = [i for i in range(len(ops)) if i not in alone]
            if rest:
                together, routes = self._apply([ops[i] for i in rest])
                for i, result in zip(rest, together, strict=True):
                    out[i] = result
            for i in sorted(alone):
                (out[i],), single_routes = self._apply([ops[i]], batching=not isinstance(exc, BatchConflict))
                routes |= single_routes
            return out, routes
        finally:
            _close_quietly(cur)  # its connection may have been replaced above

    def _send_groups(self, cur: Any, groups: Groups, commit: bool) -> list[int | list[int]]:
        """Send deferred writes (see :data:`~interplay.stores.tx.SendGroups`), in as few round
        trips as the driver allows: the hook of a dialect that sets ``DEFER``."""
        raise NotImplementedError(f"{type(self).__name__} sets DEFER but cannot send deferred writes")

    def _reconnect_writer(self) -> None:
        old = self._local.conn
        _close_quietly(old)
        try:
            self._local.conn = self._connect("writer")
            if old is self._writer:
                self._writer = self._local.conn
        except Exception as exc:  # the database is down; the next op fails with it
            log.warning("store %s: reconnect failed: %s", self.url, exc)

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, self._error_types):
            err = StoreError(f"store write failed: {exc}")
            err.__cause__ = exc
            return err
        return exc

    def _convert(self, sql: str) -> str:
        converted = self._sql_cache.get(sql)
        if converted is None:
            converted = self._sql_cache[sql] = self._paramstyle(sql)
        return converted

    def _migrate(self) -> None:
        cur = self._writer.cursor()
        try:
            self._begin(cur)
            cur.execute(MIGRATIONS[1][0])
            cur.execute(self._convert("SELECT value FROM ip_meta WHERE key = ?"), ("schema_version",))
            row = cur.fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                cur.execute("ROLLBACK")
                raise SchemaVersionError(
                    f"store {self.url} has schema version {current}, newer than this "
                    f"interplay understands ({SCHEMA_VERSION}); upgrade interplay"
                )
            types = self._ddl_types()
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    cur.execute(statement.format(**types))
            if current < SCHEMA_VERSION:
                cur.execute(self._convert("DELETE FROM ip_meta WHERE key = ?"), ("schema_version",))
                cur.execute(
                    self._convert("INSERT INTO ip_meta (key, value) VALUES (?, ?)"),
                    ("schema_version", str(SCHEMA_VERSION)),
                )
            cur.execute("COMMIT")
        finally:
            cur.close()


_STOP = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # closing a broken connection may raise; nothing to do
        pass


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
