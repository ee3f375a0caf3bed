"""OpenTelemetry: every flow is one trace, across processes and every transport.

``app.run(observers=[OpenTelemetryObserver()])`` makes spans with the OpenTelemetry
*API* only; they go nowhere until an SDK ``TracerProvider`` is configured (by your
code, or by ``opentelemetry-instrument``), so the observer costs next to nothing
otherwise. ``interplay run`` adds it by itself when a provider is configured
(:func:`sdk_configured`).

The spans:

* ``publish TYPE`` (producer) for each event or command sent - by ``rt.publish``, a
  handler, or a workflow. Its W3C ``traceparent`` goes into the message's headers, so
  it travels in the envelope on every bus.
* ``handle TYPE`` (consumer) around each handling, child of the ``traceparent`` the
  message carries; it is the current span while the handler runs (your own spans nest
  under it) and the parent of what the handler emits. Its outcome (ok, retry,
  rejected, dead, invalid) is an attribute; failures set the span's status to error.
* ``workflow NAME`` from a run's start to its end in the orchestrator that runs it,
  child of whoever started it (a parent run, a handler, the caller of ``rt.start``);
  the commands and events the run sends are its children, so a workflow step that
  calls a service is ``workflow -> publish -> handle`` in one trace.

Replies to commands are not spanned separately: the ``handle`` span of the command
covers them. A run resumed by another orchestrator after a crash starts a new
``workflow`` span there (in a new trace, unless it is resumed inside one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .hooks import Observer

if TYPE_CHECKING:
    from ..message import Message
    from ..stores.records import RunRow, SpanRecord

__all__ = ["OpenTelemetryObserver", "messaging_system", "sdk_configured"]

log = logging.getLogger("interplay.otel")

_W3C = TraceContextTextMapPropagator()
"""Always W3C trace context in the envelope, whatever global propagator the app set:
the headers are part of interplay's wire format, read by processes in any language."""
_FAILED = frozenset({"retry", "rejected", "dead", "invalid"})
_RUN_FAILED = frozenset({"failed", "compensated"})
_MAX_OPEN_RUNS = 100_000
"""Workflow spans kept open at most (a run parked or lost here never reports its end)."""
_SYSTEMS = {"redis": "redis", "rediss": "redis", "amqp": "rabbitmq", "amqps": "rabbitmq", "nats": "nats",
            "memory": "interplay.memory"}


@dataclass(slots=True)
class _Handling:
    msg_id: str
    service: str
    span: Span


