"""interplay on real brokers, side by side with its peers on Redis, in one run.

Choreography - the 3-hop order flow (payment -> shipping -> notification), N orders,
``--concurrency`` in flight at most; orders/s and p50/p99 flow latency (publish ->
notification handled):

* ``interplay redis://`` / ``amqp://`` / ``nats://``: every service and the client in
  one process on the broker, a SQLite store file per variant (``synchronous=full``;
  tracing, the inbox and the outbox on, as always);
* ``interplay amqp:// pack=1``: as ``amqp://`` with packs off (``?pack=1``): every message
  its own AMQP message, to show what packs save;
* ``interplay sqlite bus``: the embedded default, the store's own queue;
* ``interplay redis:// apart``: as ``redis://``, but payments and shipping each run in
  an ``interplay run benchmarks.bench_app:choreography --service S`` process of its own
  on the same store file (the notification service stays with the client, which
  measures): the one-machine deployment, using both cores; ``cpu ms`` adds theirs;
* ``interplay amqp:// apart``: the same on RabbitMQ (its target: within 2x of Redis apart);
* ``faststream redis``: FastStream's ``RedisBroker``, one ``StreamSub`` consumer group
  per service, the handler's return value published by ``@broker.publisher`` to the
  next stream, ack after the handler (FastStream's defaults otherwise: one message at
  a time per subscriber; per-message logging off, as interplay logs nothing per
  message; the client publishes 50 at a time, as each concurrent publish holds one of
  the 100 connections of redis-py's pool);
* ``redis-py loop``: bare redis-py (sync), one order at a time, every command its own
  round trip: XADD, then per hop XREADGROUP, XACK, XADD to the next stream;
* ``redis-py batched``: the same hops ``--batch`` orders at a time (pipelined XADDs
  and XACKs, one XREADGROUP per hop) - a ceiling, with nothing durable around it.
* ``aio-pika batched``: bare aio-pika on RabbitMQ with the broker-side durability of
  interplay's ``amqp://``: a durable topic exchange, a durable quorum queue per hop,
  persistent ``mandatory`` messages, publisher confirms. The client and each service
  have a channel of their own (confirms on, ``--prefetch`` unacked at most); a service's
  consumer callback only buffers, and what is buffered is handled as one batch: its
  publishes to the next hop gathered, each awaiting its confirm, then one ``multiple``
  ack of its last delivery tag once the batches before it are acked (two batches in
  flight, the next one gathering meanwhile). Durable on the broker, with nothing around
  it: no store, no inbox or outbox, no tracing, no retries or dead-lettering, no
  reconnects (a plain connection, not a robust one); each publish its own write (aio-pika's
  API), where interplay writes a batch of them at once.

Orchestration - a workflow of three ``ctx.call`` commands to three services,
``--inflight`` runs at once; runs/s and p50/p99 (start -> result):

* ``interplay redis://`` / ``amqp://`` / ``nats://`` / ``sqlite bus`` as above;
* ``interplay redis:// apart``: stock, payments and shipping each in an
  ``interplay run`` process of its own, the workflows with the client;
* ``interplay amqp:// apart``: the same on RabbitMQ;
* ``celery redis``: a chain of three tasks on a Redis broker; a worker subprocess
  (prefork, ``--celery-concurrency`` children); the last task pushes the order id to a
  Redis list that the client pops (no result backend: the cheapest way to learn a
  chain finished).

Each variant runs in its own process, one after the other. Keys, streams, queues and
exchanges are named uniquely per run and deleted afterwards. Ratios are against
FastStream (choreography) and Celery (orchestration) measured in the same run.
``cpu ms`` is the CPU time per order (run) of the variant's own process(es), every
thread; ``srv ms`` the broker server's meanwhile (Linux /proc; it counts every client
of that server). cpu ms x rate near 1000 means one core is saturated: the event loop
is the bottleneck, not the broker. ``--profile DIR`` records each variant with py-spy
(raw collapsed stacks, one per thread: the event loop vs the store's writer thread).

    python benchmarks/brokers.py                      # everything, ~1.5 minutes on 2 cores
    python benchmarks/brokers.py --only redis         # the variants whose name has "redis"
    python benchmarks/brokers.py --only choreography --orders 20000
    python benchmarks/brokers.py --only "orchestration: interplay redis" --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_app import Order

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
NATS = "nats://127.0.0.1:4222"
BUSES = {"redis://": "redis", "amqp://": "amqp", "amqp:// pack=1": "amqp pack=1", "nats://": "nats",
         "sqlite bus": "sqlite"}

APART = "interplay redis:// apart"
"""The services in processes of their own (``interplay run``) on the same store file."""
APARTS = {APART: "redis", "interplay amqp:// apart": "amqp"}
CHOREOGRAPHY = [f"choreography: interplay {b}" for b in BUSES] + [f"choreography: {a}" for a in APARTS] + [
    "choreography: faststream redis", "choreography: redis-py loop",
    "choreography: redis-py batched", "choreography: aio-pika batched"]
ORCHESTRATION = [f"orchestration: interplay {b}" for b in BUSES] + [f"orchestration: {a}" for a in APARTS] + [
    "orchestration: celery redis"]
VARIANTS = CHOREOGRAPHY + ORCHESTRATION
CHOREOGRAPHY_PEER = "choreography: faststream redis"
ORCHESTRATION_PEER = "orchestration: celery redis"

CHOREOGRAPHY_TARGET = 2000.0  # orders/s, interplay on Redis
ORCHESTRATION_TARGET = 1000.0  # runs/s with 100 in flight, interplay on Redis
# What the issue measured when it set those targets: the one-round-trip redis-py loop 780
# orders/s (the steadiest gauge of the machine's speed: no framework in it), FastStream
# 280-340 orders/s, Celery 57-80 chains/s. The machine's speed moves from day to day, so the
# report scales the targets by how fast the loop ran in this very run.
LOOP_CALIBRATION = 780.0
PEER_CALIBRATION = {"choreography: faststream redis": 310.0, "orchestration: celery redis": 68.5}


def quantiles(latencies: list[float]) -> dict[str, float]:
    lat = sorted(latencies)
    return {"p50": statistics.median(lat) * 1000, "p99": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000}


def result(count: int, latencies: list[float], measured: Measured, cpu: float | None = None,
           **extra: Any) -> dict[str, Any]:
    """``cpu``: CPU seconds the measured part took (default: every thread of this process)."""
    cpu = measured.cpu if cpu is None else cpu
    per = {"cpu_ms": cpu / count * 1000, "server_cpu_ms": measured.server_cpu / count * 1000}
    return {"count": count, "rate": count / measured.elapsed, **quantiles(latencies),
            **{k: v for k, v in per.items() if v == v}, **extra}


SERVERS = {"redis": ("redis-server", "6379"), "amqp": ("beam.smp", ""), "nats": ("nats-server", "4222")}
server: str | None = None
"""The broker server whose CPU time the measured part reports (a key of SERVERS)."""


class Measured:
    """Wall and CPU time of the measured part (``with Measured() as m: ...``), and the
    CPU time the broker's server process used meanwhile (for every client it has)."""

    def __enter__(self) -> Measured:
        self.server_began = server_cpu()
        self.began, self.cpu_began = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.began
        self.cpu = time.process_time() - self.cpu_began
        self.server_cpu = server_cpu() - self.server_began


