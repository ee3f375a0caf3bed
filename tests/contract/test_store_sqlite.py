"""The SQLite store passes the store contract (a fresh file per test); ``interplay db`` on SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from interplay.cli import db
from interplay.errors import StoreError
from interplay.stores.base import Store
from interplay.stores.schema import SCHEMA_VERSION
from interplay.stores.sqlite import SqliteStore
from interplay.stores.tx import Tx
from interplay.testing import wait_until

from .store_contract import StoreContract


class TestSqliteStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "store.db"

    def make_store(self) -> Store:
        return SqliteStore(f"sqlite:///{self.path}")


async def test_writers_on_one_file_take_turns_instead_of_meeting_a_locked_database(tmp_path: Path) -> None:
    """Two stores on one file stand for two processes (each has its own lock file
    descriptor). The second's SQLite connection is told not to wait at all (busy
    timeout 0), so SQLite alone would answer it "database is locked" at once; the lock
    file makes it wait for its turn instead, and write the moment the first commits."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = SqliteStore(url), SqliteStore(url)
    await first.open()
    await second.open()
    await second.write(lambda tx: tx.execute("PRAGMA busy_timeout = 0"))
    try:
        async with writing_held_open(first):
            waiting = asyncio.create_task(second.write(
                lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES ('second', '2')").rowcount))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # neither failed nor written: waiting for its turn
        assert await waiting == 1
        assert (tmp_path / "shared.db-lock").exists()
    finally:
        await first.close()
        await second.close()


async def test_a_writer_waits_for_its_turn_at_most_busy_timeout(tmp_path: Path) -> None:
    """A process stuck inside a write transaction holds up the others only for
    ``busy_timeout``: then their writes fail with StoreError (and the stores close)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}?busy_timeout=300"
    first, second = SqliteStore(url), SqliteStore(url)
    await first.open()
    await second.open()
    try:
        async with writing_held_open(first):
            with pytest.raises(StoreError, match=r"held the write lock for over 0\.3s"):
                await asyncio.wait_for(second.write(lambda tx: tx.execute("SELECT 1")), 5)
        await second.write(lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES ('second', '2')"))
    finally:
        await first.close()
        await asyncio.wait_for(second.close(), 5)


@contextlib.asynccontextmanager
async def writing_held_open(store: SqliteStore) -> AsyncIterator[None]:
    """Inside: ``store`` holds a write transaction open (another process mid-write);
    on leaving it commits."""
    inside, release = threading.Event(), threading.Event()

    def hold(tx: Tx) -> None:
        tx.execute("INSERT INTO ip_meta (key, value) VALUES ('first', '1')")
        inside.set()
        release.wait(10)

    holding = asyncio.create_task(store.write(hold))
    try:
        assert await asyncio.to_thread(inside.wait, 10)
        yield
    finally:
        release.set()
        await holding


async def test_an_in_memory_store_keeps_no_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqliteStore("memory://")
    await store.open()
    await store.write(lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES ('k', 'v')"))
    await store.close()
    assert [p.name for p in await asyncio.to_thread(lambda: list(tmp_path.iterdir()))] == []


async def test_a_write_another_program_keeps_locked_out_fails_with_store_error(tmp_path: Path) -> None:
    """Not every writer takes turns: past ``busy_timeout`` the op fails with StoreError
    (it once surfaced as sqlite3.ProgrammingError from closing a replaced cursor), and
    the store writes again once the other program commits."""
    path = tmp_path / "shared.db"
    store = SqliteStore(f"sqlite:///{path}?busy_timeout=0")
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            await store.write(lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES ('k', 'v')"))
        other.execute("COMMIT")
        await store.write(lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES ('k', 'v')"))
    finally:
        other.close()
        await store.close()


async def test_a_batch_that_cannot_begin_fails_together_not_op_by_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Locked out at BEGIN (by a program that is not interplay), no op is to blame: the
    batch tries once more as a whole, then fails, instead of each op waiting out the
    lock again on its own (20 ops x 30 s by default)."""
    path = tmp_path / "shared.db"
    begins: list[str] = []
    connect = SqliteStore._connect

    def traced(self: SqliteStore, role: str) -> sqlite3.Connection:
        conn = connect(self, role)
        if role == "writer":
            conn.set_trace_callback(lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None)
        return conn

    def insert(key: str) -> Callable[[Tx], object]:
        return lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES (?, 'v')", (key,))

    monkeypatch.setattr(SqliteStore, "_connect", traced)
    store = SqliteStore(f"sqlite:///{path}?busy_timeout=5000")  # the turn: waited for at most 5 s
    await store.open()
    await store.write(lambda tx: tx.execute("PRAGMA busy_timeout = 0"))  # SQLite's lock: not at all
    other = sqlite3.connect(path, isolation_level=None)
    turn = os.open(f"{path}-lock", os.O_RDONLY)
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)  # the writer takes the first op, then waits for its turn
        first = asyncio.ensure_future(store.write(insert("first")))
        await wait_until(lambda: store._turns is not None and store._turns._waiter is not None,
                         message="the writer waiting for its turn")
        queued = asyncio.gather(*(store.write(insert(str(i))) for i in range(10)), return_exceptions=True)
        await wait_until(lambda: store._queue.qsize() == 10, message="the next batch queued")
        other.execute("BEGIN IMMEDIATE")
        begins.clear()
        fcntl.flock(turn, fcntl.LOCK_UN)
        outcomes = [*await asyncio.gather(first, return_exceptions=True), *await queued]
        assert all(isinstance(o, StoreError) and "locked" in str(o) for o in outcomes), outcomes
        assert len(begins) == 4  # each batch, then each batch again; not once more per op
    finally:
        os.close(turn)
        other.close()
        await store.close()


def test_db_upgrade_and_version(tmp_path: Path) -> None:
    app = typer.Typer()
    db.register(app)
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    before = runner.invoke(app, ["db", "version", "--store", url])
    assert before.exit_code == 0, before.output
    assert "database schema version: 0" in before.output
    assert not (tmp_path / "cli.db").exists()  # looking creates nothing
    upgraded = runner.invoke(app, ["db", "upgrade", "--store", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"schema version {SCHEMA_VERSION}" in upgraded.output
    after = runner.invoke(app, ["db", "version", "--store", url])
    assert f"database schema version: {SCHEMA_VERSION}" in after.output
    assert f"interplay schema version: {SCHEMA_VERSION}" in after.output
