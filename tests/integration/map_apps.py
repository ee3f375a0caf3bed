"""Apps for the map tests: one whose map adds up, one that sends what it does not declare.

Importable as ``tests.integration.map_apps:clean`` / ``:drifting`` for ``interplay map``.
"""

from __future__ import annotations

from pydantic import BaseModel

from interplay import App, Context, WorkflowContext


class Order(BaseModel):
    """An order."""

    id: int
    amended: bool = False


# --- clean: every message sent is handled, every handler is fed -------------------------
clean = App("clean")
orders = clean.service("orders")
billing = clean.service("billing")


@billing.on("order.placed", emits="invoice.sent")
async def invoice(order: Order) -> Order:
    """Bill the order."""
    return order


@orders.on("invoice.sent")
async def close(order: Order, ctx: Context) -> None:
    """The order is billed: it is done."""
    await ctx.emit("order.closed", order)


@billing.command("refund")
async def refund(order: Order) -> Order:
    """Give the money back."""
    return order


@orders.on("order.refunded")
async def note_refund(order: Order) -> None:
    """Remember the refund."""


@clean.workflow("refund_order")
async def refund_order(ctx: WorkflowContext, order: Order) -> str:
    """Refund, then tell."""
    await ctx.call("billing.refund", order)
    await ctx.emit("order.refunded", order)
    return "refunded"


clean.flow("order", starts="order.placed", ends="order.closed", within=60)


# --- drifting: names the code makes up at run time --------------------------------------
drifting = App("drifting")
shop = drifting.service("shop")


EVENTS = {"billed": "invoice.sent"}


def _audit_event(order: Order) -> str:
    return "audit.recorded" if order.id else "audit.skipped"


@shop.on("order.placed", emits="invoice.sent")
async def bill(order: Order, ctx: Context) -> Order:
    """Bill the order, and (unseen by the map) write an audit event."""
    await ctx.emit(_audit_event(order), order)
    return order


@shop.on("order.amended")
async def rebill(order: Order, ctx: Context) -> None:
    """An amended order is billed again: the same event, from a handler that does not say so."""
    await ctx.emit(EVENTS["billed"], order.model_copy(update={"amended": True}))


@shop.on("invoice.sent")
async def file_invoice(order: Order) -> None:
    """Keep the invoice."""


drifting.flow("order", starts=["order.placed", "order.amended"], ends="invoice.sent")
