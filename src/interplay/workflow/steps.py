"""The durable step primitives, as the engine executes them.

Each takes the run's state and the step's journal key. If the journal has the step
(replay), its recorded outcome is returned or raised again; otherwise the step is
done and journaled - and what it sends is committed in the same transaction as its
journal entry, so a crash never sends without recording or records without sending.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ..commands import reply_error, reply_result
from ..errors import MessageTooLarge, StepFailed, StepTimeout, StoreError, WorkflowCancelled
from ..message import Message
from ..payloads import remembered, resolve_hints, to_json
from ..stores import workflows as ops
from ..stores.messaging import Emitter
from ..stores.records import JournalEntry, Outgoing, RunRow, SpanRecord
from ..stores.tx import BatchConflict, Transaction
from ..transports.base import reply_route
from .context import SUB, ChildHandle, args_digest, step_failed

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .engine import RunState

__all__ = ["LeaseLost", "Steps"]

log = logging.getLogger("interplay.workflow")


class LeaseLost(Exception):
    """This orchestrator no longer owns the run; stop executing it."""


@dataclass(eq=False)
class Waiter:
    """A wait in progress: the predicate and the future the workflow awaits."""

    state: RunState
    key: int
    kind: str
    name: str
    match: Callable[[Any], bool]
    future: asyncio.Future[Any]


class Steps:
    """Step execution, mixed into the Engine."""

    rt: Runtime
    owner: str
    replies: dict[str, asyncio.Future[Any]]
    waiters: dict[tuple[str, int], Any]
    stopping: bool

    def launch(self, run: RunRow, journal: dict[int, JournalEntry]) -> RunState:
        raise NotImplementedError

    def _root(self, run: RunRow, *, causation_id: str | None, source: str, flow_start: Any) -> Outgoing:
        raise NotImplementedError

    # ------------------------------------------------------------------ plumbing
    async def write(
        self, state: RunState, entry: JournalEntry, outgoing: Sequence[Outgoing] = (),
        spans: Sequence[SpanRecord] = (), *, only_if_scheduled: bool = False, clear_wait: bool = False,
    ) -> bool:
        """Journal ``entry`` (fenced by ownership); raises LeaseLost unless ``only_if_scheduled``.

        Raises:
            MessageTooLarge: the bus would refuse one of ``outgoing`` for good; nothing is
                journaled, so the workflow gets the error where it sent the message.
        """
        if outgoing and (why := self.rt.too_large(outgoing)) is not None:
            raise MessageTooLarge(why)
        earlier = [t for t in state.background if t is not asyncio.current_task()]
        if earlier:  # ctx.now() entries go first: a store may commit in parallel
            await asyncio.gather(*earlier, return_exceptions=True)
        ok, relay = await self.rt.store.emitting(
            self.rt.clock.now(), self.rt.delivery_mode,
            lambda em: ops.write_step(em, state.run.holder, entry, outgoing, spans, only_if_scheduled=only_if_scheduled,
                                      clear_wait=clear_wait),
        )
        if ok:
            state.journal[entry.seq] = entry
            await self.rt.relay(relay)
        elif not only_if_scheduled:
            raise LeaseLost(state.run.run_id)
        return ok

    def _fresh(self, state: RunState) -> None:
        """Before doing new work: a cancelled run stops here (unless compensating)."""
        if state.cancelled and not state.compensating:
            raise WorkflowCancelled(f"run {state.run.run_id} was cancelled")

    async def _await(self, state: RunState, fut: asyncio.Future[Any], deadline: float | None, what: str,
                     timeout: float | None) -> Any:
        """Wait for ``fut``; StepTimeout at ``deadline`` (clock time); cancellable."""
        state.waiting.add(fut)
        try:
            if deadline is None:
                return await fut
            timer = asyncio.get_running_loop().create_task(self.rt.clock.sleep(deadline - self.rt.clock.now()))
            try:
                await asyncio.wait({fut, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            if fut.done():
                return fut.result()
            raise StepTimeout(what, timeout or 0.0)
        finally:
            state.waiting.discard(fut)

    def _now(self) -> float:
        return self.rt.clock.now()

    def _entry(self, state: RunState, key: int, kind: str, name: str, status: str, **fields: Any) -> JournalEntry:
        now = self._now()
        return JournalEntry(state.run.run_id, key, kind, name, status, started=fields.pop("started", now),
                            ended=None if status == "scheduled" else now, **fields)

    # ------------------------------------------------------------------ commands
    async def call(self, state: RunState, key: int, target: str, data: Any, timeout: float | None) -> Any:
        """Send a command and wait for its reply (see WorkflowContext.call)."""
        assert state.ctx is not None
        digest = args_digest(data)
        entry = state.ctx.check(key, "call", target, digest)
        if entry is not None and entry.status != "scheduled":
            return _outcome(entry)
        self._fresh(state)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        run = state.run
        headers = {"reply_to": reply_route(self.owner), "x-run": run.run_id, "x-key": str(key)}
        sending: Awaitable[Any]
        if entry is None:
            msg = Message(type=target, payload=data, kind="command", flow_id=run.flow_id,
                          causation_id=state.root_id, source=state.source, headers=headers)
            self.rt.instrumentation.published(msg)
            log.debug("run %s: sending %s %s", run.run_id, target, msg.id)
            deadline = None if timeout is None else self._now() + timeout
            entry = self._entry(state, key, "call", target, "scheduled", msg_id=msg.id, data={"args": digest},
                                deadline=deadline)
            sending = self.write(state, entry, [self.rt.app.topology.outgoing(msg)])
            resending = False
        else:
            # In flight when its previous owner stopped: send it again with the same id;
            # the service's inbox answers from the reply it stored the first time.
            assert entry.msg_id is not None
            log.debug("run %s: sending %s %s again (in flight when its owner stopped)", run.run_id, target,
                      entry.msg_id)
            msg = Message(type=target, payload=data, kind="command", id=entry.msg_id, flow_id=run.flow_id,
                          causation_id=state.root_id, source=state.source, headers=headers)
            sending = self.rt.send([self.rt.app.topology.outgoing(msg)])
            resending = True
        self.replies[msg.id] = fut
        try:
            await sending
        except MessageTooLarge as exc:  # on a re-send: journaled as scheduled by an interplay from before
            del self.replies[msg.id]
            return _outcome(await self._refused(state, key, "call", target, exc, resent=resending))
        except BaseException:
            del self.replies[msg.id]  # never sent: no reply will come
            raise
        try:
            body = await self._await(state, fut, entry.deadline, target, timeout)
        except StepTimeout:
            failed = self._entry(state, key, "call", target, "failed", error_type="StepTimeout",
                                 error=f"no reply within {timeout:g}s", data=timeout, started=entry.started)
            if await self.write(state, failed, only_if_scheduled=True):
                raise
            return _outcome(await self._reload(state, key))  # the reply won the race
        finally:
            self.replies.pop(msg.id, None)
        return reply_result(target, body)

    def on_reply(self, msg: Message) -> None:
        """A command's reply was committed to the journal; resume the workflow awaiting it."""
        run_id, key = msg.headers.get("x-run"), msg.headers.get("x-key")
        fut = self.replies.get(msg.causation_id or "")
        if fut is None or fut.done():
            log.debug("run %s: reply to %s and nobody waits for it here", run_id, msg.causation_id)
            return  # nobody waits here any more (timed out, or the run moved on)
        log.debug("run %s: reply to %s", run_id, msg.causation_id)
        state = self.active_state(run_id)
        if state is not None and key is not None:
            body = msg.payload if isinstance(msg.payload, dict) else {}
            ok = bool(body.get("ok"))
            error = reply_error(body)
            old = state.journal.get(int(key))
            state.journal[int(key)] = JournalEntry(
                msg.headers.get("x-run", ""), int(key), "call", msg.type, "completed" if ok else "failed",
                msg_id=msg.causation_id, data=body.get("result") if ok else error,
                error_type=None if ok else error.get("error_type"), error=None if ok else error.get("error"),
                started=old.started if old else self._now(), ended=self._now(),
            )
        fut.set_result(msg.payload)

    def active_state(self, run_id: str | None) -> RunState | None:
        """The state of a run executing here."""
        raise NotImplementedError

    async def _reload(self, state: RunState, key: int) -> JournalEntry:
        for entry in await self.rt.store.load_journal(state.run.run_id):
            if entry.seq == key:
                state.journal[key] = entry
                return entry
        raise LeaseLost(state.run.run_id)

    # ------------------------------------------------------------------ local steps
    async def step(self, state: RunState, key: int, name: str, fn: Callable[..., Any], args: tuple[Any, ...],
                   timeout: float | None, transactional: bool = False) -> Any:
        """Run a local function as a journaled step (see WorkflowContext.step)."""
        assert state.ctx is not None
        entry = state.ctx.check(key, "step", name)
        if entry is not None:
            return _outcome(entry)
        self._fresh(state)
        if transactional or _wants_transaction(fn):
            return await self._transaction_step(state, key, name, fn, args)
        started = self._now()
        try:
            if inspect.iscoroutinefunction(fn):
                result = await asyncio.wait_for(fn(*args), timeout)
            else:
                result = await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)
        except (TimeoutError, Exception) as exc:
            error_type = "StepTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            error = f"no result within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
            record, span = self._step_record(state, name, None, started, "failed", f"{error_type}: {error}")
            await self.write(state, self._entry(state, key, "step", name, "failed", error_type=error_type,
                                                error=error, started=started), [record], [span])
            raise StepFailed(name, error_type, error) from exc
        data = to_json(result)
        record, span = self._step_record(state, name, data, started, "ok", None)
        await self.write(state, self._entry(state, key, "step", name, "completed", data=data, started=started),
                         [record], [span])
        return data

    async def _transaction_step(self, state: RunState, key: int, name: str, fn: Callable[..., Any],
                                args: tuple[Any, ...]) -> Any:
        started = self._now()
        placeholder, _ = self._step_record(state, name, None, started, "ok", None)

        def op(em: Emitter) -> tuple[bool, Any, str | None, str | None]:
            tx = em.tx
            if not ops.holds(tx, state.run.run_id, state.run.holder, em.now):
                return False, None, None, None  # fenced *before* the step's writes: none happen
            tx.execute("SAVEPOINT ip_step")
            try:
                data = to_json(fn(Transaction(tx), *args))
                tx.execute("RELEASE SAVEPOINT ip_step")
                failure: tuple[str, str] | None = None
            except BatchConflict:
                raise  # not the step's failure: the store runs this op again alone
            except Exception as exc:  # the step's own writes are undone; the failure is journaled
                tx.execute("ROLLBACK TO SAVEPOINT ip_step")
                tx.execute("RELEASE SAVEPOINT ip_step")
                data, failure = None, (type(exc).__name__, str(exc))
            status = "completed" if failure is None else "failed"
            entry = self._entry(state, key, "step", name, status, data=data, started=started,
                                error_type=failure and failure[0], error=failure and failure[1])
            record = Outgoing(_with_payload(placeholder.message, data), route="", body=b"")
            span = _span(state, record.message, name, started, self._now(), "ok" if failure is None else "failed",
                         None if failure is None else f"{failure[0]}: {failure[1]}")
            if not ops.write_step(em, state.run.holder, entry, [record], [span]):
                return False, None, None, None
            written.append(entry)  # the last attempt's is the one committed
            return True, data, failure and failure[0], failure and failure[1]

        written: list[JournalEntry] = []
        (ok, data, error_type, error), _ = await self.rt.store.emitting(self._now(), self.rt.delivery_mode, op)
        if not ok:
            raise LeaseLost(state.run.run_id)
        state.journal[key] = written[-1]
        if error_type is not None:
            raise StepFailed(name, error_type, error or "")
        return data

    def _step_record(self, state: RunState, name: str, data: Any, started: float, outcome: str,
                     error: str | None) -> tuple[Outgoing, SpanRecord]:
        msg = Message(type=name, payload=data, kind="step", flow_id=state.run.flow_id,
                      causation_id=state.root_id, source=state.source, time=started)
        return Outgoing(msg, route="", body=b""), _span(state, msg, name, started, self._now(), outcome, error)

    # ------------------------------------------------------------------ events, waits, timers
    async def emit(self, state: RunState, key: int, event: str, data: Any) -> str:
        """Emit an event in the run's flow, once."""
        assert state.ctx is not None
        entry = state.ctx.check(key, "emit", event)
        if entry is not None:
            return _outcome(entry) if entry.status == "failed" else entry.msg_id or ""
        self._fresh(state)
        msg = Message(type=event, payload=data, kind="event", flow_id=state.run.flow_id,
                      causation_id=state.root_id, source=state.source)
        self.rt.instrumentation.published(msg)
        try:
            await self.write(state, self._entry(state, key, "emit", event, "completed", msg_id=msg.id),
                             [self.rt.app.topology.outgoing(msg)])
        except MessageTooLarge as exc:
            return str(_outcome(await self._refused(state, key, "emit", event, exc)))  # raises StepFailed
        return msg.id

    async def _refused(self, state: RunState, key: int, kind: str, name: str, exc: MessageTooLarge,
                       *, resent: bool = False) -> JournalEntry:
        """A call or emit the bus would never take: journal it as failed (nothing sent),
        so that a replay raises the same error whatever the bus's limit is by then; the
        entry that stands (``_outcome`` of it raises that error).

        ``resent``: a call journaled as scheduled before, whose reply may have been
        recorded meanwhile: then that reply stands.
        """
        failed = self._entry(state, key, kind, name, "failed", error_type="MessageTooLarge", error=str(exc))
        if await self.write(state, failed, only_if_scheduled=resent):
            return failed
        return await self._reload(state, key)

    async def wait(self, state: RunState, key: int, kind: str, name: str, wait_type: str,
                   match: Callable[[Any], bool], timeout: float | None) -> Any:
        """Wait for an event (or a child run) in the run's flow; returns its payload."""
        assert state.ctx is not None
        entry = state.ctx.check(key, kind, name)
        if entry is not None and entry.status != "scheduled":
            return _outcome(entry)["payload"] if entry.status == "completed" else _outcome(entry)
        self._fresh(state)
        if entry is None:
            deadline = None if timeout is None else self._now() + timeout
            entry = self._entry(state, key, kind, name, "scheduled", deadline=deadline)
        consumed = [
            e.data["message_id"] for e in state.journal.values()
            if e.kind == "wait" and e.status == "completed" and isinstance(e.data, dict) and e.data.get("message_id")
        ]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter = Waiter(state, key, kind, name, match, fut)
        self.waiters[(state.run.run_id, key)] = waiter
        registering = entry
        try:
            found, _ = await self.rt.store.emitting(
                self._now(), self.rt.delivery_mode,
                lambda em: ops.register_wait(em, state.run.holder, registering, state.run.flow_id, wait_type, consumed),
            )
            if found is None:
                raise LeaseLost(state.run.run_id)
            state.journal[key] = entry
            for msg_id, payload in found:
                if await self.offer(waiter, msg_id, payload):
                    break
            try:
                return await self._await(state, fut, entry.deadline, name, timeout)
            except StepTimeout:
                failed = self._entry(state, key, kind, name, "failed", error_type="StepTimeout",
                                     error=f"nothing within {timeout:g}s", data=timeout, started=entry.started)
                if await self.write(state, failed, only_if_scheduled=True, clear_wait=True):
                    raise
                done = await self._reload(state, key)
                return _outcome(done)["payload"]
        finally:
            self.waiters.pop((state.run.run_id, key), None)

    async def offer(self, waiter: Waiter, msg_id: str, payload: Any) -> bool:
        """Give a waiter a candidate event; True if it matched and the wait completed."""
        if waiter.future.done() or not waiter.match(payload):
            return False
        state = waiter.state
        entry = self._entry(state, waiter.key, waiter.kind, waiter.name, "completed",
                            data={"message_id": msg_id, "payload": payload}, started=state.journal[waiter.key].started)
        spans = []
        if msg_id:
            now = self._now()
            spans.append(SpanRecord(state.run.flow_id, msg_id, state.source, "wait_for", waiter.name, now, now,
                                    "ok", None, 1))
        if await self.write(state, entry, spans=spans, only_if_scheduled=True, clear_wait=True):
            if not waiter.future.done():
                waiter.future.set_result(payload)
            return True
        return False

    async def on_wake(self, msg: Message) -> None:
        """An awaited event (or child run) happened: offer it to the waiter.

        A wake from another process leaves out a payload over ``WAKE_CARRIES`` (it might
        exceed what the bus takes): it is read from the store here, retried while the
        store is unreachable (the wake itself is settled already).
        """
        body = msg.payload if isinstance(msg.payload, dict) else {}
        waiter_key = (str(body.get("run_id")), int(body.get("seq", -1)))
        if waiter_key not in self.waiters:
            return
        waiter: Waiter = self.waiters[waiter_key]
        msg_id = str(body.get("message_id") or "")
        if "payload" in body:
            payload = body["payload"]
        else:
            read = partial(ops.woken_by, wait_type=str(body.get("type")), message_id=msg_id)
            delay = 0.05
            while True:
                try:
                    found, payload = await self.rt.store.read(read)
                    break
                except StoreError as exc:
                    # Until the wait ends another way (timeout, cancel, the run moving on or
                    # away, this orchestrator stopping): whoever runs it then rescans on replay.
                    if waiter.future.done() or self.waiters.get(waiter_key) is not waiter or self.stopping:
                        return
                    log.warning("run %s: reading what woke it failed (retrying in %.2fs): %s",
                                body.get("run_id"), delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            if not found:  # only a trace_retention shorter than the wait deletes it
                log.error("run %s: woken by %s, which the store no longer has; it waits on", body.get("run_id"),
                          msg_id or body.get("type"))
                return
        await self.offer(waiter, msg_id, payload)

    async def sleep(self, state: RunState, key: int, seconds: float) -> None:
        """A durable timer."""
        assert state.ctx is not None
        entry = state.ctx.check(key, "sleep", "sleep")
        if entry is not None and entry.status == "completed":
            return
        self._fresh(state)
        if entry is None:
            entry = self._entry(state, key, "sleep", "sleep", "scheduled", deadline=self._now() + seconds,
                                data=seconds)
            await self.write(state, entry)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        assert entry.deadline is not None
        deadline = entry.deadline

        async def ring() -> None:
            await self.rt.clock.sleep(deadline - self._now())
            if not fut.done():
                fut.set_result(None)

        timer = asyncio.get_running_loop().create_task(ring())
        try:
            await self._await(state, fut, None, "sleep", None)
        finally:
            timer.cancel()
        await self.write(state, self._entry(state, key, "sleep", "sleep", "completed", data=seconds,
                                            started=entry.started), only_if_scheduled=True)

    def now(self, state: RunState, key: int) -> float:
        """The journaled time (recorded without waiting: the writes stay in order)."""
        assert state.ctx is not None
        entry = state.ctx.check(key, "now", "now")
        if entry is not None:
            return float(entry.data)
        value = self._now()
        entry = self._entry(state, key, "now", "now", "completed", data=value)
        state.journal[key] = entry
        task = asyncio.get_running_loop().create_task(self.write(state, entry))
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        return value

    # ------------------------------------------------------------------ children
    async def start_child(self, state: RunState, key: int, workflow: str, data: Any,
                          child_id: str | None) -> ChildHandle:
        """Start a child run in this flow, owned (at first) by this orchestrator."""
        assert state.ctx is not None
        entry = state.ctx.check(key, "child", workflow)
        if entry is not None:
            return ChildHandle(state.ctx, str((entry.data or {}).get("run_id")))
        self._fresh(state)
        run_id = child_id or f"{state.run.run_id}-{key // SUB}"
        now = self._now()
        child = RunRow(
            run_id=run_id, workflow=workflow, flow_id=state.run.flow_id, parent_run=state.run.run_id,
            parent_seq=key, status="running", input=data, result=None, error_type=None, error=None,
            owner=self.owner, lease_until=now + self.rt.options.run_lease, cancel_requested=False,
            created=now, updated=now, epoch=1,
        )
        root = self._root(child, causation_id=state.root_id, source=state.source, flow_start=None)
        entry = self._entry(state, key, "child", workflow, "completed", data={"run_id": run_id})

        def op(em: Emitter) -> tuple[bool, RunRow | None]:
            if not ops.write_step(em, state.run.holder, entry):
                return False, None
            return ops.create_run(em, child, root)

        (created, row), relay = await self.rt.store.emitting(now, self.rt.delivery_mode, op)
        if row is None:
            raise LeaseLost(state.run.run_id)
        state.journal[key] = entry
        await self.rt.relay(relay)
        if created:
            self.launch(row, {})
        return ChildHandle(state.ctx, run_id)

    async def child_result(self, state: RunState, key: int, child_id: str, timeout: float | None) -> Any:
        """Wait for a child run to end; its result, or StepFailed."""
        outcome = await self.wait(state, key, "child_result", child_id, f"@run:{child_id}", lambda p: True, timeout)
        if not isinstance(outcome, dict) or outcome.get("status") != "completed":
            info = outcome if isinstance(outcome, dict) else {}
            raise StepFailed(f"workflow run {child_id}", str(info.get("error_type") or info.get("status")),
                             str(info.get("error") or ""), info)
        return outcome.get("result")


def _outcome(entry: JournalEntry) -> Any:
    if entry.status == "failed":
        raise step_failed(entry)
    return entry.data


def _span(state: RunState, msg: Message, name: str, started: float, ended: float, outcome: str,
          error: str | None) -> SpanRecord:
    return SpanRecord(state.run.flow_id, msg.id, state.source, name, name, started, ended, outcome, error, 1)


def _with_payload(msg: Message, data: Any) -> Message:
    msg.payload = data
    return msg


@remembered(4096)
def _wants_transaction(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    hints = resolve_hints(fn)
    return bool(params) and hints.get(params[0].name) is Transaction
