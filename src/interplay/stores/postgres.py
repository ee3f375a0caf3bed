"""The PostgreSQL store: ``postgresql://user@host:5432/db`` - the store, and a bus for many machines.

What differs from SQLite, and nothing else (the SQL lives in the op modules):

* **Durability**: every connection sets ``synchronous_commit = on``, whatever the
  server's default, so a commit has reached the WAL on disk before interplay calls it
  committed (RELIABILITY 8). Group commit keeps that affordable.
* **Locking**: many processes write at once (READ COMMITTED); queue rows and workflow
  runs are leased with ``FOR UPDATE SKIP LOCKED``, so competing consumers and
  orchestrators never block on, nor take, each other's rows. The reader runs each
  read in one REPEATABLE READ, read-only snapshot.
* **Wake-ups**: a transaction that queues rows sends ``NOTIFY`` with the routes it
  queued to (delivered on commit); :meth:`PostgresStore.listen_for_queued` LISTENs
  on its own connection and wakes the store bus, so consumers in other processes do
  not poll. After a lost listen connection it re-listens and wakes every route,
  since notifications may have been missed meanwhile.
* **Connections heal themselves**: a connection that broke (a server restart, a
  network cut) fails the op that was using it with :class:`StoreError`; the next
  transaction reconnects before its ``BEGIN``. A connection found dead *at* ``BEGIN``
  (it died while idle) is replaced and the ``BEGIN`` sent again, which is safe since
  nothing of the transaction ran. A commit cut off mid-flight is ambiguous, as on any
  database: the op fails, and retrying it must be idempotent (ops are).
* **NUL characters**: PostgreSQL ``text`` cannot hold U+0000. An id, group, route,
  type or name containing it is refused with :class:`StoreError` (the transaction
  rolls back, nothing is written) instead of being altered. Payloads and message
  bodies are unaffected: JSON escapes NUL and bodies are ``bytea``.

URL options besides libpq's own (``sslmode``, ``connect_timeout``, ...):
``schema=NAME`` keeps interplay's tables in that schema (created if missing), so
several apps or tests can share one database; notifications are per schema too.
``writers=N`` (default 2) sets how many connections commit in parallel (each one
group-commits a batch of ops; writes are then not committed in submission order).
Tip: a database created with ``LC_COLLATE 'C'`` orders ids bytewise like SQLite.
SQL given to :class:`~interplay.stores.tx.Transaction` uses ``?`` placeholders here
too: every ``?`` outside a quoted literal is one (write ``jsonb_exists(a, b)``, not
``a ? b``), and ``%`` needs no escaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigurationError, StoreError
from .base import Store
from .tx import Groups, Tx

__all__ = ["PostgresStore"]

log = logging.getLogger("interplay.store")

LOCK_NAMESPACE = 0x1A7E0001
"""First key of interplay's two-key advisory locks (the second says what is locked),
kept apart from the single-key locks applications tend to use."""
MIGRATION_LOCK = 0
FLOW_LOCK = 1
NOTIFY_LIMIT = 7800
"""Bytes per NOTIFY payload; PostgreSQL refuses 8000 or more."""
ALL_ROUTES = "*"
"""A NOTIFY payload meaning "anything may have been queued" (a route too long to name)."""
RECONNECT_PAUSE = 0.2
"""Seconds after a failed connection attempt during which reconnecting fails at once."""
LISTEN_CHECK = 15.0
"""Seconds without notifications after which the listen connection is probed."""
_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "application_name": "interplay",
    # A peer that vanished (host down, cable cut) shows up within about a minute
    # instead of a TCP timeout of hours, for the listener above all.
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
# Literals are matched first so a '?' or '%' inside one is never taken for a placeholder;
# psycopg reads '%' everywhere (literals included), so every '%' is doubled.
_SQL_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")


class PostgresStore(Store):
    """A store in a PostgreSQL database (psycopg 3, synchronous, on the store's threads).

    Attributes:
        conninfo: the libpq connection string (interplay's own options removed).
        schema: the schema holding the tables (None: the server's ``search_path``).
        channel: the NOTIFY channel of this store's queue.
    """

    dialect = "postgresql"
    ROW_LOCK = " FOR UPDATE SKIP LOCKED"
    DEFER = True

    CLAIM_SQL = (
        "UPDATE ip_queue SET visible_at = ?, lease = ?, deliveries = deliveries + 1 "
        "WHERE id IN (SELECT id FROM ip_queue WHERE grp = ? AND visible_at <= ? "
        "ORDER BY visible_at, id LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING id, msg_id, body, deliveries, route"
    )

    def _writer_count(self) -> int:
        return self.writers

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.conninfo, self.schema, self.writers = _parse_url(url)
        try:
            given = conninfo_to_dict(self.conninfo)
        except psycopg.Error as exc:
            raise ConfigurationError(f"invalid PostgreSQL URL {self.url!r}: {exc}") from None
        self._connect_kwargs = {k: v for k, v in _DEFAULTS.items() if k not in given}
        self.channel = _channel(self.schema)
        self._migrating = False
        self._connect_failed: dict[str, tuple[float, str]] = {}  # role -> (when, why); its thread only
        self._queued_callbacks: list[Callable[[set[str]], None]] = []
        self._writer_pids: set[int] = set()  # our own commits' notifications need no relay
        self._listener: asyncio.Task[None] | None = None
        self._listen_pid: int | None = None  # the listen connection's server process (diagnostics, tests)
        self.add_precommit_hook(self._notify_queued)

    # ------------------------------------------------------------------ dialect hooks
    def _connect(self, role: str) -> _Connection:
        return _Connection(lambda: self._open_connection(role))

    def _open_connection(self, role: str) -> psycopg.Connection[Any]:
        # While the server is unreachable, a batch of ops that failed is retried op by op:
        # one connection attempt (up to connect_timeout) is enough for all of them.
        failed = self._connect_failed.get(role)
        if failed is not None and time.monotonic() - failed[0] < RECONNECT_PAUSE:
            raise psycopg.OperationalError(f"{failed[1]} (not retried within {RECONNECT_PAUSE}s)")
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, **self._connect_kwargs)  # we send BEGIN/COMMIT
        except psycopg.Error as exc:
            self._connect_failed[role] = (time.monotonic(), str(exc).strip())
            raise
        self._connect_failed.pop(role, None)
        try:
            conn.execute(self._session_setup(role))
        except BaseException:
            conn.close()
            raise
        if role == "writer":
            self._writer_pids.add(conn.info.backend_pid)
        return conn

    def _session_setup(self, role: str) -> sql.Composed:
        settings: list[sql.Composable] = [
            sql.SQL("SET synchronous_commit = on"),
            # A process paused mid-transaction (SIGSTOP, a debugger) must not hold row
            # locks forever: the server ends such a session and the others move on.
            sql.SQL("SET idle_in_transaction_session_timeout = '120s'"),
        ]
        if self.schema is not None:
            settings.append(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
        if role == "reader":
            settings.append(sql.SQL("SET default_transaction_isolation = 'repeatable read'"))
            settings.append(sql.SQL("SET default_transaction_read_only = on"))
        return sql.SQL("; ").join(settings)

    def _ddl_types(self) -> dict[str, str]:
        return {
            "serial": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            "blob": "BYTEA",
            "real": "DOUBLE PRECISION",
            "no_rowid": "",
        }

    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN")
        if self._migrating:
            # Processes opening a new database together: one creates the schema, the
            # others wait here and then find it done.
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, MIGRATION_LOCK))
            if self.schema is not None:
                # Look first: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even
                # when the schema exists, and a user may have been given only the schema.
                cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))

    def _migrate(self) -> None:
        self._migrating = True  # writer thread only, like _begin
        try:
            super()._migrate()
        finally:
            self._migrating = False

    @property
    def _error_types(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def _transient(self, exc: Exception) -> bool:
        """Deadlock victims and serialization failures may just run again (for the base's retry)."""
        return isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)

    def _cut_off(self, exc: Exception) -> bool:
        """A connection that broke (server restart, network cut): its last COMMIT is in doubt."""
        return isinstance(exc, psycopg.OperationalError) and bool(self._local.conn.conn.closed)

    def _paramstyle(self, sql_text: str) -> str:
        return _SQL_TOKENS.sub(_convert_token, sql_text)

    def _send_groups(self, cur: Any, groups: Groups, commit: bool) -> list[int | list[int]]:
        """All of a batch's deferred writes in one round trip (see :meth:`_Cursor.execute_groups`)."""
        return list(cur.execute_groups(groups, commit=commit))

    def _flow_lock(self) -> Callable[[Tx, str, bool], None]:
        """Dialect hook behind ``Tx.lock_flow`` (for the core change proposed in issue 5)."""
        return self.lock_flow

    def lock_flow(self, tx: Tx, flow_id: str, exclusive: bool) -> None:
        """Order a wait's registration and an event's emission in one flow.

        Under READ COMMITTED a transaction registering a wait (insert into ip_waits,
        then look for the event) and one emitting the event (insert the message,
        then look for waits) can each miss the other's uncommitted row, and the run
        waits forever. Registering takes this lock exclusively and emitting takes it
        shared, before either looks, so one of them always sees the other: emitters
        of a flow do not block each other, and the lock ends with the transaction.
        """
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        tx.execute(f"SELECT {fn}(CAST(? AS INTEGER), CAST(? AS INTEGER))", (LOCK_NAMESPACE + FLOW_LOCK, _key(flow_id)))

    # ------------------------------------------------------------------ wake-ups
    def _notify_queued(self, tx: Tx) -> None:
        """Precommit hook: tell listening processes which routes got rows (sent on commit)."""
        for payload in _notify_payloads(tx.routes):
            tx.later("SELECT pg_notify(?, ?)", (self.channel, payload))

    async def listen_for_queued(self, callback: Callable[[set[str]], None]) -> None:
        """Call ``callback(routes)`` on the event loop when another process queues rows.

        ``routes`` are those that received rows (``@group`` for rows queued for one
        group). After the listen connection is lost and re-established, ``callback``
        gets every declared route, since notifications may have been missed.

        Raises:
            StoreError: if the first LISTEN fails.
        """
        if not self._opened or self._closed:
            raise StoreError(f"store {self.url} is not open")
        self._queued_callbacks.append(callback)
        if self._listener is None:
            try:
                conn = await self._listen_connect()
            except psycopg.Error as exc:
                self._queued_callbacks.remove(callback)
                raise StoreError(f"cannot listen for queued messages on {self.url}: {exc}") from exc
            self._listener = asyncio.get_running_loop().create_task(
                self._listen_loop(conn), name=f"interplay-listen-{self.channel}"
            )

    async def _listen_connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, **self._connect_kwargs)
        try:
            await conn.execute(self._session_setup("listener"))
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            await conn.close()
            raise
        self._listen_pid = conn.info.backend_pid
        return conn

    async def _listen_loop(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        failures = 0
        resync = False
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._listen_connect()
                        resync = True
                        log.info("store %s: listening again", self.url)
                    if resync:  # LISTEN first, then wake all: nothing falls in between
                        cur = await conn.execute("SELECT route, grp FROM ip_routes")
                        rows = await cur.fetchall()
                        self._deliver({r[0] for r in rows} | {"@" + r[1] for r in rows})
                        resync = False
                    failures = 0
                    resync = await self._relay_notifications(conn)
                except Exception as exc:  # whatever broke, listening must go on (cancelling stops it)
                    failures += 1
                    delay = min(2.0, 0.05 * 2**failures)
                    log.warning("store %s: listen connection failed (%s); retrying in %.2fs", self.url, exc, delay)
                    if conn is not None:
                        await _aclose_quietly(conn)
                        conn = None
                    await asyncio.sleep(delay)
        finally:
            if conn is not None:
                await _aclose_quietly(conn)

    async def _relay_notifications(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Hand notifications to the callbacks for a while; True if all routes need a wake."""
        async with contextlib.aclosing(conn.notifies(timeout=LISTEN_CHECK)) as notes:
            async for note in notes:
                if note.pid in self._writer_pids:
                    continue  # our own commit: the commit listeners were called already
                try:
                    routes = orjson.loads(note.payload)
                except orjson.JSONDecodeError:
                    routes = ALL_ROUTES  # not ours to parse: wake everything rather than miss
                if routes == ALL_ROUTES or not isinstance(routes, list):
                    return True
                self._deliver({str(r) for r in routes})
        # Quiet for a while: a dead peer without a FIN (host gone) shows up here.
        await conn.execute("SELECT 1")
        return False

    def _deliver(self, routes: set[str]) -> None:
        for callback in list(self._queued_callbacks):
            try:
                callback(routes)
            except Exception:  # one broken callback must not stop the wake-ups of the others
                log.exception("store %s: queued-rows callback failed", self.url)

    async def close(self) -> None:
        """Stop listening, finish pending writes and disconnect."""
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._queued_callbacks.clear()
        await super().close()


class _Connection:
    """A psycopg connection that replaces itself when broken, only between transactions.

    It runs on one thread (the store's writer or reader) and hands out one
    :class:`_Cursor` per transaction.
    """

    __slots__ = ("_open", "backend_pid", "conn")

    def __init__(self, open_connection: Callable[[], psycopg.Connection[Any]]) -> None:
        self._open = open_connection
        self.conn = open_connection()
        self.backend_pid = self.conn.info.backend_pid
        """The server process of this connection (to recognise our own notifications)."""

    def reconnect(self) -> None:
        """Close the connection and open a new one (raises if the server is unreachable)."""
        with contextlib.suppress(Exception):  # it is broken already: closing may complain
            self.conn.close()
        self.conn = self._open()
        self.backend_pid = self.conn.info.backend_pid

    def cursor(self) -> _Cursor:
        """A cursor for one transaction (never raises: a dead connection fails its first statement)."""
        return _Cursor(self)

    def close(self) -> None:
        """Close; a later transaction would reconnect (the base closes before it reconnects)."""
        self.conn.close()


class _Cursor:
    """The cursor of one transaction; its first statement may run on a new connection.

    ``BEGIN`` is not sent on its own: it goes with the transaction's first statement,
    in one round trip (libpq's pipeline mode), and so do the deferred writes that
    :meth:`execute_groups` sends together.
    """

    __slots__ = ("_begin", "_cur", "_owner")

    def __init__(self, owner: _Connection) -> None:
        self._owner = owner
        self._cur: psycopg.Cursor[Any] | None = None
        self._begin = False  # BEGIN asked for, not sent yet

    def execute(self, query: Any, params: Sequence[Any] | None = None) -> _Cursor:
        """Run a statement; returns itself (for ``rowcount`` and the fetch methods)."""
        if query == "BEGIN" and self._cur is None:
            self._begin = True
        elif self._cur is not None:
            self._cur.execute(query, params)
        elif query == "ROLLBACK":
            self._begin = False  # nothing was sent: nothing to undo
        else:
            self._first(lambda cur: cur.execute(query, params))
        return self

    def execute_groups(self, groups: Groups, *, commit: bool = False) -> list[int | list[int]]:
        """Run each statement for each of its rows, all in one round trip (libpq pipeline).

        Returns the rows changed per statement: a count per row where a group asks for
        them (a fence), else the sum. With ``commit``, ``COMMIT`` goes in the same round trip.
        """
        cursors: list[tuple[psycopg.Cursor[Any], bool]] = []

        def queue(first: psycopg.Cursor[Any]) -> None:  # inside a pipeline: sent, not waited for
            conn = first.connection
            for sql_text, rows, per_row in groups:
                cur = conn.cursor()
                cursors.append((cur, per_row))
                if len(rows) == 1:
                    cur.execute(sql_text, rows[0])
                else:
                    cur.executemany(sql_text, rows, returning=per_row)
            if commit:
                first.execute("COMMIT")

        try:
            if self._cur is None:
                self._first(queue, pipeline=True, retry=not commit)
            else:
                with self._cur.connection.pipeline():
                    queue(self._cur)
            return [_counts(cur) if per_row else cur.rowcount for cur, per_row in cursors]
        finally:
            for cur, _ in cursors:
                cur.close()

    def _first(self, run: Callable[[psycopg.Cursor[Any]], Any], *, pipeline: bool = False, retry: bool = True,
               ) -> None:
        """Send the transaction's first statement(s), after its BEGIN (``retry``: none of them commits).

        The cursor is kept even when they fail: the transaction they began must be rolled back.
        """
        owner = self._owner
        if owner.conn.closed:  # broke during an earlier transaction
            owner.reconnect()
        begin, self._begin = self._begin, False
        self._cur = cur = owner.conn.cursor()
        try:
            self._send(cur, begin, run, pipeline)
            return
        except psycopg.OperationalError:
            # A live connection refusing the statement is a real error; a connection
            # found dead (it died while idle) ran nothing of this transaction, which
            # has not committed: try once more on a new one.
            if not owner.conn.closed or not begin or not retry:
                raise
        owner.reconnect()
        self._cur = cur = owner.conn.cursor()
        self._send(cur, begin, run, pipeline)

    @staticmethod
    def _send(cur: psycopg.Cursor[Any], begin: bool, run: Callable[[psycopg.Cursor[Any]], Any],
              pipeline: bool) -> None:
        if not (begin or pipeline):
            run(cur)
            return
        with cur.connection.pipeline():
            if begin:
                cur.execute("BEGIN")
            run(cur)

    def executemany(self, query: Any, rows: Iterable[Sequence[Any]]) -> None:
        """Run a statement for each row of parameters."""
        rows = list(rows)  # a first statement may be sent twice (on a new connection)
        if self._cur is None:
            self._first(lambda cur: cur.executemany(query, rows))
        else:
            self._cur.executemany(query, rows)

    @property
    def rowcount(self) -> int:
        """Rows changed by the last statement."""
        return -1 if self._cur is None else self._cur.rowcount

    def fetchone(self) -> Any:
        """The next row of the last query, or None."""
        assert self._cur is not None
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        """The remaining rows of the last query."""
        assert self._cur is not None
        return self._cur.fetchall()

    def close(self) -> None:
        """Release the cursor (the connection stays)."""
        if self._cur is not None:
            with contextlib.suppress(Exception):  # a broken connection's cursor
                self._cur.close()


def _counts(cur: psycopg.Cursor[Any]) -> list[int]:
    """Rows changed by each execution of an ``executemany(..., returning=True)``."""
    counts = [cur.rowcount]
    while cur.nextset():
        counts.append(cur.rowcount)
    return counts


def _convert_token(match: re.Match[str]) -> str:
    token = match.group(0)
    if token == "?":
        return "%s"
    return token.replace("%", "%%")


def _parse_url(url: str) -> tuple[str, str | None, int]:
    """Split interplay's options off a postgresql:// URL: (libpq URL, schema, writers)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    schema: str | None = None
    writers = DEFAULT_WRITERS
    rest = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            if not value:
                raise ConfigurationError("schema= needs a name in the PostgreSQL store URL")
            schema = value
        elif key == "writers":
            if not value.isdigit() or not 1 <= int(value) <= 64:
                raise ConfigurationError(f"writers= must be a number of connections from 1 to 64, got {value!r}")
            writers = int(value)
        else:
            rest.append((key, value))
    return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), "")), schema, writers


DEFAULT_WRITERS = 2
"""Writer connections per store: each group-commits what it takes from the shared queue.
A batch costs two round trips whatever its size (its writes are pipelined), so more
writers mostly make smaller batches; two let one commit while the other fills
(measured on 2 cores: 1 and 2 writers alike, 4 about 25% slower)."""


def _channel(schema: str | None) -> str:
    """The NOTIFY channel: one per schema, within the 63 bytes of an identifier."""
    if schema is None:
        return "interplay_queued"
    name = f"interplay_queued:{schema}"
    if len(name.encode()) <= 63:
        return name
    return "interplay_queued:" + hashlib.blake2b(schema.encode(), digest_size=16).hexdigest()


def _key(flow_id: str) -> int:
    """A flow's advisory lock key: a stable 32-bit hash (a collision only costs some waiting)."""
    digest = hashlib.blake2b(flow_id.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _notify_payloads(routes: set[str]) -> list[str]:
    """The routes as JSON lists, each small enough for one NOTIFY."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2
    for route in sorted(routes):
        length = len(orjson.dumps(route)) + 1
        if length + 2 > NOTIFY_LIMIT:
            return [ALL_ROUTES]
        if size + length > NOTIFY_LIMIT:
            payloads.append(orjson.dumps(chunk).decode())
            chunk, size = [], 2
        chunk.append(route)
        size += length
    if chunk:
        payloads.append(orjson.dumps(chunk).decode())
    return payloads


async def _aclose_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        await conn.close()
    except Exception:  # closing a broken connection may raise; it is gone either way
        pass
