"""Crash safety of choreography on the SQLite store bus: SIGKILL mid-stream, restart, check.

A child process hosts the example's services (``interplay run``) while this test
publishes 1,000 orders; the child is killed with SIGKILL partway and restarted. Every
order's flow must complete, and every event must have been emitted exactly once:
handling, inbox mark and emitted events commit in one transaction, so a crash can
neither lose an event nor send it twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from interplay import Runtime
from interplay.examples.orders import Order, app
from interplay.testing import wait_until

pytestmark = pytest.mark.slow

ORDERS = 1000


async def leased(rt: Runtime) -> bool:
    count = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_queue WHERE lease IS NOT NULL")[0])
    return bool(count > 0)


async def completed(rt: Runtime, at_least: int) -> bool:
    count = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'")[0])
    return bool(count >= at_least)


def start_child(store_url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "interplay", "run", "interplay.examples.orders:app", "--store", store_url,
             "--lease", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path / 'orders.db'}"
    log = tmp_path / "child.log"
    child = start_child(store_url, log)
    try:
        async with app.run(store=store_url, services=[], orchestrator=False) as rt:
            flow_ids = await asyncio.gather(
                *(rt.publish("order.created", Order(id=i, amount=1 + i % 50)) for i in range(ORDERS))
            )
            # Kill it while it is busy: after a random share of the flows completed, at a
            # moment when it holds leased messages (handlers in flight, commits pending).
            target = rng.randint(ORDERS // 10, ORDERS // 2)
            await wait_until(lambda: completed(rt, target), timeout=60, interval=0.002)
            await wait_until(lambda: leased(rt), timeout=60, interval=0.001)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            done_at_kill = await rt.store.read(
                lambda tx: tx.one("SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'")[0]
            )
            child = start_child(store_url, log)
            for fid in flow_ids:
                summary = await rt.wait_flow(fid, timeout=60)
                assert summary.status == "completed", (fid, summary)
            await rt.settled(timeout=60)

            duplicated = await rt.store.read(lambda tx: tx.all(
                "SELECT flow_id, type, COUNT(*) FROM ip_messages GROUP BY flow_id, type HAVING COUNT(*) > 1"
            ))
            per_type = dict(await rt.store.read(lambda tx: tx.all(
                "SELECT type, COUNT(*) FROM ip_messages GROUP BY type"
            )))
            inbox = dict(await rt.store.read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp")))
            leftovers = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_queue")[0])
            dead = await rt.dlq()
            redelivered = await rt.store.read(
                lambda tx: tx.one("SELECT COUNT(*) FROM ip_spans WHERE attempt > 1")[0]
            )
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=20)
    assert done_at_kill < ORDERS, "the child finished before it was killed: the test proved nothing"
    print(f"killed with {done_at_kill}/{ORDERS} flows done; {redelivered} handlings were redeliveries")
    assert duplicated == [], "an event was emitted more than once"
    assert per_type == {
        "order.created": ORDERS, "payment.completed": ORDERS, "shipment.prepared": ORDERS,
        "customer.notified": ORDERS,
    }
    assert inbox == {"payments": ORDERS, "shipping": ORDERS, "notification": ORDERS}
    assert leftovers == 0
    assert dead == []
