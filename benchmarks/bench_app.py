"""The apps of benchmarks/orchestration.py and brokers.py.

``app``: a 3-step order workflow, as steps or commands -

* ``order``: three ``ctx.call`` commands to three services (stock, payments, shipping)
  over the bus - each command, its handling, its reply and the journal committed;
* ``order_steps``: the same three steps as ``ctx.step`` (local functions, journaled).

``choreography``: the seed's 3-hop order flow as events - payments, shipping,
notification; the notification calls :data:`confirmed` (set by the process that
measures; hosted there).

Importable by child processes, which host them with (from the repository root)
``python -m interplay run benchmarks.bench_app:app --store postgresql://...``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from interplay import App, WorkflowContext

app = App("bench")


@app.service("stock").command("reserve")
async def reserve_cmd(i: int) -> int:
    return i


@app.service("payments").command("charge")
async def charge_cmd(i: int) -> int:
    return i


@app.service("shipping").command("ship")
async def ship_cmd(i: int) -> int:
    return i


async def reserve(i: int) -> int:
    return i


async def charge(i: int) -> int:
    return i


async def ship(i: int) -> int:
    return i


@app.workflow("order")
async def order(ctx: WorkflowContext, i: int) -> int:
    await ctx.call("stock.reserve", i)
    await ctx.call("payments.charge", i)
    await ctx.call("shipping.ship", i)
    return i


@app.workflow("order_steps")
async def order_steps(ctx: WorkflowContext, i: int) -> int:
    await ctx.step(reserve, i)
    await ctx.step(charge, i)
    await ctx.step(ship, i)
    return i


class Order(BaseModel):
    id: int
    amount: float = 10.0


def _nobody_waits(order_id: int) -> None:
    pass


choreography = App("bench-choreography")
confirmed: Callable[[int], None] = _nobody_waits
"""Called with each order id the notification service confirms (in the process hosting it)."""


@choreography.service("payments").on("order.created", emits="payment.completed")
async def take_payment(order: Order) -> Order:
    return order


@choreography.service("shipping").on("payment.completed", emits="shipment.prepared")
async def prepare_shipment(order: Order) -> Order:
    return order


@choreography.service("notification").on("shipment.prepared")
async def send_confirmation(order: Order) -> None:
    confirmed(order.id)


choreography.flow("order", starts="order.created", ends="shipment.prepared", within=300)
