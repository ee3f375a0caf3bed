"""The workflow engine: runs workflows durably on any transport and store.

A run lives in memory while this orchestrator owns it (no replay while it is here);
its journal in the store is what survives. Orchestrators *lease* runs: they claim
unowned runs (new ones, or those whose owner stopped heartbeating), heartbeat the
ones they hold, and every journal write is fenced by ownership. So any number of
orchestrator processes share the work, and a run whose owner died is resumed by
another, replaying its journal: no completed step runs again, and a command that was
in flight is sent again with the same message id (the service's inbox answers it
from its stored reply instead of running it twice).

The step primitives (call, step, emit, wait, sleep, child) live in ``steps.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ..commands import CANCEL
from ..errors import ConfigurationError, NonDeterminismError, StoreError, WorkflowCancelled
from ..message import Message, new_id
from ..payloads import to_json
from ..stores import workflows as ops
from ..stores.records import FlowStart, JournalEntry, Outgoing, RunRow, SpanRecord
from ..stores.tx import Tx
from ..transports.base import reply_route
from .context import WorkflowContext
from .steps import LeaseLost, Steps

if TYPE_CHECKING:
    from ..app import WorkflowSpec
    from ..runtime import Runtime

__all__ = ["Engine", "RunState"]

log = logging.getLogger("interplay.workflow")

CLAIM_BITE = 200
"""Runs claimed per round by an orchestrator."""
ENDED_KEPT = 10_000
"""Records of runs that ended here kept for ``result()`` (the oldest are read from the store)."""

@dataclass(eq=False)
class RunState:
    """A run this orchestrator is executing."""

    engine: Engine
    run: RunRow
    spec: WorkflowSpec
    journal: dict[int, JournalEntry]
    visited: set[int] = field(default_factory=set)
    waiting: set[asyncio.Future[Any]] = field(default_factory=set)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    ctx: WorkflowContext | None = None
    cancelled: bool = False
    compensating: bool = False
    lost: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def root_id(self) -> str:
        """The id of the run's start record in the trace."""
        return root_message_id(self.run.run_id)

    @property
    def source(self) -> str:
        """How the run signs what it sends."""
        return f"workflow:{self.run.workflow}"


def root_message_id(run_id: str) -> str:
    """The trace record of a run's start."""
    return f"run:{run_id}"


