"""PostgreSQL for tests: throwaway databases and schemas on the shared server, and
clusters of a test's own (for tests that restart or kill the server).

The shared server is the one of tests/servers.py (127.0.0.1:5432, user ``postgres``,
trust auth). Databases and schemas made here have random names and are dropped
afterwards, so concurrent test sessions never see each other.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

SERVER = "postgresql://postgres@127.0.0.1:5432"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _admin(dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(f"{SERVER}/{dbname}", autocommit=True, connect_timeout=5)


@contextmanager
def database(prefix: str = "interplay_test") -> Iterator[str]:
    """A new, empty database (C collation, like SQLite's ordering); yields its URL, drops it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
                     .format(sql.Identifier(name)))
    try:
        yield f"{SERVER}/{name}"
    finally:
        with _admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def new_schema() -> str:
    """A schema name no other test uses."""
    return f"t_{uuid.uuid4().hex[:12]}"


def drop_schema(database_url: str, schema: str) -> None:
    """Drop a test's schema and everything in it."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def terminate(database_url: str, where: str, *params: object) -> int:
    """pg_terminate_backend() the sessions of pg_stat_activity matching ``where``; returns how many."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND datname = current_database() AND ({})").format(sql.SQL(where)),
            params,
        ).fetchall()
    return len(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A PostgreSQL cluster of a test's own, in a temporary directory, on a free port.

    The server refuses to run as root, so its programs run as the ``postgres`` user
    (``runuser``), which owns the directory.
    """

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its parents are private to root.
        self.dir = Path(tempfile.mkdtemp(prefix="interplay-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        shutil.chown(self.dir, "postgres", "postgres")

    @staticmethod
    def available() -> bool:
        """Whether initdb/pg_ctl and runuser are installed (and we may switch users)."""
        return (PG_BIN / "initdb").exists() and shutil.which("runuser") is not None and os.geteuid() == 0

    async def _run(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            "runuser", "-u", "postgres", "--", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {output.decode(errors='replace')}")

    async def init(self) -> None:
        """initdb (no fsync while creating it: it is thrown away afterwards) and start."""
        await self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
                   "-c max_connections=40 -c shared_buffers=32MB -c fsync=on -c synchronous_commit=on")
        await self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                        "-w", "-t", "60", "start")

    async def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m fast`` (clean shutdown) or ``-m immediate`` (crash and recover)."""
        await self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-m", mode,
                        "-w", "-t", "60", "restart")

    async def stop(self) -> None:
        """Stop the server if it runs (immediately: the data is thrown away)."""
        if (self.data / "postmaster.pid").exists():
            try:
                await self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass  # already stopped

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
