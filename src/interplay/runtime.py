"""The Runtime: one running process of an app - its consumers, engine and clients.

``async with app.run(store=..., bus=...) as rt:`` opens the store and the bus,
declares every service's routes (so messages queue even for services not running
yet), starts a consumer for each hosted service and, if asked, the workflow engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .clock import Clock, SystemClock
from .commands import reply_result
from .dispatch import Consumer, record_abandoned
from .errors import (
    ConfigurationError,
    MessageDecodeError,
    MessageTooLarge,
    NotFound,
    StepTimeout,
    StoreError,
    TransportError,
)
from .message import Message, new_id
from .outbox import OutboxRelay
from .payloads import to_json
from .replies import ReplyInbox
from .service import check_name
from .stores import open_store
from .stores.base import Store
from .stores.messaging import Delivery as DeliveryMode
from .stores.messaging import Relay
from .stores.records import DeadLetterRecord, FlowStart, Outgoing, RunRow
from .tracing.flows import Flow, FlowSummary
from .tracing.hooks import Instrumentation, Observer
from .tracing.stuck import FlowStuck, announce_stuck
from .transports import open_transport
from .transports.base import Transport, reply_route, route_of
from .workflow.engine import Engine
from .workflow.handle import WorkflowHandle

if TYPE_CHECKING:
    from .app import App

__all__ = ["Runtime", "RuntimeOptions"]

T = TypeVar("T")
log = logging.getLogger("interplay.runtime")

DEFAULT_STORE = "sqlite:///interplay.db"


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Tuning of a runtime; the defaults suit most services."""

    prefetch: int = 128
    """Messages a service's consumer holds at once (in flight, across its handlers)."""
    lease: float = 30.0
    """Visibility timeout: an unacked message is redelivered after this many seconds.
    Handlers running longer keep their lease by heartbeat."""
    receive_timeout: float = 1.0
    """How long one receive call waits for messages."""
    max_deliveries: int = 20
    """A message delivered more often than this (or than its handler's retry attempts,
    if more) without being settled - its handler crashes the process, or outlives its
    lease, every time - is dead-lettered (``too_many_deliveries``) instead of run again.
    0: never. (A message RabbitMQ dead-letters at its own ``delivery_limit`` first comes
    back with its count, so it lands here all the same; see ``interplay.transports.amqp_dlq``.)"""
    shutdown_grace: float = 10.0
    """Seconds handlers in flight may finish when the runtime stops."""
    inbox_retention: float = 7 * 24 * 3600.0
    """Seconds a handled message id is remembered for de-duplication. Must exceed the
    longest redelivery horizon of the bus."""
    trace_retention: float = 7 * 24 * 3600.0
    """Seconds finished flows' traces are kept."""
    purge_interval: float = 600.0
    """Seconds between retention sweeps."""
    outbox_relay_interval: float = 1.0
    """Seconds between sweeps for outbox rows left behind (broker buses only); also the
    first pause before a row whose relay failed is tried again."""
    outbox_grace: float = 5.0
    """Outbox rows younger than this are left to the process that wrote them; a row a
    relay sweep took is left to that sweep for as long (then another process may take it)."""
    outbox_retry_max: float = 60.0
    """Longest pause before an outbox row the bus refused is tried again (the pause
    doubles from ``outbox_relay_interval`` with each failed attempt)."""
    source: str = "client"
    """The ``source`` of messages published through ``rt.publish``."""
    run_lease: float = 5.0
    """Seconds an orchestrator holds a workflow run without heartbeating; after that
    another orchestrator takes the run over (the recovery time after a crash)."""
    run_poll: float = 0.5
    """Seconds between looks for runs to take over (new runs here start at once)."""
    max_active_runs: int = 10_000
    """Workflow runs one orchestrator executes at once."""
    call_timeout: float = 30.0
    """Default timeout of ``rt.call``."""
    stuck_check_interval: float | None = 10.0
    """Seconds (on the runtime's clock) between looks for declared flows past their
    ``within``; each is announced once, whichever process sees it first, by the event
    ``interplay.flow.stuck``. None: this process does not look."""


