"""The app the workflow crash tests run in a child process (``interplay run``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from interplay import App, Transaction, WorkflowContext

app = App("crashy")
payments = app.service("payments")
shipping = app.service("shipping")


class Order(BaseModel):
    id: int


@payments.command("charge")
async def charge(order: Order) -> dict[str, str]:
    return {"receipt": f"r-{order.id}"}


@shipping.command("ship")
async def ship(order: Order) -> dict[str, int]:
    return {"parcel": order.id}


def record(tx: Transaction, run_id: str, step: str) -> None:
    # `effects` has no unique index on purpose: a step that ran twice would show twice.
    tx.execute("INSERT INTO effects (run_id, step) VALUES (?, ?)", (run_id, step))


@app.workflow("order")
async def order(ctx: WorkflowContext, o: Order) -> str:
    await ctx.step(record, ctx.run_id, "reserve")
    receipt = await ctx.call("payments.charge", o)
    await ctx.call("shipping.ship", o)
    await ctx.step(record, ctx.run_id, "shipped")
    return str(receipt["receipt"])


@app.workflow("sleeper")
async def sleeper(ctx: WorkflowContext, seconds: float) -> float:
    start = ctx.now()
    await ctx.sleep(seconds)
    return ctx.now() - start


@app.workflow("waiter")
async def waiter(ctx: WorkflowContext, _: None) -> Any:
    return await ctx.wait_for("approval.given", timeout=120)
