"""Observability for ``interplay run``: OpenTelemetry tracing and the Prometheus endpoint.

Kept apart from ``run.py`` so that command only passes two options through.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from .common import console, fail

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..tracing.hooks import Observer
    from ..tracing.metrics import MetricsObserver

__all__ = ["MetricsPortOption", "Observability", "OtelOption"]

OtelOption = Annotated[
    bool | None,
    typer.Option(
        "--otel/--no-otel",
        help="OpenTelemetry spans (publish, handle, workflow). Default: on when an OTel SDK tracer provider "
        "is configured (by the app module or opentelemetry-instrument).",
        show_default=False,
    ),
]
MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (needs prometheus_client: the metrics extra).",
        min=0, max=65535,
    ),
]


class Observability:
    """The observers ``interplay run`` adds, and the metrics endpoint it serves."""

    def __init__(self, *, otel: bool | None, metrics_port: int | None, bus: str | None) -> None:
        from ..tracing.otel import OpenTelemetryObserver, messaging_system, sdk_configured

        self.observers: list[Observer] = []
        self.metrics: MetricsObserver | None = None
        self.metrics_port = metrics_port
        configured = sdk_configured()
        self.tracing = bool(otel or (otel is None and configured))
        if self.tracing:
            if not configured:
                console.print("[yellow]--otel: no OpenTelemetry SDK tracer provider is configured; "
                              "spans go nowhere[/yellow]", highlight=False)
            self.observers.append(OpenTelemetryObserver(system=messaging_system(bus)))
        if metrics_port is not None:
            if importlib.util.find_spec("prometheus_client") is None:
                raise fail("--metrics-port needs prometheus_client: pip install 'interplay[metrics]'", 2)
            from ..tracing.metrics import MetricsObserver

            self.metrics = MetricsObserver()
            self.observers.append(self.metrics)

    @asynccontextmanager
    async def serving(self, rt: Runtime) -> AsyncIterator[None]:
        """Serve the metrics endpoint (if asked) while the runtime runs."""
        if self.tracing:
            console.print("tracing: OpenTelemetry spans on", highlight=False)
        if self.metrics is None or self.metrics_port is None:
            yield
            return
        try:
            server = self.metrics.serve(rt, self.metrics_port, host="127.0.0.1")
        except OSError as exc:
            raise fail(f"cannot serve metrics on 127.0.0.1:{self.metrics_port}: {exc}") from None
        console.print(f"metrics: {server.url}", highlight=False, soft_wrap=True)
        try:
            yield
        finally:
            server.close()
