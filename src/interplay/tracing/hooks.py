"""Instrumentation hooks: how OpenTelemetry, metrics (or your own code) watch a runtime.

An :class:`Observer` gets told what happens - a message published, a handling
started and ended, a workflow run started and ended - and can put headers on what a handler
emits (the W3C ``traceparent`` of its span, so a flow is one trace across processes
and transports). Every method has a do-nothing default; override what you need.
Observers must be quick and must not raise (an error is logged and ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..message import Message
    from ..stores.records import RunRow, SpanRecord

__all__ = ["Instrumentation", "Observer"]

log = logging.getLogger("interplay.hooks")


class Observer:
    """Base class of runtime observers (every hook a no-op)."""

    def published(self, message: Message) -> None:
        """A message is about to be committed for publishing (headers may be added)."""

    @contextmanager
    def handling(self, message: Message, service: str, handler: str | None) -> Iterator[dict[str, str]]:
        """Around one handling of ``message``; yields headers for what the handler emits."""
        yield {}

    def handled(self, span: SpanRecord, queued_for: float) -> None:
        """A handling ended (``span.outcome``: ok, retry, rejected, dead, invalid).

        ``queued_for`` is how long the message waited between its creation and the start
        of this handling (queue lag).
        """

    def run_started(self, run: RunRow) -> None:
        """A workflow run starts (or resumes) executing here, before it sends anything.

        Called in the context of whoever started it (``rt.start``, a handler, a parent
        run) or of the orchestrator that claimed it; :meth:`run_ended` follows if it ends here.
        """

    def run_ended(self, run: RunRow, status: str, seconds: float) -> None:
        """A workflow run executed here ended with ``status``."""


class Instrumentation:
    """The observers of one runtime, called together."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = list(observers)

    def add(self, observer: Observer) -> None:
        """Observe from now on."""
        self.observers.append(observer)

    def published(self, message: Message) -> None:
        """See :meth:`Observer.published`."""
        for obs in self.observers:
            try:
                obs.published(message)
            except Exception:  # an observer must never break the runtime
                log.exception("observer %r failed", obs)

    @contextmanager
    def handling(self, message: Message, service: str, handler: str | None) -> Iterator[dict[str, str]]:
        """See :meth:`Observer.handling`; the headers of all observers, merged."""
        if not self.observers:
            yield {}
            return
        headers: dict[str, str] = {}
        with ExitStack() as stack:
            for obs in self.observers:
                try:
                    headers.update(stack.enter_context(obs.handling(message, service, handler)))
                except Exception:
                    log.exception("observer %r failed", obs)
            yield headers

    def handled(self, span: SpanRecord, queued_for: float) -> None:
        """See :meth:`Observer.handled`."""
        for obs in self.observers:
            try:
                obs.handled(span, queued_for)
            except Exception:
                log.exception("observer %r failed", obs)

    def run_started(self, run: RunRow) -> None:
        """See :meth:`Observer.run_started`."""
        for obs in self.observers:
            try:
                obs.run_started(run)
            except Exception:
                log.exception("observer %r failed", obs)

    def run_ended(self, run: RunRow, status: str, seconds: float) -> None:
        """See :meth:`Observer.run_ended`."""
        for obs in self.observers:
            try:
                obs.run_ended(run, status, seconds)
            except Exception:
                log.exception("observer %r failed", obs)
