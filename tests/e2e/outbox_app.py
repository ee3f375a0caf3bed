"""The app the outbox crash test runs in child processes (``interplay run``)."""

from __future__ import annotations

from pydantic import BaseModel

from interplay import App

app = App("outboxed")
orders = app.service("orders")
audit = app.service("audit")


class Order(BaseModel):
    id: int


@orders.on("order.placed", emits="order.accepted")
async def accept(order: Order) -> Order:
    # Committed to the outbox with the handling (its inbox mark), then published.
    return order


@audit.on("order.accepted")
async def note(order: Order) -> None:
    return None
