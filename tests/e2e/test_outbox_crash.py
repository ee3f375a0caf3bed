"""Outbox: SIGKILL between commit and relay - the message is still published, once.

A child process (``interplay run``, PostgreSQL store, broker bus) handles ``ORDERS``
orders: each handling commits its inbox mark and the event it emits (to ``ip_outbox``)
in one transaction, and then publishes the event. Here the broker refuses that child's
publishes of the event - a Redis ACL user without XADD, a NATS user denied the event's
subject - so its publishing never happens, and the rows sit committed in the outbox:
the state of a process that dies between the commit and the publish. The child is
SIGKILLed in that state, having published none of them.

Then the process is started again (the same app, on a bus account that may publish).
No handling is redone (every order is in the inbox already): only the outbox relay can
get the events out. Every event must reach the broker once (counted on the broker:
entries ever added to the Redis stream, messages stored on the NATS subject), the
consumer must handle each once, and the outbox must end empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from interplay import Runtime
from interplay.testing import wait_until

from ..buses import delete_redis_keys, server_url
from ..pg import free_port
from ..servers import require
from .outage import need_server
from .outbox_app import Order, app
from .test_nats_broker_outage import NATS_SERVER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ORDERS = 200
EVENT_ROUTE = "event.order.accepted"


@dataclass
class Broker:
    """A broker for one test: a bus URL that may publish, and one that may not publish the event."""

    working: str
    blocked: str
    published: Callable[[str], Awaitable[int]]
    """How many messages were ever published on a route (counted by the broker)."""


@contextlib.asynccontextmanager
async def redis_broker() -> AsyncIterator[Broker]:
    """The test Redis, under a key prefix of its own; a user of it that may not XADD."""
    import redis.asyncio as aioredis

    require("redis")
    prefix = f"iptest:{uuid.uuid4().hex[:12]}:"
    user, password = f"iptest-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    admin = aioredis.Redis.from_url(server_url("redis"))
    # Everything on the test's keys except XADD: it consumes, acks and declares, it cannot publish.
    await admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{prefix}*", "&*",
                                "+@all", "-xadd")

    async def published(route: str) -> int:
        # entries-added: every XADD ever, whatever trimming removed since.
        return int((await admin.xinfo_stream(prefix + route))["entries-added"])

    try:
        yield Broker(
            working=f"{server_url('redis')}/0?prefix={prefix}",
            blocked=f"redis://{user}:{password}@127.0.0.1:6379/0?prefix={prefix}",
            published=published,
        )
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()
        await delete_redis_keys(prefix)


@contextlib.asynccontextmanager
async def nats_broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A nats-server of the test's own (JetStream) with two users: one is denied the event's subject."""
    import nats

    need_server(NATS_SERVER)
    port, stream = free_port(), "OUTBOX"
    subject = f"{stream}.{EVENT_ROUTE}"  # the subjects of a named stream start with its name
    config = tmp_path / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'jetstream {{ store_dir: "{tmp_path / "jetstream"}" }}\n'
        "authorization { users: [\n"
        "  { user: relay, password: relay }\n"
        f'  {{ user: stuck, password: stuck, permissions: {{ publish: {{ deny: ["{subject}"] }} }} }}\n'
        "] }\n"
    )
    log = tmp_path / "nats-server.log"
    server = spawn([str(NATS_SERVER), "-c", str(config)], log)
    admin = None
    try:
        await wait_until(lambda: "Server is ready" in tail(log, 1 << 20), timeout=15, message="nats-server ready")
        admin = await nats.connect(f"nats://relay:relay@127.0.0.1:{port}")

        async def published(route: str) -> int:
            info = await admin.jetstream().stream_info(stream, subjects_filter=f"{stream}.{route}")
            return int((info.state.subjects or {}).get(f"{stream}.{route}", 0))

        options = f"@127.0.0.1:{port}?stream={stream}&timeout=1&reconnect_wait=0.1"
        yield Broker(working=f"nats://relay:relay{options}", blocked=f"nats://stuck:stuck{options}",
                     published=published)
    finally:
        if admin is not None:
            await admin.close()
        server.terminate()
        server.wait(timeout=10)



