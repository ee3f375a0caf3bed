"""The apps the choreography tests run: the order flow, and a poison message's."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, Retry, Runtime
from interplay.testing import wait_until

if TYPE_CHECKING:
    from ..buses import Bus


class Order(BaseModel):
    id: int
    amount: float = 10.0


def order_app(calls: Counter[str], seen: Counter[tuple[str, int]] | None = None) -> App:
    """``order.created`` -> payments -> shipping -> notification, compensated by orders.

    ``calls`` counts handler runs per service; ``seen``, if given, per service and order id.
    A negative amount is rejected by payments (no retry), which emits ``payment.failed``.
    """
    app = App("shop")
    payments, shipping = app.service("payments"), app.service("shipping")
    notification, orders = app.service("notification"), app.service("orders")

    def count(service: str, order: Order) -> None:
        calls[service] += 1
        if seen is not None:
            seen[service, order.id] += 1

    @payments.on("order.created", emits="payment.completed", on_error="payment.failed")
    async def take_payment(order: Order) -> Order:
        count("payments", order)
        if order.amount < 0:
            raise Reject("negative amount")
        return order

    @shipping.on("payment.completed")
    async def ship(order: Order, ctx: Context) -> None:
        count("shipping", order)
        await ctx.emit("shipment.prepared", order)

    @notification.on("shipment.prepared")
    async def notify(order: Order) -> None:
        count("notification", order)

    @orders.on("payment.failed", emits="order.cancelled")
    async def cancel(failure: Failure) -> dict[str, Any]:
        calls["orders"] += 1
        return {"id": failure.payload["id"], "why": failure.error}

    app.flow("order", starts="order.created", ends="shipment.prepared", fails="payment.failed", within=60)
    return app


async def dead_letters(rt: Runtime, n: int) -> bool:
    """Whether the store holds at least ``n`` dead letters."""
    return len(await rt.dlq()) >= n


def poison_app(calls: list[int]) -> App:
    """A worker whose handler never returns, as if ``task.created`` killed its process.

    ``calls`` gets the attempt number of each run.
    """
    app = App("poison")

    @app.service("worker").on("task.created", retry=Retry(attempts=1))
    async def hangs(task: dict[str, Any], ctx: Context) -> None:
        calls.append(ctx.attempt)
        await asyncio.Event().wait()

    return app


async def die_holding_poison(bus: Bus, calls: list[int], times: int, /, **options: Any) -> str:
    """Publish ``task.created`` to a :func:`poison_app`; ``times`` runtimes in turn take it
    and stop holding it (``options`` go to ``bus.run``). Returns its flow's id."""
    app = poison_app(calls)
    flow_id = ""
    for held in range(1, times + 1):
        async with bus.run(app, **options) as rt:
            flow_id = flow_id or await rt.publish("task.created", {"n": 1})
            await wait_until(lambda held=held: len(calls) == held, timeout=30, message=f"delivery {held}")
    return flow_id
