"""The app of benchmarks/orchestration.py and brokers.py: a 3-step order workflow, as steps or commands.

* ``order``: three ``ctx.call`` commands to three services (stock, payments, shipping)
  over the bus - each command, its handling, its reply and the journal committed;
* ``order_steps``: the same three steps as ``ctx.step`` (local functions, journaled).

Importable by child processes, which host it with (from the repository root)
``python -m interplay run benchmarks.bench_app:app --store postgresql://...``.
"""

from __future__ import annotations

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
