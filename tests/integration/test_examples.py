"""The shipped examples do what their docstrings say, in every style."""

from __future__ import annotations

import pytest

from interplay import WorkflowFailed
from interplay.examples import orders, trip


async def test_orders_three_styles(sqlite_url: str) -> None:
    Order = orders.Order
    async with orders.app.run(store=sqlite_url) as rt:
        good = await rt.publish("order.created", Order(id=1, amount=20))
        unpaid = await rt.publish("order.created", Order(id=2, amount=-1))
        unshippable = await rt.publish("order.created", Order(id=3, item=orders.OUT_OF_STOCK))
        run = await rt.start("process_order", Order(id=4))
        saga = await rt.start("process_order", Order(id=5, item=orders.OUT_OF_STOCK))
        mixed = await rt.start("deliver_order", Order(id=6))
        assert await run.result(timeout=10) == "order 4 shipped"
        assert await mixed.result(timeout=10) == "order 6 delivered"
        with pytest.raises(WorkflowFailed) as failed:
            await saga.result(timeout=10)
        await rt.settled()
        flows = {fid: await rt.trace(fid) for fid in (good, unpaid, unshippable, saga.flow_id, mixed.flow_id)}
    assert flows[good].status == "completed"
    assert flows[good].shape() == (("order.created", (("payment.completed", (("shipment.prepared", (
        ("customer.notified", ()),)),)),)),)
    assert flows[unpaid].status == "failed"
    assert flows[unpaid].find("order.cancelled")
    assert flows[unshippable].status == "failed"
    assert flows[unshippable].find("payment.refunded")  # choreographed compensation
    assert failed.value.status == "compensated"
    assert [n.type for n in flows[saga.flow_id].roots[0].children] == [
        "payments.process_payment", "shipping.prepare_shipment", "payments.refund",
    ]
    mixed_types = [n.type for n in flows[mixed.flow_id].nodes()]
    assert "order.shipped" in mixed_types
    assert "delivery.confirmed" in mixed_types


@pytest.mark.parametrize(
    ("fail_at", "cancelled"),
    [(None, []), ("flight", []), ("hotel", ["flights.cancel"]), ("car", ["hotels.cancel", "flights.cancel"])],
)
async def test_trip_saga_orchestrated(sqlite_url: str, fail_at: str | None, cancelled: list[str]) -> None:
    async with trip.app.run(store=sqlite_url) as rt:
        run = await rt.start("book_trip", trip.Trip(id=7, traveller="ada", fail_at=fail_at))
        if fail_at is None:
            assert await run.result(timeout=10) == ["F-7", "H-7", "C-7"]
        else:
            with pytest.raises(WorkflowFailed, match=f"no {fail_at} available"):
                await run.result(timeout=10)
        flow = await rt.trace(run.flow_id)
    commands = [n.type for n in flow.roots[0].children]
    assert [c for c in commands if c.endswith(".cancel")] == cancelled  # reverse order of booking


@pytest.mark.parametrize(
    ("fail_at", "end", "status"),
    [(None, "trip.confirmed", "completed"), ("flight", "trip.failed", "failed"),
     ("hotel", "trip.cancelled", "failed"), ("car", "trip.cancelled", "failed")],
)
async def test_trip_saga_choreographed(sqlite_url: str, fail_at: str | None, end: str, status: str) -> None:
    async with trip.app.run(store=sqlite_url) as rt:
        flow_id = await rt.publish("trip.requested", trip.Trip(id=8, traveller="grace", fail_at=fail_at))
        await rt.wait_flow(flow_id)
        await rt.settled()
        flow = await rt.trace(flow_id)
    types = [n.type for n in flow.nodes()]
    assert flow.status == status
    if fail_at != "flight":
        assert types[-1] == end
    else:
        assert end in types
    if fail_at == "car":
        assert types.index("hotel.cancelled") < types.index("flight.cancelled")
