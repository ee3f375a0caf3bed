"""The seed's order flow - payment, then shipping, then notification - with interplay.

Choreography: each service reacts to the previous one's event; nobody is in charge.
A payment that fails is compensated by choreography too: ``payments`` emits
``payment.failed`` (its ``on_error`` event) and ``orders`` cancels the order.

Run it as separate services::

    interplay run interplay.examples.orders:app --service payments &
    interplay run interplay.examples.orders:app --service shipping &
    interplay run interplay.examples.orders:app --service notification --service orders &
    interplay publish interplay.examples.orders:app order.created '{"id": 1, "amount": 20}'
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from interplay import App, Context, Failure, Reject

app = App("shop")
orders = app.service("orders")
payments = app.service("payments")
shipping = app.service("shipping")
notification = app.service("notification")


class Order(BaseModel):
    """An order as it travels between the services."""

    id: int
    item: str = "book"
    amount: float = Field(default=10.0, description="what the customer pays")


class Cancellation(BaseModel):
    """Why an order was cancelled."""

    order_id: int
    reason: str


@payments.on("order.created", emits="payment.completed", on_error="payment.failed")
async def take_payment(order: Order) -> Order:
    """Charge the customer; a non-positive amount is refused for good."""
    if order.amount <= 0:
        raise Reject(f"order {order.id}: amount must be positive, got {order.amount}")
    return order


@shipping.on("payment.completed", emits="shipment.prepared")
async def prepare_shipment(order: Order) -> Order:
    """Pack the order."""
    return order


@notification.on("shipment.prepared")
async def send_confirmation(order: Order, ctx: Context) -> None:
    """Tell the customer; the emitted event ends the flow."""
    ctx.logger.debug("order %s confirmed", order.id)
    await ctx.emit("customer.notified", order)


@orders.on("payment.failed", emits="order.cancelled")
async def cancel_order(failure: Failure) -> Cancellation:
    """Compensate a failed payment by cancelling the order (a choreographed saga)."""
    return Cancellation(order_id=int(failure.payload["id"]), reason=failure.error)


app.flow(
    "order",
    starts="order.created",
    ends="customer.notified",
    fails="payment.failed",
    within=60,
)
