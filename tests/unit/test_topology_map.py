"""The map drawn from declarations and handler source: exact edges, blind spots, static drift, renderers."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
from pydantic import BaseModel

from interplay import App, Context, WorkflowContext
from interplay.errors import ConfigurationError
from interplay.examples import orders, trip
from interplay.tracing import maprender
from interplay.tracing.maprender import render_dot, render_mermaid, render_svg, render_text
from interplay.tracing.scan import scan_function
from interplay.tracing.stuck import FLOW_STUCK, FlowStuck
from interplay.tracing.topology import Finding, allowed, declared_map, find_drift

ORDERS_EDGES = [
    "workflow deliver_order -> command notification.send_confirmation calls",
    "workflow deliver_order -> command payments.process_payment calls",
    "workflow deliver_order -> event order.shipped emits",
    "workflow process_order -> command notification.send_confirmation calls",
    "workflow process_order -> command payments.process_payment calls",
    "workflow process_order -> command payments.refund compensates",
    "workflow process_order -> command shipping.prepare_shipment calls",
    "service delivery -> event delivery.confirmed emits (confirm_delivery)",
    "service notification -> event customer.notified emits (send_confirmation)",  # ctx.emit in its body
    "service orders -> event order.cancelled emits (cancel_order)",
    "service payments -> event payment.completed emits (take_payment)",
    "service payments -> event payment.failed on error (take_payment)",
    "service payments -> event payment.refunded emits (refund_failed_shipment)",
    "service shipping -> event shipment.failed on error (prepare_shipment)",
    "service shipping -> event shipment.prepared emits (prepare_shipment)",
    "command notification.send_confirmation -> service notification handles (send_confirmation)",
    "command payments.process_payment -> service payments handles (take_payment)",
    "command payments.refund -> service payments handles (refund)",
    "command shipping.prepare_shipment -> service shipping handles (prepare_shipment)",
    "event delivery.confirmed -> workflow deliver_order waits for",
    "event order.created -> service payments handles (take_payment)",
    "event order.shipped -> service delivery handles (confirm_delivery)",
    "event payment.completed -> service shipping handles (prepare_shipment)",
    "event payment.failed -> service orders handles (cancel_order)",
    "event shipment.failed -> service payments handles (refund_failed_shipment)",
    "event shipment.prepared -> service notification handles (send_confirmation)",
]

ORDERS_MERMAID_EDGES = [
    'workflow_deliver_order -->|"calls"| command_notification_send_confirmation',
    'workflow_deliver_order -->|"calls"| command_payments_process_payment',
    'workflow_deliver_order -->|"emits"| event_order_shipped',
    'workflow_process_order -->|"calls"| command_notification_send_confirmation',
    'workflow_process_order -->|"calls"| command_payments_process_payment',
    'workflow_process_order -->|"compensates"| command_payments_refund',
    'workflow_process_order -->|"calls"| command_shipping_prepare_shipment',
    'service_delivery -->|"emits (confirm_delivery)"| event_delivery_confirmed',
    'service_notification -->|"emits (send_confirmation)"| event_customer_notified',
    'service_orders -->|"emits (cancel_order)"| event_order_cancelled',
    'service_payments -->|"emits (take_payment)"| event_payment_completed',
    'service_payments -->|"on error (take_payment)"| event_payment_failed',
    'service_payments -->|"emits (refund_failed_shipment)"| event_payment_refunded',
    'service_shipping -->|"on error (prepare_shipment)"| event_shipment_failed',
    'service_shipping -->|"emits (prepare_shipment)"| event_shipment_prepared',
    'command_notification_send_confirmation -->|"handles (send_confirmation)"| service_notification',
    'command_payments_process_payment -->|"handles (take_payment)"| service_payments',
    'command_payments_refund -->|"handles (refund)"| service_payments',
    'command_shipping_prepare_shipment -->|"handles (prepare_shipment)"| service_shipping',
    'event_delivery_confirmed -->|"waits for"| workflow_deliver_order',
    'event_order_created -->|"handles (take_payment)"| service_payments',
    'event_order_shipped -->|"handles (confirm_delivery)"| service_delivery',
    'event_payment_completed -->|"handles (prepare_shipment)"| service_shipping',
    'event_payment_failed -->|"handles (cancel_order)"| service_orders',
    'event_shipment_failed -->|"handles (refund_failed_shipment)"| service_payments',
    'event_shipment_prepared -->|"handles (send_confirmation)"| service_notification',
]


def _section(text: str, title: str) -> list[str]:
    """The lines of one section of the text map, whitespace collapsed."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return [" ".join(line.split()) for line in lines[start:end]]


