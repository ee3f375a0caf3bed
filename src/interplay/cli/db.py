"""``interplay db upgrade`` and ``interplay db version``: the store's schema.

Every store upgrades its schema when it opens, so running services upgrade by
themselves; ``db upgrade`` does it ahead of a deployment (one process, on purpose),
and ``db version`` looks without changing anything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from ..errors import StoreError
from ..stores import open_store
from ..stores.base import Store
from ..stores.schema import SCHEMA_VERSION
from ..stores.sqlite import SqliteStore
from .common import DEFAULT_STORE_URL, StoreOption, console, run_async

__all__ = ["db_app", "peek_schema_version", "register"]

db_app = typer.Typer(help="The store's schema: upgrade it, show its version.", no_args_is_help=True)


@db_app.command("upgrade")
def upgrade(store: StoreOption = DEFAULT_STORE_URL) -> None:
    """Create the store's tables or upgrade them to this interplay's schema, and print its version."""

    async def main() -> tuple[str, int]:
        opened = open_store(store)
        await opened.open()  # applies the missing migrations, in one transaction
        try:
            return opened.url, await opened.schema_version()
        finally:
            await opened.close()

    url, version = run_async(main)
    console.print(f"store {url}: schema version {version}", highlight=False)


@db_app.command("version")
def version(store: StoreOption = DEFAULT_STORE_URL) -> None:
    """Print the schema version of the store's database (without upgrading it) and of this interplay."""
    target = open_store(store)
    found = run_async(lambda: peek_schema_version(target))
    console.print(f"database schema version: {found}", highlight=False)
    console.print(f"interplay schema version: {SCHEMA_VERSION}", highlight=False)
    if found < SCHEMA_VERSION:
        console.print("run `interplay db upgrade` to upgrade it (services also do when they start)", highlight=False)
    elif found > SCHEMA_VERSION:
        console.print("the database was written by a newer interplay: upgrade interplay", highlight=False)


async def peek_schema_version(store: Store) -> int:
    """The schema version recorded in a store's database (0: none), read without migrating.

    :meth:`Store.open` upgrades the schema, so this opens one connection of its own
    through the dialect's hook, reads ``ip_meta`` and closes it.

    Raises:
        StoreError: if the database cannot be reached.
    """

    def peek() -> int:
        if isinstance(store, SqliteStore) and (not store.durable or not Path(store.path).exists()):
            return 0  # nothing there yet (and connecting would create the file)
        conn = store._connect("reader")
        try:
            cur = conn.cursor()
            try:
                cur.execute(store._convert("SELECT value FROM ip_meta WHERE key = ?"), ("schema_version",))
                row = cur.fetchone()
            except store._error_types as exc:
                if "ip_meta" in str(exc):  # no such table: nothing was ever created here
                    return 0
                raise
            finally:
                cur.close()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    try:
        return await asyncio.to_thread(peek)
    except store._error_types as exc:
        raise StoreError(f"cannot read store {store.url}: {exc}") from exc


def register(app: typer.Typer) -> None:
    """Add these commands to the main CLI."""
    app.add_typer(db_app, name="db")
