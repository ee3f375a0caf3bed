"""ctx.transaction on a PostgreSQL store, on its own bus and on every broker (issue 5).

The same ledger as tests/integration/test_handler_transactions.py (which runs on the
SQLite store): one message id published five times, four of them at once, so that
handlings of one id race on PostgreSQL's READ COMMITTED inbox. The handler's ledger
row must be written once, however the bus delivers the copies.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from .. import pg
from ..buses import open_bus
from ..integration.ledger import create_ledger, ledger, ledger_app
from ..servers import require

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_url() -> Iterator[str]:
    require("postgres")
    with pg.database("interplay_handler_tx") as url:
        yield url


@pytest.mark.parametrize("bus_name", ["store", "redis", "amqp", "nats"])
async def test_rows_written_once_under_duplicate_delivery_on_postgres(bus_name: str, pg_url: str) -> None:
    runs: Counter[str] = Counter()
    async with open_bus(bus_name, pg_url) as bus, bus.run(ledger_app(runs, {})) as rt:
        await create_ledger(rt)
        same = "0190f000-0000-7000-8000-00000000000b"
        await asyncio.gather(*(rt.publish("order.paid", {"id": 1, "amount": 9.5}, id=same) for _ in range(4)))
        await rt.settled()
        await rt.publish("order.paid", {"id": 1, "amount": 9.5}, id=same)  # and again later
        await rt.publish("order.paid", {"id": 2, "amount": 3.0})
        await rt.settled()
        assert await ledger(rt) == [(1, 9.5), (2, 3.0)]
        inbox = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_inbox WHERE grp = 'accounts'")[0])
        assert inbox == 2
