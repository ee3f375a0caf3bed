"""A Redis outage mid-run: publishers and consumers recover by themselves, nothing is lost.

This test starts its own ``redis-server`` (AOF, ``appendfsync always``) on a free
loopback port, runs the example order flow through it with a SQLite store, stops the
server with SIGTERM partway and starts it again on the same directory a few seconds
later. Every order must complete, and every event must be emitted exactly once:
publishes that failed stay in the outbox and are relayed again; deliveries whose ack
was lost come back after their lease and the inbox skips them.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from interplay import Runtime
from interplay.examples.orders import Order, app
from interplay.testing import wait_until
from interplay.transports.redis import RedisTransport

from ..pg import free_port
from .outage import Record, at_least, count, need_server

pytestmark = pytest.mark.slow

ORDERS = 300
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    need_server(Path(REDIS_SERVER))


class RedisServer:
    """A redis-server process of this test's own, durable (AOF fsync on every write)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                stdout=log, stderr=asyncio.subprocess.STDOUT,
            )
        await wait_until(self.ready, timeout=10, interval=0.02, message="redis-server accepting commands")

    async def ready(self) -> bool:
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            return bool(await client.ping())
        except Exception:  # not listening yet, or still loading its AOF
            return False
        finally:
            await client.aclose()

    async def run_id(self) -> str:
        client = aioredis.Redis.from_url(self.url)
        try:
            return str((await client.info("server"))["run_id"])
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGTERM (redis flushes its AOF and exits), and wait until it is gone."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def outbox_empty(rt: Runtime) -> bool:
    return await count(rt, "SELECT COUNT(*) FROM ip_outbox") == 0


async def all_acked(rt: Runtime) -> bool:
    """Every consumer group has read and acknowledged everything on its streams."""
    assert isinstance(rt.transport, RedisTransport)
    for group, routes in rt.app.topology.routes.items():
        for route in routes:
            for info in await rt.transport.redis.xinfo_groups(rt.transport.stream_key(route)):
                if info["name"] == group.encode() and (info["pending"] or info["lag"]):
                    return False
    return True


COMPLETED = "SELECT COUNT(*) FROM ip_flows WHERE status = 'completed'"


async def test_redis_restart_mid_run_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data)
    store_url = f"sqlite:///{tmp_path / 'orders.db'}"
    options = {"lease": 2.0, "outbox_relay_interval": 0.2, "outbox_grace": 0.5, "shutdown_grace": 2.0}
    flow_ids: list[str] = []
    try:
        await server.start()
        first_run = await server.run_id()
        bus = f"{server.url}?prefix=shop:"
        async with (
            app.run(store=store_url, bus=bus, **options) as workers,
            app.run(store=store_url, bus=bus, services=[], orchestrator=False, **options) as client,
        ):

            async def publish(numbers: range) -> None:
                for chunk in range(numbers.start, numbers.stop, 10):  # ten at a time, concurrently
                    flow_ids.extend(await asyncio.gather(*(
                        client.publish("order.created", Order(id=i, amount=1 + i % 50))
                        for i in range(chunk, min(chunk + 10, numbers.stop))
                    )))

            await publish(range(ORDERS // 3))
            await wait_until(lambda: at_least(workers, COMPLETED, 1), timeout=30, message="orders flowing")
            await server.stop()  # while the services are busy with the first third
            outage = asyncio.get_running_loop().time()
            publishing = asyncio.ensure_future(publish(range(ORDERS // 3, ORDERS)))  # on through the outage
            try:
                await wait_until(
                    lambda: at_least(client, "SELECT COUNT(*) FROM ip_outbox", 1), timeout=30,
                    message="publishes failing into the outbox",
                )
                # A deliberate fault length (not a wait for a condition): a few seconds down.
                await asyncio.sleep(max(0.0, 3.0 - (asyncio.get_running_loop().time() - outage)))
                await server.start()
                await asyncio.wait_for(publishing, 60)  # publishes ride out the outage, never hang
            finally:
                publishing.cancel()
            assert await server.run_id() != first_run  # it really was a new server process

            for flow_id in flow_ids:
                summary = await client.wait_flow(flow_id, timeout=60)
                assert summary.status == "completed", (flow_id, summary)
            await client.settled(timeout=60)
            # A publish cut off by the shutdown can have reached Redis while its caller saw
            # an error (an ambiguous publish): its flow completes, and the relay loop still
            # publishes the outbox row again - a duplicate the inbox must absorb.
            await wait_until(lambda: outbox_empty(client), timeout=30, message="outbox drained")
            await wait_until(lambda: all_acked(client), timeout=30, message="every group acked everything")

            record = await Record.of(client)
            redelivered = await count(client, "SELECT COUNT(*) FROM ip_spans WHERE attempt > 1")
    finally:
        await server.stop()
    warnings = [r.getMessage() for r in caplog.records]
    print(f"{sum('receive failed' in w for w in warnings)} failed receives, "
          f"{sum('publish failed' in w for w in warnings)} failed publishes, {redelivered} redelivered handlings")
    # Both sides felt the outage, and got over it by themselves.
    assert any("publish failed" in w for w in warnings)
    for service in ("payments", "shipping", "notification"):
        assert any(w.startswith(f"{service}: receive failed") for w in warnings), service
    assert len(flow_ids) == ORDERS
    record.assert_each_order_once(ORDERS)
