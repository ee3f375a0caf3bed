"""interplay.testing: a virtual clock makes hour-long timers and backoffs instant."""

from __future__ import annotations

import asyncio
from typing import Any

from interplay import App, Context, Retry, WorkflowContext
from interplay.testing import VirtualClock, wait_until


async def test_an_hour_long_durable_sleep_in_virtual_time(sqlite_url: str) -> None:
    clock = VirtualClock()
    app = App("timers")

    @app.workflow("reminder")
    async def reminder(ctx: WorkflowContext, _: None) -> float:
        start = ctx.now()
        await ctx.sleep(3600)
        return ctx.now() - start

    async with app.run(store=sqlite_url, clock=clock) as rt:
        run = await rt.start("reminder", None)
        await wait_until(lambda: clock.sleepers > 0, message="the timer to be set")
        assert await run.status() == "running"
        await clock.advance(3599)
        await asyncio.sleep(0.05)
        assert await run.status() == "running"  # not a second early
        await clock.advance(1)
        assert await run.result(timeout=5) == 3600


async def test_retry_backoff_follows_the_clock(sqlite_url: str) -> None:
    clock = VirtualClock()
    app = App("backoff")
    attempts: list[float] = []

    @app.service("worker").on("task.created", retry=Retry(attempts=3, backoff=60, jitter=False))
    async def work(task: dict[str, Any], ctx: Context) -> None:
        attempts.append(clock.now())
        if len(attempts) < 3:
            raise ConnectionError("down")

    async with app.run(store=sqlite_url, bus="memory://", clock=clock) as rt:
        await rt.publish("task.created", {})
        await wait_until(lambda: len(attempts) == 1)
        await wait_until(lambda: clock.sleepers > 0)
        await clock.advance(60)
        await wait_until(lambda: len(attempts) == 2)
        await wait_until(lambda: clock.sleepers > 0)
        await clock.advance(120)
        await wait_until(lambda: len(attempts) == 3)
        await rt.settled()
    assert [t - attempts[0] for t in attempts] == [0, 60, 180]


async def test_per_handler_concurrency_limit(sqlite_url: str) -> None:
    app = App("limits")
    running = 0
    peak = 0

    @app.service("worker").on("job.queued", concurrency=3)
    async def work(job: dict[str, int]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    async with app.run(store=sqlite_url) as rt:
        await asyncio.gather(*(rt.publish("job.queued", {"n": n}) for n in range(40)))
        await rt.settled(timeout=20)
    assert peak == 3
