"""A ledger service whose handler writes its rows with ``ctx.transaction`` (exactly once per message)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from interplay import App, Context, Retry, Transaction


def ledger_app(runs: Counter[str], fail: dict[str, int]) -> App:
    app = App("ledger")

    def book(tx: Transaction, order_id: int, amount: float) -> None:
        if fail.get("left", 0) > 0:
            fail["left"] -= 1
            tx.execute("INSERT INTO ledger (order_id, amount) VALUES (?, ?)", (order_id, amount))
            raise ValueError("ledger locked")  # after writing: the write must be undone too
        tx.execute("INSERT INTO ledger (order_id, amount) VALUES (?, ?)", (order_id, amount))

    @app.service("accounts").on("order.paid", emits="order.booked", retry=Retry(attempts=3, backoff=0.01))
    async def record(order: dict[str, Any], ctx: Context) -> dict[str, Any]:
        runs["record"] += 1
        ctx.transaction(book, order["id"], order["amount"])
        return order

    return app


async def ledger(rt: Any) -> list[tuple[int, float]]:
    return list(await rt.store.read(lambda tx: tx.all("SELECT order_id, amount FROM ledger ORDER BY order_id")))


async def create_ledger(rt: Any) -> None:
    await rt.store.write(lambda tx: tx.execute("CREATE TABLE IF NOT EXISTS ledger (order_id INTEGER, amount REAL)"))


async def publish_duplicates(rt: Any, same_id: str) -> None:
    """``order.paid`` for order 1 under one id five times (four at once, then once more
    after they settled), and once for order 2; returns when all is handled."""
    await asyncio.gather(*(rt.publish("order.paid", {"id": 1, "amount": 9.5}, id=same_id) for _ in range(4)))
    await rt.settled()
    await rt.publish("order.paid", {"id": 1, "amount": 9.5}, id=same_id)
    await rt.publish("order.paid", {"id": 2, "amount": 3.0})
    await rt.settled()