def sdk_configured() -> bool:
    """Whether an OpenTelemetry SDK tracer provider is installed globally (tracing is on)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def messaging_system(bus: str | None) -> str:
    """The ``messaging.system`` attribute for a bus URL (``None``: the store's own queue)."""
    scheme = (bus or "").partition("://")[0].lower()
    return _SYSTEMS.get(scheme, "interplay")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class OpenTelemetryObserver(Observer):
    """Spans for publish, handle and workflow runs, with W3C context in every envelope.

    Args:
        tracer_provider: where spans go; default the global one (``trace.set_tracer_provider``).
        system: the ``messaging.system`` attribute (see :func:`messaging_system`);
            default ``interplay``.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None, *, system: str = "interplay") -> None:
        from .. import __version__

        self.tracer = trace.get_tracer("interplay", __version__, tracer_provider=tracer_provider)
        self.system = system
        self._current: ContextVar[_Handling | None] = ContextVar(f"interplay_otel_{id(self)}", default=None)
        self._runs: dict[str, Span] = {}

    # ------------------------------------------------------------------ publish
    def published(self, message: Message) -> None:
        """Open and close the ``publish`` span; put its ``traceparent`` in the headers."""
        if message.kind == "reply":
            return
        parent = self._publish_parent(message)
        span = self.tracer.start_span(
            f"publish {message.type}", context=parent, kind=SpanKind.PRODUCER,
            attributes=self._message_attributes(message, "publish", "send"),
        )
        if span.is_recording() and message.source:
            span.set_attribute("interplay.source", message.source)
        message.headers.pop("tracestate", None)  # the new context's own, if any, replaces the parent's
        _W3C.inject(message.headers, context=trace.set_span_in_context(span))
        span.end()

    def _publish_parent(self, message: Message) -> OtelContext | None:
        if "traceparent" in message.headers:
            # Stamped by the handling that emitted it (or propagated by Message.caused).
            return _W3C.extract(message.headers)
        cause = message.causation_id or ""
        if cause.startswith("run:"):
            run_span = self._runs.get(cause[4:])
            if run_span is not None:
                return trace.set_span_in_context(run_span)
        return None  # the caller's current context: a root publish joins the caller's trace

    # ------------------------------------------------------------------ handle
    @contextmanager
    def handling(self, message: Message, service: str, handler: str | None) -> Iterator[dict[str, str]]:
        """The ``handle`` span, current while the handler runs; yields its ``traceparent``."""
        parent = _W3C.extract(message.headers)  # empty without one: a new trace, never a stale context
        attributes = self._message_attributes(message, "handle", "process")
        attributes["messaging.consumer.group.name"] = service
        attributes["interplay.service"] = service
        if handler:
            attributes["interplay.handler"] = handler
        span = self.tracer.start_span(f"handle {message.type}", context=parent, kind=SpanKind.CONSUMER,
                                      attributes=attributes)
        token = self._current.set(_Handling(message.id, service, span))
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
                headers: dict[str, str] = {}
                _W3C.inject(headers, context=trace.set_span_in_context(span))
                yield headers
        finally:
            self._current.reset(token)
            span.end()

    def handled(self, span: SpanRecord, queued_for: float) -> None:
        """Put the outcome on the current ``handle`` span."""
        current = self._current.get()
        if current is None or current.msg_id != span.msg_id or current.service != span.service:
            return
        otel_span = current.span
        if not otel_span.is_recording():
            return
        otel_span.set_attributes({
            "interplay.outcome": span.outcome,
            "interplay.attempt": span.attempt,
            "interplay.queued_for": queued_for,
        })
        if span.outcome in _FAILED:
            otel_span.set_status(Status(StatusCode.ERROR, span.error or span.outcome))
            if span.error:
                otel_span.set_attribute("error.type", span.error.partition(":")[0])

    # ------------------------------------------------------------------ workflows
    def run_started(self, run: RunRow) -> None:
        """Open the run's ``workflow`` span (ended by :meth:`run_ended`)."""
        old = self._runs.pop(run.run_id, None)
        if old is not None:  # launched here again (its earlier execution here was cut short)
            old.end()
        parent: OtelContext | None = None
        if run.parent_run is not None and run.parent_run in self._runs:
            parent = trace.set_span_in_context(self._runs[run.parent_run])
        self._runs[run.run_id] = self.tracer.start_span(
            f"workflow {run.workflow}", context=parent, kind=SpanKind.INTERNAL, start_time=_ns(run.created),
            attributes=_run_attributes(run),
        )
        while len(self._runs) > _MAX_OPEN_RUNS:
            self._runs.pop(next(iter(self._runs))).end()

    def run_ended(self, run: RunRow, status: str, seconds: float) -> None:
        """End the run's ``workflow`` span with its status."""
        span = self._runs.pop(run.run_id, None)
        if span is None:  # its start was not seen here: the span covers it from creation
            span = self.tracer.start_span(f"workflow {run.workflow}", kind=SpanKind.INTERNAL,
                                          start_time=_ns(run.created), attributes=_run_attributes(run))
        span.set_attribute("interplay.outcome", status)
        if status in _RUN_FAILED:
            span.set_status(Status(StatusCode.ERROR, f"workflow run {status}"))
        span.end(end_time=_ns(run.created + seconds))

    # ------------------------------------------------------------------ attributes
    def _message_attributes(self, message: Message, operation: str, operation_type: str) -> dict[str, Any]:
        return {
            "messaging.system": self.system,
            "messaging.operation.name": operation,
            "messaging.operation.type": operation_type,
            "messaging.destination.name": message.type,
            "messaging.message.id": message.id,
            "messaging.message.conversation_id": message.flow_id,
            "interplay.flow_id": message.flow_id,
            "interplay.kind": message.kind,
        }


def _run_attributes(run: RunRow) -> Mapping[str, Any]:
    attributes: dict[str, Any] = {
        "interplay.workflow": run.workflow, "interplay.run_id": run.run_id, "interplay.flow_id": run.flow_id,
    }
    if run.parent_run:
        attributes["interplay.parent_run"] = run.parent_run
    return attributes
