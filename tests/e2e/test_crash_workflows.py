"""Crash recovery of workflows: SIGKILL the orchestrator mid-run, restart, check every step.

A child process (``interplay run``) hosts the services and the orchestrator; this test
starts 500 runs, kills the child with SIGKILL at a random moment while runs are in
flight, and starts it again. Every run must complete; each step's side effect written
through a transactional ``ctx.step`` must exist exactly once; each command must have
been handled once per run (the inbox), though it may have been sent again.
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
from interplay.testing import wait_until

from .crash_app import Order, app

pytestmark = pytest.mark.slow

RUNS = 500
ROOT = Path(__file__).resolve().parents[2]


def start_child(store_url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "interplay", "run", "tests.e2e.crash_app:app", "--store", store_url,
             "--lease", "2", "--run-lease", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def kill(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)


def stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)


async def count(rt: Runtime, sql: str) -> int:
    return int(await rt.store.read(lambda tx: tx.one(sql)[0]))


async def open_client(store_url: str) -> Runtime:
    rt = app.run(store=store_url, services=[], orchestrator=False)
    await rt.open()
    await rt.store.write(lambda tx: tx.execute("CREATE TABLE IF NOT EXISTS effects (run_id TEXT, step TEXT)"))
    return rt


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_sigkill_mid_run_every_workflow_completes_each_step_once(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    log = tmp_path / "child.log"
    rt = await open_client(store_url)
    child = start_child(store_url, log)
    try:
        handles = await asyncio.gather(*(rt.start("order", Order(id=i), id=f"order-{i}") for i in range(RUNS)))
        target = rng.randint(RUNS // 10, RUNS // 2)
        await wait_until(lambda: count_ge(rt, "SELECT COUNT(*) FROM ip_runs WHERE status = 'completed'", target),
                         timeout=60, interval=0.002)
        await asyncio.sleep(rng.uniform(0, 0.02))
        kill(child)
        done_at_kill = await count(rt, "SELECT COUNT(*) FROM ip_runs WHERE status = 'completed'")
        child = start_child(store_url, log)
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
        effects = await rt.store.read(lambda tx: tx.all(
            "SELECT step, COUNT(*), COUNT(DISTINCT run_id) FROM effects GROUP BY step ORDER BY step"))
        inbox = dict(await rt.store.read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp")))
        resent = await count(rt, "SELECT COUNT(*) FROM ip_messages m JOIN ip_journal j ON j.msg_id = m.id "
                                 "WHERE m.kind = 'command'")
    finally:
        stop(child)
        await rt.close()
    assert done_at_kill < RUNS, "the child finished before it was killed: the test proved nothing"
    assert results == [f"r-{i}" for i in range(RUNS)]
    assert effects == [("reserve", RUNS, RUNS), ("shipped", RUNS, RUNS)]  # each exactly once
    assert inbox == {"payments": RUNS, "shipping": RUNS}  # each command handled once per run
    assert resent == 2 * RUNS  # one command message per step, even when re-sent


async def count_ge(rt: Runtime, sql: str, n: int) -> bool:
    return await count(rt, sql) >= n


async def test_durable_sleep_and_wait_survive_a_sigkill(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'timers.db'}"
    log = tmp_path / "child.log"
    rt = await open_client(store_url)
    child = start_child(store_url, log)
    try:
        sleeper = await rt.start("sleeper", 3.0, id="sleeper")
        waiter = await rt.start("waiter", None, id="waiter")
        await wait_until(lambda: count_ge(rt, "SELECT COUNT(*) FROM ip_journal WHERE kind IN ('sleep', 'wait')", 2),
                         timeout=30)
        kill(child)  # both are now only in the journal
        child = start_child(store_url, log)
        await rt.publish("approval.given", {"by": "alice"}, flow_id=waiter.flow_id)
        assert await waiter.result(timeout=30) == {"by": "alice"}
        slept = await sleeper.result(timeout=30)
        journal = await sleeper.journal()
    finally:
        stop(child)
        await rt.close()
    assert 3.0 <= slept < 10.0  # the timer kept its deadline across the crash, and fired
    assert [(e.kind, e.status) for e in journal if e.kind == "sleep"] == [("sleep", "completed")]
