"""ctx.transaction in handlers: the service's own rows change exactly once per message."""

from __future__ import annotations

from collections import Counter

import pytest

from ..buses import Bus
from .ledger import create_ledger, ledger, ledger_app, publish_duplicates

# The rows are the store's business; how each bus delivers duplicates is test_choreography's.
pytestmark = pytest.mark.buses("store", "memory")


async def test_rows_written_once_under_duplicate_delivery(bus: Bus) -> None:
    runs: Counter[str] = Counter()
    app = ledger_app(runs, {})
    async with bus.run(app) as rt:
        await create_ledger(rt)
        await publish_duplicates(rt, "0190f000-0000-7000-8000-00000000000a")
        assert await ledger(rt) == [(1, 9.5), (2, 3.0)]


async def test_a_failing_transaction_undoes_the_handling_and_retries(bus: Bus) -> None:
    runs: Counter[str] = Counter()
    app = ledger_app(runs, {"left": 2})
    async with bus.run(app) as rt:
        await create_ledger(rt)
        flow_id = await rt.publish("order.paid", {"id": 7, "amount": 1.0})
        await rt.settled()
        flow = await rt.trace(flow_id)
        assert await ledger(rt) == [(7, 1.0)]  # the two failed attempts left nothing behind
    assert runs["record"] == 3
    assert [s.outcome for s in flow.roots[0].spans] == ["retry", "retry", "ok"]
    assert "ValueError: ledger locked" in (flow.roots[0].spans[0].error or "")
    assert flow.shape() == (("order.paid", (("order.booked", ()),)),)  # emitted once, by the good attempt


async def test_a_transaction_that_always_fails_dead_letters(sqlite_url: str) -> None:
    runs: Counter[str] = Counter()
    app = ledger_app(runs, {"left": 99})
    async with app.run(store=sqlite_url) as rt:
        await create_ledger(rt)
        await rt.publish("order.paid", {"id": 8, "amount": 1.0})
        await rt.settled()
        (dead,) = await rt.dlq()
        assert await ledger(rt) == []
    assert (dead.reason, dead.attempts) == ("retries_exhausted", 3)
    assert dead.error == "ValueError: ledger locked"
