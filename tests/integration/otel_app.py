"""The app of the OpenTelemetry tests, and an SDK set up for a child ``interplay run``.

``order.created`` -> payments -> ``payment.completed`` -> shipping -> ``shipment.prepared``
-> notification; a negative amount is rejected by payments (``payment.failed``, handled
by orders). The ``fulfil`` workflow calls ``payments.charge`` and emits ``invoice.sent``
(handled by notification).

Imported by ``interplay run tests.integration.otel_app:app`` with ``OTEL_SPANS_FILE``
set, it installs a global SDK tracer provider exporting every span, as a JSON line, to
that file - so the child process traces (``interplay run`` turns OpenTelemetry on by
itself when a provider is configured) and the test reads its spans back.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel

from interplay import App, Context, Failure, Reject, WorkflowContext

SPANS_FILE_ENV = "OTEL_SPANS_FILE"


class Order(BaseModel):
    id: int
    amount: float = 10.0


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    """A span as plain data: what the tests compare, in either process."""
    ctx = span.context
    assert ctx is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_dict(s)) + "\n" for s in spans)
        with self._lock, self.path.open("a") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


def read_spans(path: Path) -> list[dict[str, Any]]:
    """The spans a child process exported so far (complete lines only)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def make_app() -> App:
    """A fresh app (one per test in the test process)."""
    app = App("traced")
    payments, shipping = app.service("payments"), app.service("shipping")
    notification, orders = app.service("notification"), app.service("orders")

    @payments.on("order.created", emits="payment.completed", on_error="payment.failed")
    async def take_payment(order: Order) -> Order:
        if order.amount < 0:
            raise Reject("negative amount")
        return order

    @shipping.on("payment.completed")
    async def ship(order: Order, ctx: Context) -> None:
        await ctx.emit("shipment.prepared", order)

    @notification.on("shipment.prepared")
    async def notify(order: Order) -> None:
        pass

    @notification.on("invoice.sent")
    async def send_invoice(order: Order) -> None:
        pass

    @orders.on("payment.failed")
    async def cancel(failure: Failure) -> None:
        pass

    @payments.command("charge")
    async def charge(order: Order) -> str:
        return f"receipt-{order.id}"

    @app.workflow("fulfil")
    async def fulfil(ctx: WorkflowContext, order: Order) -> str:
        receipt = str(await ctx.call("payments.charge", order))
        await ctx.emit("invoice.sent", order)
        return receipt

    return app


app = make_app()

if os.environ.get(SPANS_FILE_ENV):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(Path(os.environ[SPANS_FILE_ENV]))))
    trace.set_tracer_provider(provider)
