"""ctx.transaction on a PostgreSQL store, on its own bus and on every broker (issue 5).

The same ledger as tests/integration/test_handler_transactions.py (which runs on the
SQLite store): one message id published five times, four of them at once, so that
handlings of one id race on PostgreSQL's READ COMMITTED inbox. The handler's ledger
row must be written once, however the bus delivers the copies.
"""

from __future__ import annotations

from collections import Counter

import pytest

from ..buses import open_bus
from ..integration.ledger import create_ledger, ledger, ledger_app, publish_duplicates

pytestmark = pytest.mark.slow



@pytest.mark.parametrize("bus_name", ["store", "redis", "amqp", "nats"])
async def test_rows_written_once_under_duplicate_delivery_on_postgres(bus_name: str, pg_url: str) -> None:
    runs: Counter[str] = Counter()
    async with open_bus(bus_name, pg_url) as bus, bus.run(ledger_app(runs, {})) as rt:
        await create_ledger(rt)
        await publish_duplicates(rt, "0190f000-0000-7000-8000-00000000000b")
        assert await ledger(rt) == [(1, 9.5), (2, 3.0)]
        inbox = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_inbox WHERE grp = 'accounts'")[0])
        assert inbox == 2
