"""The SQLite store passes the store contract (a fresh file per test); ``interplay db`` on SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
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

from .store_contract import StoreContract


class TestSqliteStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "store.db"

    def make_store(self) -> Store:
        return SqliteStore(f"sqlite:///{self.path}")


async def test_writers_on_one_file_take_turns_instead_of_meeting_a_locked_database(tmp_path: Path) -> None:
    """Two stores on one file stand for two processes (each has its own lock file
    descriptor). With ``busy_timeout=0`` SQLite itself would answer the second writer
    "database is locked" at once; the lock file makes it wait for its turn instead."""
    url = f"sqlite:///{tmp_path / 'shared.db'}?busy_timeout=0"
    first, second = SqliteStore(url), SqliteStore(url)
    await first.open()
    await second.open()
    inside, release = threading.Event(), threading.Event()

    def hold(tx: Tx) -> None:  # a write transaction that stays open until released
        tx.execute("INSERT INTO ip_meta (key, value) VALUES ('first', '1')")
        inside.set()
        release.wait(10)

    try:
        holding = asyncio.create_task(first.write(hold))
        assert await asyncio.to_thread(inside.wait, 10)
        waiting = asyncio.create_task(second.write(
            lambda tx: tx.execute("INSERT INTO ip_meta (key, value) VALUES ('second', '2')").rowcount))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # neither failed nor written: waiting for its turn
        release.set()
        await holding
        assert await waiting == 1
        assert (tmp_path / "shared.db-lock").exists()
    finally:
        release.set()
        await first.close()
        await second.close()


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