class Runtime:
    """A running interplay process. Make it with :meth:`App.run`.

    Attributes:
        app: the app.
        store: the open store.
        transport: the open bus.
        clock: the clock.
        instance: this process's unique id (its reply route and lease owner name).
    """

    def __init__(
        self,
        app: App,
        *,
        bus: str | Transport | None,
        store: str | Store | None,
        services: Sequence[str] | None,
        orchestrator: bool,
        clock: Clock | None,
        options: RuntimeOptions,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.app = app
        self.options = options
        self.clock: Clock = clock or SystemClock()
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{new_id()[-12:]}"
        store_url = store if store is not None else os.environ.get("INTERPLAY_STORE") or DEFAULT_STORE
        self.store: Store = open_store(store_url) if isinstance(store_url, str) else store_url
        bus_url = bus if bus is not None else os.environ.get("INTERPLAY_BUS") or None
        self.transport: Transport = (
            bus_url if isinstance(bus_url, Transport) else open_transport(bus_url, self.store)
        )
        unknown = set(services or ()) - set(app.services)
        if unknown:
            raise ConfigurationError(f"unknown service(s) {sorted(unknown)}; the app has {sorted(app.services)}")
        self.hosted = list(services) if services is not None else list(app.services)
        self.orchestrator = orchestrator
        self.consumers: dict[str, Consumer] = {}
        self.instrumentation = Instrumentation(observers)
        """Observers of this runtime (OpenTelemetry, metrics, yours): see tracing.hooks."""
        self.engine = Engine(self)
        self.replies = ReplyInbox(self)
        self._replies_started = False
        self._background: list[asyncio.Task[None]] = []
        self._running = False
        self._owns_store = not isinstance(store, Store)
        self._owns_transport = not isinstance(bus, Transport)

    @property
    def delivery_mode(self) -> DeliveryMode:
        """Where published messages go inside a store transaction."""
        if self.transport.store_bound:
            return "queue"
        return "outbox" if self.transport.durable and self.store.durable else "direct"

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Runtime:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the store and bus, declare routes, start consumers and background work."""
        if self._running:
            return
        await self.store.open()
        try:
            await self.transport.open(self.clock)
            self.transport.on_abandoned(partial(record_abandoned, self))
            topology = self.app.topology
            for name in self.app.services:
                await self.transport.declare(name, topology.routes[name])
            for name in self.hosted:
                consumer = Consumer(self, self.app.services[name])
                await consumer.start()
                self.consumers[name] = consumer
            if self.orchestrator and self.app.workflows:
                await self._start_replies()
                await self.engine.start()
            loop = asyncio.get_running_loop()
            self._background.append(loop.create_task(self._purge_loop(), name="interplay-purge"))
            if self.delivery_mode == "outbox":
                self._background.append(loop.create_task(self._relay_loop(), name="interplay-outbox"))
            # Only processes that run part of the app watch (not a publishing client or
            # the CLI), and only for an app that declares a deadline somewhere.
            if self.options.stuck_check_interval and (self.hosted or self.orchestrator) and any(
                spec.within is not None for spec in self.app.flows.values()
            ):
                self._background.append(loop.create_task(self._stuck_loop(), name="interplay-stuck-watch"))
        except BaseException:
            await self._close_backends()
            raise
        self._running = True

    async def close(self) -> None:
        """Stop workflows and consumers (letting handlers finish), then the bus and store."""
        if not self._running:
            return
        self._running = False
        await self.engine.stop()
        if self._replies_started:
            await self.replies.stop()
        for consumer in self.consumers.values():
            await consumer.stop(self.options.shutdown_grace)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        await self._close_backends()

    async def _start_replies(self) -> None:
        if not self._replies_started:
            self._replies_started = True
            await self.replies.start()

    async def _close_backends(self) -> None:
        self.transport.on_abandoned(None)  # a transport passed in outlives this store
        if self._owns_transport:
            await self.transport.close()
        if self._owns_store:
            await self.store.close()

    # ------------------------------------------------------------------ publishing
    async def publish(
        self,
        event: str,
        payload: Any = None,
        *,
        flow_id: str | None = None,
        id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Publish an event; returns its flow's id.

        Args:
            event: the event type.
            payload: a model, dataclass, dict or primitive (sent as JSON).
            flow_id: join this existing flow instead of starting a new one.
            id: the message id (for idempotent re-publishing); default a new UUIDv7.
            headers: extra string headers.
        """
        check_name("event", event)
        msg = Message(
            type=event, payload=to_json(payload), kind="event", id=id or new_id(),
            flow_id=flow_id or "", source=self.options.source, headers=dict(headers or {}),
        )
        self.instrumentation.published(msg)
        now = self.clock.now()
        topology = self.app.topology
        start = topology.flow_start(msg, now) if flow_id is None else None
        await self.send([topology.outgoing(msg, flow_start=start)])
        return msg.flow_id

    def too_large(self, outgoing: Sequence[Outgoing]) -> str | None:
        """Why the bus would never take one of these messages (too large, or its route too
        long: a reply to a ``reply_to`` a sender made up), or None."""
        limit, route_limit = self.transport.body_limit(), self.transport.route_limit()
        for out in outgoing:
            msg = out.message
            if limit is not None and len(out.body) > limit:
                return (f"{msg.kind} {msg.type!r} is {len(out.body)} bytes; the bus takes at most {limit} "
                        "(raise its limit, or send a reference to the data)")
            if route_limit is not None and (size := len(out.route.encode())) > route_limit:
                return (f"{msg.kind} {msg.type!r} goes to route {out.route[:40]!r}... of {size} bytes; the bus "
                        f"takes routes of at most {route_limit}")
        return None

    async def send(self, outgoing: Sequence[Outgoing]) -> None:
        """Commit messages (trace + queue or outbox) and hand them to the bus.

        Raises:
            MessageTooLarge: the bus would refuse one of them for good; nothing is stored.
        """
        if (why := self.too_large(outgoing)) is not None:
            raise MessageTooLarge(why)
        relay = await self.store.publish(outgoing, self.clock.now(), self.delivery_mode)
        await self.relay(relay, raise_errors=self.delivery_mode == "direct")

    async def relay(self, relay: Relay, *, raise_errors: bool = False) -> None:
        """Publish what a commit left for the bus, then forget its outbox rows.

        If the bus fails, the rows stay in the outbox and the relay loop retries them
        (with the same message ids, so consumers de-duplicate).
        """
        if not relay:
            return
        local = self.store.local_routes
        remote = [o for o, _ in relay if o.route not in local]
        for out, _ in relay:
            if out.route in local:
                self.replies.deliver_local(out.message)
        if not remote:
            return
        outbox_ids = [i for _, i in relay if i is not None]
        try:
            await self.transport.publish(remote)
        except TransportError as exc:
            if raise_errors or not outbox_ids:
                raise
            log.warning("publish failed (%s); %d message(s) stay in the outbox for retry", exc, len(outbox_ids))
            return
        if outbox_ids:
            self.store.outbox_done(outbox_ids)

    async def _relay_loop(self) -> None:
        # Every process sweeps; a sweep claims the rows it relays (see interplay.outbox).
        relay = OutboxRelay(self)
        while True:
            await asyncio.sleep(self.options.outbox_relay_interval)
            try:
                await relay.sweep()
            except Exception as exc:  # the relay must outlive a bad moment of the store or bus
                expected = isinstance(exc, StoreError | TransportError)
                log.warning("outbox relay failed: %s", exc, exc_info=not expected)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.purge_interval)
            now = self.clock.now()
            try:
                await self.store.purge(now - self.options.inbox_retention, now - self.options.trace_retention)
            except StoreError as exc:
                log.warning("retention sweep failed: %s", exc)

    async def _stuck_loop(self) -> None:
        assert self.options.stuck_check_interval is not None
        while True:
            await self.clock.sleep(self.options.stuck_check_interval)
            try:
                await self.check_stuck()
            except Exception as exc:  # the watch must outlive a bad moment of the store or bus
                expected = isinstance(exc, StoreError | TransportError)
                log.warning("stuck-flow check failed: %s", exc, exc_info=not expected)

    async def check_stuck(self) -> list[FlowStuck]:
        """Announce declared flows past their ``within`` (``interplay.flow.stuck``, once per flow).

        The watch calls this every ``stuck_check_interval``; returns the flows this call announced.
        """
        return await announce_stuck(self)

    # ------------------------------------------------------------------ orchestration
    async def start(
        self, workflow: str, payload: Any = None, *, id: str | None = None, flow_id: str | None = None
    ) -> WorkflowHandle:
        """Start a workflow run (or get the existing run with this ``id``).

        Args:
            workflow: the workflow's name.
            payload: its input, validated against the workflow's annotation.
            id: the run id; starting again with the same id returns the same run.
            flow_id: run inside this existing flow (e.g. the one of the event that
                triggered it) instead of opening a new one.

        Raises:
            ValidationFailed: the payload does not fit (nothing is stored).
        """
        run = await self.engine.start_run(workflow, payload, id, flow_id)
        return WorkflowHandle(self, run)

    async def workflow(self, run_id: str) -> WorkflowHandle:
        """A handle on an existing run.

        Raises:
            NotFound: no run has that id.
        """
        run = await self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"no workflow run {run_id!r}")
        return WorkflowHandle(self, run)

    async def workflows(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[RunRow]:
        """Runs, newest first."""
        return await self.store.list_runs(status=status, workflow=workflow, limit=limit)

    async def resume(self, run_id: str) -> bool:
        """Let a parked run (replay diverged) run again, after its code was fixed."""
        run = await self.store.resume_run(run_id, self.clock.now())
        if run is not None:
            self.engine.wake_claims()
        return run is not None

    async def call(self, target: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """Send one command and wait for its reply (outside any workflow).

        Raises:
            StepFailed: the service failed it (``error_type``, ``error``).
            StepTimeout: no reply within ``timeout`` (default ``options.call_timeout``).
        """
        self.app.command_handler(target)
        await self._start_replies()
        wait = self.options.call_timeout if timeout is None else timeout
        msg = Message(
            type=target, payload=to_json(payload), kind="command", source=self.options.source,
            headers={"reply_to": reply_route(self.instance)},
        )
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies.calls[msg.id] = fut
        try:
            await self.send([self.app.topology.outgoing(msg, flow_start=FlowStart(name=target))])
            try:
                body = await asyncio.wait_for(fut, wait)
            except TimeoutError:
                raise StepTimeout(target, wait) from None
        finally:
            self.replies.calls.pop(msg.id, None)
        return reply_result(target, body)

    # ------------------------------------------------------------------ observing
    async def trace(self, flow_id: str) -> Flow:
        """The flow's causation tree with timings and status.

        Raises:
            NotFound: no flow has that id.
        """
        row = await self.store.flow(flow_id, self.clock.now())
        messages, spans = await self.store.flow_records(flow_id)
        if row is None:
            if not messages:
                raise NotFound(f"no flow with id {flow_id!r}")
            first = messages[0]
            summary = FlowSummary(flow_id, first.type, "flow", "running", first.time, None, 0, 0, messages[-1].type)
        else:
            summary = FlowSummary.from_row(row)
        return Flow(summary, messages, spans)

    async def flows(
        self, *, status: str | None = None, name: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[FlowSummary]:
        """Flows, newest first; ``status`` is one of running, completed, failed, stuck, ..."""
        rows = await self.store.flows(self.clock.now(), status=status, name=name, limit=limit, since=since)
        return [FlowSummary.from_row(r) for r in rows]

    async def wait_flow(self, flow_id: str, timeout: float = 10.0) -> FlowSummary:
        """Wait until a flow is done (completed, failed, ...); returns its summary.

        Raises:
            TimeoutError: it is still running after ``timeout`` seconds.
        """
        last = "unknown"

        async def done() -> FlowSummary | None:
            nonlocal last
            row = await self.store.flow(flow_id, self.clock.now())
            if row is None:
                return None
            last = row.status
            summary = FlowSummary.from_row(row)
            return summary if summary.done else None

        return await _poll(done, timeout, lambda: f"flow {flow_id} not done after {timeout}s (status: {last})")

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait until no flow has deliveries pending (everything published got handled).

        Raises:
            TimeoutError: work is still pending after ``timeout`` seconds.
        """
        pending = 0

        async def quiet() -> bool | None:
            nonlocal pending
            pending = await self.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_flows WHERE pending > 0")[0])
            return True if pending == 0 else None

        await _poll(quiet, timeout, lambda: f"{pending} flow(s) still have pending deliveries after {timeout}s")

    # ------------------------------------------------------------------ dead letters
    async def dlq(self, limit: int = 50, *, service: str | None = None) -> list[DeadLetterRecord]:
        """Dead letters, newest first."""
        return await self.store.dlq_list(limit, group=service)

    async def replay(self, ids: Sequence[int]) -> list[DeadLetterRecord]:
        """Send dead letters back to the service that failed them, keeping their ids.

        A dead letter of no service (a broker gave up on it in a queue of none) is
        published again by its route, to every service bound to it: those that handled
        it already answer from their inbox.

        Raises:
            TransportError: the bus refused; this and the later ones stay dead letters.
            NotFound: a dead letter of no service is not a message, or has no route;
                it and the later ones stay (drop it instead).
        """
        requeue = self.transport.store_bound
        taken = await self.store.dlq_replay(ids, self.clock.now(), requeue=requeue)
        if not requeue:
            for i, d in enumerate(taken):
                try:
                    if d.group:
                        await self.transport.publish_to_group(d.group, d.route, d.body)
                    else:
                        await self.transport.publish([_by_route(d)])
                except (TransportError, NotFound):
                    await self.store.dlq_restore(taken[i:], self.clock.now())
                    raise
        return taken

    async def drop(self, ids: Sequence[int]) -> int:
        """Delete dead letters for good."""
        return await self.store.dlq_drop(ids)


def _by_route(d: DeadLetterRecord) -> Outgoing:
    """A dead letter of no service, to publish again as it first was."""
    try:
        message = Message.decode(d.body)
        return Outgoing(message=message, route=d.route or route_of(message), body=d.body, fanout=1)
    except (MessageDecodeError, ValueError) as exc:
        raise NotFound(f"dead letter {d.id} died in no service's queue and cannot be sent again by its "
                       f"route ({exc}); drop it instead") from None


async def _poll(probe: Callable[[], Awaitable[T | None]], timeout: float, describe: Callable[[], str]) -> T:
    """Call ``probe`` with growing pauses until it returns something; TimeoutError after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while True:
        result = await probe()
        if result is not None:
            return result
        if loop.time() >= deadline:
            raise TimeoutError(describe())
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
