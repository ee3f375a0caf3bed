"""Prometheus metrics: what the runtime does, and what the store holds.

Needs ``prometheus_client`` (``pip install 'interplay[metrics]'``)::

    metrics = MetricsObserver()
    async with app.run(observers=[metrics]) as rt:
        with metrics.serve(rt, port=9464):        # http://127.0.0.1:9464/metrics
            ...

``interplay run --metrics-port 9464`` does the same. Counters and histograms are
updated as this process works (each process reports its own; sum them in queries):

* ``interplay_messages_handled_total{service,type,outcome}`` - handlings, by outcome
  ``ok``, ``retry``, ``rejected``, ``dead``, ``invalid`` (duplicates the inbox skipped
  are not counted);
* ``interplay_messages_failed_total{service,type}`` - failed handlings (every failed
  attempt), of which ``interplay_messages_retried_total`` will be tried again and
  ``interplay_messages_dead_lettered_total{service,type,outcome}`` went to the DLQ;
* ``interplay_handler_duration_seconds{service,type}`` - handling time;
* ``interplay_queue_lag_seconds{service}`` - from a message's creation to the start of
  its handling (for a retry: since its first creation, backoff included);
* ``interplay_messages_published_total{kind,type}`` - events and commands sent;
* ``interplay_workflows_ended_total{workflow,status}`` and
  ``interplay_workflow_duration_seconds{workflow}`` - runs this orchestrator ended.

Gauges read from the store when scraped (at most every ``refresh_interval`` seconds),
so they are the whole deployment's, whichever process serves them:
``interplay_workflow_runs{status}``, ``interplay_flows{status}`` (``stuck`` included)
and ``interplay_dead_letters{service}`` (the DLQ's size: alert on it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .hooks import Observer

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from ..clock import Clock
    from ..message import Message
    from ..runtime import Runtime
    from ..stores.base import Store
    from ..stores.records import RunRow, SpanRecord
    from ..stores.tx import Tx

__all__ = ["MetricsObserver", "MetricsServer"]

log = logging.getLogger("interplay.metrics")

_DEAD = frozenset({"rejected", "dead", "invalid"})
_FAILED = _DEAD | {"retry"}
RUN_STATUSES = ("pending", "running", "completed", "failed", "compensated", "cancelled", "parked")
"""Always reported (0 when none), so a status that empties drops to 0 instead of vanishing."""
FLOW_STATUSES = ("running", "completed", "failed", "stuck")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LAG = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
_RUN_SECONDS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
_READ_TIMEOUT = 5.0


@dataclass(slots=True)
class _Snapshot:
    runs: dict[str, int] = field(default_factory=dict)
    flows: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Watched:
    store: Store
    clock: Clock
    loop: asyncio.AbstractEventLoop
    thread: int


class MetricsObserver(Observer):
    """Prometheus counters and histograms of a runtime, and gauges of its store.

    Args:
        registry: where the metrics live; default a registry of its own (pass
            ``prometheus_client.REGISTRY`` to expose them with your other metrics).
        refresh_interval: seconds a reading of the store's gauges is reused by scrapes.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, refresh_interval: float = 1.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.refresh_interval = refresh_interval
        r = self.registry
        self.handled_total = Counter(
            "interplay_messages_handled", "Handlings of messages, by outcome (ok, retry, rejected, dead, invalid).",
            ["service", "type", "outcome"], registry=r)
        self.failed_total = Counter(
            "interplay_messages_failed", "Failed handlings (each failed attempt).", ["service", "type"], registry=r)
        self.retried_total = Counter(
            "interplay_messages_retried", "Failed handlings that will be retried.", ["service", "type"], registry=r)
        self.dead_lettered_total = Counter(
            "interplay_messages_dead_lettered", "Messages sent to the dead-letter queue, by outcome.",
            ["service", "type", "outcome"], registry=r)
        self.handler_seconds = Histogram(
            "interplay_handler_duration_seconds", "Time to handle a message (one attempt).",
            ["service", "type"], buckets=_SECONDS, registry=r)
        self.queue_lag_seconds = Histogram(
            "interplay_queue_lag_seconds", "Seconds from a message's creation to the start of its handling.",
            ["service"], buckets=_LAG, registry=r)
        self.published_total = Counter(
            "interplay_messages_published", "Events and commands sent by this process.", ["kind", "type"],
            registry=r)
        self.workflows_ended_total = Counter(
            "interplay_workflows_ended", "Workflow runs this orchestrator ended, by status.",
            ["workflow", "status"], registry=r)
        self.workflow_seconds = Histogram(
            "interplay_workflow_duration_seconds", "Seconds from a run's creation to its end.",
            ["workflow"], buckets=_RUN_SECONDS, registry=r)
        self._watched: _Watched | None = None
        self._snapshot: _Snapshot | None = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        r.register(_StoreGauges(self))

    # ------------------------------------------------------------------ hooks
    def published(self, message: Message) -> None:
        """Count an event or command sent."""
        if message.kind != "reply":
            self.published_total.labels(message.kind, message.type).inc()

    def handled(self, span: SpanRecord, queued_for: float) -> None:
        """Count a handling, its time, its lag, and a failure or dead letter."""
        service, type_, outcome = span.service, span.type, span.outcome
        self.handled_total.labels(service, type_, outcome).inc()
        self.handler_seconds.labels(service, type_).observe(max(0.0, span.ended - span.started))
        self.queue_lag_seconds.labels(service).observe(queued_for)
        if outcome in _FAILED:
            self.failed_total.labels(service, type_).inc()
            if outcome == "retry":
                self.retried_total.labels(service, type_).inc()
            else:
                self.dead_lettered_total.labels(service, type_, outcome).inc()

    def run_ended(self, run: RunRow, status: str, seconds: float) -> None:
        """Count a run's end and its duration."""
        self.workflows_ended_total.labels(run.workflow, status).inc()
        self.workflow_seconds.labels(run.workflow).observe(max(0.0, seconds))

    # ------------------------------------------------------------------ store gauges
    def watch(self, rt: Runtime) -> None:
        """Read the gauges from ``rt``'s store when scraped. Call it on the runtime's loop."""
        loop = asyncio.get_running_loop()
        self._watched = _Watched(rt.store, rt.clock, loop, threading.get_ident())

    async def refresh(self) -> None:
        """Read the store's gauges now (before ``generate_latest`` on the runtime's own loop)."""
        if self._watched is None:
            return
        self._snapshot = await _read(self._watched)
        self._read_at = time.monotonic()

    def _gauges(self) -> _Snapshot | None:
        watched = self._watched
        if watched is None:
            return self._snapshot
        with self._lock:
            fresh = time.monotonic() - self._read_at < self.refresh_interval
            # A scrape on the loop's own thread must not block it: it gets the last reading.
            if not fresh and threading.get_ident() != watched.thread and not watched.loop.is_closed():
                future = asyncio.run_coroutine_threadsafe(_read(watched), watched.loop)
                try:
                    self._snapshot = future.result(_READ_TIMEOUT)
                    self._read_at = time.monotonic()
                except Exception as exc:  # the store is down or busy: report the last reading
                    future.cancel()
                    log.warning("metrics: could not read the store's gauges: %s", exc or type(exc).__name__)
            return self._snapshot

    def serve(self, rt: Runtime, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``host:port`` (``port=0``: any free port) until closed.

        Loopback by default: metrics name your services and events, so expose them
        further only on purpose. Call it on the runtime's loop.

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        self.watch(rt)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


async def _read(watched: _Watched) -> _Snapshot:
    now = watched.clock.now()
    flows = await watched.store.count_flows(now)

    def counts(tx: Tx) -> tuple[dict[str, int], dict[str, int]]:
        runs = {str(s): int(n) for s, n in tx.all("SELECT status, COUNT(*) FROM ip_runs GROUP BY status")}
        dead = {str(g): int(n) for g, n in tx.all("SELECT grp, COUNT(*) FROM ip_dlq GROUP BY grp")}
        return runs, dead

    runs, dead = await watched.store.read(counts)
    return _Snapshot(runs, flows, dead)


class _StoreGauges(Collector):
    """The gauges read from the store, collected at scrape time."""

    def __init__(self, observer: MetricsObserver) -> None:
        self.observer = observer
        self._statuses: dict[str, set[str]] = {"runs": set(RUN_STATUSES), "flows": set(FLOW_STATUSES)}
        self._services: set[str] = set()
        self._lock = threading.Lock()  # scrapes run in threads of their own

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        snapshot = self.observer._gauges()
        if snapshot is None:
            return []
        with self._lock:
            return list(self._families(snapshot))

    def _families(self, snapshot: _Snapshot | None) -> Iterator[Metric]:
        runs = GaugeMetricFamily("interplay_workflow_runs", "Workflow runs in the store, by status.",
                                 labels=["status"])
        flows = GaugeMetricFamily("interplay_flows", "Flows in the store (within trace retention), by status.",
                                  labels=["status"])
        dead = GaugeMetricFamily("interplay_dead_letters", "Messages in the dead-letter queue, by service.",
                                 labels=["service"])
        if snapshot is not None:
            for family, key, counts in ((runs, "runs", snapshot.runs), (flows, "flows", snapshot.flows)):
                self._statuses[key].update(counts)
                for status in sorted(self._statuses[key]):
                    family.add_metric([status], counts.get(status, 0))
            self._services.update(snapshot.dead_letters)
            for service in sorted(self._services):
                dead.add_metric([service], snapshot.dead_letters.get(service, 0))
        yield from (runs, flows, dead)


class MetricsServer:
    """A running ``/metrics`` HTTP server (a daemon thread); ``close()`` or use ``with``."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        address = server.server_address
        self.host: str = str(address[0])
        """The address it is bound to."""
        self.port: int = int(address[1])
        """The port it listens on (the one picked, if asked for port 0)."""

    @property
    def url(self) -> str:
        """Where to scrape."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
