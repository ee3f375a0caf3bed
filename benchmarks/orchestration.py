"""A 3-step order workflow: interplay vs DBOS Transact, durable on SQLite and on PostgreSQL, one run.

Variants (each in its own process, one after the other, so they don't share a core):

* ``dbos sqlite`` / ``dbos postgres``: DBOS Transact, a workflow of three ``@DBOS.step``
  functions, its system database in a SQLite file or a fresh PostgreSQL database
  (install the peer with ``pip install -e '.[bench]'``);
* ``interplay steps`` / ``interplay steps postgres``: the same three steps as
  ``ctx.step`` - local functions, each journaled before the workflow goes on (SQLite
  with ``synchronous=FULL``; PostgreSQL with its default ``synchronous_commit=on``);
* ``interplay commands`` / ``interplay commands postgres``: three ``ctx.call``
  commands to services over the store's own bus (each command, its handling, its
  reply and the journal committed durably).

For each: sequential runs (p50/p99 latency) and ``--inflight`` runs at once (runs/s,
p50/p99). Ratios are against DBOS on the same store, measured in the same run.

With PostgreSQL, two more measurements:

* ``pgbench`` one-row INSERT commits/s with 1 and 8 clients on the same server, in the
  same run - the physical limit; interplay's journaled steps/s are reported against it;
* ``--orchestrators 1,2,4``: that many ``interplay run`` processes share the runs a
  client process starts (steps variant), to show how throughput scales on this machine.

    python benchmarks/orchestration.py --runs 2000
    python benchmarks/orchestration.py --only postgres --orchestrators 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"

SQLITE = ("dbos sqlite", "interplay steps", "interplay commands")
POSTGRES = ("dbos postgres", "interplay steps postgres", "interplay commands postgres")


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
    return {"sequential": quantiles(seq) if seq else None, "parallel": {"rate": runs / elapsed, **quantiles(par)}}


async def run_dbos(url: str, runs: int, sequential: int, inflight: int) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    config: DBOSConfig = {"name": "bench", "system_database_url": url, "run_admin_server": False}
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


async def run_interplay(store: str, runs: int, sequential: int, inflight: int, commands: bool) -> dict[str, Any]:
    from bench_app import app

    workflow = "order" if commands else "order_steps"
    async with app.run(store=store) as rt:

        async def start(i: int) -> None:
            handle = await rt.start(workflow, i)
            await handle.result(timeout=60)

        return await measure(start, runs, sequential, inflight)


async def run_orchestrators(store: str, runs: int, inflight: int, processes: int) -> dict[str, Any]:
    """``processes`` ``interplay run`` orchestrators share the runs a client here starts."""
    from bench_app import app

    from interplay.testing import wait_until

    async with app.run(store=store, services=[], orchestrator=False) as rt:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "interplay", "run", "benchmarks.bench_app:app", "--store", store,
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for _ in range(processes)
        ]
        try:

            async def owners() -> bool:  # every orchestrator is up and holds its lease
                return int(await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_leases")[0])) >= processes

            await wait_until(owners, timeout=60, interval=0.1, message="orchestrators up")

            async def start(i: int) -> None:
                handle = await rt.start("order_steps", i)
                await handle.result(timeout=120)

            return await measure(start, runs, 0, inflight)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(asyncio.wait_for(proc.wait(), 30) for proc in procs))


@contextmanager
def postgres_database(server: str) -> Iterator[str]:
    """A fresh database on ``server`` for one variant; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"ip_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def pgbench(server: str, clients: int, seconds: int) -> float:
    """One-row INSERT commits/s by ``pgbench`` with ``clients`` connections: the physical limit."""
    import psycopg

    with postgres_database(server) as url, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE one_row (id bigserial PRIMARY KEY, v int)")
        script = Path(tmp) / "insert.sql"
        script.write_text("INSERT INTO one_row (v) VALUES (1);\n")
        out = subprocess.run(
            ["pgbench", "-n", "-f", str(script), "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
             "-d", url],
            capture_output=True, text=True, check=True,
        ).stdout
    match = re.search(r"tps = ([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"could not read pgbench's output: {out}")
    return float(match.group(1))


def child(variant: str, args: argparse.Namespace) -> None:
    runs, sequential, inflight = args.runs, args.sequential, args.inflight
    on_pg = "postgres" in variant or variant.startswith("orchestrators")
    with tempfile.TemporaryDirectory() as tmp, postgres_database(args.pg) if on_pg else nullcontext(None) as pg:
        store = pg or f"sqlite:///{Path(tmp) / 'bench.db'}"
        if variant.startswith("dbos"):
            result = asyncio.run(run_dbos(store, runs, sequential, inflight))
        elif variant.startswith("orchestrators"):
            result = asyncio.run(run_orchestrators(store, runs, inflight, int(variant.split()[1])))
        else:
            result = asyncio.run(run_interplay(store, runs, sequential, inflight, "commands" in variant))
    print("RESULT " + json.dumps(result), flush=True)


def spawn(variant: str, args: argparse.Namespace, runs: int) -> dict[str, Any] | None:
    print(f"running {variant} ...", flush=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--variant", variant, "--runs", str(runs), "--sequential", str(args.sequential),
         "--inflight", str(args.inflight), "--pg", args.pg],
        capture_output=True, text=True, check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {variant} did not run: {' | '.join(tail)}")
        return None
    return dict(json.loads(line[7:]))


def table(results: dict[str, dict[str, Any]], base_of: Callable[[str], str]) -> None:
    print(f"\n{'':28} {'seq p50 ms':>10} {'seq p99 ms':>10} {'runs/s':>9} {'vs dbos':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        base = results.get(base_of(name))
        ratio = r["parallel"]["rate"] / base["parallel"]["rate"] if base else float("nan")
        seq = r.get("sequential") or {"p50": float("nan"), "p99": float("nan")}
        print(f"{name:28} {seq['p50']:10.2f} {seq['p99']:10.2f} {r['parallel']['rate']:9.0f} "
              f"{ratio:8.1f} {r['parallel']['p50']:8.2f} {r['parallel']['p99']:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="runs measured with --inflight at once")
    parser.add_argument("--sequential", type=int, default=200, help="runs measured one at a time")
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--only", choices=("sqlite", "postgres"), help="measure one store only")
    parser.add_argument("--pg", default=PG_SERVER, help="PostgreSQL server (a database is made per variant)")
    parser.add_argument("--orchestrators", default="", help="e.g. 1,2,4: orchestrator processes to scale over (PG)")
    parser.add_argument("--pgbench-seconds", type=int, default=5)
    parser.add_argument("--variant", help="(internal) run one variant and print its result")
    parser.add_argument("--dbos-runs", type=int, default=400, help="DBOS is slow: fewer runs keep the wait short")
    args = parser.parse_args()
    if args.variant:
        child(args.variant, args)
        return
    variants = (SQLITE if args.only != "postgres" else ()) + (POSTGRES if args.only != "sqlite" else ())
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        result = spawn(variant, args, args.dbos_runs if variant.startswith("dbos") else args.runs)
        if result is not None:
            results[variant] = result
    table(results, lambda name: "dbos postgres" if "postgres" in name else "dbos sqlite")
    print(f"\n(runs/s and its p50/p99 with {args.inflight} runs in flight; targets for interplay: >= 1,000 runs/s, "
          "sequential p50 <= 5 ms)")
    if args.only == "sqlite" or not any("postgres" in name for name in results):
        return
    print("\nrunning pgbench (one-row INSERT commits) ...", flush=True)
    try:
        limit = {clients: pgbench(args.pg, clients, args.pgbench_seconds) for clients in (1, 8)}
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"pgbench did not run: {exc}")
        return
    print(f"pgbench: {limit[1]:.0f} commits/s with 1 client, {limit[8]:.0f} with 8")
    for name in ("interplay steps postgres", "interplay commands postgres"):
        if name in results:
            steps = 3 * results[name]["parallel"]["rate"]
            print(f"{name}: {steps:.0f} journaled steps/s = {steps / limit[1]:.2f}x pgbench with 1 client, "
                  f"{steps / limit[8]:.2f}x with 8")
    if args.orchestrators:
        scaled: dict[str, dict[str, Any]] = {}
        for n in (int(x) for x in args.orchestrators.split(",")):
            result = spawn(f"orchestrators {n}", args, args.runs)
            if result is not None:
                scaled[f"{n} orchestrator process(es)"] = result
        print(f"\n{'':28} {'runs/s':>9} {'p50 ms':>8} {'p99 ms':>8}   (steps workflow, client in its own process)")
        for name, r in scaled.items():
            print(f"{name:28} {r['parallel']['rate']:9.0f} {r['parallel']['p50']:8.2f} {r['parallel']['p99']:8.2f}")


if __name__ == "__main__":
    main()
