"""WorkflowContext: the durable primitives a workflow is written with.

Every primitive is a numbered step. Its outcome is journaled in the store before the
workflow moves on; when a run is resumed (after a crash, on another orchestrator) the
workflow function runs again from the top and each step already in the journal returns
its recorded outcome instead of running again. The step number is taken when the
primitive is *called* (not when it is awaited), so ``ctx.gather`` numbers its steps in
argument order whatever order they finish in.

Workflow code must be deterministic: the same journal must lead it to the same steps.
Replay checks each step's kind, name and arguments against the journal and raises
:class:`~interplay.errors.NonDeterminismError` (the run is parked) when they differ.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import ConfigurationError, NonDeterminismError, StepFailed, StepTimeout, WorkflowCancelled
from ..payloads import PayloadType, resolve_hints, to_json
from ..service import Retry, check_name
from ..stores.records import JournalEntry

if TYPE_CHECKING:
    from .engine import RunState

__all__ = ["ChildHandle", "Saga", "WorkflowContext"]

SUB = 1000
"""Journal keys are ``seq * SUB + sub``: retries and backoffs of step ``seq`` are its subs."""

_NAMESPACE = uuid.UUID("6f1d6a36-4d1e-4b55-9d5c-0a6f3c1e9b20")

Coro = Coroutine[Any, Any, Any]


def args_digest(value: Any) -> str:
    """A short digest of a step's arguments, to notice replay with different ones."""
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        data = repr(value).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class WorkflowContext:
    """What a workflow can do durably. Passed as the workflow's ``ctx`` parameter.

    Attributes:
        run_id: this run's id.
        flow_id: the flow the run belongs to (its trace).
        workflow: the workflow's name.
        logger: a logger bound to the run.
    """

    def __init__(self, state: RunState) -> None:
        self._state = state
        self.run_id = state.run.run_id
        self.flow_id = state.run.flow_id
        self.workflow = state.run.workflow
        self._seq = 0
        self._uuids = 0
        self.compensated = False
        self.logger = logging.LoggerAdapter(
            logging.getLogger(f"interplay.workflow.{self.workflow}"), {"run_id": self.run_id}
        )

    @property
    def is_replaying(self) -> bool:
        """True while the run re-executes steps that are already in its journal."""
        return self._state.journal.get(self._seq * SUB) is not None

    def _next(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    # ------------------------------------------------------------------ commands and steps
    def call(
        self,
        target: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        returns: Any = None,
    ) -> Coro:
        """Send the command ``service.command`` and wait for its reply.

        Args:
            target: ``"service.command"``.
            payload: the command's payload (a model, dataclass, dict, primitive).
            timeout: seconds to wait for the reply before :class:`StepTimeout`.
            retry: retry the command (a new message each attempt) when it fails or
                times out; a ``Reject`` by the service is never retried.
            returns: a type to validate the reply's result into.

        Raises:
            StepFailed: the service failed the command (``error_type``, ``error``).
            StepTimeout: no reply within ``timeout``.
        """
        self._state.engine.rt.app.command_handler(target)  # unknown command: fail at the call site
        seq = self._next()
        data = to_json(payload)
        return self._attempts(seq, retry, lambda key: self._state.engine.call(self._state, key, target, data, timeout),
                              returns)

    def step(self, fn: Callable[..., Any], *args: Any, retry: Retry | None = None, timeout: float | None = None,
             name: str | None = None) -> Coro:
        """Run a local function as a journaled step (at least once; its result is recorded).

        A function whose first parameter is annotated :class:`Transaction` runs inside the
        store transaction that journals it, so its database writes happen exactly once.
        The result is returned as JSON data, validated into the function's return
        annotation when it has one (the same on first run and on replay).
        """
        seq = self._next()
        step_name = name or str(getattr(fn, "__qualname__", repr(fn)))
        engine = self._state.engine
        return self._attempts(seq, retry, lambda key: engine.step(self._state, key, step_name, fn, args, timeout),
                              _return_type(fn))

    def transaction(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Coro:
        """Run ``fn(tx, *args)`` inside the transaction that journals it: exactly once."""
        seq = self._next()
        step_name = name or str(getattr(fn, "__qualname__", repr(fn)))
        engine = self._state.engine
        return self._attempts(seq, None, lambda key: engine.step(self._state, key, step_name, fn, args, None, True),
                              _return_type(fn))

    async def _attempts(
        self, seq: int, retry: Retry | None, attempt: Callable[[int], Awaitable[Any]], returns: Any
    ) -> Any:
        policy = retry or Retry(attempts=1)
        for n in range(1, policy.attempts + 1):
            key = seq * SUB + 2 * (n - 1)
            try:
                result = await attempt(key)
            except StepFailed as exc:
                if exc.error_type == "Reject" or n == policy.attempts:
                    raise
                await self._state.engine.sleep(self._state, key + 1, policy.delay(n))
                continue
            return result if returns is None else PayloadType(returns).validate(result)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ events
    def emit(self, event: str, payload: Any = None) -> Coro:
        """Emit an event in this run's flow (choreographed services may react to it)."""
        check_name("event", event)
        seq = self._next()
        return self._state.engine.emit(self._state, seq * SUB, event, to_json(payload))

    def wait_for(
        self,
        event: str,
        *,
        match: Callable[[Any], bool] | Mapping[str, Any] | None = None,
        timeout: float | None = None,
        returns: Any = None,
    ) -> Coro:
        """Wait for an event in this run's flow; returns its payload.

        Events that arrived before the wait are buffered: the first event of that type
        in the flow that matches and that no earlier ``wait_for`` of this run consumed
        is taken.

        Args:
            event: the event type.
            match: a predicate on the payload, or a dict of fields that must be equal.
            timeout: seconds before :class:`StepTimeout` (durable: survives restarts).
            returns: a type to validate the payload into.
        """
        check_name("event", event)
        seq = self._next()
        predicate = _matcher(match)
        return self._returning(self._state.engine.wait(self._state, seq * SUB, "wait", event, event, predicate,
                                                       timeout), returns)

    async def _returning(self, coro: Awaitable[Any], returns: Any) -> Any:
        result = await coro
        return result if returns is None else PayloadType(returns).validate(result)

    def sleep(self, seconds: float) -> Coro:
        """A durable timer: the run resumes after ``seconds`` even across restarts."""
        seq = self._next()
        return self._state.engine.sleep(self._state, seq * SUB, seconds)

    # ------------------------------------------------------------------ composition
    async def gather(self, *steps: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        """Run steps in parallel; results in argument order (like ``asyncio.gather``)."""
        return list(await asyncio.gather(*steps, return_exceptions=return_exceptions))

    def start_child(
        self, workflow: str, payload: Any = None, *, id: str | None = None
    ) -> Coroutine[Any, Any, ChildHandle]:
        """Start a child workflow run in this flow; await ``handle.result()`` for its result."""
        spec = self._state.engine.rt.app.workflows.get(workflow)
        if spec is None:
            raise ConfigurationError(f"unknown workflow {workflow!r}")
        seq = self._next()
        data = to_json(spec.payload.validate(payload))
        return self._state.engine.start_child(self._state, seq * SUB, workflow, data, id)

    def saga(self) -> Saga:
        """Compensations that run in reverse order when the ``async with`` block fails."""
        return Saga(self)

    # ------------------------------------------------------------------ determinism helpers
    def now(self) -> float:
        """The current time, recorded on first run and the same on replay."""
        seq = self._next()
        return self._state.engine.now(self._state, seq * SUB)

    def uuid(self) -> str:
        """A UUID that is the same on replay (derived from the run id and a counter)."""
        self._uuids += 1
        return str(uuid.uuid5(_NAMESPACE, f"{self.run_id}:{self._uuids}"))

    def check(self, key: int, kind: str, name: str, digest: str | None = None) -> JournalEntry | None:
        """The journal entry at ``key``, after checking replay matches it."""
        state = self._state
        state.visited.add(key)
        entry = state.journal.get(key)
        if entry is None:
            return None
        if entry.kind != kind or entry.name != name:
            raise NonDeterminismError(
                f"run {self.run_id} step {key // SUB}: the journal has {entry.kind} {entry.name!r} "
                f"but the workflow now does {kind} {name!r}"
            )
        recorded = (entry.data or {}).get("args") if isinstance(entry.data, dict) else None
        if digest is not None and recorded is not None and entry.status == "scheduled" and recorded != digest:
            raise NonDeterminismError(
                f"run {self.run_id} step {key // SUB}: {kind} {name!r} is replayed with different arguments"
            )
        return entry

    def cancelled(self) -> None:
        """Raise WorkflowCancelled if the run was cancelled (checked by every primitive)."""
        if self._state.cancelled:
            raise WorkflowCancelled(f"run {self.run_id} was cancelled")


class ChildHandle:
    """A child workflow run started with :meth:`WorkflowContext.start_child`."""

    def __init__(self, ctx: WorkflowContext, run_id: str) -> None:
        self._ctx = ctx
        self.id = run_id

    def result(self, *, timeout: float | None = None) -> Coro:
        """Wait (durably) for the child to finish; its result, or StepFailed."""
        ctx = self._ctx
        seq = ctx._next()
        return ctx._state.engine.child_result(ctx._state, seq * SUB, self.id, timeout)

    def __repr__(self) -> str:
        return f"ChildHandle({self.id!r})"


class Saga:
    """Compensations registered as a block goes; run in reverse order if it fails.

    Each compensation is a durable step (a command, or a local function); a failing
    compensation does not stop the others. Then the error propagates and the run ends
    ``compensated``.
    """

    def __init__(self, ctx: WorkflowContext) -> None:
        self._ctx = ctx
        self._steps: list[tuple[str | Callable[..., Any], tuple[Any, ...]]] = []

    def compensate(self, action: str | Callable[..., Any], *args: Any) -> None:
        """Register ``action`` (``"service.command"`` with one payload, or a function)."""
        if isinstance(action, str):
            self._ctx._state.engine.rt.app.command_handler(action)
            if len(args) > 1:
                raise ConfigurationError("a command compensation takes one payload")
        self._steps.append((action, args))

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        ctx = self._ctx
        if exc is None or ctx._state.engine.stopping or isinstance(exc, NonDeterminismError):
            return False
        if isinstance(exc, asyncio.CancelledError) and not ctx._state.cancelled:
            return False  # the process is going away, not the run failing
        ctx.compensated = True
        ctx._state.compensating = True
        failures: list[BaseException] = []
        for action, args in reversed(self._steps):
            try:
                if isinstance(action, str):
                    await ctx.call(action, args[0] if args else None)
                else:
                    await ctx.step(action, *args)
            except Exception as comp_exc:
                failures.append(comp_exc)
        ctx._state.compensating = False
        for failure in failures:
            exc.add_note(f"compensation failed: {failure}")
        return False


def _matcher(match: Callable[[Any], bool] | Mapping[str, Any] | None) -> Callable[[Any], bool]:
    if match is None:
        return lambda payload: True
    if callable(match):
        return match
    expected = dict(match)

    def fields_equal(payload: Any) -> bool:
        return isinstance(payload, dict) and all(payload.get(k) == v for k, v in expected.items())

    return fields_equal


def _return_type(fn: Callable[..., Any]) -> Any:
    annotation = resolve_hints(fn).get("return")
    return None if annotation in (None, type(None), Any) else annotation


def step_failed(entry: JournalEntry) -> StepFailed:
    """The error a failed journal entry raises again on replay."""
    if entry.error_type == "StepTimeout":
        err = StepTimeout(entry.name, float(entry.data or 0) if isinstance(entry.data, int | float) else 0.0)
        err.args = (entry.error or str(err),)
        return err
    details = entry.data if isinstance(entry.data, dict) else None
    return StepFailed(entry.name, entry.error_type or "Error", entry.error or "", details)
