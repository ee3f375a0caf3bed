"""Broker outage on NATS JetStream: stop the server mid-run, restart it, check everything.

The test runs its own ``nats-server -js`` on a free loopback port with its own store
directory. While the order flow (interplay.examples.orders) is busy, the server is
stopped; orders published during the outage stay in the store's outbox; the server
comes back on the same directory. Without any help from the test, publishers and
consumers must recover: every order completes, nothing is lost, and every event is
emitted exactly once.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from interplay import Runtime
from interplay.examples.orders import Order, app
from interplay.testing import wait_until
from interplay.transports.nats import NatsTransport

from ..servers import IN_CI

pytestmark = pytest.mark.slow

BEFORE = 300  # orders published while the server runs
DURING = 50  # orders published while it is down
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def need_nats_server() -> None:
    """Skip (locally) or fail (in CI) when there is no nats-server binary to start."""
    if not Path(NATS_SERVER).exists():
        if IN_CI:
            pytest.fail(f"{NATS_SERVER} is not installed, and CI is set")
        pytest.skip(f"{NATS_SERVER} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server process with JetStream, restartable on the same port and store."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.store_dir = tmp_path / "jetstream"
        self.log = tmp_path / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
        return self.log.read_text().count("Server is ready") >= self.starts

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


async def count(rt: Runtime, sql: str) -> int:
    return int(await rt.store.read(lambda tx: tx.one(sql)[0]))


async def test_server_restart_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    need_nats_server()
    server = NatsServer(tmp_path)
    server.start()
    try:
        await wait_until(server.ready, timeout=15, message="nats-server ready")
        # A short publish timeout, so publishes during the outage end up in the outbox
        # instead of waiting for the server; fast reconnects and relays keep the test short.
        bus = f"nats://127.0.0.1:{server.port}?stream=OUTAGE&timeout=1&reconnect_wait=0.1"
        options = {"lease": 2.0, "outbox_grace": 0.5, "outbox_relay_interval": 0.2}
        async with app.run(bus=bus, store=f"sqlite:///{tmp_path / 'orders.db'}", **options) as rt:
            assert isinstance(rt.transport, NatsTransport)
            transport = rt.transport
            flow_ids = list(await asyncio.gather(
                *(rt.publish("order.created", Order(id=i, amount=1 + i % 50)) for i in range(BEFORE))
            ))
            completed = "SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'"
            await wait_until(lambda: _at_least(rt, completed, BEFORE // 10), timeout=30, interval=0.002)

            server.stop()
            done_at_stop = await count(rt, completed)
            await wait_until(lambda: not transport.connected, message="runtime noticed the outage")
            flow_ids += await asyncio.gather(
                *(rt.publish("order.created", Order(id=i, amount=5)) for i in range(BEFORE, BEFORE + DURING))
            )
            stranded = await count(rt, "SELECT COUNT(*) FROM ip_outbox")

            server.start()  # same port, same store directory
            await wait_until(server.ready, timeout=15, message="nats-server ready again")
            for flow_id in flow_ids:
                summary = await rt.wait_flow(flow_id, timeout=30)
                assert summary.status == "completed", summary
            await wait_until(lambda: _at_most(rt, "SELECT COUNT(*) FROM ip_outbox", 0), timeout=30,
                             message="outbox drained")

            duplicated = await rt.store.read(lambda tx: tx.all(
                "SELECT flow_id, type, COUNT(*) FROM ip_messages GROUP BY flow_id, type HAVING COUNT(*) > 1"
            ))
            per_type = dict(await rt.store.read(
                lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type")
            ))
            inbox = dict(await rt.store.read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp")))
            dead = await rt.dlq()
            redelivered = await count(rt, "SELECT COUNT(*) FROM ip_spans WHERE attempt > 1")
            reconnects = transport.reconnects
    finally:
        server.stop()
    total = BEFORE + DURING
    print(f"stopped with {done_at_stop}/{BEFORE} flows done; {stranded} publishes waited in the outbox; "
          f"{redelivered} handlings were redeliveries")
    assert done_at_stop < BEFORE, "every flow finished before the outage: the test proved nothing"
    assert stranded > 0, "no publish met the outage: the test proved nothing"
    assert reconnects >= 1
    assert duplicated == [], "an event was emitted more than once"
    assert per_type == {
        "order.created": total, "payment.completed": total, "shipment.prepared": total,
        "customer.notified": total,
    }
    assert inbox == {"payments": total, "shipping": total, "notification": total}
    assert dead == []


async def _at_least(rt: Runtime, sql: str, n: int) -> bool:
    return await count(rt, sql) >= n


async def _at_most(rt: Runtime, sql: str, n: int) -> bool:
    return await count(rt, sql) <= n
