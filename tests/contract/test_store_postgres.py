"""The PostgreSQL store passes the store contract, plus what is specific to PostgreSQL.

Needs the server of tests/servers.py (127.0.0.1:5432, user postgres). The session gets
a database of its own, dropped at the end; each test gets a schema of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from interplay.cli import db
from interplay.errors import ConfigurationError, StoreError
from interplay.stores import open_store
from interplay.stores.base import Store
from interplay.stores.postgres import PostgresStore
from interplay.stores.schema import SCHEMA_VERSION
from interplay.stores.tx import Tx
from interplay.testing import wait_until

from .. import pg
from ..servers import require
from .store_contract import T0, StoreContract, event, occupy_writers, out, tag


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    require("postgres")
    with pg.database("interplay_store") as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A store URL on a schema of this test's own (dropped afterwards)."""
    schema = pg.new_schema()
    yield f"{pg_database}?schema={schema}"
    pg.drop_schema(pg_database, schema)


class TestPostgresStore(StoreContract):
    text_holds_nul = False  # PostgreSQL text cannot hold U+0000: refused with StoreError

    @pytest.fixture(autouse=True)
    def _url(self, pg_url: str) -> None:
        self.url = pg_url

    def make_store(self) -> Store:
        return PostgresStore(self.url)


@pytest.fixture
async def store(pg_url: str) -> Any:
    s = PostgresStore(pg_url)
    await s.open()
    yield s
    await s.close()


def _database(url: str) -> str:
    return url.split("?", 1)[0]


# ---------------------------------------------------------------------- dialect details


def test_url_options_and_redaction() -> None:
    s = open_store("postgres://alice:s3cret@db.example:6543/shop?schema=Orders%20Two&sslmode=disable")
    assert isinstance(s, PostgresStore)
    assert s.schema == "Orders Two"
    assert s.conninfo == "postgresql://alice:s3cret@db.example:6543/shop?sslmode=disable"
    assert "s3cret" not in s.url
    assert s.channel == "interplay_queued:Orders Two"
    assert len(PostgresStore(f"postgresql://h/db?schema={'x' * 80}").channel) <= 63
    with pytest.raises(ConfigurationError):
        PostgresStore("postgresql://h/db?schema=")


def test_placeholders_become_psycopg_style_outside_literals() -> None:
    s = PostgresStore("postgresql://h/db")
    assert s._paramstyle("SELECT '?', ?, '%', x % 2, \"a?b\" FROM t WHERE a = ? AND b LIKE 'it''s%?'") == (
        "SELECT '?', %s, '%%', x %% 2, \"a?b\" FROM t WHERE a = %s AND b LIKE 'it''s%%?'"
    )


async def test_sessions_are_durable_and_reads_are_snapshots(pg_url: str) -> None:
    # Even a URL asking for asynchronous commit gets synchronous_commit = on.
    s = PostgresStore(pg_url + "&options=-csynchronous_commit%3Doff")
    await s.open()
    try:
        assert (await s.write(lambda tx: tx.one("SHOW synchronous_commit")))[0] == "on"
        assert (await s.read(lambda tx: tx.one("SHOW transaction_isolation")))[0] == "repeatable read"
        with pytest.raises(StoreError, match="read-only"):
            await s.read(lambda tx: tx.execute("DELETE FROM ip_queue"))
    finally:
        await s.close()


async def test_literal_percent_and_question_marks_in_sql(store: PostgresStore) -> None:
    row = await store.write(lambda tx: tx.one("SELECT '100%?' || ?, 7 % 4", ("!",)))
    assert tuple(row) == ("100%?!", 3)


async def test_nul_is_refused_clearly(store: PostgresStore) -> None:
    msg = event("order.created", msg_id="bad\x00id")
    with pytest.raises(StoreError, match="NUL"):
        await store.publish([out(msg)], T0, "queue")
    fine = event("order.created", payload={"text": "a\x00b"})  # payloads are JSON: NUL is escaped
    await store.publish([out(fine)], T0, "queue")
    (stored,), _ = await store.flow_records(fine.flow_id)
    assert stored.payload == {"text": "a\x00b"}


