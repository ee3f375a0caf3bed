"""A 3-step order workflow: interplay vs DBOS Transact, both durable on SQLite, one run.

Variants (each in its own process, one after the other, so they don't share a core):

* ``dbos sqlite``: DBOS Transact, a workflow of three ``@DBOS.step`` functions, its
  system database in a SQLite file (install the peer with ``pip install -e '.[bench]'``);
* ``interplay steps``: the same three steps as ``ctx.step`` - local functions, each
  journaled before the workflow goes on (SQLite, ``synchronous=FULL``);
* ``interplay commands``: three ``ctx.call`` commands to services over the store bus
  (each command, its handling, its reply and the journal committed durably).

For each: sequential runs (p50/p99 latency) and ``--inflight`` runs at once (runs/s,
p50/p99). Ratios are against DBOS measured in the same run.

    python benchmarks/orchestration.py --runs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

VARIANTS = ("dbos sqlite", "interplay steps", "interplay commands")


def quantiles(latencies: list[float]) -> dict[str, float]:
    lat = sorted(latencies)
    return {"p50": statistics.median(lat) * 1000, "p99": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000}


async def measure(start: Callable[[int], Awaitable[Any]], runs: int, sequential: int, inflight: int) -> dict[str, Any]:
    """``start(i)`` runs workflow i to completion."""
    for i in range(min(50, runs)):  # warm up
        await start(-1 - i)
    seq: list[float] = []
    for i in range(sequential):
        began = time.perf_counter()
        await start(i)
        seq.append(time.perf_counter() - began)
    slots = asyncio.Semaphore(inflight)
    par: list[float] = []

    async def one(i: int) -> None:
        async with slots:
            began = time.perf_counter()
            await start(i)
            par.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(one(sequential + i) for i in range(runs)))
    elapsed = time.perf_counter() - began
    return {"sequential": quantiles(seq), "parallel": {"rate": runs / elapsed, **quantiles(par)}}


async def run_dbos(db: Path, runs: int, sequential: int, inflight: int) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    config: DBOSConfig = {"name": "bench", "system_database_url": f"sqlite:///{db}", "run_admin_server": False}
    DBOS(config=config)

    @DBOS.step()
    async def reserve(i: int) -> int:
        return i

    @DBOS.step()
    async def charge(i: int) -> int:
        return i

    @DBOS.step()
    async def ship(i: int) -> int:
        return i

    @DBOS.workflow()
    async def order(i: int) -> int:
        await reserve(i)
        await charge(i)
        await ship(i)
        return i

    DBOS.launch()

    async def start(i: int) -> None:
        handle = await DBOS.start_workflow_async(order, i)
        await handle.get_result()

    try:
        return await measure(start, runs, sequential, inflight)
    finally:
        DBOS.destroy()


async def run_interplay(db: Path, runs: int, sequential: int, inflight: int, commands: bool) -> dict[str, Any]:
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
        if commands:
            await ctx.call("stock.reserve", i)
            await ctx.call("payments.charge", i)
            await ctx.call("shipping.ship", i)
        else:
            await ctx.step(reserve, i)
            await ctx.step(charge, i)
            await ctx.step(ship, i)
        return i

    async with app.run(store=f"sqlite:///{db}") as rt:

        async def start(i: int) -> None:
            handle = await rt.start("order", i)
            await handle.result(timeout=60)

        return await measure(start, runs, sequential, inflight)


def child(variant: str, runs: int, sequential: int, inflight: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        if variant == "dbos sqlite":
            result = asyncio.run(run_dbos(db, runs, sequential, inflight))
        else:
            result = asyncio.run(run_interplay(db, runs, sequential, inflight, variant == "interplay commands"))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="runs measured with --inflight at once")
    parser.add_argument("--sequential", type=int, default=200, help="runs measured one at a time")
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant and print its result")
    parser.add_argument("--dbos-runs", type=int, default=400, help="DBOS is slow: fewer runs keep the wait short")
    args = parser.parse_args()
    if args.variant:
        child(args.variant, args.runs, args.sequential, args.inflight)
        return
    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        runs = args.dbos_runs if variant.startswith("dbos") else args.runs
        print(f"running {variant} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--runs", str(runs), "--sequential",
             str(args.sequential), "--inflight", str(args.inflight)],
            capture_output=True, text=True, check=False,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"  {variant} did not run: {' | '.join(tail)}")
            continue
        results[variant] = json.loads(line[7:])
    base = results.get("dbos sqlite")
    print(f"\n{'':20} {'seq p50 ms':>10} {'seq p99 ms':>10} {'runs/s':>9} {'vs dbos':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        ratio = r["parallel"]["rate"] / base["parallel"]["rate"] if base else float("nan")
        print(f"{name:20} {r['sequential']['p50']:10.2f} {r['sequential']['p99']:10.2f} {r['parallel']['rate']:9.0f} "
              f"{ratio:8.1f} {r['parallel']['p50']:8.2f} {r['parallel']['p99']:8.2f}")
    print(f"\n(runs/s and its p50/p99 with {args.inflight} runs in flight; targets for interplay: >= 1,000 runs/s, "
          "sequential p50 <= 5 ms)")


if __name__ == "__main__":
    main()