def test_orders_text_map_has_exactly_the_declared_edges() -> None:
    m = declared_map(orders.app)
    text = render_text(m, find_drift(m))
    assert text.splitlines()[0] == "map of shop (declared): 5 services, 2 workflows, 10 events, 4 commands"
    assert _section(text, "edges") == ORDERS_EDGES
    assert _section(text, "flows") == [
        "order: starts order.created; ends customer.notified; fails payment.failed, shipment.failed; "
        "stuck after 60s"
    ]
    assert "not seen statically" not in text  # every name in the orders code is a literal


def test_orders_mermaid_map_has_exactly_the_declared_edges() -> None:
    m = declared_map(orders.app)
    chart = render_mermaid(m, find_drift(m))
    lines = [line.strip() for line in chart.splitlines()]
    assert lines[0] == "flowchart LR"
    assert [line for line in lines if "-->" in line] == ORDERS_MERMAID_EDGES
    nodes = {line for line in lines if line.startswith(("service_", "workflow_", "event_", "command_"))
             and "-->" not in line}
    assert {'service_payments["payments"]', 'workflow_process_order[["process_order"]]',
            'event_order_created(["order.created"])',
            'command_payments_refund[/"payments.refund"/]'} <= nodes
    assert len(nodes) == 5 + 2 + 10 + 4
    assert "class event_order_cancelled,event_payment_refunded drift" in lines  # nobody handles them


def test_orders_static_drift_is_the_events_nobody_handles() -> None:
    m = declared_map(orders.app)
    # customer.notified is handled by nobody either, but it ends the declared flow: an outcome
    assert [(f.kind, f.subject) for f in find_drift(m)] == [
        ("unhandled", "order.cancelled"), ("unhandled", "payment.refunded"),
    ]
    kept, waived = allowed(find_drift(m), ["unhandled:order.*", "payment.refunded"])
    assert kept == []
    assert len(waived) == 2


def test_names_built_at_run_time_are_matched_against_declared_names() -> None:
    m = declared_map(trip.app)
    calls = {(e.target.name, e.inferred) for e in m.edges.values() if e.source.name == "book_trip"}
    assert calls == {(f"{svc}.{cmd}", True) for svc in ("flights", "hotels", "cars") for cmd in ("book", "cancel")}
    assert [n.where for n in m.notes] == ["workflow book_trip", "workflow book_trip"]
    assert "ctx.call(f'{service}.book') is only known at run time; it matches cars.book, flights.book, " \
           "hotels.book" in m.notes[0].text
    assert [(f.kind, f.subject) for f in find_drift(m)] == [("unhandled", "trip.cancelled")]
    assert "calls [inferred]" in render_text(m, [])


class Item(BaseModel):
    sku: str


SHIPPED = "item.shipped"


class Events:
    PACKED = "item.packed"


def _helper(ctx: Context) -> None:
    """Sends things the map cannot see."""


