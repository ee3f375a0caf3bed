"""The 3-hop order flow (payment -> shipping -> notification) for N orders.

Measured in one run, because this machine is shared and noisy - so read the ratios:

* ``naive bus``: the seed's in-process EventBus (re-implemented minimally here: a dict
  of callbacks, awaited in turn) - no durability, no tracing, the baseline;
* ``interplay memory://``: interplay's in-memory bus and store;
* ``interplay sqlite FULL``: the durable embedded default - every message committed
  with fsync before it is acknowledged, inbox and trace records included;
* ``interplay sqlite NORMAL``: the same with ``?synchronous=normal`` (safe against a
  process crash, a power cut may lose the last commits).

Each reports orders/s and p50/p99 flow latency (publish -> notification handled),
with ``concurrency`` orders in flight at most.

    python benchmarks/choreography.py --orders 10000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_app import Order


class Result:
    def __init__(self, name: str, orders: int, seconds: float, latencies: list[float]) -> None:
        self.name = name
        self.rate = orders / seconds
        lat = sorted(latencies)
        self.p50 = statistics.median(lat) * 1000
        self.p99 = lat[int(len(lat) * 0.99) - 1] * 1000


async def drive(n: int, concurrency: int, publish: Callable[[int], Awaitable[None]],
                done: dict[int, asyncio.Future[float]]) -> tuple[float, list[float]]:
    """Publish n orders, at most ``concurrency`` in flight; returns elapsed and latencies."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with slots:
            done[i] = loop.create_future()
            start = time.perf_counter()
            await publish(i)
            finished = await done[i]
            latencies.append(finished - start)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started, latencies


# --- the baseline: the seed's naive event bus --------------------------------------
class NaiveBus:
    def __init__(self) -> None:
        self.listeners: dict[str, list[Callable[[Any], Awaitable[None]]]] = {}

    def subscribe(self, event: str, callback: Callable[[Any], Awaitable[None]]) -> None:
        self.listeners.setdefault(event, []).append(callback)

    async def publish(self, event: str, data: Any) -> None:
        for callback in self.listeners.get(event, []):
            await callback(data)


async def naive(n: int, concurrency: int) -> Result:
    bus = NaiveBus()
    done: dict[int, asyncio.Future[float]] = {}

    async def payment(order: dict[str, Any]) -> None:
        await bus.publish("payment_completed", order)

    async def shipping(order: dict[str, Any]) -> None:
        await bus.publish("shipment_completed", order)

    async def notification(order: dict[str, Any]) -> None:
        done[order["id"]].set_result(time.perf_counter())

    bus.subscribe("order_created", payment)
    bus.subscribe("payment_completed", shipping)
    bus.subscribe("shipment_completed", notification)
    elapsed, lat = await drive(n, concurrency, lambda i: bus.publish("order_created", {"id": i}), done)
    return Result("naive bus (seed)", n, elapsed, lat)


# --- interplay ----------------------------------------------------------------------
async def interplay(name: str, n: int, concurrency: int, store: str, bus: str | None, **options: Any) -> Result:
    import bench_app  # the same three services as benchmarks/brokers.py's

    done: dict[int, asyncio.Future[float]] = {}

    def confirmed(order_id: int) -> None:
        fut = done.get(order_id)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    bench_app.confirmed = confirmed
    async with bench_app.choreography.run(store=store, bus=bus, **options) as rt:
        await drive(min(500, n), concurrency, lambda i: _publish(rt, i), done)  # warm up
        done.clear()
        elapsed, lat = await drive(n, concurrency, lambda i: _publish(rt, i), done)
        await rt.settled(timeout=120)
    return Result(name, n, elapsed, lat)


async def _publish(rt: Any, i: int) -> None:
    await rt.publish("order.created", Order(id=i))


def report(results: list[Result]) -> None:
    base = results[0]
    print(f"\n{'':28} {'orders/s':>10} {'vs naive':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in results:
        print(f"{r.name:28} {r.rate:10.0f} {r.rate / base.rate:9.3f} {r.p50:8.2f} {r.p99:8.2f}")
    full = next((r for r in results if "FULL" in r.name), None)
    if full is not None:
        print(f"\ndurable SQLite (FULL): {full.rate:.0f} orders/s = {3 * full.rate:.0f} handled messages/s "
              f"(target >= 3,000 orders/s)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=1000, help="orders in flight at most")
    parser.add_argument("--only", help="run only the variants whose name contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants: list[tuple[str, Callable[[], Awaitable[Result]]]] = [
            ("naive bus (seed)", lambda: naive(args.orders, args.concurrency)),
            ("interplay memory://", lambda: interplay("interplay memory://", args.orders, args.concurrency,
                                                      "memory://", "memory://")),
            ("interplay sqlite FULL", lambda: interplay("interplay sqlite FULL", args.orders, args.concurrency,
                                                        f"sqlite:///{Path(tmp) / 'full.db'}", None)),
            ("interplay sqlite NORMAL", lambda: interplay(
                "interplay sqlite NORMAL", args.orders, args.concurrency,
                f"sqlite:///{Path(tmp) / 'normal.db'}?synchronous=normal", None)),
        ]
        results = []
        for name, run in variants:
            if args.only and args.only not in name and name != "naive bus (seed)":
                continue
            print(f"running {name} ...", flush=True)
            results.append(await run())
    report(results)


if __name__ == "__main__":
    asyncio.run(main())
