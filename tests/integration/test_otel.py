"""OpenTelemetry: a flow is one trace - in one process on every bus, and across processes on Redis.

Spans are read back from the SDK's in-memory exporter (in this process) and from a file
the child ``interplay run`` process exports to (tests/integration/otel_app.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from interplay.cli.observe import Observability
from interplay.testing import wait_until
from interplay.tracing.otel import OpenTelemetryObserver, sdk_configured

from ..buses import Bus, delete_redis_keys, server_url
from ..servers import require
from .otel_app import SPANS_FILE_ENV, Order, make_app, read_spans, span_dict

REPO = Path(__file__).resolve().parents[2]
Spans = list[dict[str, Any]]


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """An SDK provider of this test's own (not the global one) and its in-memory exporter."""
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``interplay run ARGS`` as a child process, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "interplay", "run", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})


def finished(memory: InMemorySpanExporter) -> Spans:
    return [span_dict(s) for s in memory.get_finished_spans()]


def one(spans: Spans, name: str, **attributes: Any) -> dict[str, Any]:
    """The single span called ``name`` with these attributes."""
    found = [s for s in spans if s["name"] == name and all(s["attributes"].get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, f"{len(found)} span(s) {name!r} {attributes}: {[s['name'] for s in spans]}"
    return found[0]


def assert_chain(*chain: dict[str, Any]) -> None:
    """Each span is the parent of the next, all in the first one's trace."""
    for parent, child in itertools.pairwise(chain):
        assert child["trace_id"] == chain[0]["trace_id"], (parent["name"], child["name"])
        assert child["parent_id"] == parent["span_id"], f"{child['name']} is not a child of {parent['name']}"


async def test_a_choreographed_flow_is_one_trace_on_every_bus(
    bus: Bus, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    request = provider.get_tracer("test")
    async with bus.run(make_app(), observers=[OpenTelemetryObserver(provider, system=bus.name)]) as rt:
        with request.start_as_current_span("POST /orders") as outer:
            flow_id = await rt.publish("order.created", Order(id=1))
        failed_id = await rt.publish("order.created", Order(id=2, amount=-1))
        assert (await rt.wait_flow(flow_id)).status == "completed"
        assert (await rt.wait_flow(failed_id)).status == "failed"
        await rt.settled()
        # a handle span ends just after its handling commits
        await wait_until(lambda: len(finished(memory)) >= 11, timeout=5, message="11 spans")
    spans = finished(memory)
    flow = [s for s in spans if s["attributes"].get("interplay.flow_id") == flow_id]
    root = one(spans, "POST /orders")
    assert root["span_id"] == f"{outer.get_span_context().span_id:016x}"
    chain = [
        root,
        one(flow, "publish order.created"), one(flow, "handle order.created"),
        one(flow, "publish payment.completed"), one(flow, "handle payment.completed"),
        one(flow, "publish shipment.prepared"), one(flow, "handle shipment.prepared"),
    ]
    assert_chain(*chain)
    assert len(flow) == 6  # nothing else in the flow...
    assert len([s for s in spans if s["trace_id"] == root["trace_id"]]) == 7  # ...nor in its trace
    assert [s["kind"] for s in chain[1:]] == ["PRODUCER", "CONSUMER"] * 3
    handle = one(flow, "handle order.created")
    assert handle["attributes"] == {
        "messaging.system": bus.name, "messaging.operation.name": "handle", "messaging.operation.type": "process",
        "messaging.destination.name": "order.created",
        "messaging.message.id": handle["attributes"]["messaging.message.id"],
        "messaging.message.conversation_id": flow_id, "messaging.consumer.group.name": "payments",
        "interplay.flow_id": flow_id, "interplay.kind": "event", "interplay.service": "payments",
        "interplay.handler": "tests.integration.otel_app.make_app.<locals>.take_payment",
        "interplay.outcome": "ok", "interplay.attempt": 1,
        "interplay.queued_for": handle["attributes"]["interplay.queued_for"],
    }
    assert handle["status"] == "UNSET"

    # The rejected order: its own trace (published outside any span), the failure on the span,
    # and the on_error event a child of the failed handling.
    failed = [s for s in spans if s["attributes"].get("interplay.flow_id") == failed_id]
    rejected = one(failed, "handle order.created")
    assert (rejected["status"], rejected["attributes"]["interplay.outcome"]) == ("ERROR", "rejected")
    assert rejected["attributes"]["error.type"] == "Reject"
    publish = one(failed, "publish order.created")
    assert publish["parent_id"] is None
    assert publish["trace_id"] != root["trace_id"]
    assert_chain(publish, rejected, one(failed, "publish payment.failed"), one(failed, "handle payment.failed"))
    assert len(failed) == 4


async def test_a_workflow_and_what_it_causes_are_one_trace(
    bus: Bus, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    request = provider.get_tracer("test")
    async with bus.run(make_app(), observers=[OpenTelemetryObserver(provider)]) as rt:
        with request.start_as_current_span("POST /fulfil"):
            handle = await rt.start("fulfil", Order(id=3))
        assert await handle.result(timeout=10) == "receipt-3"
        await rt.settled()
        await wait_until(lambda: len(finished(memory)) >= 6, timeout=5, message="6 spans")
    spans = finished(memory)
    run = one(spans, "workflow fulfil")
    assert run["attributes"] == {"interplay.workflow": "fulfil", "interplay.run_id": handle.id,
                                 "interplay.flow_id": handle.flow_id, "interplay.outcome": "completed"}
    assert_chain(one(spans, "POST /fulfil"), run, one(spans, "publish payments.charge"),
                 one(spans, "handle payments.charge", **{"interplay.outcome": "ok"}))
    assert_chain(run, one(spans, "publish invoice.sent"), one(spans, "handle invoice.sent"))
    assert {s["trace_id"] for s in spans} == {run["trace_id"]}
    assert len(spans) == 6  # the command's reply is covered by its handle span


def test_interplay_run_traces_only_when_an_sdk_is_configured_or_asked() -> None:
    assert not sdk_configured()  # this process never installs a global provider (the child above does)
    assert Observability(otel=None, metrics_port=None, bus=None).observers == []
    assert Observability(otel=False, metrics_port=None, bus=None).observers == []
    [forced] = Observability(otel=True, metrics_port=None, bus="nats://127.0.0.1:4222").observers
    assert isinstance(forced, OpenTelemetryObserver)
    assert forced.system == "nats"


@pytest.mark.slow
async def test_one_trace_across_two_processes_on_redis(
    tmp_path: Path, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """This process publishes and hosts notification; a child ``interplay run`` hosts payments
    and shipping, tracing by itself because its app module configured an SDK."""
    require("redis")
    provider, memory = exporter
    prefix = f"iptest:{uuid.uuid4().hex[:12]}:"
    redis_url = f"{server_url('redis')}/0?prefix={prefix}"
    store = f"sqlite:///{tmp_path / 'store.db'}"
    spans_file = tmp_path / "child-spans.jsonl"
    observer = OpenTelemetryObserver(provider, system="redis")
    child: subprocess.Popen[bytes] | None = None
    try:
        # opened first: the store file exists before the child shares it
        async with make_app().run(bus=redis_url, store=store, services=["notification"], orchestrator=False,
                                  observers=[observer]) as rt:
            child = spawn(
                ["tests.integration.otel_app:app", "--store", store, "--bus", redis_url,
                 "--service", "payments", "--service", "shipping", "--no-orchestrator"],
                tmp_path / "child.log", {SPANS_FILE_ENV: str(spans_file)},
            )
            flow_id = await rt.publish("order.created", Order(id=9))
            assert (await rt.wait_flow(flow_id, timeout=30)).status == "completed", (tmp_path / "child.log").read_text()
            await wait_until(lambda: len(read_spans(spans_file)) >= 4 and len(memory.get_finished_spans()) >= 2,
                             timeout=10, message="both processes' spans")
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
        if child is not None:
            await asyncio.to_thread(child.wait, 30)
        await delete_redis_keys(prefix)
    here, there = finished(memory), read_spans(spans_file)
    assert {s["pid"] for s in there} == {child.pid}
    assert {s["pid"] for s in here} == {os.getpid()}
    assert_chain(
        one(here, "publish order.created"),
        one(there, "handle order.created"), one(there, "publish payment.completed"),
        one(there, "handle payment.completed"), one(there, "publish shipment.prepared"),
        one(here, "handle shipment.prepared"),
    )
    assert len({s["trace_id"] for s in here + there}) == 1
    assert len(here) == 2
    assert len(there) == 4
    assert {s["attributes"]["messaging.system"] for s in there} == {"redis"}  # interplay run: from the bus URL
    assert {s["attributes"]["interplay.flow_id"] for s in here + there} == {flow_id}
    assert "tracing: OpenTelemetry spans on" in (tmp_path / "child.log").read_text()
    assert child.returncode == 0