def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text()[-chars:] if log.exists() else ""


def interplay_run(store: str, bus: str, log: Path, *services: str) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-m", "interplay", "run", "tests.e2e.outbox_app:app", "--store", store,
                  "--bus", bus, "--no-orchestrator", "--lease", "2", "--log-level", "INFO",
                  *(f"--service={s}" for s in services)], log)


async def count(rt: Runtime, sql: str) -> int:
    return int(await rt.store.read(lambda tx: tx.one(sql)[0]))


def reaches(rt: Runtime, sql: str, n: int, proc: subprocess.Popen[bytes], log: Path) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}): {tail(log)}")
        return await count(rt, sql) >= n

    return check


HANDLED = "SELECT COUNT(*) FROM ip_inbox WHERE grp = '{}'"
LEFT = f"SELECT COUNT(*) FROM ip_outbox WHERE route = '{EVENT_ROUTE}'"


@pytest.mark.parametrize("broker_name", ["redis", "nats"])
async def test_sigkill_between_commit_and_relay_still_publishes_once(
    broker_name: str, pg_url: str, tmp_path: Path
) -> None:
    broker_cm = redis_broker() if broker_name == "redis" else nats_broker(tmp_path)
    async with broker_cm as broker:
        # The test's own runtime publishes the orders and watches the store. Its relay
        # loop must leave the child's rows alone (a grace longer than the test), so that
        # only the restarted process can relay them.
        client = app.run(store=pg_url, bus=broker.working, services=[], orchestrator=False, outbox_grace=3600.0)
        await client.open()
        children: list[subprocess.Popen[bytes]] = []
        try:
            assert client.delivery_mode == "outbox"
            for start in range(0, ORDERS, 50):
                await asyncio.gather(*(client.publish("order.placed", Order(id=i))
                                       for i in range(start, min(start + 50, ORDERS))))
            first_log = tmp_path / "first.log"
            first = interplay_run(pg_url, broker.blocked, first_log, "orders")
            children.append(first)
            await wait_until(reaches(client, HANDLED.format("orders"), ORDERS, first, first_log), timeout=45,
                             message="every order handled by the first process")
            await wait_until(reaches(client, LEFT, ORDERS, first, first_log), timeout=20,
                             message="every event committed to the outbox")
            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
            assert "publish failed" in tail(first_log, 1 << 20)  # it tried, and the broker refused
            assert await broker.published(EVENT_ROUTE) == 0, "an event got out before the kill: nothing to prove"
            assert await count(client, LEFT) == ORDERS

            again_log = tmp_path / "again.log"
            again = interplay_run(pg_url, broker.working, again_log)  # restarted, every service
            children.append(again)
            await wait_until(reaches(client, HANDLED.format("audit"), ORDERS, again, again_log), timeout=45,
                             message="every relayed event handled")
            await wait_until(lambda: _equals(count(client, LEFT), 0), timeout=20, message="outbox drained")
            published = await broker.published(EVENT_ROUTE)
            handled = {g: await count(client, HANDLED.format(g)) for g in ("orders", "audit")}
            emitted = await count(client, "SELECT COUNT(*) FROM ip_messages WHERE type = 'order.accepted'")
            spans = await count(client, "SELECT COUNT(*) FROM ip_spans WHERE service = 'audit' AND outcome = 'ok'")
            dead = await client.dlq()
            again.send_signal(signal.SIGTERM)
            assert again.wait(timeout=30) == 0, tail(again_log)
        finally:
            for proc in children:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
            await client.close()
    assert published == ORDERS  # each event once on the broker
    assert handled == {"orders": ORDERS, "audit": ORDERS}
    assert spans == ORDERS  # each relayed event handled once
    assert emitted == ORDERS
    assert dead == []


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
