"""The order app the choreography tests run: payments, shipping, notification, orders."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel

from interplay import App, Context, Failure, Reject


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
