"""memory:// passes the transport contract."""

from __future__ import annotations

from interplay.clock import SystemClock
from interplay.transports.base import Transport
from interplay.transports.memory import MemoryTransport

from .transport_contract import TransportContract


class TestMemoryTransport(TransportContract):
    async def connect(self) -> Transport:
        # Every "connection" of one in-process bus is the same object.
        if not hasattr(self, "_bus"):
            self._bus = MemoryTransport()
            await self._bus.open(SystemClock())
        return self._bus