# ---------------------------------------------------------------------- connections that drop


async def test_writer_and_reader_reconnect_after_their_connections_drop(store: PostgresStore, pg_url: str) -> None:
    database, schema = _database(pg_url), store.schema
    await store.declare_routes("g", ["event.a"])
    # Killed while idle: the next transaction finds it dead at BEGIN and runs on a new one.
    pids = [store._writer.backend_pid, store._reader.backend_pid]
    assert pg.terminate(database, "pid = ANY(%s)", pids) == 2
    await store.publish([out(event("a"))], T0, "queue")
    assert len(await store.claim("g", 10, T0, 30)) == 1
    assert (await store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_queue")))[0] == 1

    # Killed in the middle of a transaction: that op fails, the next one works.
    def killed_mid_transaction(tx: Tx) -> None:
        tx.execute("INSERT INTO ip_meta (key, value) VALUES ('half', 'done')")
        tx.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(StoreError):
        await store.write(killed_mid_transaction)
    assert await store.schema_version() == SCHEMA_VERSION
    assert (await store.write(lambda tx: tx.one("SELECT COUNT(*) FROM ip_meta WHERE key = 'half'")))[0] == 0

    def reader_killed(tx: Tx) -> None:
        tx.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(StoreError):
        await store.read(reader_killed)
    assert (await store.read(lambda tx: tx.one("SELECT current_schema()")))[0] == schema


async def test_a_batch_whose_commit_is_cut_off_fails_instead_of_running_again(pg_url: str) -> None:
    # The connection dies in the round trip that carries COMMIT: whether it committed is
    # unknown, so the batch's ops must fail (their callers retry, idempotently), not run
    # again one by one - a rerun could apply one twice or answer "stale" to a winner.
    s = PostgresStore(pg_url + "&writers=1")
    await s.open()
    kills = []

    def cut_once(tx: Tx) -> None:
        if len(kills) < 1 and tx.routes:
            kills.append(True)  # in the COMMIT round trip, before COMMIT
            tx.later("SELECT pg_terminate_backend(pg_backend_pid())")

    s.add_precommit_hook(cut_once)
    try:
        group = "g-" + tag()
        await s.declare_routes(group, ["event.x"])  # so the publishes' transaction has routes
        gate = threading.Event()
        blocking = await occupy_writers(s, 1, gate)
        writes = [s.publish([out(event("order.created", payload={"n": n}), route="event.x")], T0, "queue")
                  for n in range(3)]
        pending = asyncio.gather(*writes, return_exceptions=True)
        await wait_until(lambda: s._queue.qsize() >= len(writes), message="the publishes queued")
        gate.set()
        await blocking
        results = await pending
        assert all(isinstance(r, StoreError) and "outcome unknown" in str(r) for r in results), results
        assert kills == [True]
        # Cut before its COMMIT, that batch left nothing; the writer reconnected and goes on.
        await s.publish([out(event("order.created"), route="event.x")], T0, "queue")
        assert len(await s.claim(group, 10, T0, 30)) == 1
    finally:
        await s.close()


async def test_ops_fail_with_store_error_while_the_server_is_unreachable(pg_url: str) -> None:
    s = PostgresStore(pg_url + ("&" if "?" in pg_url else "?") + "writers=1")  # one connection to cut
    await s.open()
    try:
        s.conninfo = "postgresql://postgres@127.0.0.1:1/nowhere"  # every reconnect now fails
        pg.terminate(_database(pg_url), "pid = ANY(%s)", [s._writer.backend_pid, s._reader.backend_pid])
        for _ in range(2):
            with pytest.raises(StoreError):
                await s.write(lambda tx: tx.one("SELECT 1"))
            with pytest.raises(StoreError):
                await s.read(lambda tx: tx.one("SELECT 1"))
        s.conninfo = _database(pg_url)  # the server is back

        async def works() -> bool:
            try:
                written = (await s.write(lambda tx: tx.one("SELECT 1")))[0]
                return bool(written == (await s.read(lambda tx: tx.one("SELECT 1")))[0])
            except StoreError:  # within RECONNECT_PAUSE of the last failed attempt
                return False

        await wait_until(works, timeout=5, message="reconnected")
    finally:
        await s.close()


# ---------------------------------------------------------------------- LISTEN/NOTIFY


async def test_commits_in_another_process_are_notified(pg_url: str) -> None:
    listening, other = PostgresStore(pg_url), PostgresStore(pg_url)
    await listening.open()
    await other.open()
    heard: list[set[str]] = []
    try:
        await listening.listen_for_queued(heard.append)
        for s, route in ((listening, "event.own"), (other, "event.theirs")):
            await s.declare_routes("g-" + tag(), [route])
        await listening.publish([out(event("own"))], T0, "queue")  # our own: the commit listener has it
        await other.publish([out(event("theirs")), out(event("nobody"))], T0, "queue")
        await other.enqueue_raw("solo", "event.solo", b"raw", T0)
        await wait_until(lambda: {"@solo"} in heard, timeout=5, message="notifications")
        assert heard == [{"event.theirs"}, {"@solo"}]  # in commit order; none for our own commit
    finally:
        await listening.close()
        await other.close()


async def test_listening_survives_a_dropped_connection(pg_url: str) -> None:
    listening, other = PostgresStore(pg_url), PostgresStore(pg_url)
    await listening.open()
    await other.open()
    heard: list[set[str]] = []
    try:
        await listening.declare_routes("g1", ["event.a", "event.b"])
        await listening.listen_for_queued(heard.append)
        assert pg.terminate(_database(pg_url), "pid = %s", listening._listen_pid) == 1
        # Back again, it wakes every route: what was queued meanwhile was not notified.
        await wait_until(lambda: {"event.a", "event.b", "@g1"} in heard, timeout=10, message="a full wake")
        await other.publish([out(event("a"))], T0, "queue")
        await wait_until(lambda: heard[-1] == {"event.a"}, timeout=5, message="notifications again")
    finally:
        await listening.close()
        await other.close()


async def test_many_routes_are_notified_in_chunks_and_a_huge_one_wakes_everything(pg_url: str) -> None:
    listening, other = PostgresStore(pg_url), PostgresStore(pg_url)
    await listening.open()
    await other.open()
    heard: list[set[str]] = []
    types = [f"r{n}." + "y" * 400 for n in range(40)]  # ~16 kB of route names: more than one NOTIFY
    huge = "x" * 9000  # one route longer than a NOTIFY payload can be
    try:
        await listening.declare_routes("g1", ["event." + t for t in types])
        await listening.declare_routes("g2", ["event.a", "event." + huge])
        await listening.listen_for_queued(heard.append)
        await other.publish([out(event(t)) for t in types], T0, "queue")
        everything = {"event." + t for t in types}
        await wait_until(lambda: set().union(*heard) >= everything, timeout=5, message="chunked notifications")
        assert len(heard) >= 2
        assert set().union(*heard) == everything
        await other.publish([out(event(huge))], T0, "queue")
        await wait_until(lambda: "@g2" in heard[-1], timeout=5, message="a full wake")
        assert heard[-1] >= {"event.a", "event." + huge, "@g1", "@g2"}
    finally:
        await listening.close()
        await other.close()


async def test_concurrent_opens_of_a_new_schema(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert {await s.schema_version() for s in stores} == {SCHEMA_VERSION}
    finally:
        for s in stores:
            await s.close()


# ---------------------------------------------------------------------- the CLI


def test_db_upgrade_and_version(pg_url: str) -> None:
    app = typer.Typer()
    db.register(app)
    runner = CliRunner()
    before = runner.invoke(app, ["db", "version", "--store", pg_url])
    assert before.exit_code == 0, before.output
    assert "database schema version: 0" in before.output  # looking does not upgrade
    upgraded = runner.invoke(app, ["db", "upgrade", "--store", pg_url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"schema version {SCHEMA_VERSION}" in upgraded.output
    after = runner.invoke(app, ["db", "version", "--store", pg_url])
    assert f"database schema version: {SCHEMA_VERSION}" in after.output
    down = runner.invoke(app, ["db", "upgrade", "--store", "postgresql://postgres@127.0.0.1:1/x"])
    assert down.exit_code == 1
    assert "cannot open store" in down.output
