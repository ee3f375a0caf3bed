"""Workflows on PostgreSQL: orchestration and the mix, across runtimes that share a database.

Two runtimes (as two processes would) on the shared server of tests/servers.py: one
hosts the services and an orchestrator, the other only an orchestrator. Runs started
on either are claimed with SKIP LOCKED leases, and a workflow waiting for an event
emitted by a service in the other runtime must be woken by it.
"""

from __future__ import annotations

import asyncio

import pytest

from interplay.examples.orders import Order, app

pytestmark = pytest.mark.slow



async def test_orchestration_across_two_runtimes(pg_url: str) -> None:
    async with app.run(store=pg_url) as services, app.run(store=pg_url, services=[]) as orchestrator:
        handles = [await rt.start("process_order", Order(id=i, amount=5))
                   for i in range(10) for rt in (services, orchestrator)]
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        assert sorted(results) == sorted(f"order {i} shipped" for i in range(10) for _ in range(2))
        again = await orchestrator.start("process_order", Order(id=0), id=handles[0].id)
        assert (again.id, await again.result(timeout=5)) == (handles[0].id, "order 0 shipped")


async def test_a_workflow_waiting_for_another_runtimes_event_is_always_woken(pg_url: str) -> None:
    async with app.run(store=pg_url) as services, app.run(store=pg_url, services=[]) as orchestrator:
        del services  # it hosts the delivery service, whose event the workflows wait for
        handles = [await orchestrator.start("deliver_order", Order(id=i, amount=5)) for i in range(30)]
        results = await asyncio.gather(*(h.result(timeout=15) for h in handles), return_exceptions=True)
        stuck = [h.id for h, r in zip(handles, results, strict=True) if isinstance(r, BaseException)]
        assert stuck == [], f"{len(stuck)} of 30 runs never saw delivery.confirmed"


async def test_runs_started_elsewhere_are_claimed_and_awaited_without_polling(pg_url: str) -> None:
    """NOTIFY wakes an orchestrator for a new run, and a remote ``result()`` when it ends.

    Both polls are set far beyond the test's timeouts: only the notifications can make
    these runs finish in time.
    """
    slow_polls = {"run_poll": 60.0}
    async with (
        app.run(store=pg_url, **slow_polls) as orchestrator,
        app.run(store=pg_url, orchestrator=False, services=[], **slow_polls) as client,
    ):
        await orchestrator.start("process_order", Order(id=0, amount=5))  # warm up: services up, claim loop idle
        await asyncio.sleep(0.2)
        handles = [await client.start("process_order", Order(id=i, amount=5)) for i in range(1, 11)]
        results = await asyncio.gather(*(h.result(timeout=5) for h in handles))
        assert results == [f"order {i} shipped" for i in range(1, 11)]