class Engine(Steps):
    """Executes the workflows of one runtime (an orchestrator)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.owner = runtime.instance
        self.active: dict[str, RunState] = {}
        self.replies: dict[str, asyncio.Future[Any]] = {}
        self.waiters: dict[tuple[str, int], Any] = {}
        self.stopping = False
        self.running = False
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._finished: dict[str, asyncio.Event] = {}
        self._ended: OrderedDict[str, RunRow] = OrderedDict()  # runs that ended here, as stored
        self._claiming: set[str] = set()
        self._watched: dict[str, asyncio.Event] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._watch_wake = asyncio.Event()
        self._listening = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start claiming and heartbeating runs."""
        # Our lease first: a run we create or claim is ours only while it holds.
        await self.rt.store.heartbeat_runs(self.owner, self.rt.clock.now(), self.rt.options.run_lease)
        self.running = True
        await self._listen()
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._claim_loop(), name="interplay-claim-runs"),
            loop.create_task(self._heartbeat_loop(), name="interplay-heartbeat-runs"),
        ]

    async def stop(self) -> None:
        """Stop executing; hand the runs held here back so another orchestrator resumes them."""
        self.stopping = True
        for task in self._loops:
            task.cancel()
        tasks = [s.task for s in self.active.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*self._loops, *tasks, return_exceptions=True)
        if self.running:
            try:
                await self.rt.store.write(lambda tx: ops.release(tx, self.owner))
            except StoreError as exc:  # the leases expire by themselves
                log.warning("could not release runs on shutdown: %s", exc)
        self.running = False

    async def _listen(self) -> None:
        """Where the store notifies other processes' commits (PostgreSQL), hear about runs.

        Runs that became claimable wake the claim loop, runs that ended wake the watch
        loop, so neither waits for its next poll; the polls stay as the fallback.
        """
        listen = getattr(self.rt.store, "listen_for_queued", None)
        if self._listening or listen is None:
            return
        try:
            await listen(self._heard)
            self._listening = True
        except StoreError as exc:
            log.warning("cannot listen for workflow runs (polling instead): %s", exc)

    def _heard(self, routes: set[str]) -> None:
        if ops.RUNS_READY in routes:
            self._wake.set()
        if ops.RUNS_ENDED in routes:
            self._watch_wake.set()

    # ------------------------------------------------------------------ starting runs
    async def start_run(
        self, name: str, payload: Any, run_id: str | None, flow_id: str | None
    ) -> RunRow:
        """Create a run (or return the existing one with that id) and execute it here if we can.

        Raises:
            ConfigurationError: unknown workflow, or the id belongs to another workflow.
            ValidationFailed: the payload does not fit the workflow (nothing is stored).
        """
        spec = self.rt.app.workflows.get(name)
        if spec is None:
            raise ConfigurationError(f"unknown workflow {name!r}; known: {sorted(self.rt.app.workflows)}")
        data = to_json(spec.payload.validate(payload))
        run_id = run_id or new_id()
        now = self.rt.clock.now()
        own = self.running and not self.stopping
        run = RunRow(
            run_id=run_id, workflow=name, flow_id=flow_id or run_id, parent_run=None, parent_seq=None,
            status="running" if own else "pending", input=data, result=None, error_type=None, error=None,
            owner=self.owner if own else None, lease_until=now + self.rt.options.run_lease if own else None,
            cancel_requested=False, created=now, updated=now, epoch=1 if own else 0,
        )
        root = self._root(run, causation_id=None, source=self.rt.options.source,
                          flow_start=FlowStart(name, kind="workflow", declared=True) if flow_id is None else None)
        (created, row), _ = await self.rt.store.emitting(
            now, self.rt.delivery_mode, lambda em: ops.create_run(em, run, root)
        )
        if not created and row.workflow != name:
            raise ConfigurationError(f"run id {run_id!r} already belongs to workflow {row.workflow!r}")
        if created and own:
            self.launch(row, {})
        elif created:
            self._wake.set()
        return row

    def _root(self, run: RunRow, *, causation_id: str | None, source: str, flow_start: FlowStart | None) -> Outgoing:
        msg = Message(
            type=run.workflow, payload=run.input, kind="workflow", id=root_message_id(run.run_id),
            flow_id=run.flow_id, causation_id=causation_id, source=source, time=run.created,
        )
        return Outgoing(msg, route="", body=b"", flow_start=flow_start)

    def launch(self, run: RunRow, journal: dict[int, JournalEntry]) -> RunState:
        """Execute a run this orchestrator owns."""
        spec = self.rt.app.workflows.get(run.workflow)
        if spec is None:  # a run of a workflow this process does not know: leave it
            raise ConfigurationError(f"unknown workflow {run.workflow!r}")
        log.debug("run %s: executing here (%d journaled steps)", run.run_id, len(journal))
        state = RunState(self, run, spec, journal, cancelled=run.cancel_requested)
        state.finished = self.finished_event(run.run_id)
        self.active[run.run_id] = state
        self.rt.instrumentation.run_started(run)  # before the run sends anything: its span parents what it sends
        state.task = asyncio.get_running_loop().create_task(self._execute(state), name=f"interplay-run-{run.run_id}")
        # Forget the run when its task ends - also when it was cancelled before it ever
        # started, in which case no code of _execute (not even a finally) runs.
        state.task.add_done_callback(lambda _: self._forget(state))
        return state

    def _forget(self, state: RunState) -> None:
        run_id = state.run.run_id
        if self.active.get(run_id) is state:
            del self.active[run_id]
        event = self._finished.pop(run_id, None)
        if event is not None:
            event.set()

    def ended_here(self, run_id: str) -> RunRow | None:
        """The stored record of a run that ended in this orchestrator lately (None otherwise)."""
        return self._ended.get(run_id)

    def finished_event(self, run_id: str) -> asyncio.Event:
        """Set when a run held here finishes (or leaves this orchestrator)."""
        event = self._finished.get(run_id)
        if event is None:
            event = self._finished[run_id] = asyncio.Event()
        return event

    # ------------------------------------------------------------------ executing
    async def _execute(self, state: RunState) -> None:
        run, spec = state.run, state.spec
        ctx = state.ctx = WorkflowContext(state)
        try:
            kwargs: dict[str, Any] = {spec.ctx_param: ctx}
            if spec.payload_param is not None:
                kwargs[spec.payload_param] = spec.payload.validate(run.input)
            result = await spec.fn(**kwargs)
            unvisited = sorted(set(state.journal) - state.visited)
            if unvisited:
                raise NonDeterminismError(
                    f"run {run.run_id} finished without the journal's step(s) "
                    f"{[k // 1000 for k in unvisited]}: the workflow code changed"
                )
            await self._finish(state, "completed", to_json(result), None, None)
        except NonDeterminismError as exc:
            log.error("run %s parked: %s", run.run_id, exc)
            await self._park(state, exc)
        except LeaseLost:
            log.info("run %s: lease lost; another orchestrator has it", run.run_id)
        except asyncio.CancelledError:
            if not (self.stopping or state.lost):
                raise
        except WorkflowCancelled as exc:
            await self._finish(state, "cancelled", None, "WorkflowCancelled", str(exc))
        except Exception as exc:
            status = "compensated" if ctx.compensated else "failed"
            log.info("run %s %s: %s: %s", run.run_id, status, type(exc).__name__, exc)
            await self._finish(state, status, None, type(exc).__name__, str(exc))
        finally:
            for task in state.background:
                task.cancel()

    async def _finish(self, state: RunState, status: str, result: Any, error_type: str | None,
                      error: str | None) -> None:
        run = state.run
        now = self.rt.clock.now()
        span = SpanRecord(
            flow_id=run.flow_id, msg_id=state.root_id, service=state.source, handler=state.spec.fn.__qualname__,
            type=run.workflow, started=run.created, ended=now, outcome=status,
            error=None if error is None else f"{error_type}: {error}", attempt=1,
        )
        try:
            ok, relay = await self.rt.store.emitting(
                now, self.rt.delivery_mode,
                lambda em: ops.finish_run(em, run, run.holder, status, result, error_type, error, span),
            )
        except StoreError as exc:  # the lease expires; another orchestrator replays and finishes it
            log.warning("run %s: could not record its end (%s); it will be resumed", run.run_id, exc)
            return
        if not ok:
            log.info("run %s ended here but another orchestrator owns it now", run.run_id)
            return
        # What the commit stored, so that result() here needs no read of it.
        self._ended[run.run_id] = dataclasses.replace(
            run, status=status, result=result, error_type=error_type, error=error, owner=None, lease_until=None,
            updated=now,
        )
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        self.rt.instrumentation.run_ended(run, status, now - run.created)
        await self.rt.relay(relay)

    async def _park(self, state: RunState, exc: NonDeterminismError) -> None:
        now = self.rt.clock.now()
        await self.rt.store.write(
            lambda tx: ops.park_run(tx, state.run, state.run.holder, "NonDeterminismError", str(exc), now)
        )

    # ------------------------------------------------------------------ leases
    async def _claim_loop(self) -> None:
        opts = self.rt.options
        while not self.stopping:
            # Cleared before looking, not after: a wake-up arriving while we claim
            # (a run created meanwhile) must make the wait below return at once.
            self._wake.clear()
            try:
                # A bite at a time: a run claimed but not started in time would lapse and
                # bounce to another orchestrator. A full bite means more may be waiting.
                room = min(CLAIM_BITE, opts.max_active_runs - len(self.active))
                claimed: list[RunRow] = []
                if room > 0:
                    claimed = await self.rt.store.claim_runs(self.owner, room, self.rt.clock.now(), opts.run_lease)
                    # still winding down here: the heartbeat releases such a run to be claimed again
                    fresh = [run for run in claimed if run.run_id not in self.active]
                    self._claiming.update(run.run_id for run in fresh)
                    try:
                        journals = await self.rt.store.load_journals([run.run_id for run in fresh]) if fresh else {}
                        for run in fresh:
                            if run.run_id not in self.active:
                                self.launch(run, {e.seq: e for e in journals[run.run_id]})
                    finally:
                        self._claiming.difference_update(run.run_id for run in fresh)
            except (StoreError, ConfigurationError) as exc:
                log.warning("claiming runs failed: %s", exc)
            if len(claimed) == CLAIM_BITE:
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), opts.run_poll)
            except TimeoutError:
                pass

    async def _heartbeat_loop(self) -> None:
        lease = self.rt.options.run_lease
        while not self.stopping:
            await asyncio.sleep(lease / 3)
            try:
                held = await self.rt.store.heartbeat_runs(self.owner, self.rt.clock.now(), lease)
            except StoreError as exc:
                log.warning("run heartbeat failed: %s", exc)
                continue
            for run_id, state in list(self.active.items()):
                if run_id not in held and state.task is not None and not state.task.done():
                    # Someone took it over (we were too slow): stop executing it here.
                    state.lost = True
                    state.task.cancel()
            orphans = held - self.active.keys() - self._claiming
            if orphans:
                # Leased to us but executed nowhere (e.g. claimed back while its old task
                # was still winding down): a heartbeat must not keep such a lease alive.
                log.info("releasing %d run(s) leased here but not executing: %s", len(orphans), sorted(orphans)[:5])
                await self._release(orphans)
                self._wake.set()

    async def _release(self, run_ids: set[str]) -> None:
        ids = sorted(run_ids)
        marks = ", ".join("?" * len(ids))
        try:

            def release(tx: Tx) -> None:
                tx.execute(
                    "UPDATE ip_runs SET owner = NULL, lease_until = NULL "
                    f"WHERE owner = ? AND status = 'running' AND run_id IN ({marks})",
                    (self.owner, *ids),
                )
                tx.routes.add(ops.RUNS_READY)

            await self.rt.store.write(release)
        except StoreError as exc:  # the lease lapses by itself
            log.warning("could not release runs: %s", exc)

    # ------------------------------------------------------------------ control
    async def cancel(self, run_id: str) -> RunRow | None:
        """Ask for a run to be cancelled, wherever it executes."""

        def control(owner: str) -> Outgoing:
            msg = Message(type=CANCEL, kind="reply", payload={"run_id": run_id}, source="interplay",
                          headers={"reply_to": reply_route(owner)})
            return Outgoing(msg, route=reply_route(owner), body=msg.encode(), fanout=1)

        now = self.rt.clock.now()
        run, relay = await self.rt.store.emitting(
            now, self.rt.delivery_mode, lambda em: ops.request_cancel(em, run_id, control)
        )
        await self.rt.relay(relay)
        if run is not None:
            self.cancel_local(run_id)
        return run

    def cancel_local(self, run_id: str) -> None:
        """Cancel a run held here: its current wait raises WorkflowCancelled."""
        state = self.active.get(run_id)
        if state is None:
            return
        state.cancelled = True
        for fut in list(state.waiting):
            if not fut.done():
                fut.set_exception(WorkflowCancelled(f"run {run_id} was cancelled"))

    async def watch(self, run_id: str, timeout: float | None) -> None:
        """Return when the run may have ended (or after ``timeout``); the caller checks."""
        if run_id in self.active:
            event = self.finished_event(run_id)
        else:
            watched = self._watched.get(run_id)
            if watched is None:
                watched = self._watched[run_id] = asyncio.Event()
            event = watched
            if self._watcher is None or self._watcher.done():
                await self._listen()
                self._watcher = asyncio.get_running_loop().create_task(self._watch_loop(), name="interplay-watch")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                await event.wait()

    async def _watch_loop(self) -> None:
        """One query for all runs awaited here but executed elsewhere, instead of one each."""
        pause = 0.005
        while self._watched:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._watch_wake.wait()
            self._watch_wake.clear()
            ids = list(self._watched)
            ended: set[str] = set()
            try:
                ended = await self.rt.store.read(partial(ops.ended_runs, run_ids=ids))
            except StoreError as exc:
                log.warning("watching runs failed: %s", exc)
            for run_id in ended | {r for r in ids if r in self.active}:
                event = self._watched.pop(run_id, None)
                if event is not None:
                    event.set()
            # Notified of ends (PostgreSQL), the poll is only a fallback.
            pause = 0.005 if ended else min(pause * 2, 1.0 if self._listening else 0.1)

    def active_state(self, run_id: str | None) -> RunState | None:
        """The state of a run executing here."""
        return None if run_id is None else self.active.get(run_id)

    def wake_claims(self) -> None:
        """Look for claimable runs now (a run was created or resumed)."""
        self._wake.set()
