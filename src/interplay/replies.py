"""A runtime's reply inbox: replies to its commands, and wakes for its workflows.

Every runtime that sends commands (``rt.call``, or workflows as an orchestrator) has
an ephemeral group on its own reply route. What arrives there: command replies
(recorded in the calling workflow's journal in the same transaction as the ack),
wakes (an event a workflow here waits for happened), and cancel requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .commands import CANCEL, is_workflow_reply, recorder
from .errors import StoreError, TransportError
from .message import Message
from .stores.messaging import WAKE
from .stores.records import Settlement
from .transports.base import Delivery, Subscription, reply_route

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ReplyInbox"]

log = logging.getLogger("interplay.replies")


class ReplyInbox:
    """Consumes this runtime's reply route."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.group = f"_r.{runtime.instance}"
        self.route = reply_route(runtime.instance)
        self.calls: dict[str, asyncio.Future[Any]] = {}
        self.sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Declare the reply route and start consuming it."""
        # Messages for this route written by this process are handed over in memory
        # (see Emitter.route); those from other processes arrive through the bus.
        self.rt.store.local_routes.add(self.route)
        await self.rt.transport.declare(self.group, [self.route], ephemeral=True)
        self.sub = await self.rt.transport.subscribe(self.group, [self.route], lease=self.rt.options.lease)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="interplay-replies")

    async def stop(self) -> None:
        """Stop consuming and forget the route."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self.rt.options.shutdown_grace)
            for task in pending:  # settled already: what they would do, a replay does
                task.cancel()
        self.rt.store.local_routes.discard(self.route)
        if self.sub is not None:
            await self.sub.close()
        try:
            await self.rt.transport.drop_group(self.group)
        except (TransportError, StoreError) as exc:
            log.warning("could not drop reply group %s: %s", self.group, exc)

    async def _loop(self) -> None:
        assert self.sub is not None
        while True:
            try:
                deliveries = await self.sub.receive(256, self.rt.options.receive_timeout)
            except (TransportError, StoreError) as exc:
                log.warning("reply receive failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for d in deliveries:
                self._spawn(self._handle(d))

    def deliver_local(self, msg: Message) -> None:
        """Take a message for this route, committed (journaled): one this process wrote,
        or one that came by the bus and was just settled."""
        if msg.type != WAKE:  # nothing to wait for: resolve the waiter now, not in a task of its own
            self._resolve(msg)
        else:
            self._spawn(self._dispatch(msg))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle(self, d: Delivery) -> None:
        msg = d.message
        extra = None
        if msg is not None and is_workflow_reply(msg):
            extra = recorder(msg, self.rt.clock.now())
        settlement = Settlement(
            self.group, msg.id if msg else "", msg.flow_id if msg else None, "ok",
            queue_id=d.queue_id, lease=d.lease, extra=extra,
        )
        try:
            result, relay = await self.rt.store.settle(settlement, self.rt.clock.now(), self.rt.delivery_mode)
        except (TransportError, StoreError) as exc:
            log.warning("reply not settled (%s); it will come again", exc)
            return
        if msg is not None and result != "stale":
            self.deliver_local(msg)  # committed: the waiter need not wait for the ack too
        try:
            await self.rt.relay(relay)
            if not self.rt.transport.store_bound and self.sub is not None:
                await self.sub.ack([d])
        except (TransportError, StoreError) as exc:
            log.warning("reply not acknowledged (%s); it will come again, and be dropped as a duplicate", exc)

    async def _dispatch(self, msg: Message) -> None:
        try:
            await self.rt.engine.on_wake(msg)
        except Exception:  # a workflow-side failure must not kill the inbox
            log.exception("handling wake %s failed", msg.id)

    def _resolve(self, msg: Message) -> None:
        """A reply or a cancel request: hand it to whoever waits, at once."""
        engine = self.rt.engine
        try:
            if msg.type == CANCEL:
                engine.cancel_local(str((msg.payload or {}).get("run_id")))
            elif "x-run" in msg.headers:
                engine.on_reply(msg)
            else:
                fut = self.calls.get(msg.causation_id or "")
                if fut is not None and not fut.done():
                    fut.set_result(msg.payload)
        except Exception:  # a workflow-side failure must not kill the inbox
            log.exception("handling reply %s failed", msg.id)