def server_cpu() -> float:
    """CPU seconds used so far by the broker server on this machine (Linux /proc; NaN if unknown)."""
    if server is None:
        return float("nan")
    comm, port = SERVERS[server]
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == comm and \
                    port in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(proc.name)
        except OSError:
            continue
    return sum(process_tree_cpu(int(pid), children=False) for pid in pids) if pids else float("nan")


async def drive(n: int, concurrency: int, publish: Callable[[int], Awaitable[Any]],
                done: dict[int, asyncio.Future[float]], first: int = 0) -> tuple[Measured, list[float]]:
    """Publish orders first..first+n-1, at most ``concurrency`` in flight; times and latencies."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with slots:
            done[i] = loop.create_future()
            start = time.perf_counter()
            await publish(i)
            finished = await asyncio.wait_for(done[i], 120)
            latencies.append(finished - start)
            del done[i]

    with Measured() as measured:
        await asyncio.gather(*(one(i) for i in range(first, first + n)))
    return measured, latencies


def finish(done: dict[int, asyncio.Future[float]], i: int) -> None:
    fut = done.get(i)
    if fut is not None and not fut.done():
        fut.set_result(time.perf_counter())


# --- where each bus lives, and how to clean up after it -----------------------------
class Bus:
    """A uniquely named place on one broker, deleted by :meth:`cleanup`."""

    def __init__(self, kind: str) -> None:
        kind, _, self.options = kind.partition(" ")  # "amqp pack=1": URL options after the kind
        self.kind = kind
        self.uid = uuid.uuid4().hex[:10]
        self.transports: list[Any] = []
        self.groups: set[str] = set()
        """Groups only other processes declared (their queues are deleted too)."""

    @property
    def url(self) -> str | None:
        if self.kind == "redis":
            return f"{REDIS}?prefix=ipbench:{self.uid}:"
        if self.kind == "amqp":
            return f"{AMQP}?exchange=ipbench-{self.uid}" + (f"&{self.options}" if self.options else "")
        if self.kind == "nats":
            return f"{NATS}?stream=IPBENCH_{self.uid}"
        return None  # the store's own queue

    async def cleanup(self) -> None:
        if self.kind == "redis":
            await delete_redis_keys(f"ipbench:{self.uid}:")
        elif self.kind == "amqp":
            import aio_pika

            connection = await aio_pika.connect(AMQP)
            try:
                channel = await connection.channel()
                for group in sorted(self.groups):
                    await channel.queue_delete(f"ipbench-{self.uid}.{group}")
                for t in self.transports:
                    for name in sorted(t.declared_queues):
                        await channel.queue_delete(name)
                    for name in sorted(t.declared_exchanges):
                        await channel.exchange_delete(name)
            finally:
                await connection.close()
        elif self.kind == "nats":
            import nats

            nc = await nats.connect(NATS)
            try:
                with contextlib.suppress(Exception):
                    await nc.jsm().delete_stream(f"IPBENCH_{self.uid}")
            finally:
                await nc.close()


async def delete_redis_keys(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start:start + 500])
    finally:
        await client.aclose()


def store_url(tmp: Path, synchronous: str) -> str:
    return f"sqlite:///{tmp / 'store.db'}" + ("" if synchronous == "full" else f"?synchronous={synchronous}")


# --- interplay -----------------------------------------------------------------------
async def interplay_choreography(kind: str, store: str, n: int, concurrency: int,
                                 apart: bool = False) -> dict[str, Any]:
    """``apart``: payments and shipping each in an ``interplay run`` process of their own."""
    import bench_app

    done: dict[int, asyncio.Future[float]] = {}
    bench_app.confirmed = lambda order_id: finish(done, order_id)
    bus = Bus(kind)
    assert bus.url is not None or not apart
    try:
        async with contextlib.AsyncExitStack() as stack:
            others = ["payments", "shipping"] if apart else []
            bus.groups.update(others)
            helpers = await stack.enter_async_context(hosted_apart("choreography", others, store, bus.url))
            rt = await stack.enter_async_context(bench_app.choreography.run(
                store=store, bus=bus.url, services=["notification"] if apart else None))
            bus.transports.append(rt.transport)

            async def publish(i: int) -> None:
                await rt.publish("order.created", Order(id=i))

            await drive(min(500, n), concurrency, publish, done, first=-1_000_000)  # warm up
            helpers.start()
            measured, lat = await drive(n, concurrency, publish, done)
            helpers_cpu = helpers.cpu()  # over the same span as this process's
            await rt.settled(timeout=120)
            return result(n, lat, measured, measured.cpu + helpers_cpu, **helpers.extra())
    finally:
        await bus.cleanup()


class Helpers:
    """The ``interplay run`` processes of a variant: their CPU time from :meth:`start` on."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs
        self.began = 0.0

    def start(self) -> None:
        self.began = sum(process_tree_cpu(p.pid) for p in self.procs)

    def cpu(self) -> float:
        return sum(process_tree_cpu(p.pid) for p in self.procs) - self.began if self.procs else 0.0

    def extra(self) -> dict[str, Any]:
        return {"processes": 1 + len(self.procs)} if self.procs else {}


