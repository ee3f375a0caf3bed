"""The consumer of one service: receive, run the handler, settle - effectively once.

For each delivery: skip it if the service's inbox already has its id (re-sending a
command's stored reply); dead-letter it if it is not an envelope, has no handler or
its payload does not validate; otherwise run the handler. The outcome - inbox mark,
span, emitted messages, or the retry / dead letter - is committed in one store
transaction (group-committed with other deliveries'); on a broker the ack follows
that commit, on the store bus the ack is part of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import orjson

from .commands import is_workflow_reply, recorder, reply_body
from .context import Context
from .errors import MessageTooLarge, Reject, StoreError, TransportError, ValidationFailed
from .message import Message, new_id
from .payloads import to_json
from .service import Failure, Handler, Service
from .stores.messaging import Emitter
from .stores.records import DeadLetter, Settlement, SpanRecord
from .transports.base import Abandoned, Delivery, Subscription, route_of

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["Consumer"]

log = logging.getLogger("interplay.dispatch")

# Headers an observer wants on what the current handling emits (its trace context).
_TRACE_HEADERS: ContextVar[dict[str, str]] = ContextVar("interplay_trace_headers", default={})  # noqa: B039


class Consumer:
    """Runs one service's handlers on its group's deliveries."""

    def __init__(self, runtime: Runtime, service: Service) -> None:
        self.rt = runtime
        self.service = service
        self.group = service.name
        self.sub: Subscription | None = None
        self._inflight: dict[asyncio.Task[None], tuple[Delivery, float]] = {}
        self._room = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._limits: dict[str, asyncio.Semaphore] = {}
        # message id -> set when its handling ends (made only once a duplicate waits for it)
        self._running: dict[str, asyncio.Event | None] = {}
        self.handled = 0

    @property
    def inflight(self) -> int:
        """Deliveries being handled right now (each holds one of ``prefetch`` slots)."""
        return len(self._inflight)

    async def start(self) -> None:
        """Subscribe and start receiving."""
        opts = self.rt.options
        routes = self.rt.app.topology.routes[self.group]
        self.sub = await self.rt.transport.subscribe(self.group, routes, lease=opts.lease)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._receive_loop(), name=f"interplay-consume-{self.group}"),
            loop.create_task(self._heartbeat_loop(), name=f"interplay-heartbeat-{self.group}"),
        ]

    async def stop(self, grace: float) -> None:
        """Stop receiving, let handlers in flight finish for up to ``grace`` seconds."""
        self._stopping = True
        self._room.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.sub is not None:
            await self.sub.close()

    # ------------------------------------------------------------------ loops
    async def _receive_loop(self) -> None:
        opts = self.rt.options
        assert self.sub is not None
        failures = 0
        while not self._stopping:
            room = opts.prefetch - len(self._inflight)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                deliveries = await self.sub.receive(room, opts.receive_timeout)
                if deliveries and not self.rt.transport.store_bound:
                    await self._mark_duplicates(deliveries)
                failures = 0
            except (TransportError, StoreError) as exc:
                failures += 1
                delay = min(5.0, 0.05 * 2**failures)
                log.warning("%s: receive failed (%s); retrying in %.2fs", self.group, exc, delay)
                await asyncio.sleep(delay)
                continue
            now = self.rt.clock.now()
            for d in deliveries:
                task = asyncio.get_running_loop().create_task(self._handle_safely(d))
                self._inflight[task] = (d, now)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._room.set()

    async def _heartbeat_loop(self) -> None:
        lease = self.rt.options.lease
        assert self.sub is not None
        while not self._stopping:
            await asyncio.sleep(lease / 3)
            cutoff = self.rt.clock.now() - lease / 3
            long_running = [d for d, started in self._inflight.values() if started <= cutoff]
            if long_running:
                try:
                    await self.sub.extend(long_running, lease)
                except Exception as exc:  # a missed heartbeat only risks a fenced duplicate
                    log.warning("%s: lease heartbeat failed: %s", self.group, exc)

    async def _mark_duplicates(self, deliveries: Sequence[Delivery]) -> None:
        ids = [d.message.id for d in deliveries if d.message is not None]
        seen = await self.rt.store.inbox_seen(self.group, ids)
        for d in deliveries:
            if d.message is not None and d.message.id in seen:
                d.duplicate = True
                d.stored_reply = seen[d.message.id]

    # ------------------------------------------------------------------ handling
    async def _handle_safely(self, d: Delivery) -> None:
        msg_id = d.message.id if d.message is not None else None
        mine = False
        try:
            if msg_id is not None and not d.duplicate:
                if msg_id in self._running:
                    # The same message is being handled right now (a duplicate delivery):
                    # wait for that handling, then ask the inbox instead of running it twice.
                    running = self._running[msg_id]
                    if running is None:
                        running = self._running[msg_id] = asyncio.Event()
                    await running.wait()
                    await self._mark_duplicates([d])
                else:
                    self._running[msg_id] = None
                    mine = True
            if d.message is None or not self.rt.instrumentation.observers:
                await self._handle(d)
            else:
                handler = self._handler_for(d.message)
                with self.rt.instrumentation.handling(
                    d.message, self.group, handler.name if handler else None
                ) as headers:
                    token = _TRACE_HEADERS.set(headers)
                    try:
                        await self._handle(d)
                    finally:
                        _TRACE_HEADERS.reset(token)
        except asyncio.CancelledError:
            raise
        except (TransportError, StoreError) as exc:
            # The store or the bus is down: the delivery stays unacked and comes back.
            log.warning("%s: could not settle message (%s); it will be redelivered", self.group, exc)
        except Exception:
            log.exception("%s: could not settle message; it will be redelivered", self.group)
        finally:
            if mine:
                done = self._running.pop(msg_id)  # type: ignore[arg-type]
                if done is not None:
                    done.set()

    async def _handle(self, d: Delivery) -> None:
        msg = d.message
        started = self.rt.clock.now()
        if msg is None:
            await self._dead_invalid(d, started)
            return
        if d.duplicate:
            log.debug("%s: %s %s already handled; answering from the inbox", self.group, msg.kind, msg.id)
            emits = []
            if msg.kind == "command" and d.stored_reply is not None:
                reply = self._reply(msg, orjson.loads(d.stored_reply))
                if reply is not None:
                    emits.append(reply)
            await self._settle(d, Settlement(self.group, msg.id, msg.flow_id, "duplicate"), emits)
            return
        handler = self._handler_for(msg)
        if handler is None:
            what = f"{msg.kind} {msg.type!r}"
            err = f"service {self.group!r} has no handler for {what}"
            await self._fail(d, msg, None, "no_handler", "NoHandler", err, started)
            return
        limit = self.rt.options.max_deliveries
        if limit and d.deliveries > max(limit, handler.retry.attempts):
            # A poison message: whatever it does to its handler never got it settled.
            err = f"delivered {d.deliveries} times without being settled (its handler dies or hangs)"
            await self._fail(d, msg, handler, "too_many_deliveries", "DeliveryLimit", err, started)
            return
        try:
            payload = handler.payload.validate(msg.payload)
        except ValidationFailed as exc:
            await self._fail(d, msg, handler, "invalid_payload", "ValidationFailed", str(exc), started)
            return
        ctx = Context(msg, self.group, d.deliveries)
        try:
            result = await self._call(handler, payload, ctx)
        except Reject as exc:
            await self._fail(d, msg, handler, "rejected", "Reject", str(exc), started)
            return
        except Exception as exc:
            if d.deliveries < handler.retry.attempts:
                await self._retry(d, msg, handler, f"{type(exc).__name__}: {exc}", started)
            else:
                await self._fail(d, msg, handler, "retries_exhausted", type(exc).__name__, str(exc), started)
            return
        emits = ctx.emitted
        if handler.emits is not None and result is not None:
            emits.append(msg.caused(handler.emits, to_json(result), source=self.group))
        stored_reply = None
        if handler.kind == "command":
            body = reply_body(True, to_json(result))
            stored_reply = orjson.dumps(body)
            reply = self._reply(msg, body)
            if reply is not None:
                emits.append(reply)
        settlement = Settlement(
            self.group, msg.id, msg.flow_id, "ok", inbox=True, reply=stored_reply,
            span=self._span(msg, handler, started, "ok", None, d.deliveries), transactions=ctx.transactions,
        )
        try:
            settled = await self._settle(d, settlement, emits)
        except MessageTooLarge as exc:  # an emitted message the bus will never take: no retry helps
            await self._fail(d, msg, handler, "emit_too_large", "MessageTooLarge", str(exc), started)
            return
        if settled == "failed":
            # The handler's own transaction raised: the handling failed after all.
            error_type, _, error = (settlement.failure or "Error: ").partition(": ")
            if d.deliveries < handler.retry.attempts:
                await self._retry(d, msg, handler, settlement.failure or "Error", started)
            else:
                await self._fail(d, msg, handler, "retries_exhausted", error_type, error, started)

    async def _call(self, handler: Handler, payload: Any, ctx: Context) -> Any:
        kwargs: dict[str, Any] = {}
        if handler.payload_param is not None:
            kwargs[handler.payload_param] = payload
        if handler.ctx_param is not None:
            kwargs[handler.ctx_param] = ctx
        limit = self._limit(handler)
        if limit is None:
            return await handler.fn(**kwargs) if handler.is_async else await asyncio.to_thread(handler.fn, **kwargs)
        async with limit:
            return await handler.fn(**kwargs) if handler.is_async else await asyncio.to_thread(handler.fn, **kwargs)

    def _limit(self, handler: Handler) -> asyncio.Semaphore | None:
        if handler.concurrency is None:
            return None
        sem = self._limits.get(handler.topic)
        if sem is None:
            sem = self._limits[handler.topic] = asyncio.Semaphore(handler.concurrency)
        return sem

    def _handler_for(self, msg: Message) -> Handler | None:
        if msg.kind == "event":
            return self.service.events.get(msg.type)
        if msg.kind == "command":
            svc, _, cmd = msg.type.partition(".")
            return self.service.commands.get(cmd) if svc == self.group else None
        return None

    async def _retry(self, d: Delivery, msg: Message, handler: Handler, error: str, started: float) -> None:
        delay = handler.retry.delay(d.deliveries)
        log.info("%s: %s failed (attempt %d), retrying in %.2fs: %s", self.group, msg.type, d.deliveries, delay, error)
        settlement = Settlement(
            self.group, msg.id, msg.flow_id, "retry",
            span=self._span(msg, handler, started, "retry", error, d.deliveries),
            retry_at=self.rt.clock.now() + delay,
        )
        await self._settle(d, settlement, [], retry_delay=delay)

    async def _fail(
        self,
        d: Delivery,
        msg: Message,
        handler: Handler | None,
        reason: str,
        error_type: str,
        error: str,
        started: float,
        *,
        ack: bool = True,
    ) -> None:
        """Fail a message for good: DLQ, ``on_error`` event or error reply, span (and the
        ack, unless ``ack`` is False: a message the broker gave up on, see
        :func:`record_abandoned`)."""
        failure = Failure(
            event=msg.type, service=self.group, handler=handler.name if handler else "",
            error_type=error_type, error=error, attempts=d.deliveries, payload=msg.payload,
            message_id=msg.id,
        )
        log.warning("%s: %s %s dead-lettered (%s): %s", self.group, msg.kind, msg.type, reason, error)
        emits: list[Message] = []
        stored_reply = None
        failure_json = failure.model_dump(mode="json")
        if handler is not None and handler.kind == "event" and handler.on_error:
            emits.append(msg.caused(handler.on_error, failure_json, source=self.group))
        if msg.kind == "command":
            body = reply_body(False, failure_json)
            stored_reply = orjson.dumps(body)
            reply = self._reply(msg, body)
            if reply is not None:
                emits.append(reply)
        outcome = {"rejected": "rejected", "invalid_payload": "invalid", "no_handler": "invalid"}.get(reason, "dead")
        settlement = Settlement(
            self.group, msg.id, msg.flow_id, "dead", inbox=True, reply=stored_reply,
            span=self._span(msg, handler, started, outcome, f"{error_type}: {error}", d.deliveries),
            dead=DeadLetter(
                msg_id=msg.id, group=self.group, route=d.route or _route(msg), type=msg.type, flow_id=msg.flow_id,
                body=d.body, reason=reason, error=f"{error_type}: {error}", attempts=d.deliveries,
            ),
        )
        await self._settle(d, settlement, emits, ack=ack)

    async def _dead_invalid(self, d: Delivery, started: float) -> None:
        log.warning("%s: undecodable message dead-lettered: %s", self.group, d.error)
        settlement = Settlement(
            self.group, "", None, "dead",
            dead=DeadLetter(
                msg_id="invalid-" + new_id(), group=self.group, route=d.route or "", type="(invalid)",
                flow_id=None, body=d.body, reason="invalid_envelope", error=d.error, attempts=d.deliveries,
            ),
        )
        await self._settle(d, settlement, [])

    def _answer_duplicate(self, command: Message) -> Callable[[bytes, Emitter], None]:
        """Answer a command that a competing consumer handled first, with its stored reply."""
        rt = self.rt

        def answer(stored: bytes, em: Emitter) -> None:
            reply = self._reply(command, orjson.loads(stored))
            if reply is None:
                return
            out = rt.app.topology.outgoing(reply)
            if out.route in rt.store.local_routes and is_workflow_reply(reply):
                recorder(reply, rt.clock.now())(em)
            em.emit([out])

        return answer

    def _reply(self, command: Message, body: Any) -> Message | None:
        reply_to = command.headers.get("reply_to")
        if not reply_to:
            return None
        # x- headers are the caller's correlation (a workflow's run and step): echo them.
        echoed = {k: v for k, v in command.headers.items() if k.startswith("x-")}
        return command.caused(command.type, body, kind="reply", source=self.group,
                              headers={**echoed, "reply_to": reply_to})

    def _span(
        self, msg: Message, handler: Handler | None, started: float, outcome: str, error: str | None, attempt: int
    ) -> SpanRecord:
        return SpanRecord(
            flow_id=msg.flow_id, msg_id=msg.id, service=self.group, handler=handler.name if handler else None,
            type=msg.type, started=started, ended=self.rt.clock.now(), outcome=outcome, error=error,
            attempt=attempt,
        )

    async def _settle(
        self, d: Delivery, settlement: Settlement, emits: list[Message], *, retry_delay: float = 0.0,
        ack: bool = True,
    ) -> str:
        rt = self.rt
        settlement.queue_id, settlement.lease = d.queue_id, d.lease
        topology = rt.app.topology
        trace = _TRACE_HEADERS.get()
        for m in emits:
            if trace:
                m.headers.update(trace)
            rt.instrumentation.published(m)
        settlement.emits = [topology.outgoing(m) for m in emits]
        if settlement.outcome == "ok" and (why := rt.too_large(settlement.emits)) is not None:
            raise MessageTooLarge(why)  # nothing committed: the handling fails instead (see _handle)
        if settlement.outcome != "ok":
            # A failure's own messages (error reply, on_error event) the bus would refuse
            # for good are left out: in the outbox they would wait for ever. The dead
            # letter keeps what happened.
            kept = []
            for out in settlement.emits:
                if (why := rt.too_large([out])) is None:
                    kept.append(out)
                else:
                    log.warning("%s: not sending %s %s after %s: %s", self.group, out.message.kind,
                                out.message.type, settlement.msg_id, why)
            settlement.emits = kept
        for out in settlement.emits:
            if out.route in rt.store.local_routes and is_workflow_reply(out.message):
                # The calling workflow runs in this process: journal its step's result in
                # this very transaction, and hand the reply over in memory after commit.
                settlement.extra = recorder(out.message, rt.clock.now())
        command = d.message
        if command is not None and command.kind == "command" and command.headers.get("reply_to"):
            settlement.on_duplicate = self._answer_duplicate(command)
        result, relay = await rt.store.settle(settlement, rt.clock.now(), rt.delivery_mode)
        if result == "stale":
            log.info("%s: lease on %s lost before commit; another consumer owns it", self.group, settlement.msg_id)
            return result
        if result == "failed":
            return result
        self.handled += 1
        if settlement.span is not None and rt.instrumentation.observers:
            span = settlement.span
            rt.instrumentation.handled(span, max(0.0, span.started - (d.message.time if d.message else span.started)))
        await rt.relay(relay)  # to the broker, or in memory to this process's reply inbox
        if rt.transport.store_bound or not ack:
            return result  # the ack was part of the transaction, or is not ours to give
        assert self.sub is not None
        if settlement.outcome == "retry":
            await self.sub.nack(d, retry_delay)
        else:
            await self.sub.ack([d])
        return result


async def record_abandoned(rt: Runtime, abandoned: Abandoned) -> None:
    """Dead-letter into the store a message the broker gave up on (reason ``abandoned``),
    its handler never run - as its service's consumer fails any message: in ``interplay
    dlq``, its flow failed, an ``on_error`` event or a command's caller answered with the
    error, a span. Raises if the store fails (the broker keeps it meanwhile)."""
    d = Delivery.from_bytes(abandoned.body, abandoned.deliveries, route=abandoned.route or None)
    msg = d.message
    service = rt.app.services.get(abandoned.group)
    if msg is not None and service is not None:
        consumer = rt.consumers.get(abandoned.group) or Consumer(rt, service)
        await consumer._fail(d, msg, consumer._handler_for(msg), "abandoned", "Abandoned", abandoned.reason,
                             rt.clock.now(), ack=False)
        return
    # Not an envelope, or from a queue of no service here: kept, but counted in no flow
    # (it never was) and marked in no inbox.
    dead = DeadLetter(
        msg_id=msg.id if msg is not None else "invalid-" + new_id(), group=abandoned.group, route=abandoned.route,
        type=msg.type if msg is not None else "(invalid)", flow_id=msg.flow_id if msg is not None else None,
        body=abandoned.body, reason="abandoned", error=f"Abandoned: {abandoned.reason}", attempts=abandoned.deliveries,
        counted=False,
    )
    await rt.store.settle(Settlement(abandoned.group, dead.msg_id, None, "dead", dead=dead), rt.clock.now(),
                          rt.delivery_mode)


def _route(msg: Message) -> str:
    """The route a message was published to, when the transport does not say (store bus)."""
    try:
        return route_of(msg)
    except ValueError:  # a reply without reply_to: it came by no route
        return ""
