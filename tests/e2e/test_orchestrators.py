"""Many orchestrators on PostgreSQL: they share the runs, survive one dying, never double up.

Three ``interplay run`` processes (each hosting the services and running workflows)
share one PostgreSQL store. 2,000 runs are started; one process is SIGKILLed mid-run
and not restarted. The two survivors take its runs over when their leases lapse.
Every run must complete; each transactional step's row must exist exactly once; each
command must be handled once per run; each run's journal must hold exactly its four
steps. A durable timer with three orchestrators up must fire exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from interplay import Runtime
from interplay.testing import wait_until

from .crash_app import Order, app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUNS = 2000



def orchestrator(store: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "interplay", "run", "tests.e2e.crash_app:app", "--store", store,
             "--lease", "2", "--run-lease", "1.5"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def count(rt: Runtime, sql: str) -> int:
    return int(await rt.store.read(lambda tx: tx.one(sql)[0]))


async def client(store: str) -> Runtime:
    rt = app.run(store=store, services=[], orchestrator=False)
    await rt.open()
    await rt.store.write(lambda tx: tx.execute("CREATE TABLE IF NOT EXISTS effects (run_id TEXT, step TEXT)"))
    return rt


def stop_all(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return [proc.wait(timeout=30) for proc in procs]


async def test_three_orchestrators_one_killed_every_run_once(tmp_path: Path, pg_url: str) -> None:
    rt = await client(pg_url)
    procs = [orchestrator(pg_url, tmp_path / f"orch{i}.log") for i in range(3)]
    try:
        await _all_up(rt, 3)
        handles = await asyncio.gather(*(rt.start("order", Order(id=i), id=f"order-{i}") for i in range(RUNS)))
        await wait_until(lambda: _completed_at_least(rt, RUNS // 3), timeout=120, interval=0.01)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        killed_at = await count(rt, "SELECT COUNT(*) FROM ip_runs WHERE status = 'completed'")
        results = await asyncio.gather(*(h.result(timeout=180) for h in handles))
        owners = await rt.store.read(lambda tx: tx.all(
            "SELECT COUNT(DISTINCT owner) FROM ip_runs WHERE owner IS NOT NULL"))
        effects = await rt.store.read(lambda tx: tx.all(
            "SELECT step, COUNT(*), COUNT(DISTINCT run_id) FROM effects GROUP BY step ORDER BY step"))
        inbox = dict(await rt.store.read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp")))
        journals = await rt.store.read(lambda tx: tx.all(
            "SELECT string_agg(kind || ':' || status, ',' ORDER BY seq), COUNT(*) FROM ip_journal GROUP BY run_id"))
        commands = await count(rt, "SELECT COUNT(*) FROM ip_messages WHERE kind = 'command'")
    finally:
        codes = stop_all(procs[1:])
        await rt.close()
    assert killed_at < RUNS, "everything was done before the kill: the test proved nothing"
    assert results == [f"r-{i}" for i in range(RUNS)]
    assert effects == [("reserve", RUNS, RUNS), ("shipped", RUNS, RUNS)]  # each transactional step once
    assert inbox == {"payments": RUNS, "shipping": RUNS}  # each command handled once per run
    assert commands == 2 * RUNS  # a re-sent command keeps its id
    assert {j for j, _ in journals} == {"step:completed,call:completed,call:completed,step:completed"}
    assert {n for _, n in journals} == {4}
    assert owners == [(0,)]  # finished runs hold no lease
    assert codes == [0, 0]


async def _all_up(rt: Runtime, n: int) -> None:
    """Every orchestrator process holds its lease: up, and past Python's default SIGTERM."""
    async def up() -> bool:
        return await count(rt, "SELECT COUNT(*) FROM ip_leases") >= n

    await wait_until(up, timeout=60, interval=0.05, message=f"{n} orchestrators up")


async def _completed_at_least(rt: Runtime, n: int) -> bool:
    return await count(rt, "SELECT COUNT(*) FROM ip_runs WHERE status = 'completed'") >= n


async def test_a_timer_fires_once_with_three_orchestrators(tmp_path: Path, pg_url: str) -> None:
    rt = await client(pg_url)
    procs = [orchestrator(pg_url, tmp_path / f"orch{i}.log") for i in range(3)]
    try:
        await _all_up(rt, 3)
        handles = [await rt.start("sleeper", 1.0, id=f"sleeper-{i}") for i in range(30)]
        slept = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        timers = await rt.store.read(lambda tx: tx.all(
            "SELECT run_id, COUNT(*) FROM ip_journal WHERE kind = 'sleep' GROUP BY run_id"))
        starts = await rt.store.read(lambda tx: tx.all(
            "SELECT COUNT(*) FROM ip_spans WHERE msg_id LIKE 'run:%' GROUP BY msg_id"))
    finally:
        codes = stop_all(procs)
        await rt.close()
    assert all(1.0 <= s < 10 for s in slept)
    assert len(timers) == 30
    assert {n for _, n in timers} == {1}  # one timer per run, fired once
    assert {n for (n,) in starts} == {1}  # each run ended once
    assert codes == [0, 0, 0]
