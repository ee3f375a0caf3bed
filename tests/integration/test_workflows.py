"""Durable workflows on real SQLite: every primitive, sagas, retries, timeouts, replay.

Tests about what crosses the bus - commands with their replies and errors, sagas,
events and wake-ups, cancellation, rt.call - run on every bus (tests/buses.py); those
about the engine's own machinery (timers, retries and timeouts, buffering, idempotent
starts, replay) on the store's own queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel

from interplay import (
    App,
    ConfigurationError,
    Context,
    NonDeterminismError,
    Reject,
    Retry,
    StepFailed,
    StepTimeout,
    Transaction,
    ValidationFailed,
    WorkflowCancelled,
    WorkflowContext,
    WorkflowFailed,
)
from interplay.message import Message
from interplay.testing import wait_until

from ..buses import Bus


class Order(BaseModel):
    id: int
    amount: float = 10.0


def shop(calls: Counter[str], log: list[str] | None = None) -> App:
    app = App("shop")
    payments, shipping, notification = app.service("payments"), app.service("shipping"), app.service("notification")
    log = log if log is not None else []

    @payments.command("charge")
    async def charge(order: Order) -> dict[str, str]:
        calls["charge"] += 1
        log.append(f"charge {order.id}")
        if order.amount < 0:
            raise Reject("negative amount")
        return {"receipt": f"r-{order.id}"}

    @payments.command("refund")
    async def refund(receipt: dict[str, str]) -> None:
        calls["refund"] += 1
        log.append(f"refund {receipt['receipt']}")

    @shipping.command("reserve")
    async def reserve(order: Order) -> dict[str, int]:
        calls["reserve"] += 1
        log.append(f"reserve {order.id}")
        return {"slot": order.id * 10}

    @shipping.command("release")
    async def release(slot: dict[str, int]) -> None:
        calls["release"] += 1
        log.append(f"release {slot['slot']}")

    @shipping.command("ship")
    async def ship(order: Order) -> None:
        calls["ship"] += 1
        log.append(f"ship {order.id}")
        if order.id == 13:
            raise Reject("cannot ship order 13")

    @notification.command("notify")
    async def notify(order: Order) -> None:
        calls["notify"] += 1

    return app


async def test_call_step_and_result(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    app = shop(calls)
    steps: list[int] = []

    def tax(amount: float) -> float:
        steps.append(1)
        return round(amount * 0.2, 2)

    @app.workflow("checkout")
    async def checkout(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
        receipt = await ctx.call("payments.charge", order)
        vat = await ctx.step(tax, order.amount)
        await ctx.call("notification.notify", order)
        return {"receipt": receipt["receipt"], "vat": vat}

    async with bus.run(app) as rt:
        run = await rt.start("checkout", Order(id=1, amount=50))
        assert await run.result(timeout=10) == {"receipt": "r-1", "vat": 10.0}
        assert await run.status() == "completed"
        journal = await run.journal()
        flow = await rt.trace(run.flow_id)
    assert [(e.kind, e.name, e.status) for e in journal] == [
        ("call", "payments.charge", "completed"),
        ("step", "test_call_step_and_result.<locals>.tax", "completed"),
        ("call", "notification.notify", "completed"),
    ]
    assert calls == Counter(charge=1, notify=1)
    assert steps == [1]
    assert flow.status == "completed"
    assert flow.shape() == (
        ("checkout", (
            ("payments.charge", (("payments.charge", ()),)),
            ("test_call_step_and_result.<locals>.tax", ()),
            ("notification.notify", (("notification.notify", ()),)),
        )),
    )


@pytest.mark.buses("nats")  # the bus with a size it always refuses past (max_payload, 1 MiB here)
async def test_a_command_or_event_too_large_for_the_bus_fails_where_the_workflow_sends_it(
    bus: Bus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Journaled with its outbox row, it would be relayed and refused forever while the
    # run waited for a reply that never comes. Journaled as failed instead, its replay
    # fails the same way even where the bus would now take it.
    app = App("big")
    handled: list[int] = []

    @app.service("worker").command("store")
    async def store_it(blob: str) -> int:
        handled.append(len(blob))
        return len(blob)

    @app.workflow("upload")
    async def upload(ctx: WorkflowContext, size: int) -> int:
        try:
            stored = int(await ctx.call("worker.store", "x" * size))
        except StepFailed as exc:
            if exc.error_type != "MessageTooLarge":
                raise
            stored = int(await ctx.call("worker.store", "a reference to the data"))
        await ctx.wait_for("go")
        return stored

    @app.workflow("announce")
    async def announce(ctx: WorkflowContext, size: int) -> None:
        await ctx.emit("blob.ready", {"blob": "y" * size})

    async with bus.run(app, run_lease=0.5) as rt:
        run = await rt.start("upload", 2 << 20, id="up")
        await wait_until(lambda: _has_wait(rt, "up"), message="the run waits")
        with pytest.raises(WorkflowFailed, match=r"MessageTooLarge: event 'blob\.ready' is"):
            await (await rt.start("announce", 2 << 20)).result(timeout=30)
    # The next orchestrator replays the run on a bus that says it takes anything.
    monkeypatch.setattr(type(rt.transport), "body_limit", lambda self: None)
    async with bus.run(app, run_lease=0.5, run_poll=0.05) as rt:
        await rt.publish("go", None, flow_id=run.flow_id)
        assert await (await rt.workflow("up")).result(timeout=30) == 23
        outbox = await rt.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_outbox")[0])
    assert handled == [23]
    assert int(outbox) == 0


@pytest.mark.buses("nats")
async def test_an_event_just_under_the_limit_wakes_a_workflow_in_another_process(bus: Bus) -> None:
    # The event fits the bus; a wake wrapping it would not (and would wait in the outbox
    # for ever): to another process a wake names the event, which is read from the store.
    app = App("near-limit")

    @app.workflow("await_blob")
    async def await_blob(ctx: WorkflowContext, _: None) -> int:
        blob: dict[str, str] = await ctx.wait_for("blob.ready", timeout=30)
        return len(blob["blob"])

    async with bus.run(app) as orchestrator, bus.run(app, services=[], orchestrator=False) as publisher:
        run = await orchestrator.start("await_blob", None)
        await wait_until(lambda: _has_wait(orchestrator, run.id), message="the run waits")
        limit = publisher.transport.body_limit()
        assert limit is not None
        bare = Message(type="blob.ready", payload={"blob": ""}, kind="event", flow_id=run.flow_id, source="client")
        size = limit - 60 - len(bare.encode())  # the event's body ends up 60 bytes under the limit
        await publisher.publish("blob.ready", {"blob": "x" * size}, flow_id=run.flow_id)
        assert await run.result(timeout=30) == size
        outbox = await publisher.store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_outbox")[0])
    assert int(outbox) == 0


async def test_saga_third_step_fails_compensates_first_two_in_reverse(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    log: list[str] = []
    app = shop(calls, log)

    @app.workflow("checkout")
    async def checkout(ctx: WorkflowContext, order: Order) -> str:
        async with ctx.saga() as saga:
            receipt = await ctx.call("payments.charge", order)
            saga.compensate("payments.refund", receipt)
            slot = await ctx.call("shipping.reserve", order)
            saga.compensate("shipping.release", slot)
            await ctx.call("shipping.ship", order)  # fails for order 13
        return "shipped"

    async with bus.run(app) as rt:
        run = await rt.start("checkout", Order(id=13))
        with pytest.raises(WorkflowFailed) as failed:
            await run.result(timeout=10)
        ok = await rt.start("checkout", Order(id=14))
        assert await ok.result(timeout=10) == "shipped"
    assert failed.value.status == "compensated"
    assert failed.value.error_type == "StepFailed"
    assert "cannot ship order 13" in failed.value.error
    order_13 = [line for line in log if "13" in line or "130" in line]
    assert order_13 == ["charge 13", "reserve 13", "ship 13", "release 130", "refund r-13"]
    assert calls["refund"] == 1
    assert calls["release"] == 1


async def test_compensating_a_step_that_never_ran_is_a_no_op(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    app = shop(calls)

    @app.workflow("checkout")
    async def checkout(ctx: WorkflowContext, order: Order) -> None:
        async with ctx.saga() as saga:
            receipt = await ctx.call("payments.charge", order)  # rejected: nothing to refund
            saga.compensate("payments.refund", receipt)

    async with app.run(store=sqlite_url) as rt:
        run = await rt.start("checkout", Order(id=1, amount=-1))
        with pytest.raises(WorkflowFailed) as failed:
            await run.result(timeout=10)
    assert failed.value.status == "compensated"
    assert calls["refund"] == 0


async def test_step_failed_carries_the_remote_error(bus: Bus) -> None:
    app = shop(Counter())
    seen: list[StepFailed] = []

    @app.workflow("checkout")
    async def checkout(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.call("payments.charge", order)
        except StepFailed as exc:
            seen.append(exc)
            return "declined"
        return "paid"

    async with bus.run(app) as rt:
        assert await (await rt.start("checkout", Order(id=1, amount=-5))).result(timeout=10) == "declined"
    (exc,) = seen
    assert exc.step == "payments.charge"
    assert exc.error_type == "Reject"
    assert exc.error == "negative amount"
    assert exc.details["service"] == "payments"


async def test_call_retry_and_timeout(sqlite_url: str) -> None:
    app = App("flaky")
    attempts: Counter[str] = Counter()

    @app.service("svc").command("flaky", retry=Retry(attempts=1))
    async def flaky(payload: dict[str, int]) -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError("try later")
        return "finally"

    @app.service("svc").command("slow")
    async def slow(payload: None) -> str:
        await asyncio.sleep(5)
        return "late"

    @app.workflow("wf")
    async def wf(ctx: WorkflowContext, _: None) -> dict[str, str]:
        result = await ctx.call("svc.flaky", {"n": 1}, retry=Retry(attempts=4, backoff=0.01))
        try:
            await ctx.call("svc.slow", None, timeout=0.2)
        except StepTimeout as exc:
            return {"flaky": result, "slow": f"timed out after {exc.timeout}s"}
        return {"flaky": result, "slow": "answered"}

    async with app.run(store=sqlite_url, shutdown_grace=0.1) as rt:
        run = await rt.start("wf", None)
        assert await run.result(timeout=10) == {"flaky": "finally", "slow": "timed out after 0.2s"}
        journal = await run.journal()
    assert attempts["flaky"] == 3
    kinds = [(e.seq, e.kind, e.status) for e in journal]
    # step 0 = the retried call: attempts at keys 0, 2, 4 with backoff sleeps at 1, 3
    assert kinds[:5] == [(0, "call", "failed"), (1, "sleep", "completed"), (2, "call", "failed"),
                         (3, "sleep", "completed"), (4, "call", "completed")]
    assert kinds[5] == (1000, "call", "failed")
    assert journal[5].error_type == "StepTimeout"


async def test_local_step_retry_and_timeout(sqlite_url: str) -> None:
    app = App("steps")
    tries: list[int] = []

    async def wobbly() -> int:
        tries.append(1)
        if len(tries) < 2:
            raise OSError("disk hiccup")
        return 7

    async def forever() -> None:
        await asyncio.sleep(10)

    @app.workflow("wf")
    async def wf(ctx: WorkflowContext, _: None) -> str:
        value = await ctx.step(wobbly, retry=Retry(attempts=3, backoff=0.01))
        try:
            await ctx.step(forever, timeout=0.1)
        except StepFailed as exc:
            return f"{value} {exc.error_type}"
        return "no timeout"

    async with app.run(store=sqlite_url) as rt:
        assert await (await rt.start("wf", None)).result(timeout=10) == "7 StepTimeout"
    assert len(tries) == 2


async def test_emit_and_wait_for_mix_choreography_into_a_workflow(bus: Bus) -> None:
    app = App("mixed")
    delivery = app.service("delivery")

    @delivery.on("order.shipped")
    async def deliver(order: Order, ctx: Context) -> None:
        await ctx.emit("delivery.confirmed", {"order": order.id, "by": "courier"})

    @app.workflow("ship_and_wait")
    async def ship_and_wait(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
        await ctx.emit("order.shipped", order)
        confirmed: dict[str, Any] = await ctx.wait_for("delivery.confirmed", match={"order": order.id}, timeout=10)
        return confirmed

    async with bus.run(app) as rt:
        run = await rt.start("ship_and_wait", Order(id=9))
        assert await run.result(timeout=10) == {"order": 9, "by": "courier"}
        flow = await rt.trace(run.flow_id)
    assert flow.shape() == (("ship_and_wait", (("order.shipped", (("delivery.confirmed", ()),)),)),)
    confirmed = flow.find("delivery.confirmed")[0]
    assert {s.service for s in confirmed.spans} == {"workflow:ship_and_wait"}  # the workflow consumed it


async def test_wait_for_takes_buffered_events_and_respects_match(sqlite_url: str) -> None:
    app = App("buffer")
    gate = asyncio.Event()

    @app.workflow("collector")
    async def collector(ctx: WorkflowContext, _: None) -> list[Any]:
        await ctx.step(gate_wait)
        first = await ctx.wait_for("reading.taken")
        big = await ctx.wait_for("reading.taken", match=lambda p: p["value"] > 100)
        second = await ctx.wait_for("reading.taken")
        return [first["value"], big["value"], second["value"]]

    async def gate_wait() -> None:
        await gate.wait()

    async with app.run(store=sqlite_url) as rt:
        run = await rt.start("collector", None)
        for value in (1, 2, 500):  # all arrive before the first wait: buffered
            await rt.publish("reading.taken", {"value": value}, flow_id=run.flow_id)
        gate.set()
        assert await run.result(timeout=10) == [1, 500, 2]


async def test_wait_for_times_out_durably(sqlite_url: str) -> None:
    app = App("timeouts")

    @app.workflow("impatient")
    async def impatient(ctx: WorkflowContext, _: None) -> str:
        try:
            await ctx.wait_for("never.happens", timeout=0.2)
        except StepTimeout:
            return "gave up"
        return "got it"

    async with app.run(store=sqlite_url) as rt:
        assert await (await rt.start("impatient", None)).result(timeout=10) == "gave up"


async def test_sleep_gather_now_uuid_and_child(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    app = shop(calls)

    @app.workflow("child")
    async def child(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep(0.05)
        return n * 2

    @app.workflow("parent")
    async def parent(ctx: WorkflowContext, _: None) -> dict[str, Any]:
        before = ctx.now()
        await ctx.sleep(0.2)
        after = ctx.now()
        first, second = await ctx.gather(
            ctx.call("shipping.reserve", Order(id=1)), ctx.call("shipping.reserve", Order(id=2))
        )
        kid = await ctx.start_child("child", 21)
        doubled = await kid.result(timeout=10)
        return {"slept": after - before >= 0.2, "slots": [first["slot"], second["slot"]], "child": doubled,
                "ids": [ctx.uuid(), ctx.uuid()]}

    async with app.run(store=sqlite_url) as rt:
        run = await rt.start("parent", None, id="parent-1")
        result = await run.result(timeout=10)
        children = await rt.workflows(workflow="child")
        flow = await rt.trace(run.flow_id)
    assert result["slept"] is True
    assert result["slots"] == [10, 20]
    assert result["child"] == 42
    assert len(set(result["ids"])) == 2
    assert [(c.run_id, c.parent_run, c.flow_id, c.status) for c in children] == [
        ("parent-1-5", "parent-1", "parent-1", "completed")
    ]
    assert flow.find("child")[0].message.causation_id == "run:parent-1"  # the child hangs under its parent


async def test_same_id_starts_one_run(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    app = shop(calls)

    @app.workflow("once")
    async def once(ctx: WorkflowContext, order: Order) -> str:
        await ctx.call("payments.charge", order)
        return "done"

    async with app.run(store=sqlite_url) as rt:
        handles = await asyncio.gather(*[rt.start("once", Order(id=1), id="order-1") for _ in range(5)])
        assert {h.id for h in handles} == {"order-1"}
        assert await handles[0].result(timeout=10) == "done"
        again = await rt.start("once", Order(id=1), id="order-1")
        assert await again.result(timeout=10) == "done"
        runs = await rt.workflows()
    assert len(runs) == 1
    assert calls["charge"] == 1


async def test_invalid_input_is_refused_at_start_and_nothing_is_stored(sqlite_url: str) -> None:
    app = shop(Counter())

    @app.workflow("checkout")
    async def checkout(ctx: WorkflowContext, order: Order) -> None:
        pass

    async with app.run(store=sqlite_url) as rt:
        with pytest.raises(ValidationFailed, match="Order: id: Field required"):
            await rt.start("checkout", {"amount": 3})
        with pytest.raises(ConfigurationError, match="unknown workflow"):
            await rt.start("nope", None)
        assert await rt.workflows() == []
        assert await rt.flows() == []


async def test_cancel_a_waiting_workflow_runs_its_compensations(bus: Bus) -> None:
    calls: Counter[str] = Counter()
    app = shop(calls)

    @app.workflow("patient")
    async def patient(ctx: WorkflowContext, order: Order) -> str:
        async with ctx.saga() as saga:
            receipt = await ctx.call("payments.charge", order)
            saga.compensate("payments.refund", receipt)
            await ctx.wait_for("never.comes")
        return "done"

    async with bus.run(app) as rt:
        run = await rt.start("patient", Order(id=5))
        await wait_until(lambda: _has_wait(rt, run.id), message="the run to wait")
        assert await run.cancel() is True
        with pytest.raises(WorkflowFailed) as failed:
            await run.result(timeout=10)
        assert await run.cancel() is False  # already over
    assert failed.value.status == "cancelled"
    assert calls["refund"] == 1


async def _has_wait(rt: Any, run_id: str) -> bool:
    journal = await rt.store.load_journal(run_id)
    return any(e.kind == "wait" for e in journal)


async def test_transactional_step_writes_exactly_once_with_the_journal(sqlite_url: str) -> None:
    app = App("ledger")

    def book(tx: Transaction, amount: int) -> int:
        tx.execute("INSERT INTO ledger (amount) VALUES (?)", (amount,))
        return int(tx.one("SELECT SUM(amount) FROM ledger")[0])

    def broken(tx: Transaction) -> None:
        tx.execute("INSERT INTO ledger (amount) VALUES (?)", (1000,))
        raise ValueError("constraint in my head")

    @app.workflow("wf")
    async def wf(ctx: WorkflowContext, _: None) -> int:
        total = await ctx.step(book, 5)
        try:
            await ctx.transaction(broken)
        except StepFailed:
            pass
        return int(total)

    async with app.run(store=sqlite_url) as rt:
        await rt.store.write(lambda tx: tx.execute("CREATE TABLE ledger (amount INTEGER)"))
        assert await (await rt.start("wf", None)).result(timeout=10) == 5
        rows = await rt.store.read(lambda tx: tx.all("SELECT amount FROM ledger"))
    assert rows == [(5,)]  # the broken step's insert was rolled back with it


async def test_nondeterministic_replay_parks_the_run_and_resume_continues(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    app = shop(calls)
    version = {"v": 1}

    @app.workflow("evolving")
    async def evolving(ctx: WorkflowContext, order: Order) -> str:
        if version["v"] == 1:
            await ctx.call("payments.charge", order)
            await ctx.wait_for("go")
        else:  # a deploy reordered the steps of runs already in flight
            await ctx.call("shipping.reserve", order)
            await ctx.call("payments.charge", order)
        return f"v{version['v']}"

    async with app.run(store=sqlite_url, run_lease=0.5) as rt:
        run = await rt.start("evolving", Order(id=1), id="evo")
        await wait_until(lambda: _has_wait(rt, "evo"))
    version["v"] = 2
    async with app.run(store=sqlite_url, run_lease=0.5, run_poll=0.05) as rt:
        await wait_until(lambda: _status_is(rt, "evo", "parked"), message="run parked")
        with pytest.raises(WorkflowFailed) as parked:
            await (await rt.workflow("evo")).result(timeout=1)
        assert parked.value.error_type == "NonDeterminismError"
        assert "journal has call 'payments.charge'" in parked.value.error
        version["v"] = 1  # the fix: back to a compatible version
        assert await rt.resume("evo") is True
        await rt.publish("go", None, flow_id=run.flow_id)
        assert await (await rt.workflow("evo")).result(timeout=10) == "v1"
    assert calls["charge"] == 1  # the completed step never ran again
    assert NonDeterminismError.__name__ == "NonDeterminismError"


async def _status_is(rt: Any, run_id: str, status: str) -> bool:
    run = await rt.store.get_run(run_id)
    return run is not None and run.status == status


async def test_cancel_before_start_and_failed_workflow_code(sqlite_url: str) -> None:
    app = App("plain")

    @app.workflow("boom")
    async def boom(ctx: WorkflowContext, _: None) -> None:
        raise RuntimeError("bug in the workflow")

    async with app.run(store=sqlite_url) as rt:
        with pytest.raises(WorkflowFailed, match="RuntimeError: bug in the workflow") as failed:
            await (await rt.start("boom", None)).result(timeout=10)
        assert failed.value.status == "failed"
        assert issubclass(WorkflowCancelled, Exception)


async def test_rt_call_outside_a_workflow(bus: Bus) -> None:
    app = shop(Counter())
    async with bus.run(app) as rt:
        assert await rt.call("payments.charge", Order(id=3)) == {"receipt": "r-3"}
        with pytest.raises(StepFailed, match="negative amount"):
            await rt.call("payments.charge", Order(id=3, amount=-1))
        with pytest.raises(ConfigurationError, match="unknown command"):
            await rt.call("payments.nope", None)
