"""The store bus on SQLite passes the transport contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from interplay.clock import SystemClock
from interplay.stores.sqlite import SqliteStore
from interplay.transports.base import Transport
from interplay.transports.store import StoreBus

from .transport_contract import TransportContract


class _OwnedStoreBus(StoreBus):
    """A store bus on its own connection to the file (one per "process")."""

    async def close(self) -> None:
        await self.store.close()


class TestSqliteStoreBus(TransportContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "bus.db"

    async def connect(self) -> Transport:
        store = SqliteStore(f"sqlite:///{self.path}")
        await store.open()
        bus = _OwnedStoreBus(store, poll=0.02)
        await bus.open(SystemClock())
        return bus
