"""The Store contract: what every SQL store must do, written once.

Each backend's test module subclasses :class:`StoreContract` and provides
``make_store()``: a new, not yet opened store on the same database, each call (a
second call is "another process"). Ops take ``now`` explicitly, so leases, deadlines
and retention are tested on made-up time, without sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interplay.errors import SchemaVersionError, StoreError
from interplay.message import Message
from interplay.stores import messaging, workflows
from interplay.stores.base import Store
from interplay.stores.records import (
    ClaimedRow,
    DeadLetter,
    FlowStart,
    JournalEntry,
    OutboxRow,
    Outgoing,
    RunRow,
    Settlement,
    SpanRecord,
)
from interplay.stores.schema import SCHEMA_VERSION
from interplay.stores.tx import Tx
from interplay.testing import wait_until
from interplay.transports.base import reply_route

T0 = 1_700_000_000.0
TABLES = ("ip_meta", "ip_routes", "ip_queue", "ip_inbox", "ip_outbox", "ip_dlq", "ip_messages", "ip_spans",
          "ip_flows", "ip_runs", "ip_journal", "ip_waits", "ip_leases")
Connect = Callable[[], Awaitable[Store]]
# Strings that broke SQL layers before: quotes, comment starters, placeholder look-alikes
# of every driver, backslashes, NUL, characters outside the BMP.
NASTY = ["'", "''", '"', "';--", "'); DROP TABLE ip_queue;--", "%s", "%(x)s", "%", "?", "$1", ":name", "\\",
         "\x00", "☃", "zürich", "\U0001f600", "\n", " ", "--", "/*"]
nasty_names = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=6)), min_size=1, max_size=4).map("".join)


def tag() -> str:
    return uuid.uuid4().hex[:10]


def event(type_: str, *, flow_id: str = "", msg_id: str | None = None, payload: Any = None,
          causation_id: str | None = None) -> Message:
    return Message(type=type_, payload=payload, kind="event", id=msg_id or str(uuid.uuid4()), flow_id=flow_id,
                   causation_id=causation_id, source="contract", time=T0)


def out(msg: Message, route: str | None = None, **kwargs: Any) -> Outgoing:
    return Outgoing(message=msg, route="event." + msg.type if route is None else route, body=msg.encode(), **kwargs)


def span(msg: Message, group: str, outcome: str = "ok", at: float = T0) -> SpanRecord:
    return SpanRecord(flow_id=msg.flow_id, msg_id=msg.id, service=group, handler="h", type=msg.type, started=at,
                      ended=at + 0.01, outcome=outcome, error=None, attempt=1)


def settled(group: str, msg: Message, row: ClaimedRow | None, outcome: str = "ok", **kwargs: Any) -> Settlement:
    return Settlement(group, msg.id, msg.flow_id, outcome,  # type: ignore[arg-type]
                      queue_id=None if row is None else row.queue_id, lease=None if row is None else row.lease,
                      inbox=outcome != "retry", **kwargs)


def new_run(run_id: str, *, owner: str | None = None, flow_id: str | None = None, at: float = T0,
            parent: str | None = None) -> RunRow:
    return RunRow(run_id=run_id, workflow="wf", flow_id=flow_id or run_id, parent_run=parent, parent_seq=None,
                  status="running" if owner else "pending", input={"n": 1}, result=None, error_type=None,
                  error=None, owner=owner, lease_until=at + 5 if owner else None, cancel_requested=False,
                  created=at, updated=at)


def root_of(run: RunRow) -> Outgoing:
    msg = Message(type=run.workflow, payload=run.input, kind="workflow", id="root-" + run.run_id,
                  flow_id=run.flow_id, source="contract", time=run.created)
    start = FlowStart(run.workflow, kind="workflow", declared=True) if run.flow_id == run.run_id else None
    return Outgoing(message=msg, route="", body=msg.encode(), flow_start=start)


def wait_entry(run_id: str, seq: int, name: str) -> JournalEntry:
    return JournalEntry(run_id=run_id, seq=seq, kind="wait", name=name, status="scheduled", started=T0)


async def count(store: Store, table: str) -> int:
    return int((await store.read(lambda tx: tx.one(f"SELECT COUNT(*) FROM {table}")))[0])


async def occupy_writers(store: Store, n: int, gate: threading.Event) -> asyncio.Future[list[Any]]:
    """Hold ``n`` of the store's writer threads in an op until ``gate`` is set; returns their writes."""
    started = threading.Semaphore(0)

    def hold(tx: Tx) -> None:
        started.release()
        gate.wait(10)

    held = []
    for _ in range(n):  # one at a time, or one writer would take them all in one batch
        held.append(asyncio.ensure_future(store.write(hold)))
        assert await asyncio.to_thread(started.acquire, True, 10), "a writer did not take its op"
    return asyncio.gather(*held)