@contextlib.asynccontextmanager
async def hosted_apart(app: str, services: list[str], store: str, bus: str | None) -> AsyncIterator[Helpers]:
    """One ``interplay run benchmarks.bench_app:<app> --service S`` process per service,
    on the same store file and bus; yielded once each says it is hosting (subscribed).
    Their stderr goes to a file beside the store, shown if one does not start."""
    procs: list[asyncio.subprocess.Process] = []
    logs = Path(store.removeprefix("sqlite:///")).parent
    try:
        for service in services:
            with open(logs / f"{service}.log", "wb") as log:  # noqa: ASYNC230 - before anything is measured
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "interplay", "run", f"benchmarks.bench_app:{app}", "--service", service,
                    "--no-orchestrator", "--store", store, "--bus", str(bus),
                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    stdout=subprocess.PIPE, stderr=log,
                ))
        for service, proc in zip(services, procs, strict=True):
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if b"hosting" not in line:
                tail = (logs / f"{service}.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"interplay run --service {service} did not start: {' | '.join(tail)}")
        yield Helpers(procs)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def interplay_orchestration(kind: str, store: str, runs: int, inflight: int,
                                  apart: bool = False) -> dict[str, Any]:
    """``apart``: the three services each in an ``interplay run`` process of their own."""
    from bench_app import app  # the 3-command "order" workflow of benchmarks/orchestration.py too

    bus = Bus(kind)
    try:
        async with contextlib.AsyncExitStack() as stack:
            others = ["stock", "payments", "shipping"] if apart else []
            bus.groups.update(others)
            helpers = await stack.enter_async_context(hosted_apart("app", others, store, bus.url))
            rt = await stack.enter_async_context(app.run(store=store, bus=bus.url, services=[] if apart else None))
            bus.transports.append(rt.transport)

            async def start(i: int) -> None:
                handle = await rt.start("order", i)
                await handle.result(timeout=120)

            await parallel(start, min(200, runs), inflight, first=-1_000_000)  # warm up
            helpers.start()
            measured, lat = await parallel(start, runs, inflight)
            return result(runs, lat, measured, measured.cpu + helpers.cpu(), **helpers.extra())
    finally:
        await bus.cleanup()


async def parallel(start: Callable[[int], Awaitable[Any]], runs: int, inflight: int,
                   first: int = 0) -> tuple[Measured, list[float]]:
    """``start(i)`` runs workflow i to completion; ``inflight`` at once."""
    slots = asyncio.Semaphore(inflight)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with slots:
            began = time.perf_counter()
            await start(i)
            latencies.append(time.perf_counter() - began)

    with Measured() as measured:
        await asyncio.gather(*(one(first + i) for i in range(runs)))
    return measured, latencies


# --- FastStream: the same choreography on Redis Streams --------------------------------
async def faststream_choreography(n: int, concurrency: int) -> dict[str, Any]:
    from faststream.redis import RedisBroker, StreamSub

    prefix = f"fsbench:{uuid.uuid4().hex[:10]}:"
    created, paid, shipped = (prefix + s for s in ("order.created", "payment.completed", "shipment.prepared"))
    done: dict[int, asyncio.Future[float]] = {}
    broker = RedisBroker(REDIS, logger=None)
    # redis-py's async pool holds at most 100 connections and each concurrent publish
    # takes one: the client publishes 50 at a time (orders in flight stay --concurrency)
    publishing = asyncio.Semaphore(50)

    @broker.subscriber(stream=StreamSub(created, group="payments", consumer="payments-1"))
    @broker.publisher(stream=paid)
    async def take_payment(order: Order) -> Order:
        return order

    @broker.subscriber(stream=StreamSub(paid, group="shipping", consumer="shipping-1"))
    @broker.publisher(stream=shipped)
    async def prepare_shipment(order: Order) -> Order:
        return order

    @broker.subscriber(stream=StreamSub(shipped, group="notification", consumer="notification-1"))
    async def send_confirmation(order: Order) -> None:
        finish(done, order.id)

    try:
        async with broker:
            await broker.start()

            async def publish(i: int) -> None:
                async with publishing:
                    await broker.publish(Order(id=i), stream=created)

            await drive(min(500, n), concurrency, publish, done, first=-1_000_000)  # warm up
            measured, lat = await drive(n, concurrency, publish, done)
    finally:
        await delete_redis_keys(prefix)
    return result(n, lat, measured)


# --- bare redis-py: one round trip at a time, and batched -----------------------------
def redis_hops(prefix: str) -> tuple[Any, list[tuple[str, str]]]:
    import redis

    client = redis.Redis.from_url(REDIS)
    hops = [(prefix + s, g) for s, g in
            (("order.created", "payments"), ("payment.completed", "shipping"), ("shipment.prepared", "notification"))]
    for stream, group in hops:
        client.xgroup_create(stream, group, id="$", mkstream=True)
    return client, hops


def redis_loop(n: int) -> dict[str, Any]:
    import orjson

    prefix = f"rpbench:{uuid.uuid4().hex[:10]}:"
    client, hops = redis_hops(prefix)

    def one(i: int) -> float:
        began = time.perf_counter()
        client.xadd(hops[0][0], {"body": orjson.dumps({"id": i, "amount": 10.0})})
        for k, (stream, group) in enumerate(hops):
            [(_, [(entry, fields)])] = client.xreadgroup(group, "c1", {stream: ">"}, count=1)
            order = Order.model_validate_json(fields[b"body"])
            client.xack(stream, group, entry)
            if k + 1 < len(hops):
                client.xadd(hops[k + 1][0], {"body": order.model_dump_json()})
        return time.perf_counter() - began

    try:
        for i in range(min(500, n)):
            one(-1 - i)
        with Measured() as measured:
            lat = [one(i) for i in range(n)]
    finally:
        client.close()
        asyncio.run(delete_redis_keys(prefix))
    return result(n, lat, measured)


def redis_batched(n: int, batch: int) -> dict[str, Any]:
    prefix = f"rpbench:{uuid.uuid4().hex[:10]}:"
    client, hops = redis_hops(prefix)

    def run_batch(first: int, size: int) -> float:
        began = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for i in range(first, first + size):
            pipe.xadd(hops[0][0], {"body": Order(id=i).model_dump_json()})
        pipe.execute()
        for k, (stream, group) in enumerate(hops):
            got = 0
            pipe = client.pipeline(transaction=False)
            while got < size:
                [(_, entries)] = client.xreadgroup(group, "c1", {stream: ">"}, count=size - got)
                got += len(entries)
                orders = [Order.model_validate_json(fields[b"body"]) for _, fields in entries]
                pipe.xack(stream, group, *(entry for entry, _ in entries))
                if k + 1 < len(hops):
                    for order in orders:
                        pipe.xadd(hops[k + 1][0], {"body": order.model_dump_json()})
            pipe.execute()
        return time.perf_counter() - began

    try:
        for first in range(-min(500, n), 0, batch):
            run_batch(first, min(batch, -first))
        lat: list[float] = []
        with Measured() as measured:
            for first in range(0, n, batch):
                size = min(batch, n - first)
                lat += [run_batch(first, size)] * size
    finally:
        client.close()
        asyncio.run(delete_redis_keys(prefix))
    return result(n, lat, measured, batch=batch)


# --- bare aio-pika: the same choreography on RabbitMQ, batched ------------------------
AMQP_HOPS = (("order.created", "payments"), ("payment.completed", "shipping"), ("shipment.prepared", "notification"))


class AmqpHop:
    """One service of ``aio-pika batched``: buffers what its consumer is handed, handles
    what was buffered as one batch (the next hop's publishes gathered, every one awaiting
    its confirm), and acks a batch with ``multiple=True`` on its last delivery tag once its
    publishes are confirmed and every batch before it is acked (so the ack covers exactly
    the deliveries handled so far). At most ``DEPTH`` batches are in flight: while they
    wait for their confirms, the next batch gathers (deliveries come one at a time)."""

    DEPTH = 2

    def __init__(self, exchange: AbstractExchange, next_route: str | None,
                 done: dict[int, asyncio.Future[float]]) -> None:
        self.exchange = exchange  # on this service's own channel, confirms on
        self.next_route = next_route  # None: the last hop, which only acks
        self.done = done
        self.buffer: list[AbstractIncomingMessage] = []
        self.arrived = asyncio.Event()
        self.next_tag = 1  # the delivery tag the next batch must start with (one channel per hop)
        self.slots = asyncio.Semaphore(self.DEPTH)
        self.batches = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.buffer.append(message)
        self.arrived.set()

    async def run(self) -> None:
        previous: asyncio.Task[None] | None = None  # the batch before, done once acked
        while True:
            await self.slots.acquire()  # released by the batch once acked
            while not self.buffer:
                self.arrived.clear()
                await self.arrived.wait()
            batch, self.buffer = self.buffer, []
            tags = [m.delivery_tag for m in batch]
            if tags != list(range(self.next_tag, self.next_tag + len(batch))):  # a multiple ack would be wrong
                raise RuntimeError(f"deliveries out of order: expected tags from {self.next_tag}, got {tags[:5]}...")
            self.next_tag += len(batch)
            self.batches += 1
            previous = asyncio.create_task(self.handle(batch, previous))
            previous.add_done_callback(self.failed)

    def failed(self, task: asyncio.Task[None]) -> None:
        """A batch failed (or a later one, awaiting it): fail the orders waiting, not just time out."""
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            for fut in self.done.values():
                if not fut.done():
                    fut.set_exception(exc)

    async def handle(self, batch: list[AbstractIncomingMessage], previous: asyncio.Task[None] | None) -> None:
        from aio_pika import DeliveryMode, Message

        try:
            orders = [Order.model_validate_json(m.body) for m in batch]
            if self.next_route is None:
                for order in orders:
                    finish(self.done, order.id)
            else:
                await asyncio.gather(*(
                    self.exchange.publish(
                        Message(order.model_dump_json().encode(), delivery_mode=DeliveryMode.PERSISTENT),
                        self.next_route, mandatory=True)
                    for order in orders))
            if previous is not None:
                await previous
            await batch[-1].ack(multiple=True)
        finally:
            self.slots.release()


async def aio_pika_batched(n: int, concurrency: int, prefetch: int) -> dict[str, Any]:
    import aio_pika
    from aio_pika import DeliveryMode, ExchangeType

    name = f"apbench-{uuid.uuid4().hex[:10]}"
    queues = [f"{name}.{group}" for _, group in AMQP_HOPS]
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    done: dict[int, asyncio.Future[float]] = {}
    connection = await aio_pika.connect(AMQP)
    tasks: list[asyncio.Task[None]] = []
    channels: list[AbstractChannel] = []  # the services' (consuming) channels
    try:
        # on_return_raises: an unroutable (returned) message fails its publish
        client = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await client.declare_exchange(name, ExchangeType.TOPIC, durable=True)
        for (route, _), queue_name in zip(AMQP_HOPS, queues, strict=True):
            queue = await client.declare_queue(queue_name, durable=True, arguments=arguments)
            await queue.bind(exchange, route)
        hops: list[AmqpHop] = []
        for k, queue_name in enumerate(queues):
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channels.append(channel)
            await channel.set_qos(prefetch_count=prefetch)
            hop = AmqpHop(await channel.get_exchange(name),
                          AMQP_HOPS[k + 1][0] if k + 1 < len(AMQP_HOPS) else None, done)
            tasks.append(asyncio.create_task(hop.run()))
            tasks[-1].add_done_callback(hop.failed)
            await (await channel.get_queue(queue_name)).consume(hop.on_message, no_ack=False)
            hops.append(hop)

        async def publish(i: int) -> None:
            message = aio_pika.Message(Order(id=i).model_dump_json().encode(), delivery_mode=DeliveryMode.PERSISTENT)
            await exchange.publish(message, AMQP_HOPS[0][0], mandatory=True)

        await drive(min(500, n), concurrency, publish, done, first=-1_000_000)  # warm up
        batches = [hop.batches for hop in hops]
        measured, lat = await drive(n, concurrency, publish, done)
        batches = [hop.batches - before for hop, before in zip(hops, batches, strict=True)]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            for channel in channels:  # stop consuming before the queues go
                await channel.close()
            channel = await connection.channel()
            for queue_name in queues:
                await channel.queue_delete(queue_name)
            await channel.exchange_delete(name)
        finally:
            await connection.close()
    mean_batch = "/".join(f"{n / b:.1f}" if b else "-" for b in batches)  # per hop
    return result(n, lat, measured, prefetch=prefetch, mean_batch=mean_batch)


# --- Celery: a 3-task chain on Redis -----------------------------------------------------
def celery_app(prefix: str) -> Any:
    from celery import Celery

    app = Celery("bench", broker=REDIS, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},  # every kombu key under the prefix
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    pushed: dict[str, Any] = {}

    @app.task(name="bench.reserve")
    def reserve(i: int) -> int:
        return i

    @app.task(name="bench.charge")
    def charge(i: int) -> int:
        return i

    @app.task(name="bench.ship")
    def ship(i: int) -> int:
        if "client" not in pushed:  # one connection per worker process
            import redis

            pushed["client"] = redis.Redis.from_url(REDIS)
        pushed["client"].rpush(prefix + "done", i)
        return i

    return app


def process_tree_cpu(pid: int, children: bool = True) -> float:
    """CPU seconds used so far by a process and its live children (Linux /proc; NaN elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if children else []
        for p in [str(pid), *children]:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total / tick


def celery_worker(prefix: str, concurrency: int) -> None:
    app = celery_app(prefix)
    app.worker_main(["worker", "--pool=prefork", f"--concurrency={concurrency}", "--loglevel=WARNING",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])


def celery_chains(runs: int, inflight: int, concurrency: int) -> dict[str, Any]:
    import redis
    from celery import chain

    prefix = f"cybench:{uuid.uuid4().hex[:10]}:"
    app = celery_app(prefix)
    reserve, charge, ship = (app.tasks[f"bench.{t}"] for t in ("reserve", "charge", "ship"))
    client = redis.Redis.from_url(REDIS)
    worker = subprocess.Popen([sys.executable, __file__, "--celery-worker", prefix,
                               "--celery-concurrency", str(concurrency)])

    def measure(first: int, count: int) -> list[float]:
        started: dict[int, float] = {}
        lat: list[float] = []
        following = first
        while len(lat) < count:
            while following < first + count and len(started) < inflight:
                started[following] = time.perf_counter()
                chain(reserve.s(following), charge.s(), ship.s()).apply_async()
                following += 1
            popped = client.blpop([prefix + "done"], timeout=60)
            if popped is None:
                raise TimeoutError(f"celery: {count - len(lat)} chain(s) not done after 60 s")
            ids = [popped[1], *(client.lpop(prefix + "done", inflight) or [])]
            now = time.perf_counter()
            lat += [now - started.pop(int(i)) for i in ids]
        return lat

    try:
        measure(-1_000_000, min(100, runs))  # warm up (and wait for the worker to boot)
        worker_cpu = process_tree_cpu(worker.pid)
        with Measured() as measured:
            lat = measure(0, runs)
        worker_cpu = process_tree_cpu(worker.pid) - worker_cpu
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        client.close()
        asyncio.run(delete_redis_keys(prefix))
    cpu = measured.cpu + worker_cpu if worker_cpu == worker_cpu else float("nan")  # NaN: /proc unreadable
    return result(runs, lat, measured, cpu, worker=f"prefork x{concurrency}")


# --- one variant (in its own process) ------------------------------------------------------
def child(args: argparse.Namespace) -> dict[str, Any]:
    global server
    variant: str = args.variant
    kind, _, name = variant.partition(": ")
    server = "amqp" if name.startswith("aio-pika") else next((s for s in SERVERS if s in name), None)
    if name.startswith("interplay "):
        apart = name in APARTS
        bus = APARTS[name] if apart else BUSES[name.removeprefix("interplay ")]
        with tempfile.TemporaryDirectory() as tmp:
            store = store_url(Path(tmp), args.synchronous)
            if kind == "choreography":
                return asyncio.run(interplay_choreography(bus, store, args.orders, args.concurrency, apart))
            return asyncio.run(interplay_orchestration(bus, store, args.runs, args.inflight, apart))
    if name == "faststream redis":
        return asyncio.run(faststream_choreography(args.orders, args.concurrency))
    if name == "redis-py loop":
        return redis_loop(args.orders)
    if name == "redis-py batched":
        return redis_batched(args.orders, args.batch)
    if name == "aio-pika batched":
        return asyncio.run(aio_pika_batched(args.orders, args.concurrency, args.prefetch))
    if name == "celery redis":
        return celery_chains(args.runs, args.inflight, args.celery_concurrency)
    raise SystemExit(f"unknown variant {variant!r}")


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any] | str:
    """Run one variant in a fresh process; its result, or why it did not run."""
    slow = variant in (CHOREOGRAPHY_PEER, "choreography: redis-py loop")  # fewer orders keep the wait short
    orders = args.faststream_orders if slow else args.orders
    runs = args.celery_runs if variant == ORCHESTRATION_PEER else args.runs
    command = [sys.executable, __file__, "--variant", variant, "--orders", str(orders), "--runs", str(runs),
               "--concurrency", str(args.concurrency), "--inflight", str(args.inflight), "--batch", str(args.batch),
               "--prefetch", str(args.prefetch),
               "--synchronous", args.synchronous, "--celery-concurrency", str(args.celery_concurrency)]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        slug = variant.replace(": ", "-").replace(" ", "-").replace("://", "")
        tool = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        # --subprocesses: Celery's worker and its pool children too; --threads: one stack per thread
        command = [tool, "record", "--format", "raw", "--threads", "--subprocesses", "--rate", "200",
                   "--output", str(Path(args.profile) / f"{slug}.txt"), "--", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"no result within {args.timeout} s"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return " | ".join(tail) or f"exit status {proc.returncode}"
    return dict(json.loads(line[7:]))


def available(variant: str) -> str | None:
    """Why a variant cannot run here (a missing driver), else None."""
    needs = {"nats://": "nats", "amqp://": "aio_pika", "aio-pika": "aio_pika", "redis": "redis",
             "faststream": "faststream", "celery": "celery"}
    for word, module in needs.items():
        if word in variant:
            try:
                __import__(module)
            except ImportError as e:
                return f"not installed: {e.name} (pip install -e '.[bench,redis,nats,amqp]')"
    if "nats://" in variant:
        try:
            import interplay.transports.nats  # noqa: F401
        except ImportError as e:
            return f"interplay has no nats:// transport here ({e})"
    return None


def report(results: dict[str, dict[str, Any] | str], args: argparse.Namespace) -> None:
    def rate(variant: str) -> float | None:
        r = results.get(variant)
        return r["rate"] if isinstance(r, dict) else None

    print(f"\n{'':38} {'per s':>8} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>9} {'cpu ms':>7} {'srv ms':>7} {'n':>6}"
          "  target")
    for section, peer, unit in (
        (CHOREOGRAPHY, CHOREOGRAPHY_PEER, f"orders/s, up to {args.concurrency} in flight; ratio vs FastStream"),
        (ORCHESTRATION, ORCHESTRATION_PEER, f"runs/s, {args.inflight} in flight; ratio vs Celery"),
    ):
        if not any(v in results for v in section):
            continue
        print(f"{section[0].partition(':')[0]} ({unit})")
        base = rate(peer)
        kind = section[0].partition(":")[0]
        for variant in section:
            redis_rate = rate(f"{kind}: {APART}" if variant.endswith(" apart") else section[0])
            if variant not in results:
                continue
            r = results[variant]
            name = variant.partition(": ")[2]
            if isinstance(r, str):
                print(f"  {name:36} did not run: {r}")
                continue
            ratio = f"{r['rate'] / base:7.2f}" if base else f"{'-':>7}"
            cpu, srv = (f"{r[k]:7.3f}" if k in r else f"{'-':>7}" for k in ("cpu_ms", "server_cpu_ms"))
            print(f"  {name:36} {r['rate']:8.0f} {ratio} {r['p50']:8.2f} {r['p99']:9.2f} {cpu} {srv} {r['count']:6}  "
                  f"{target(variant, r['rate'], redis_rate)}")
    if (loop := rate("choreography: redis-py loop")) is not None:
        speed = loop / LOOP_CALIBRATION
        print(f"\nthe redis-py loop ran {speed:.2f}x as fast as when the issue set its targets ({LOOP_CALIBRATION:,.0f}"
              f" orders/s): scaled by it they are {CHOREOGRAPHY_TARGET * speed:,.0f} orders/s and "
              f"{ORCHESTRATION_TARGET * speed:,.0f} runs/s (the ok/MISSED above are against the targets as "
              "written)", end="")
    ran = [f"{peer.partition(': ')[2]} {r / base:.2f}x" for peer, base in PEER_CALIBRATION.items()
           if (r := rate(peer)) is not None]
    if ran:
        print(f"\nthe peers against the issue's figures: {', '.join(ran)} (they swing far more than the loop)", end="")
    print("\n\ncpu ms: CPU time per order or run of the variant's own process(es), all threads (Celery: client + "
          "worker); srv ms: of the broker's server meanwhile (from every client it had then)")
    print(f"store: SQLite file per variant, synchronous={args.synchronous}; tracing, inbox and outbox on. "
          f"Targets (issue 4): interplay on Redis >= {CHOREOGRAPHY_TARGET:,.0f} orders/s and "
          f">= {ORCHESTRATION_TARGET:,.0f} runs/s with 100 in flight; NATS and RabbitMQ within 2x of Redis.")


def target(variant: str, rate: float, redis_rate: float | None) -> str:
    if variant in ("choreography: interplay redis://", f"choreography: {APART}"):
        return f">= {CHOREOGRAPHY_TARGET:,.0f}: {'ok' if rate >= CHOREOGRAPHY_TARGET else 'MISSED'}"
    if variant in ("orchestration: interplay redis://", f"orchestration: {APART}"):
        return f">= {ORCHESTRATION_TARGET:,.0f}: {'ok' if rate >= ORCHESTRATION_TARGET else 'MISSED'}"
    if "pack=1" in variant:
        return "(packs off: to compare)"
    if "amqp://" in variant or "nats://" in variant:
        if redis_rate is None:
            return ">= redis / 2: (no redis result)"
        return f">= redis / 2 ({redis_rate / 2:,.0f}): {'ok' if rate >= redis_rate / 2 else 'MISSED'}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=5000, help="orders per interplay choreography variant")
    parser.add_argument("--faststream-orders", type=int, default=3000,
                        help="orders for FastStream and the redis-py loop (slower: fewer keep the wait short)")
    parser.add_argument("--concurrency", type=int, default=1000, help="choreography: orders in flight at most")
    parser.add_argument("--runs", type=int, default=2000, help="workflow runs per interplay orchestration variant")
    parser.add_argument("--celery-runs", type=int, default=1000, help="Celery chains (slower: fewer)")
    parser.add_argument("--inflight", type=int, default=100, help="orchestration: runs in flight")
    parser.add_argument("--batch", type=int, default=100, help="orders per batch of 'redis-py batched'")
    parser.add_argument("--prefetch", type=int, default=300,
                        help="unacked messages per service channel of 'aio-pika batched'")
    parser.add_argument("--celery-concurrency", type=int, default=os.cpu_count() or 2,
                        help="Celery worker pool processes (default: the number of cores)")
    parser.add_argument("--synchronous", choices=("full", "normal", "off"), default="full",
                        help="SQLite store's synchronous setting (full: the durable default)")
    parser.add_argument("--only", action="append",
                        help="run only the variants whose name contains this (repeatable), e.g. 'redis', "
                             "'choreography', 'orchestration: interplay nats'")
    parser.add_argument("--profile", metavar="DIR",
                        help="record each variant with py-spy (raw collapsed stacks, per thread) into DIR")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a variant may take")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--celery-worker", metavar="PREFIX", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.celery_worker:
        celery_worker(args.celery_worker, args.celery_concurrency)
        return
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    chosen = [v for v in VARIANTS if not args.only or any(word in v for word in args.only)]
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: dict[str, dict[str, Any] | str] = {}
    for variant in chosen:
        why = available(variant)
        if why is not None:
            results[variant] = why
            continue
        print(f"running {variant} ...", end=" ", flush=True)
        began = time.perf_counter()
        outcome = results[variant] = run_variant(variant, args)
        summary = f"{outcome['rate']:.0f}/s" if isinstance(outcome, dict) else f"did not run: {outcome}"
        print(f"{summary} ({time.perf_counter() - began:.0f} s)", flush=True)
    report(results, args)
    print(f"finished {datetime.datetime.now().isoformat(timespec='seconds')}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