def test_what_the_source_scan_sees_and_what_it_reports() -> None:
    app = App("scan")
    store = app.service("store")

    @store.on("item.added")
    async def add(item: Item, context: Context) -> None:  # the context under another name
        await context.emit(SHIPPED, item)  # a module constant
        await context.emit(Events.PACKED, item)  # a class attribute
        await context.emit("stock." + item.sku, item)  # built from parts: nothing declared matches
        await context.emit(item.sku, item)  # unknown
        _helper(context)  # handed to another function

    @store.on("item.shipped")
    async def shipped(item: Item) -> None: ...

    @store.on("item.packed")
    async def packed(item: Item) -> None: ...

    m = declared_map(app)
    edges = {str(e) for e in m.edges.values()}
    assert {"service store -> event item.shipped", "service store -> event item.packed"} <= edges
    notes = [n.text for n in m.notes]
    assert any("the context is passed to _helper()" in n for n in notes)
    assert any("context.emit('stock.' + item.sku) is only known at run time and matches nothing declared" in n
               for n in notes)
    assert any("context.emit(item.sku) is only known at run time; not on the map" in n for n in notes)

    namespace: dict[str, Any] = {}
    exec("async def made(order, ctx):\n    await ctx.emit('x.y')\n", namespace)  # no source file
    assert scan_function(namespace["made"], "ctx").problem is not None


def test_unfed_handlers_and_the_stuck_event() -> None:
    app = App("feeds")
    ops = app.service("ops")

    @ops.on("never.sent")
    async def orphan(payload: dict[str, Any]) -> None: ...

    @ops.on(FLOW_STUCK)
    async def page(stuck: FlowStuck) -> None: ...

    @app.workflow("waiter")
    async def waiter(ctx: WorkflowContext, payload: None) -> None:
        await ctx.wait_for("also.never.sent")

    app.flow("job", starts="job.created", ends="never.sent")  # no within: nothing is ever announced stuck
    findings = find_drift(declared_map(app))
    assert [(f.kind, f.subject) for f in findings] == [
        ("unfed", "event also.never.sent -> workflow waiter"),
        ("unfed", f"event {FLOW_STUCK} -> service ops"),
        ("unfed", "event never.sent -> service ops"),
    ]
    assert "no declared flow has within=" in findings[1].detail

    timed = App("timed")
    timed.service("ops").on(FLOW_STUCK)(page)
    timed.flow("job", starts="job.created", within=30)
    m = declared_map(timed)
    assert "system interplay -> event interplay.flow.stuck" in {str(e) for e in m.edges.values()}
    assert find_drift(m) == []


def test_a_command_nobody_answers_is_unhandled() -> None:
    app = App("calls")
    app.service("billing")

    @app.workflow("charge")
    async def charge(ctx: WorkflowContext, payload: None) -> None:
        await ctx.call("billing.charge", payload)  # ConfigurationError when it runs

    assert find_drift(declared_map(app)) == [
        Finding("unhandled", "billing.charge", "sent by workflow charge but no service answers it", "billing.charge")
    ]


def test_dot_has_every_node_and_edge() -> None:
    m = declared_map(orders.app)
    dot = render_dot(m, find_drift(m))
    assert dot.startswith('digraph "shop" {')
    assert dot.count(" -> ") == len(ORDERS_EDGES)
    assert '"event:order.created" -> "service:payments" [label="handles (take_payment)"];' in dot
    assert '"event:payment.refunded" [label="payment.refunded", shape=ellipse' in dot


def test_svg_is_drawn_by_graphviz() -> None:
    if shutil.which("dot") is None:
        reason = "Graphviz's dot is not installed (apt-get install graphviz)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: .ci/run installs it")
        pytest.skip(reason)
    m = declared_map(orders.app)
    svg = render_svg(m, [])
    assert svg.lstrip().startswith("<?xml")
    assert "<svg" in svg
    assert svg.count('class="edge"') == len(ORDERS_EDGES)
    assert ">payments.process_payment<" in svg


def test_svg_without_graphviz_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maprender.shutil, "which", lambda name: None)
    with pytest.raises(ConfigurationError, match=r"apt-get install graphviz.*--format dot"):
        render_svg(declared_map(orders.app), [])
