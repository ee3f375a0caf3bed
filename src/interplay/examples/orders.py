"""The seed's order flow - payment, then shipping, then notification - three ways.

The same service code serves every style:

* **Choreography**: each service reacts to the previous one's event; nobody is in
  charge. Failures are compensated by choreography too: a payment that fails emits
  ``payment.failed`` and ``orders`` cancels the order; a shipment that fails emits
  ``shipment.failed`` and ``payments`` refunds.
* **Orchestration**: the durable workflow ``process_order`` sends commands to the
  same handlers and, with a saga, refunds the payment when shipping fails.
* **Mixed**: the workflow ``deliver_order`` emits ``order.shipped`` and waits for
  ``delivery.confirmed`` from the choreographed ``delivery`` service.

Run it as separate services (each line a process; add ``--bus redis://...`` to use a
broker)::

    interplay run interplay.examples.orders:app --service payments --no-orchestrator
    interplay run interplay.examples.orders:app --service shipping --service delivery --no-orchestrator
    interplay run interplay.examples.orders:app --service notification --service orders --no-orchestrator
    interplay run interplay.examples.orders:app --service payments --orchestrator   # or any process
    interplay publish interplay.examples.orders:app order.created '{"id": 1, "amount": 20}'
    interplay start interplay.examples.orders:app process_order '{"id": 2, "amount": 20}' --wait 10
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from interplay import App, Context, Failure, Reject, WorkflowContext

app = App("shop")
orders = app.service("orders")
payments = app.service("payments")
shipping = app.service("shipping")
notification = app.service("notification")
delivery = app.service("delivery")

OUT_OF_STOCK = "unobtainium"
"""An item shipping can never find: makes shipping fail, for the compensations."""


class Order(BaseModel):
    """An order as it travels between the services."""

    id: int
    item: str = "book"
    amount: float = Field(default=10.0, description="what the customer pays")


class Cancellation(BaseModel):
    """Why an order was cancelled."""

    order_id: int
    reason: str


class Refund(BaseModel):
    """Money given back."""

    order_id: int
    amount: float


# --- the services: each handler serves choreography (.on) and orchestration (.command) ---
@payments.on("order.created", emits="payment.completed", on_error="payment.failed")
@payments.command("process_payment")
async def take_payment(order: Order) -> Order:
    """Charge the customer; a non-positive amount is refused for good."""
    if order.amount <= 0:
        raise Reject(f"order {order.id}: amount must be positive, got {order.amount}")
    return order


@shipping.on("payment.completed", emits="shipment.prepared", on_error="shipment.failed")
@shipping.command("prepare_shipment")
async def prepare_shipment(order: Order) -> Order:
    """Pack the order; an item that is not in stock fails the shipment."""
    if order.item == OUT_OF_STOCK:
        raise Reject(f"order {order.id}: {order.item} is out of stock")
    return order


@notification.on("shipment.prepared")
@notification.command("send_confirmation")
async def send_confirmation(order: Order, ctx: Context) -> None:
    """Tell the customer; the emitted event ends a choreographed order's flow."""
    ctx.logger.debug("order %s confirmed", order.id)
    await ctx.emit("customer.notified", order)


@payments.command("refund")
async def refund(order: Order) -> Refund:
    """Give the money back (a compensation; idempotent by the order's id)."""
    return Refund(order_id=order.id, amount=order.amount)


@payments.on("shipment.failed", emits="payment.refunded")
async def refund_failed_shipment(failure: Failure) -> Refund:
    """Choreographed compensation: a shipment failed, so refund its payment."""
    return await refund(Order.model_validate(failure.payload))


@orders.on("payment.failed", emits="order.cancelled")
async def cancel_order(failure: Failure) -> Cancellation:
    """Choreographed compensation: a payment failed, so cancel the order."""
    return Cancellation(order_id=int(failure.payload["id"]), reason=failure.error)


@delivery.on("order.shipped", emits="delivery.confirmed")
async def confirm_delivery(order: Order) -> Order:
    """The courier reports the parcel delivered (choreography inside a workflow's flow)."""
    return order


app.flow(
    "order",
    starts="order.created",
    ends="customer.notified",
    fails=["payment.failed", "shipment.failed"],
    within=60,
)


# --- orchestration: a durable workflow drives the same services by commands ---
@app.workflow("process_order")
async def process_order(ctx: WorkflowContext, order: Order) -> str:
    """Pay, ship (refunding if shipping fails), confirm."""
    await ctx.call("payments.process_payment", order)
    async with ctx.saga() as saga:
        saga.compensate("payments.refund", order)
        await ctx.call("shipping.prepare_shipment", order, timeout=30)
    await ctx.call("notification.send_confirmation", order)
    return f"order {order.id} shipped"


# --- the mix: a workflow that emits an event and waits for a choreographed answer ---
@app.workflow("deliver_order")
async def deliver_order(ctx: WorkflowContext, order: Order) -> str:
    """Pay, hand over to the courier by event, wait for their confirmation, notify."""
    await ctx.call("payments.process_payment", order)
    await ctx.emit("order.shipped", order)
    await ctx.wait_for("delivery.confirmed", match={"id": order.id}, timeout=60)
    await ctx.call("notification.send_confirmation", order)
    return f"order {order.id} delivered"
