"""The map against a store's records (counts, p50, drift) and ``interplay map --check`` for CI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from interplay.cli.map import build_map
from interplay.examples import orders
from interplay.tracing.topology import find_drift

from .. import pg
from ..cli.helpers import fails, invoke, ok
from ..servers import require
from .map_apps import Order, clean, drifting

CLEAN = "tests.integration.map_apps:clean"
DRIFTING = "tests.integration.map_apps:drifting"
ORDERS = "interplay.examples.orders:app"


async def _run_clean(store: str) -> None:
    """Traffic along every edge of the clean app."""
    async with clean.run(store=store) as rt:
        for n in range(3):
            await rt.publish("order.placed", Order(id=n))
        run = await rt.start("refund_order", Order(id=9))
        assert await run.result(timeout=10) == "refunded"
        await rt.settled()


async def _run_drifting(store: str) -> None:
    async with drifting.run(store=store) as rt:
        await rt.publish("order.placed", Order(id=1))
        await rt.publish("order.amended", Order(id=1))
        await rt.publish("parcel.lost", {"id": 1})  # a type the app does not know at all
        await rt.settled()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    require("postgres")
    with pg.database("interplay_map") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    """A SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        yield sqlite_url
        return
    database = request.getfixturevalue("pg_database")
    schema = pg.new_schema()
    yield f"{database}?schema={schema}"
    pg.drop_schema(database, schema)


async def test_observed_counts_and_latency_on_the_declared_edges(store_url: str) -> None:
    await _run_clean(store_url)
    m = await build_map(clean, store_url)
    edges = {str(e): e for e in m.edges.values()}
    placed = edges["event order.placed -> service billing"]
    assert (placed.seen, placed.errors, placed.declared) == (3, 0, True)
    assert placed.p50 is not None
    assert 0 <= placed.p50 < 5
    assert edges["external client -> event order.placed"].seen == 3  # how the flows began: not drift
    assert edges["external client -> workflow refund_order"].seen == 1
    assert edges["workflow refund_order -> command billing.refund"].seen == 1
    assert edges["service orders -> event order.closed"].seen_after == {"invoice.sent": 3}
    assert find_drift(m) == []
    recent = await build_map(clean, store_url, since=1e-6)  # only what happened in the last microsecond
    assert not any(e.seen for e in recent.edges.values())


async def test_drift_in_a_store_with_undeclared_edges(store_url: str) -> None:
    await _run_drifting(store_url)
    m = await build_map(drifting, store_url)
    assert [(f.kind, f.subject) for f in find_drift(m)] == [
        ("undeclared", "external client -> event parcel.lost"),  # nobody declares the type
        ("undeclared", "service shop -> event audit.recorded"),  # emitted under a name made at run time
        ("undeclared", "service shop -> event invoice.sent (after order.amended)"),  # by a handler not declaring it
        ("unhandled", "audit.recorded"),
        ("unhandled", "parcel.lost"),
    ]
    assert [n.where for n in m.notes] == ["service shop (rebill)", "service shop (bill)"]  # the blind spots


async def test_declared_but_never_seen(sqlite_url: str) -> None:
    async with orders.app.run(store=sqlite_url) as rt:
        await rt.publish("order.created", orders.Order(id=1, amount=20))  # the happy path only
        await rt.settled()
    m = await build_map(orders.app, sqlite_url)
    unseen = {f.subject for f in find_drift(m) if f.kind == "unseen"}
    assert "service payments -> event payment.failed" in unseen  # on_error: no payment failed
    assert "workflow process_order -> command payments.refund" in unseen  # no workflow ran
    assert "event order.created -> service payments" not in unseen
    assert not [f for f in find_drift(m) if f.kind == "undeclared"]


# ------------------------------------------------------------------------------ the CLI
def test_check_passes_on_a_map_that_adds_up(sqlite_url: str) -> None:
    asyncio.run(_run_clean(sqlite_url))
    text = ok("map", CLEAN, "--check")
    assert "drift: none" in text
    observed = ok("map", CLEAN, "--observed", "--store", sqlite_url, "--check")
    assert "event order.placed -> service billing handles (invoice) 3 seen, p50" in " ".join(observed.split())
    assert "drift: none" in observed


def test_check_fails_on_drift_and_lists_it(sqlite_url: str, tmp_path: Path) -> None:
    asyncio.run(_run_drifting(sqlite_url))
    assert invoke("map", DRIFTING).exit_code == 0  # without --check: a map, not a verdict
    assert invoke("map", DRIFTING, "--check").exit_code == 0  # statically nothing is wrong
    text = fails(1, "map", DRIFTING, "--observed", "--store", sqlite_url, "--check")
    assert "drift (5) undeclared: external client -> event parcel.lost" in text
    assert "UNDECLARED (1 seen)" in text
    chart = tmp_path / "map.mmd"
    listed = fails(1, "map", DRIFTING, "--observed", "--store", sqlite_url, "--check", "-f", "mermaid",
                   "-o", str(chart))
    assert listed.startswith("drift (5): undeclared: external client -> event parcel.lost")  # on stderr
    assert "linkStyle" in chart.read_text()  # the undeclared edges drawn red
    ok("map", DRIFTING, "--observed", "--store", sqlite_url, "--check", "--allow", "undeclared:*",
       "--allow", "unhandled:*")


def test_check_on_the_orders_example() -> None:
    text = fails(1, "map", ORDERS, "--check")
    assert "drift (2) unhandled: order.cancelled" in text
    ok("map", ORDERS, "--check", "--allow", "order.cancelled", "--allow", "payment.refunded")


def test_asyncapi_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "shop.json"
    ok("map", ORDERS, "--format", "asyncapi", "--output", str(out))
    doc = json.loads(out.read_text())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["components"]["schemas"]["Order"] == orders.Order.model_json_schema()


def test_map_errors_exit_2(tmp_path: Path) -> None:
    assert "cannot import" in fails(2, "map", "no_such_module:app")
    assert "unknown store URL" in fails(2, "map", ORDERS, "--observed", "--store", "bogus://x")
    assert "apt-get install graphviz" in fails(2, "map", ORDERS, "--format", "svg", env={"PATH": str(tmp_path)})


@pytest.mark.parametrize("fmt", ["text", "mermaid", "dot", "asyncapi"])
def test_every_format_is_stable(fmt: str) -> None:
    first, second = ok("map", ORDERS, "-f", fmt), ok("map", ORDERS, "-f", fmt)
    assert first == second
    assert first.endswith("\n")
