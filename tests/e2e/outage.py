"""A broker restart mid-run, the same for every broker whose server a test runs itself.

The order flow (interplay.examples.orders) runs on a broker server of the test's own,
with a SQLite store. While it is busy the server is stopped; orders published during
the outage stay in the store's outbox; the server comes back on the same port and data
directory. Without any help from the test, publishers and consumers must recover: every
order completes, nothing is lost, every event is emitted exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from interplay import Runtime
from interplay.examples.orders import Order, app
from interplay.testing import wait_until

from ..servers import IN_CI

BEFORE = 300  # orders published while the server runs
DURING = 50  # orders published while it is down
OPTIONS: dict[str, Any] = {"lease": 2.0, "outbox_grace": 0.5, "outbox_relay_interval": 0.2}
"""Short leases and relays keep the recovery within the test's time."""


class ServerProcess:
    """A broker server process of the test's own, restartable on the same port and data.

    Subclasses set ``command`` (and ``env``, ``ready_line``, ...) before :meth:`start`;
    the server's output goes to ``log``, where ``ready_line`` appears once per start.
    """

    command: list[str]
    env: dict[str, str] | None = None
    ready_line: str
    own_session = False  # its own process group, stopped as a whole (a wrapper script and its VM)
    stop_timeout = 10.0  # seconds a clean shutdown may take before SIGKILL

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=self.own_session
            )
        self.starts += 1

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.command[0]} exited: {self.log.read_text()[-2000:]}")
        return self.log.read_text().count(self.ready_line) >= self.starts

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.own_session and not self._group_gone(self.stop_timeout):
            # The wrapper script can exit on SIGTERM while the server it started is still
            # shutting down, its port open and its node name taken: a start then fails.
            self._signal(signal.SIGKILL)
            if not self._group_gone(10):
                raise RuntimeError(f"{self.command[0]}'s processes outlived SIGKILL")

    def _group_gone(self, timeout: float) -> bool:
        """Whether every process of the server's group has exited within ``timeout`` s."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.own_session:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)


class Reconnecting(Protocol):
    """What the test reads off the transport: the connection's state, and its reconnects."""

    @property
    def connected(self) -> bool: ...
    @property
    def reconnects(self) -> int: ...


def need_server(binary: Path) -> None:
    """Skip (locally) or fail (in CI) when the broker's server binary is not installed."""
    if not os.access(binary, os.X_OK):
        if IN_CI:
            pytest.fail(f"{binary} is not installed, and CI is set: tests may not skip for a missing service")
        pytest.skip(f"{binary} is not installed")


async def restart_mid_run(server: ServerProcess, bus: str, store: Path, *, startup: float = 15) -> None:
    """Run the scenario on ``bus`` (served by ``server``, started; stopped on return) and
    check the outcome.

    ``bus`` should time publishes out quickly, so that those during the outage end up in
    the outbox instead of waiting for the server.
    """
    try:
        await wait_until(server.ready, timeout=startup, message="broker ready")
        async with app.run(bus=bus, store=f"sqlite:///{store}", **OPTIONS) as rt:
            transport: Reconnecting = rt.transport  # type: ignore[assignment]
            flow_ids = list(await asyncio.gather(
                *(rt.publish("order.created", Order(id=i, amount=1 + i % 50)) for i in range(BEFORE))
            ))
            completed = "SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'"
            await wait_until(lambda: at_least(rt, completed, BEFORE // 10), timeout=30, interval=0.002)

            server.stop()
            done_at_stop = await count(rt, completed)
            await wait_until(lambda: not transport.connected, message="runtime noticed the outage")
            flow_ids += await asyncio.gather(
                *(rt.publish("order.created", Order(id=i, amount=5)) for i in range(BEFORE, BEFORE + DURING))
            )
            stranded = await count(rt, "SELECT COUNT(*) FROM ip_outbox")

            server.start()  # same port, same data directory
            await wait_until(server.ready, timeout=startup, message="broker ready again")
            for flow_id in flow_ids:
                summary = await rt.wait_flow(flow_id, timeout=30)
                assert summary.status == "completed", summary
            await wait_until(lambda: at_most(rt, "SELECT COUNT(*) FROM ip_outbox", 0), timeout=30,
                             message="outbox drained")
            # every handling came to an end: none hangs on a settle the outage cut off,
            # holding one of its service's prefetch slots for good
            await wait_until(lambda: not any(c.inflight for c in rt.consumers.values()), timeout=10,
                             message="no handler left in flight")

            record = await Record.of(rt)
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
    record.assert_each_order_once(total)


@dataclass
class Record:
    """What the store recorded of the order flow, read before the runtime closes."""

    duplicated: list[Any]  # (flow, type) emitted more than once
    per_type: dict[str, int]  # messages recorded per type
    inbox: dict[str, int]  # messages handled per service
    dead: list[Any]

    @classmethod
    async def of(cls, rt: Runtime) -> Record:
        read = rt.store.read
        return cls(
            duplicated=await read(lambda tx: tx.all(
                "SELECT flow_id, type, COUNT(*) FROM ip_messages GROUP BY flow_id, type HAVING COUNT(*) > 1"
            )),
            per_type=dict(await read(lambda tx: tx.all("SELECT type, COUNT(*) FROM ip_messages GROUP BY type"))),
            inbox=dict(await read(lambda tx: tx.all("SELECT grp, COUNT(*) FROM ip_inbox GROUP BY grp"))),
            dead=list(await rt.dlq()),
        )

    def assert_each_order_once(self, total: int) -> None:
        """Every one of ``total`` orders went through each hop exactly once, none dead."""
        assert self.duplicated == [], "an event was emitted more than once"
        assert self.per_type == {
            "order.created": total, "payment.completed": total, "shipment.prepared": total,
            "customer.notified": total,
        }
        assert self.inbox == {"payments": total, "shipping": total, "notification": total}
        assert self.dead == []


async def count(rt: Runtime, sql: str) -> int:
    return int(await rt.store.read(lambda tx: tx.one(sql)[0]))


async def at_least(rt: Runtime, sql: str, n: int) -> bool:
    return await count(rt, sql) >= n


async def at_most(rt: Runtime, sql: str, n: int) -> bool:
    return await count(rt, sql) <= n