class StoreContract:
    """Subclass and implement ``make_store``; pytest collects the inherited tests."""

    #: Whether text columns hold U+0000. If not, a name containing it must fail with
    #: StoreError and write nothing (never be stored altered).
    text_holds_nul: ClassVar[bool] = True

    def make_store(self) -> Store:
        raise NotImplementedError

    @pytest.fixture
    async def connect_store(self) -> AsyncIterator[Connect]:
        """Opens stores on the test's database; all are closed after the test."""
        opened: list[Store] = []

        async def connect() -> Store:
            store = self.make_store()
            await store.open()
            opened.append(store)
            return store

        yield connect
        for store in opened:
            await store.close()

    @pytest.fixture
    async def store(self, connect_store: Connect) -> Store:
        return await connect_store()

    async def emitting(self, store: Store, fn: Callable[[messaging.Emitter], Any], now: float = T0) -> Any:
        result, _ = await store.emitting(now, "queue", fn)
        return result

    # ------------------------------------------------------------------ schema
    async def test_schema_is_created_at_the_current_version(self, connect_store: Connect) -> None:
        first = await connect_store()
        second = await connect_store()  # opening an up-to-date database changes nothing
        assert await first.schema_version() == await second.schema_version() == SCHEMA_VERSION
        for table in TABLES:
            assert await count(second, table) >= 0

    async def test_a_database_from_a_newer_interplay_is_refused(self, store: Store) -> None:
        newer = str(SCHEMA_VERSION + 1)
        await store.write(lambda tx: tx.execute("UPDATE ip_meta SET value = ? WHERE key = 'schema_version'", (newer,)))
        with pytest.raises(SchemaVersionError, match="newer"):
            await self.make_store().open()

    async def test_a_failing_op_fails_alone(self, store: Store) -> None:
        def bad(tx: Tx) -> None:
            tx.execute("SELEC nonsense")

        good = [store.write(lambda tx, n=n: tx.one("SELECT ?", (n,))[0]) for n in range(3)]
        results = await asyncio.gather(*good, store.write(bad), return_exceptions=True)
        assert [int(r) for r in results[:3]] == [0, 1, 2]  # type: ignore[call-overload]
        assert isinstance(results[3], StoreError)

    async def test_an_op_failing_at_its_first_statement_leaves_the_writer_usable(self, store: Store) -> None:
        # PostgreSQL sends BEGIN with the first statement: a failure there must still roll back.
        gate = threading.Event()  # all writer connections but one wait here: the ops below share that one
        blockers = await occupy_writers(store, store._writer_count() - 1, gate)
        try:
            for _ in range(3):
                with pytest.raises(StoreError):
                    await store.write(lambda tx: tx.execute("SELEC nonsense"))
                assert int((await store.write(lambda tx: tx.one("SELECT 7")))[0]) == 7
                with pytest.raises(StoreError):  # a deferred write failing at the end, sent first
                    await store.write(lambda tx: tx.later("INSERT INTO no_such_table (x) VALUES (?)", (1,)))
                assert int((await store.write(lambda tx: tx.one("SELECT 8")))[0]) == 8
        finally:
            gate.set()
            await blockers

    async def test_a_fenced_write_in_a_batch_is_refused_alone(self, store: Store) -> None:
        # Ops batched together defer their fences to commit time (Tx.expect); one that
        # fails there must fail only its own op, and only that op's writes are dropped.
        runs = [new_run("run-" + tag(), owner="a") for _ in range(6)]
        for run in runs:
            await self.emitting(store, lambda em, run=run: workflows.create_run(em, run, root_of(run)))
        gate = threading.Event()  # every writer waits here meanwhile: the steps below queue up together
        blocking = await occupy_writers(store, store._writer_count(), gate)
        holders = [("b", 0) if i == 2 else ("a", 0) for i in range(len(runs))]
        steps = [
            self.emitting(store, lambda em, run=run, holder=holder: workflows.write_step(
                em, holder, JournalEntry(run.run_id, 0, "step", "charge", "completed", data=run.run_id,
                                         started=T0, ended=T0),
                [out(event("charged", flow_id=run.flow_id), route="")]))
            for run, holder in zip(runs, holders, strict=True)
        ]
        pending = asyncio.gather(*steps)
        await wait_until(lambda: store._queue.qsize() >= len(steps), message="the steps queued")
        gate.set()
        await blocking
        assert await pending == [True, True, False, True, True, True]
        journals = [await store.load_journal(run.run_id) for run in runs]
        assert [[e.data for e in j] for j in journals] == [[r.run_id] if i != 2 else [] for i, r in enumerate(runs)]
        charged = await store.read(lambda tx: tx.all("SELECT flow_id FROM ip_messages WHERE type = 'charged'"))
        assert sorted(r[0] for r in charged) == sorted(r.flow_id for i, r in enumerate(runs) if i != 2)

    async def test_a_flow_opened_in_a_batch_gets_the_counts_of_the_same_batch(self, store: Store) -> None:
        # Deferred writes run INSERTs before UPDATEs: one op's flow counter UPDATE, first
        # used before another op opens its flow, must not run before that flow's INSERT.
        # (Step records: an event would take the flow lock, which sends what is deferred.)
        def step(type_: str, flow_id: str) -> Message:
            return Message(type=type_, payload=None, kind="step", flow_id=flow_id, source="contract", time=T0)

        known = "flow-" + tag()
        await store.publish([out(step("reserve", known), route="", flow_start=FlowStart("order", declared=True))],
                            T0, "queue")
        fresh = "flow-" + tag()
        gate = threading.Event()
        blocking = await occupy_writers(store, store._writer_count(), gate)
        writes = [
            store.publish([out(step("charge", known), route="")], T0 + 1, "queue"),
            store.publish([out(step("reserve", fresh), route="", flow_start=FlowStart("order", declared=True)),
                           out(step("charge", fresh), route="")], T0 + 1, "queue"),
        ]
        pending = asyncio.gather(*writes)
        await wait_until(lambda: store._queue.qsize() >= len(writes), message="the publishes queued")
        gate.set()
        await blocking
        await pending
        for flow_id in (known, fresh):
            flow = await store.flow(flow_id, T0 + 1)
            assert flow is not None
            assert (flow.last_type, flow.updated) == ("charge", T0 + 1)

    # ------------------------------------------------------------------ the queue
    async def test_publish_claim_settle_with_lease_fencing(self, store: Store) -> None:
        g = "g-" + tag()
        msg = event("order.created", payload={"n": 1})
        await store.declare_routes(g, ["event.order.created"])
        await store.publish([out(msg)], T0, "queue")
        (first,) = await store.claim(g, 10, T0, 5)
        assert (first.body, first.deliveries, first.duplicate) == (msg.encode(), 1, False)
        assert await store.claim(g, 10, T0 + 1, 5) == []  # leased
        (second,) = await store.claim(g, 10, T0 + 6, 5)  # the lease ran out: delivered again
        assert (second.queue_id, second.deliveries) == (first.queue_id, 2)
        assert second.lease != first.lease
        assert await store.extend_leases([(first.queue_id, first.lease)], T0 + 60) == 0
        child = event("payment.completed", flow_id=msg.flow_id, causation_id=msg.id)
        stale = settled(g, msg, first, span=span(msg, g), emits=[out(child)])
        assert await store.settle(stale, T0 + 7, "queue") == ("stale", [])
        messages, spans = await store.flow_records(msg.flow_id)
        assert ([m.id for m in messages], spans) == ([msg.id], [])  # the stale settle changed nothing
        assert await store.inbox_seen(g, [msg.id]) == {}
        assert await store.extend_leases([(second.queue_id, second.lease)], T0 + 60) == 1
        assert await store.claim(g, 10, T0 + 30, 5) == []  # kept by the heartbeat
        fresh = settled(g, msg, second, span=span(msg, g), emits=[out(child)])
        assert (await store.settle(fresh, T0 + 8, "queue"))[0] == "applied"
        assert await store.claim(g, 10, T0 + 1000, 5) == []

    async def test_retry_reschedules_the_row(self, store: Store) -> None:
        g = "g-" + tag()
        msg = event("order.created")
        await store.declare_routes(g, ["event.order.created"])
        await store.publish([out(msg)], T0, "queue")
        (row,) = await store.claim(g, 10, T0, 30)
        retry = settled(g, msg, row, "retry", retry_at=T0 + 2)
        assert (await store.settle(retry, T0 + 1, "queue"))[0] == "applied"
        assert await store.claim(g, 10, T0 + 1.5, 30) == []
        (again,) = await store.claim(g, 10, T0 + 2, 30)
        assert (again.queue_id, again.deliveries) == (row.queue_id, 2)

    async def test_raw_bytes_and_groups(self, store: Store) -> None:
        g = "g-" + tag()
        await store.enqueue_raw(g, "event.raw", b"\x00\xff not an envelope", T0)
        (row,) = await store.claim(g, 10, T0, 5)
        assert (row.body, row.route) == (b"\x00\xff not an envelope", "event.raw")
        await store.declare_routes(g, ["event.x"], ephemeral=True)
        await store.drop_group(g)
        await store.publish([out(event("x"))], T0, "queue")
        assert await store.claim(g, 10, T0 + 100, 5) == []

    async def test_inbox_lets_one_settlement_of_a_message_apply(self, connect_store: Connect) -> None:
        one, two = await connect_store(), await connect_store()
        g = "g-" + tag()
        msg = event("order.created")
        await one.declare_routes(g, ["event.order.created"])
        await one.publish([out(msg)], T0, "queue")
        await two.publish([out(msg)], T0, "queue")  # the same id again: a redelivery
        rows = await one.claim(g, 10, T0, 30)
        assert len(rows) == 2
        child = event("payment.completed", flow_id=msg.flow_id, causation_id=msg.id)
        results = await asyncio.gather(*(
            store.settle(settled(g, msg, row, span=span(msg, g), emits=[out(child)]), T0 + 1, "queue")
            for store, row in zip((one, two), rows, strict=True)
        ))
        assert sorted(r[0] for r in results) == ["applied", "duplicate"]
        messages, spans = await one.flow_records(msg.flow_id)
        assert sorted(m.type for m in messages) == ["order.created", "payment.completed"]
        assert len(spans) == 1
        await one.publish([out(msg)], T0 + 2, "queue")
        (late,) = await one.claim(g, 10, T0 + 2, 30)
        assert late.duplicate

    async def test_a_command_lost_in_a_race_is_answered_with_the_winners_reply(self, connect_store: Connect) -> None:
        # Two consumers handled one command at once (each from its own delivery, each
        # caller waiting on its own reply route). The loser's settlement is a duplicate,
        # but its caller must still be answered - with the reply the winner stored.
        store = await connect_store()
        g = "g-" + tag()
        cmd = Message(type="payments.charge", payload={}, kind="command", source="contract", time=T0)
        answered: list[bytes] = []

        def answer(stored: bytes, em: messaging.Emitter) -> None:
            answered.append(stored)
            reply = cmd.caused("payments.charge", {"stored": stored.decode()}, kind="reply",
                               headers={"reply_to": reply_route("loser")})
            em.emit([out(reply, route=reply_route("loser"), fanout=1)])

        win = settled(g, cmd, None, reply=b'{"ok":true,"result":1}')
        lose = settled(g, cmd, None, reply=b'{"ok":true,"result":2}', on_duplicate=answer)
        assert (await store.settle(win, T0, "outbox"))[0] == "applied"
        result, relay = await store.settle(lose, T0, "outbox")
        assert result == "duplicate"
        assert answered == [b'{"ok":true,"result":1}']
        assert [o.route for o, _ in relay] == [reply_route("loser")]

    async def test_competing_claims_never_share_a_row(self, connect_store: Connect) -> None:
        stores = [await connect_store(), await connect_store()]
        g = "g-" + tag()
        await stores[0].declare_routes(g, ["event.many"])
        await stores[0].publish([out(event("many", payload={"n": n})) for n in range(120)], T0, "queue")
        claims = await asyncio.gather(*(stores[i % 2].claim(g, 9, T0, 30) for i in range(16)))
        ids = [r.queue_id for rows in claims for r in rows]
        assert len(ids) == len(set(ids)) == 120

    # ------------------------------------------------------------------ the trace
    async def test_trace_keeps_messages_and_spans(self, store: Store) -> None:
        g = "g-" + tag()
        root = event("order.created", payload={"id": 7, "text": "zürich ☃"})
        await store.declare_routes(g, ["event.order.created"])
        await store.publish([out(root, flow_start=FlowStart("order"))], T0, "queue")
        (row,) = await store.claim(g, 1, T0, 30)
        child = event("payment.completed", flow_id=root.flow_id, causation_id=root.id, payload=[1, None])
        child.time = T0 + 1  # the trace is ordered by time
        await store.settle(settled(g, root, row, span=span(root, g), emits=[out(child)]), T0 + 1, "queue")
        messages, spans = await store.flow_records(root.flow_id)
        assert [(m.id, m.type, m.causation_id, m.payload, m.source) for m in messages] == [
            (root.id, "order.created", None, {"id": 7, "text": "zürich ☃"}, "contract"),
            (child.id, "payment.completed", root.id, [1, None], "contract"),
        ]
        assert [(s.msg_id, s.service, s.outcome) for s in spans] == [(root.id, g, "ok")]

    async def test_flow_counters_and_status(self, store: Store) -> None:
        g1, g2 = "g1-" + tag(), "g2-" + tag()
        for g in (g1, g2):
            await store.declare_routes(g, ["event.order.created"])
        msg = event("order.created")
        await store.publish([out(msg, flow_start=FlowStart("order", declared=True, deadline=T0 + 10))], T0, "queue")
        flow = await store.flow(msg.flow_id, T0)
        assert flow is not None
        assert (flow.name, flow.status, flow.pending, flow.dead, flow.last_type) == ("order", "running", 2, 0,
                                                                                    "order.created")
        late = await store.flow(msg.flow_id, T0 + 11)
        assert late is not None
        assert late.status == "stuck"
        assert msg.flow_id in [f.flow_id for f in await store.flows(T0 + 11, status="stuck")]
        assert (await store.count_flows(T0 + 11)).get("stuck") == 1
        (r1,) = await store.claim(g1, 1, T0, 30)
        (r2,) = await store.claim(g2, 1, T0, 30)
        await store.settle(settled(g1, msg, r1), T0 + 1, "queue")
        dead = DeadLetter(msg.id, g2, "event.order.created", msg.type, msg.flow_id, r2.body, "rejected", "no", 1)
        await store.settle(settled(g2, msg, r2, "dead", dead=dead), T0 + 1, "queue")
        flow = await store.flow(msg.flow_id, T0 + 1)
        assert flow is not None
        assert (flow.status, flow.pending, flow.dead) == ("failed", 0, 1)  # a dead letter fails a flow...
        await store.dlq_replay([d.id for d in await store.dlq_list(group=g2)], T0 + 1, requeue=False)
        flow = await store.flow(msg.flow_id, T0 + 1)
        assert flow is not None
        assert (flow.status, flow.pending, flow.dead) == ("running", 1, 0)  # ...until it is replayed
        done = event("shipment.prepared", flow_id=msg.flow_id)
        await store.publish([out(done, completes=("order",))], T0 + 2, "queue")
        flow = await store.flow(msg.flow_id, T0 + 20)
        assert flow is not None
        assert (flow.status, flow.ended, flow.last_type) == ("completed", T0 + 2, "shipment.prepared")
        # Undeclared flows end when nothing is pending, or fail with a dead letter.
        quiet, failing = event("user.seen"), event("user.seen")
        await store.declare_routes(g1, ["event.user.seen"])
        for m in (quiet, failing):
            await store.publish([out(m, flow_start=FlowStart("user"))], T0, "queue")
        rows = await store.claim(g1, 2, T0, 30)
        assert len(rows) == 2
        by_msg = {Message.decode(r.body).id: r for r in rows}
        await store.settle(settled(g1, quiet, by_msg[quiet.id]), T0 + 1, "queue")
        dead = DeadLetter(failing.id, g1, "event.user.seen", "user.seen", failing.flow_id, b"x", "rejected", "no", 1)
        await store.settle(settled(g1, failing, by_msg[failing.id], "dead", dead=dead), T0 + 1, "queue")
        statuses = {f.flow_id: f.status for f in await store.flows(T0 + 1, name="user")}
        assert statuses == {quiet.flow_id: "completed", failing.flow_id: "failed"}

    # ------------------------------------------------------------------ DLQ, outbox, retention
    async def test_dead_letters_list_replay_drop_restore(self, store: Store) -> None:
        g = "g-" + tag()
        msg = event("order.created", payload={"bad": True})
        await store.declare_routes(g, ["event.order.created"])
        await store.publish([out(msg, flow_start=FlowStart("order"))], T0, "queue")
        (row,) = await store.claim(g, 1, T0, 30)
        dead = DeadLetter(msg.id, g, "event.order.created", msg.type, msg.flow_id, row.body, "rejected", "E: no", 1)
        await store.settle(settled(g, msg, row, "dead", dead=dead), T0 + 1, "queue")
        (record,) = await store.dlq_list(group=g)
        assert (record.msg_id, record.reason, record.error, record.body) == (msg.id, "rejected", "E: no", msg.encode())
        assert await store.dlq_list(flow_id=msg.flow_id) == [record]
        (replayed,) = await store.dlq_replay([record.id], T0 + 2, requeue=True)
        assert replayed.msg_id == msg.id
        assert await store.dlq_list(group=g) == []
        (again,) = await store.claim(g, 1, T0 + 2, 30)
        assert Message.decode(again.body).id == msg.id
        assert not again.duplicate  # the inbox mark went with the replay: the handler runs again
        flow = await store.flow(msg.flow_id, T0 + 2)
        assert flow is not None
        assert (flow.pending, flow.dead) == (1, 0)
        await store.settle(settled(g, msg, again, "dead", dead=dead), T0 + 3, "queue")
        (record,) = await store.dlq_list(group=g)
        taken = await store.dlq_replay([record.id], T0 + 4, requeue=False)  # for a broker
        assert await store.dlq_list(group=g) == []
        await store.dlq_restore(taken, T0 + 5)  # ...which failed: put it back
        (restored,) = await store.dlq_list(group=g)
        assert restored.msg_id == msg.id
        assert await store.dlq_drop([restored.id, restored.id + 1000]) == 1
        assert await store.dlq_list(group=g) == []

    async def test_outbox_keeps_rows_until_done(self, store: Store) -> None:
        g = "g-" + tag()
        await store.declare_routes(g, ["event.order.created"])
        msgs = [event("order.created") for _ in range(3)]
        relay = await store.publish([out(m, fanout=1) for m in msgs], T0, "outbox")
        ids = [i for _, i in relay]
        assert all(i is not None for i in ids)
        assert await store.claim(g, 10, T0, 30) == []  # a broker carries them, not the queue
        pending = await store.outbox_pending(T0 + 1)
        assert [(r[1], r[2]) for r in pending] == [("event.order.created", m.encode()) for m in msgs]
        assert await store.outbox_pending(T0 - 1) == []  # too young: their writer relays them
        store.outbox_done([ids[0], ids[1]])  # in the next transaction, not awaited
        await store.write(lambda tx: None)  # writes commit in order: this one is after it
        assert [r[0] for r in await store.outbox_pending(T0 + 1)] == [ids[2]]

    async def test_outbox_rows_are_claimed_by_one_relay_and_retried_later(self, store: Store) -> None:
        msgs = [event("order.created") for _ in range(3)]
        ids = [i for _, i in await store.publish([out(m, fanout=1) for m in msgs], T0, "outbox")]
        grace = 5.0

        def claim(now: float, limit: int = 10) -> Awaitable[list[OutboxRow]]:
            return store.outbox_claim(now, now - grace, now + grace, limit)

        async def due(now: float) -> bool:
            return await store.outbox_due(now, now - grace)

        assert not await due(T0 + 1)
        assert await claim(T0 + 1) == []  # young: their writer relays them
        assert await due(T0 + 6)
        first = await claim(T0 + 6, limit=2)
        assert [(r.id, r.route, r.msg_id, r.body, r.attempts) for r in first] == [
            (i, "event.order.created", m.id, m.encode(), 1) for i, m in zip(ids[:2], msgs[:2], strict=True)
        ]
        second = await claim(T0 + 6)  # another relay at the same moment: only what is left
        assert [(r.id, r.attempts) for r in second] == [(ids[2], 1)]
        assert not await due(T0 + 10)
        assert await claim(T0 + 10) == []  # all held (until T0 + 11)
        # The first relay published one row and failed the other (retry at T0 + 20)...
        await store.write(lambda tx: messaging.outbox_done(tx, [ids[0]]))
        assert await store.outbox_retry([(ids[1], 1, T0 + 20)]) == 1
        # ...the second died: its row is due again when its hold lapses.
        assert [(r.id, r.attempts) for r in await claim(T0 + 11)] == [(ids[2], 2)]
        # The dead relay's late retry is fenced off by the attempts of its claim.
        assert await store.outbox_retry([(ids[2], 1, T0 + 12)]) == 0
        assert await claim(T0 + 15) == []  # one waits for its retry, one is held (until T0 + 16)
        assert [(r.id, r.attempts) for r in await claim(T0 + 20)] == [(ids[1], 2), (ids[2], 3)]

    async def test_concurrent_outbox_claims_take_each_row_once(self, connect_store: Connect) -> None:
        stores = [await connect_store() for _ in range(4)]  # four processes
        relay = await stores[0].publish([out(event("order.created"), fanout=1) for _ in range(60)], T0, "outbox")
        now = T0 + 10

        def claim(store: Store) -> Awaitable[list[OutboxRow]]:
            return store.outbox_claim(now, now - 5, now + 5, 20)

        claims = await asyncio.gather(*(claim(s) for s in stores for _ in range(3)))
        taken = [r.id for rows in claims for r in rows]
        assert sorted(taken) == sorted(i for _, i in relay)  # every row, each by one claim

    async def test_purge_applies_retention(self, store: Store) -> None:
        g = "g-" + tag()
        await store.declare_routes(g, ["event.order.created"])
        old, busy = event("order.created"), event("order.created")
        for msg in (old, busy):
            await store.publish([out(msg, flow_start=FlowStart("order"))], T0, "queue")
        rows = {Message.decode(r.body).id: r for r in await store.claim(g, 2, T0, 30)}
        await store.settle(settled(g, old, rows[old.id], span=span(old, g)), T0 + 1, "queue")
        counts = await store.purge(T0 + 100, T0 + 100)
        assert (counts["inbox"], counts["ip_messages"], counts["ip_spans"], counts["flows"]) == (1, 1, 1, 1)
        assert await store.flow_records(old.flow_id) == ([], [])
        assert await store.inbox_seen(g, [old.id]) == {}
        assert await store.flow(busy.flow_id, T0 + 100) is not None  # still pending: kept

    # ------------------------------------------------------------------ workflow runs
    async def test_runs_are_created_once_per_id(self, store: Store) -> None:
        run = new_run("run-" + tag())
        created, row = await self.emitting(store, lambda em: workflows.create_run(em, run, root_of(run)))
        assert created
        assert row == run
        other = new_run(run.run_id, at=T0 + 5)
        created, row = await self.emitting(store, lambda em: workflows.create_run(em, other, root_of(other)))
        assert not created
        assert row == run
        assert await store.get_run(run.run_id) == run
        flow = await store.flow(run.run_id, T0)
        assert flow is not None
        assert (flow.kind, flow.name) == ("workflow", "wf")

    async def test_claim_runs_gives_each_run_to_one_owner(self, connect_store: Connect) -> None:
        stores = [await connect_store(), await connect_store()]
        runs = [new_run(f"run-{tag()}-{n}") for n in range(30)]
        await self.emitting(stores[0], lambda em: [workflows.create_run(em, r, root_of(r)) for r in runs])
        claims: list[list[RunRow]] = []
        for _ in range(5):  # under READ COMMITTED a claim racing others may come back short: go on
            claims += await asyncio.gather(*(stores[i % 2].claim_runs(f"owner-{i}", 4, T0, 5) for i in range(10)))
            if sum(len(rows) for rows in claims) >= len(runs):
                break
        owners = {r.run_id: r.owner for rows in claims for r in rows}
        # No run twice: a claim meeting a run claimed since its snapshot must not take it too.
        assert sum(len(rows) for rows in claims) == len(owners) == 30
        for rows in claims:
            assert all(r.status == "running" and r.lease_until == T0 + 5 for r in rows)
        assert {r.run_id: r.owner for r in await stores[1].list_runs(limit=100)} == owners

    async def test_expired_leases_are_taken_over_and_heartbeats_keep_them(self, store: Store) -> None:
        run = new_run("run-" + tag())
        await self.emitting(store, lambda em: workflows.create_run(em, run, root_of(run)))
        assert [r.owner for r in await store.claim_runs("a", 10, T0, 5)] == ["a"]
        assert await store.claim_runs("b", 10, T0 + 1, 5) == []
        assert await store.heartbeat_runs("a", T0 + 4, 5) == {run.run_id}
        assert await store.claim_runs("b", 10, T0 + 8, 5) == []  # the heartbeat held it until T0+9
        assert [r.owner for r in await store.claim_runs("b", 10, T0 + 10, 5)] == ["b"]
        assert await store.heartbeat_runs("a", T0 + 11, 5) == set()

    async def test_journal_writes_are_fenced_by_ownership(self, store: Store) -> None:
        run = new_run("run-" + tag(), owner="a")
        await self.emitting(store, lambda em: workflows.create_run(em, run, root_of(run)))
        step = JournalEntry(run.run_id, 0, "step", "charge", "completed", data={"ok": 1}, started=T0, ended=T0)
        assert await self.emitting(store, lambda em: workflows.write_step(em, ("a", 0), step))
        await store.claim_runs("b", 10, T0 + 100, 5)  # a stopped heartbeating
        stale = JournalEntry(run.run_id, 1, "step", "ship", "completed", data={"by": "a"}, started=T0)
        assert not await self.emitting(store, lambda em: workflows.write_step(em, ("a", 0), stale))
        mine = JournalEntry(run.run_id, 1, "step", "ship", "completed", data={"by": "b"}, started=T0)
        assert await self.emitting(store, lambda em: workflows.write_step(em, ("b", 1), mine))
        assert [(e.seq, e.data) for e in await store.load_journal(run.run_id)] == [(0, {"ok": 1}), (1, {"by": "b"})]

    async def test_journals_of_several_runs_load_in_one_read(self, store: Store) -> None:
        runs = [new_run("run-" + tag(), owner="a") for _ in range(3)]
        for run in runs:
            await self.emitting(store, lambda em, run=run: workflows.create_run(em, run, root_of(run)))
        for run, steps in zip(runs, (2, 0, 1), strict=True):
            for seq in range(steps):
                entry = JournalEntry(run.run_id, seq, "step", f"s{seq}", "completed", data=seq, started=T0, ended=T0)
                assert await self.emitting(store, lambda em, entry=entry: workflows.write_step(em, ("a", 0), entry))
        journals = await store.load_journals([r.run_id for r in runs] + ["no-such-run"])
        assert {k: [(e.seq, e.data) for e in v] for k, v in journals.items()} == {
            runs[0].run_id: [(0, 0), (1, 1)], runs[1].run_id: [], runs[2].run_id: [(0, 0)], "no-such-run": []}

    async def test_a_run_claimed_back_fences_its_old_execution(self, store: Store) -> None:
        # a claims, loses the run to b, claims it back: the writes a still had in flight
        # from its first lease carry the old epoch and are refused, though the owner is a.
        run = new_run("run-" + tag())
        await self.emitting(store, lambda em: workflows.create_run(em, run, root_of(run)))
        (first,) = await store.claim_runs("a", 10, T0, 5)
        (second,) = await store.claim_runs("b", 10, T0 + 10, 5)
        (third,) = await store.claim_runs("a", 10, T0 + 20, 5)
        assert (first.epoch, second.epoch, third.epoch) == (1, 2, 3)
        late = JournalEntry(run.run_id, 0, "step", "charge", "completed", data={"lease": 1}, started=T0)
        assert not await self.emitting(store, lambda em: workflows.write_step(em, first.holder, late))
        now = JournalEntry(run.run_id, 0, "step", "charge", "completed", data={"lease": 3}, started=T0)
        assert await self.emitting(store, lambda em: workflows.write_step(em, third.holder, now))
        assert [e.data for e in await store.load_journal(run.run_id)] == [{"lease": 3}]

    async def test_an_event_after_a_wait_wakes_the_run(self, store: Store) -> None:
        owner, replies = "orch-" + tag(), "replies-" + tag()
        await store.declare_routes(replies, [reply_route(owner)])
        run = new_run("run-" + tag(), owner=owner)
        await self.emitting(store, lambda em: workflows.create_run(em, run, root_of(run)))
        early = event("delivery.confirmed", flow_id=run.flow_id, payload={"n": 0})
        await store.publish([out(early)], T0, "queue")
        entry = wait_entry(run.run_id, 0, "delivery.confirmed")
        found = await self.emitting(store, lambda em: workflows.register_wait(
            em, (owner, 0), entry, run.flow_id, "delivery.confirmed", []))
        assert found == [(early.id, {"n": 0})]  # what already happened comes back at once
        found = await self.emitting(store, lambda em: workflows.register_wait(
            em, (owner, 0), entry, run.flow_id, "delivery.confirmed", [early.id]))
        assert found == []
        later = event("delivery.confirmed", flow_id=run.flow_id, payload={"n": 1})
        await store.publish([out(later)], T0 + 1, "queue")
        (row,) = await store.claim(replies, 10, T0 + 1, 5)
        wake = Message.decode(row.body)
        assert wake.type == messaging.WAKE
        assert wake.payload == {"run_id": run.run_id, "seq": 0, "type": "delivery.confirmed",
                                "payload": {"n": 1}, "message_id": later.id}
        # A large event is left out of the wake (it could exceed what the bus takes) and
        # read from the store by the run's owner.
        large = event("delivery.confirmed", flow_id=run.flow_id, payload={"blob": "x" * messaging.WAKE_CARRIES})
        await store.publish([out(large)], T0 + 2, "queue")
        (row,) = await store.claim(replies, 10, T0 + 2, 5)
        assert "payload" not in Message.decode(row.body).payload
        assert await store.read(lambda tx: workflows.woken_by(tx, "delivery.confirmed", large.id)) == (
            True, large.payload)
        assert await store.read(lambda tx: workflows.woken_by(tx, "delivery.confirmed", "gone")) == (False, None)

    async def test_ended_runs_are_found_among_more_ids_than_one_in_list_takes(self, store: Store) -> None:
        owner = "orch-" + tag()
        ended, running = new_run("run-" + tag(), owner=owner), new_run("run-" + tag(), owner=owner)
        for run in (ended, running):
            await self.emitting(store, lambda em, run=run: workflows.create_run(em, run, root_of(run)))
        done = span(Message(type="wf", flow_id=ended.flow_id), "wf")
        assert await self.emitting(store, lambda em: workflows.finish_run(
            em, ended, (owner, 0), "completed", None, None, None, done), T0 + 1)
        ids = [f"absent-{i}" for i in range(1200)] + [running.run_id, ended.run_id]
        assert await store.read(lambda tx: workflows.ended_runs(tx, ids)) == {ended.run_id}

    async def test_finishing_a_run_ends_its_flow_and_wakes_its_parent(self, store: Store) -> None:
        owner, replies = "orch-" + tag(), "replies-" + tag()
        await store.declare_routes(replies, [reply_route(owner)])
        parent = new_run("run-" + tag(), owner=owner)
        child = new_run(parent.run_id + "-1", owner=owner, flow_id=parent.flow_id, parent=parent.run_id)
        for run in (parent, child):
            await self.emitting(store, lambda em, run=run: workflows.create_run(em, run, root_of(run)))
        entry = wait_entry(parent.run_id, 3, "@run:" + child.run_id)
        assert await self.emitting(store, lambda em: workflows.register_wait(
            em, (owner, 0), entry, parent.flow_id, "@run:" + child.run_id, [])) == []
        done = span(Message(type="wf", flow_id=parent.flow_id), "wf")
        assert await self.emitting(store, lambda em: workflows.finish_run(
            em, child, (owner, 0), "completed", {"r": 2}, None, None, done), T0 + 1)
        (row,) = await store.claim(replies, 10, T0 + 1, 5)
        wake = Message.decode(row.body).payload
        ended = {"status": "completed", "result": {"r": 2}, "error_type": None, "error": None}
        assert wake["payload"] == ended
        assert await store.read(lambda tx: workflows.woken_by(tx, wake["type"], "")) == (True, ended)
        assert await self.emitting(store, lambda em: workflows.finish_run(
            em, parent, (owner, 0), "completed", "ok", None, None, done), T0 + 2)
        ended = await store.get_run(parent.run_id)
        assert ended is not None
        assert (ended.status, ended.result, ended.owner) == ("completed", "ok", None)
        flow = await store.flow(parent.flow_id, T0 + 2)
        assert flow is not None
        assert (flow.status, flow.ended) == ("completed", T0 + 2)
        assert await count(store, "ip_waits") == 0

    async def test_a_wait_and_an_event_racing_never_miss_each_other(self, connect_store: Connect) -> None:
        """Registering a wait and emitting its event in two concurrent transactions.

        The registering transaction is held open after it looked for the event; the
        emitting one starts then. Either it waits for the first (SQLite: one writer;
        PostgreSQL: the flow lock) and then sees the wait, or the wait saw the event.
        """
        waiting, emitting = await connect_store(), await connect_store()
        owner, replies = "orch-" + tag(), "replies-" + tag()
        await waiting.declare_routes(replies, [reply_route(owner)])
        run = new_run("run-" + tag(), owner=owner)
        await self.emitting(waiting, lambda em: workflows.create_run(em, run, root_of(run)))
        registered, emitted = threading.Event(), threading.Event()

        def register_and_hold(em: messaging.Emitter) -> Any:
            found = workflows.register_wait(em, (owner, 0), wait_entry(run.run_id, 0, "race.won"), run.flow_id,
                                            "race.won", [])
            registered.set()
            emitted.wait(1.0)  # a bounded hold: a store that serializes us blocks the emitter
            return found

        def emit_and_signal(tx: Tx) -> Any:
            relay = messaging.publish(tx, [out(event("race.won", flow_id=run.flow_id))], T0 + 1, "queue")
            emitted.set()
            return relay

        registering = asyncio.ensure_future(self.emitting(waiting, register_and_hold))
        assert await asyncio.to_thread(registered.wait, 10)
        found, _ = await asyncio.gather(registering, emitting.write(emit_and_signal))
        wakes = await waiting.claim(replies, 10, T0 + 1, 5)
        assert found or wakes, "the wait and the event missed each other: the run would wait forever"

    # ------------------------------------------------------------------ hostile input (RELIABILITY S4)
    async def test_names_round_trip_byte_exact(self, store: Store) -> None:
        loop = asyncio.get_running_loop()
        serial = iter(range(1_000_000))

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(names=st.tuples(nasty_names, nasty_names, nasty_names, nasty_names, nasty_names))
        def check(names: tuple[str, str, str, str, str]) -> None:
            n = next(serial)
            unique = tuple(f"{n}:{name}" for name in names)
            asyncio.run_coroutine_threadsafe(self._round_trip(store, n, *unique), loop).result(60)

        await asyncio.to_thread(check)

    async def test_nul_in_names_round_trips_or_fails_cleanly(self, store: Store) -> None:
        await self._round_trip(store, 0, "id\x00", "flow\x00", "grp\x00'", "route\x00", "type\x00")
        await self._round_trip(store, 1, "id\x00b", "ok-flow", "ok-grp", "ok-route", "ok-type")

    async def _round_trip(self, store: Store, n: int, msg_id: str, flow_id: str, group: str, route: str,
                          type_: str) -> None:
        now = T0 + n
        msg = Message(type=type_, payload={"names": [msg_id, group]}, kind="event", id=msg_id, flow_id=flow_id,
                      source=group, time=now)
        item = out(msg, route, flow_start=FlowStart(type_))
        if not self.text_holds_nul and "\x00" in "".join((msg_id, flow_id, group, route, type_)):
            await self._refused(store, store.declare_routes(group, [route]), "\x00" in group + route)
            in_message = "\x00" in msg_id + flow_id + route + type_ + group  # the group is the source
            await self._refused(store, store.publish([item], now, "queue"), in_message)
            return
        await store.declare_routes(group, [route])
        await store.publish([item], now, "queue")
        (row,) = await store.claim(group, 10, now, 30)
        assert row.body == item.body
        assert Message.decode(row.body) == msg
        (stored,), _ = await store.flow_records(flow_id)
        assert (stored.id, stored.flow_id, stored.type, stored.source, stored.payload) == (
            msg_id, flow_id, type_, group, msg.payload)
        flow = await store.flow(flow_id, now)
        assert flow is not None
        assert (flow.flow_id, flow.name, flow.last_type) == (flow_id, type_, type_)
        result, _ = await store.settle(settled(group, msg, row, span=span(msg, group, at=now)), now, "queue")
        assert result == "applied"
        assert await store.inbox_seen(group, [msg_id]) == {msg_id: None}
        _, (sp,) = await store.flow_records(flow_id)
        assert (sp.msg_id, sp.service, sp.type) == (msg_id, group, type_)

    async def _refused(self, store: Store, write: Awaitable[Any], refused: bool) -> None:
        """Run a write that must fail cleanly (with StoreError, writing nothing) if ``refused``."""
        tables = ("ip_routes", "ip_messages", "ip_flows", "ip_queue")
        if not refused:
            await write
            return
        before = [await count(store, t) for t in tables]
        with pytest.raises(StoreError, match="NUL"):
            await write
        assert [await count(store, t) for t in tables] == before, "a refused write left rows behind"
