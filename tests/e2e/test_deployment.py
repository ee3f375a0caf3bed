"""The seed's microservices really run apart: one process per service, on each bus.

Four ``interplay run`` processes (payments; shipping; notification; orders + delivery +
the orchestrator) share a bus and a store. The test pushes 1,000 orders through both
styles (500 choreographed, 500 ``process_order`` workflows), SIGKILLs the shipping
process halfway and restarts it, then checks that every order completed and every
message was handled exactly once by each service (inbox counts), and each event was
emitted once per flow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from interplay import Runtime
from interplay.examples.orders import Order, app
from interplay.testing import wait_until

from ..servers import require

pytestmark = pytest.mark.slow

ORDERS = 500  # per style
PROCESSES = {
    "payments": ["--service", "payments", "--no-orchestrator"],
    "shipping": ["--service", "shipping", "--no-orchestrator"],
    "notification": ["--service", "notification", "--no-orchestrator"],
    "core": ["--service", "orders", "--service", "delivery"],
}


@pytest.fixture(params=["store", "redis", "amqp", "nats"])
def bus(request: pytest.FixtureRequest) -> Iterator[str | None]:
    tag = uuid.uuid4().hex[:10]
    name = str(request.param)
    if name == "store":
        yield None
        return
    require(name)
    yield {
        "redis": f"redis://127.0.0.1:6379/0?prefix=ipdeploy{tag}:",
        "amqp": f"amqp://guest:guest@127.0.0.1:5672/?exchange=ipdeploy{tag}",
        "nats": f"nats://127.0.0.1:4222?stream=IPDEPLOY{tag}",
    }[name]


def spawn(name: str, store: str, bus: str | None, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "interplay", "run", "interplay.examples.orders:app", "--store", store,
            "--lease", "2", "--run-lease", "2", *PROCESSES[name]]
    if bus is not None:
        args += ["--bus", bus]
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def completed(rt: Runtime) -> int:
    flows = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'")[0])
    return int(flows)


async def test_services_in_separate_processes_survive_a_sigkill(tmp_path: Path, bus: str | None) -> None:
    store = f"sqlite:///{tmp_path / 'shop.db'}"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    async with app.run(store=store, bus=bus, services=[], orchestrator=False) as rt:
        try:
            for name in PROCESSES:
                procs[name] = spawn(name, store, bus, tmp_path / f"{name}.log")
            flows = await asyncio.gather(*(
                rt.publish("order.created", Order(id=i, amount=5 + i % 7)) for i in range(ORDERS)
            ))
            runs = await asyncio.gather(*(
                rt.start("process_order", Order(id=ORDERS + i)) for i in range(ORDERS)
            ))
            await wait_until(lambda: _at_least(rt, ORDERS // 2), timeout=120, interval=0.01)
            procs["shipping"].send_signal(signal.SIGKILL)
            procs["shipping"].wait(timeout=10)
            at_kill = await completed(rt)
            procs["shipping"] = spawn("shipping", store, bus, tmp_path / "shipping.log")
            # Up again before anything is judged (and before the SIGTERM at the end,
            # which during its start-up would find Python's default handler).
            await wait_until(lambda: _hosting(tmp_path / "shipping.log", 2), timeout=60, interval=0.05,
                             message="the restarted shipping process hosting its service")
            for fid in flows:
                assert (await rt.wait_flow(fid, timeout=120)).status == "completed"
            results = await asyncio.gather(*(h.result(timeout=120) for h in runs))
            await rt.settled(timeout=60)
            inbox = dict(await rt.store.read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp")))
            twice = await rt.store.read(lambda tx: tx.all(
                "SELECT flow_id, type, COUNT(*) FROM ip_messages WHERE kind IN ('event', 'command') "
                "GROUP BY flow_id, type HAVING COUNT(*) > 1"))
            dead = await rt.dlq()
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(timeout=30)
    assert at_kill < 2 * ORDERS, "everything was done before the kill: the test proved nothing"
    assert results == [f"order {ORDERS + i} shipped" for i in range(ORDERS)]
    # each service handled each of its messages once: events of 500 flows + commands of 500 runs
    assert inbox == {"payments": 2 * ORDERS, "shipping": 2 * ORDERS, "notification": 2 * ORDERS}
    assert twice == []
    assert dead == []
    assert all(proc.returncode == 0 for name, proc in procs.items()), {n: p.returncode for n, p in procs.items()}


async def _at_least(rt: Runtime, n: int) -> bool:
    return await completed(rt) >= n


def _hosting(log: Path, times: int) -> bool:
    """The process(es) logging to ``log`` said ``hosting ...`` at least ``times`` times."""
    return log.read_text(errors="replace").count("hosting") >= times
