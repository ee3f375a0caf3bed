"""Ops for messages: publish, claim, settle, dead letters, outbox, routes.

Each function runs inside one store transaction (it gets a :class:`Tx`) and is written
once for every SQL dialect. They must be safe to run twice (the store re-applies an op
alone when a batch it shared failed), so they only touch the database.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

import orjson

from ..message import Message
from ..transports.base import reply_route
from .records import ClaimedRow, DeadLetter, DeadLetterRecord, OutboxRow, Outgoing, Settlement
from .tx import BatchConflict, Transaction, Tx

__all__ = [
    "SettleResult",
    "claim",
    "declare_routes",
    "dlq_drop",
    "dlq_list",
    "dlq_replay",
    "drop_group",
    "outbox_claim",
    "outbox_due",
    "outbox_retry",
    "publish",
    "settle",
]

Delivery = Literal["queue", "outbox", "direct"]
"""Where published messages go: the store's queue table (store bus), the outbox
(a durable broker relays them), or straight to a non-durable bus after commit."""

SettleResult = Literal["applied", "stale", "duplicate", "failed"]

_INSERT_MESSAGE = (
    "INSERT INTO ip_messages (id, flow_id, causation_id, kind, type, source, time, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_FAN_OUT = (
    "INSERT INTO ip_queue (grp, msg_id, flow_id, body, visible_at, route) "
    "SELECT grp, ?, ?, ?, ?, route FROM ip_routes WHERE route = ?"
)


def declare_routes(tx: Tx, group: str, routes: Sequence[str], ephemeral: bool) -> None:
    """Make ``group`` receive the messages published to ``routes`` from now on."""
    tx.executemany(
        "INSERT INTO ip_routes (route, grp, ephemeral) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        [(route, group, int(ephemeral)) for route in routes],
    )


def drop_group(tx: Tx, group: str) -> None:
    """Forget a (temporary) group: its routes and whatever is queued for it."""
    tx.execute("DELETE FROM ip_routes WHERE grp = ?", (group,))
    tx.execute("DELETE FROM ip_queue WHERE grp = ?", (group,))


Relay = list[tuple[Outgoing, int | None]]
"""What the caller must deliver after commit: messages put in the outbox (with their
outbox id), for a non-durable bus (id None), or for a route consumed in this process
(id None; delivered in memory)."""


def publish(tx: Tx, items: Sequence[Outgoing], now: float, delivery: Delivery) -> Relay:
    """Record and queue messages; returns what the caller must relay to the bus."""
    emitter = Emitter(tx, now, delivery)
    emitter.emit(items)
    emitter.changes.apply(tx, now)
    return emitter.relay


class Emitter:
    """Records messages in the trace and routes them, inside one transaction.

    Routing an event also wakes the workflows waiting for it in its flow: each gets
    a wake message on its orchestrator's reply route.
    """

    __slots__ = ("changes", "delivery", "now", "relay", "tx")

    def __init__(self, tx: Tx, now: float, delivery: Delivery, changes: FlowChanges | None = None) -> None:
        self.tx = tx
        self.now = now
        self.delivery = delivery
        self.changes = changes or FlowChanges()
        self.relay: Relay = []

    def emit(self, items: Sequence[Outgoing]) -> None:
        """Record each message in the trace, open/close flows, route it."""
        tx = self.tx
        for item in items:
            msg = item.message
            record = (msg.id, msg.flow_id, msg.causation_id, msg.kind, msg.type, msg.source, msg.time,
                      orjson.dumps(msg.payload).decode())
            if item.route and self.delivery != "queue":  # a broker's fan-out counts first records only
                first = tx.execute(_INSERT_MESSAGE, record).rowcount > 0
            else:
                first = True
                tx.later(_INSERT_MESSAGE, record)
            start = item.flow_start
            if start is not None:
                tx.later(
                    "INSERT INTO ip_flows (flow_id, name, kind, declared, started, deadline, status, "
                    "pending, dead, last_type, updated) VALUES (?, ?, ?, ?, ?, ?, 'running', 0, 0, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (msg.flow_id, start.name, start.kind, int(start.declared), msg.time, start.deadline,
                     msg.type, self.now),
                )
            if item.route:
                self.route(item, first=first)
            self.changes.add(msg.flow_id, last_type=msg.type)
            for status, names in (("completed", item.completes), ("failed", item.fails)):
                if names:
                    marks = ", ".join("?" * len(names))
                    tx.execute(
                        f"UPDATE ip_flows SET status = ?, ended = ? WHERE flow_id = ? "
                        f"AND status = 'running' AND name IN ({marks})",
                        (status, self.now, msg.flow_id, *names),
                    )
            if msg.kind == "event":
                self.wake_waiters(msg.flow_id, msg.type, msg)

    def route(self, item: Outgoing, *, first: bool = True) -> None:
        """Queue a message for its route's groups (store bus) or for the caller to relay.

        A message for a route consumed in this very process is handed to the caller
        to deliver in memory: nothing to queue, nothing to claim back.
        """
        msg = item.message
        if item.route in self.tx.local_routes:
            self.relay.append((item, None))
            return
        if self.delivery == "queue":
            visible = self.now if item.visible_at is None else item.visible_at
            routed = self.tx.execute(_FAN_OUT, (msg.id, msg.flow_id, item.body, visible, item.route)).rowcount
            if routed:
                self.tx.routes.add(item.route)
        else:
            # A broker delivers every publish of an id (a re-sent command, an outbox
            # retry) but the inbox lets one handling per group through: count the first.
            routed = item.fanout if first else 0
            outbox_id = None
            if self.delivery == "outbox":
                row = self.tx.one(
                    "INSERT INTO ip_outbox (route, msg_id, body, created) VALUES (?, ?, ?, ?) RETURNING id",
                    (item.route, msg.id, item.body, self.now),
                )
                outbox_id = int(row[0])
            self.relay.append((item, outbox_id))
        self.changes.add(msg.flow_id, pending=routed)

    def wake_waiters(self, flow_id: str, wait_type: str, cause: Message | None, payload: Any = None) -> None:
        """Send a wake to the orchestrator of every run waiting for ``wait_type`` in the flow."""
        if self.tx.lock_flow(flow_id, exclusive=False) and not self.tx.waits:
            self.tx.waits = None  # concurrent writers: a "no run waits" seen before the lock may be stale
        if self.tx.waits is None:  # most transactions of a busy system emit many events and no run waits
            self.tx.waits = self.tx.one("SELECT 1 FROM ip_waits LIMIT 1") is not None
        if not self.tx.waits:
            return
        rows = self.tx.all(
            "SELECT w.run_id, w.seq, r.owner FROM ip_waits w JOIN ip_runs r ON r.run_id = w.run_id "
            "WHERE w.flow_id = ? AND w.type = ?",
            (flow_id, wait_type),
        )
        carried = cause.payload if cause is not None else payload
        small = len(orjson.dumps(carried)) <= WAKE_CARRIES if rows else True
        for run_id, seq, owner in rows:
            if not owner:  # nobody runs it now; whoever claims it rescans on replay
                continue
            body: dict[str, Any] = {"run_id": run_id, "seq": int(seq), "type": wait_type}
            if cause is not None:
                body["message_id"] = cause.id
            # In memory any size will do; through the bus a large one is left out and the
            # owner reads the event (or the child's end) from the store: a wake carrying it
            # could be larger than the bus takes, and be refused for good.
            if small or reply_route(owner) in self.tx.local_routes:
                body["payload"] = carried
            wake = Message(
                type=WAKE, kind="reply", payload=body, flow_id=flow_id,
                causation_id=cause.id if cause is not None else None, source="interplay",
                headers={"reply_to": reply_route(owner)},
            )
            self.route(Outgoing(wake, route=reply_route(owner), body=wake.encode(), fanout=1))


WAKE_CARRIES = 32 * 1024
"""Payload bytes a wake to another process carries at most (JSON); see ``wake_waiters``.
Below what any bus here takes by default (NATS: 1 MiB); a NATS server configured with a
``max_payload`` under ~33 KiB could still refuse a wake carrying that much."""

WAKE = "interplay.wake"
"""The type of the reply that tells an orchestrator a waited-for event arrived."""


class FlowChanges:
    """What one op changes in flow records, applied as one UPDATE per flow."""

    __slots__ = ("_flows",)

    def __init__(self) -> None:
        self._flows: dict[str, list[Any]] = {}

    def add(self, flow_id: str | None, *, pending: int = 0, dead: int = 0, last_type: str | None = None) -> None:
        """Count ``pending`` more deliveries and ``dead`` more dead letters for a flow."""
        if not flow_id:
            return
        entry = self._flows.get(flow_id)
        if entry is None:
            entry = self._flows[flow_id] = [0, 0, None]
        entry[0] += pending
        entry[1] += dead
        if last_type is not None:
            entry[2] = last_type

    def apply(self, tx: Tx, now: float) -> None:
        """Write the changes."""
        for flow_id, (pending, dead, last_type) in self._flows.items():
            tx.later(
                "UPDATE ip_flows SET pending = pending + ?, dead = dead + ?, "
                "last_type = COALESCE(?, last_type), updated = ? WHERE flow_id = ?",
                (pending, dead, last_type, now, flow_id),
            )


class _HandlerTransactionFailed(Exception):
    pass


def settle(tx: Tx, s: Settlement, now: float, delivery: Delivery) -> tuple[SettleResult, Relay]:
    """Commit what follows one handling: ack or retry, inbox mark, span, emits, DLQ.

    On the store bus the queue row is deleted (or rescheduled) only if this consumer
    still holds its lease; a stale consumer gets ``stale`` and nothing it did is kept.
    A message already in the group's inbox gets ``duplicate``: acked, nothing emitted.
    The handler's own transaction functions (``ctx.transaction``) run here, after the
    inbox mark, so their writes happen once per message; if one raises, everything of
    this settlement is undone and ``failed`` is returned (``s.failure`` says why).
    """
    if not s.transactions:
        return _settle(tx, s, now, delivery)
    tx.execute("SAVEPOINT ip_settle")
    try:
        outcome = _settle(tx, s, now, delivery)
    except _HandlerTransactionFailed as exc:
        tx.execute("ROLLBACK TO SAVEPOINT ip_settle")
        tx.execute("RELEASE SAVEPOINT ip_settle")
        s.failure = str(exc)
        return "failed", []
    tx.execute("RELEASE SAVEPOINT ip_settle")
    return outcome


def _settle(tx: Tx, s: Settlement, now: float, delivery: Delivery) -> tuple[SettleResult, Relay]:
    if s.queue_id is not None:
        if s.outcome == "retry":
            held = tx.expect(
                "UPDATE ip_queue SET visible_at = ?, lease = NULL WHERE id = ? AND lease = ?",
                (s.retry_at if s.retry_at is not None else now, s.queue_id, s.lease),
            )
        else:
            held = tx.expect("DELETE FROM ip_queue WHERE id = ? AND lease = ?", (s.queue_id, s.lease))
        if not held:
            return "stale", []
    changes = FlowChanges()
    result: SettleResult = "applied"
    if s.outcome == "duplicate":
        result = "duplicate"
    elif s.inbox and not tx.expect(
        "INSERT INTO ip_inbox (grp, msg_id, handled_at, reply) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (s.group, s.msg_id, now, s.reply),
    ):
        result = "duplicate"
    # The store bus counted every queue row it fanned out, duplicates included; on a
    # broker the deliveries of one id were counted once (see Emitter.route).
    if s.outcome != "retry" and (delivery == "queue" or result != "duplicate"):
        changes.add(s.flow_id, pending=-1)
    if result == "duplicate" and s.outcome != "duplicate":
        # Another consumer handled this very message first (a race): keep nothing of
        # ours, but a command's caller must still get an answer - the stored one.
        emitter = Emitter(tx, now, delivery, changes)
        if s.on_duplicate is not None:
            row = tx.one("SELECT reply FROM ip_inbox WHERE grp = ? AND msg_id = ?", (s.group, s.msg_id))
            if row is not None and row[0] is not None:
                s.on_duplicate(bytes(row[0]), emitter)
        changes.apply(tx, now)
        return result, emitter.relay
    if s.transactions:
        tx.flush()  # a lost lease or an inbox duplicate shows here, not as the handler's failure
    for fn, args in s.transactions:
        try:
            fn(Transaction(tx), *args)
        except BatchConflict:
            raise  # not the handler's failure: the store runs this settlement again alone
        except Exception as exc:  # the handler's own SQL failed: the handling failed
            raise _HandlerTransactionFailed(f"{type(exc).__name__}: {exc}") from exc
    if s.span is not None:
        sp = s.span
        tx.later(
            "INSERT INTO ip_spans (flow_id, msg_id, service, handler, type, started, ended, outcome, "
            "error, attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sp.flow_id, sp.msg_id, sp.service, sp.handler, sp.type, sp.started, sp.ended, sp.outcome,
             sp.error, sp.attempt),
        )
    if s.dead is not None:
        _insert_dead(tx, s.dead, now)
        changes.add(s.flow_id, dead=1)
    emitter = Emitter(tx, now, delivery, changes)
    if s.extra is not None:
        s.extra(emitter)
    if s.emits:
        emitter.emit(s.emits)
    changes.apply(tx, now)
    return result, emitter.relay


def _insert_dead(tx: Tx, d: DeadLetter, now: float) -> None:
    tx.execute(
        "INSERT INTO ip_dlq (msg_id, grp, route, type, flow_id, body, reason, error, attempts, time, counted) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (d.msg_id, d.group, d.route, d.type, d.flow_id, d.body, d.reason, d.error, d.attempts, now, int(d.counted)),
    )


def claim(tx: Tx, claim_sql: str, group: str, limit: int, now: float, lease_for: float) -> list[ClaimedRow]:
    """Lease up to ``limit`` visible rows of ``group``; flags those already in its inbox."""
    lease = uuid.uuid4().hex
    rows = tx.all(claim_sql, (now + lease_for, lease, group, now, limit))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    ids = [r[1] for r in rows]
    marks = ", ".join("?" * len(ids))
    seen = {
        r[0]: r[1]
        for r in tx.all(
            f"SELECT msg_id, reply FROM ip_inbox WHERE grp = ? AND msg_id IN ({marks})",
            (group, *ids),
        )
    }
    return [
        ClaimedRow(
            queue_id=int(r[0]),
            lease=lease,
            body=bytes(r[2]),
            deliveries=int(r[3]),
            route=r[4],
            duplicate=r[1] in seen,
            reply=None if seen.get(r[1]) is None else bytes(seen[r[1]]),
        )
        for r in rows
    ]


def enqueue_raw(tx: Tx, group: str, route: str, body: bytes, now: float) -> None:
    """Queue bytes for one group as they are (they may not even be an envelope)."""
    try:
        envelope = orjson.loads(body)
        msg_id, flow_id = str(envelope["id"]), str(envelope["flow_id"])
    except Exception:  # not an envelope: the consumer will dead-letter it
        msg_id = flow_id = ""
    tx.execute(
        "INSERT INTO ip_queue (grp, msg_id, flow_id, body, visible_at, route) VALUES (?, ?, ?, ?, ?, ?)",
        (group, msg_id, flow_id, body, now, route),
    )
    tx.routes.add("@" + group)
    changes = FlowChanges()  # the store bus settles every queue row against its flow
    changes.add(flow_id, pending=1)
    changes.apply(tx, now)


def extend_leases(tx: Tx, rows: Sequence[tuple[int, str]], until: float) -> int:
    """Push the visibility of rows this consumer still holds (heartbeat)."""
    count = 0
    for queue_id, lease in rows:
        count += tx.execute(
            "UPDATE ip_queue SET visible_at = ? WHERE id = ? AND lease = ?", (until, queue_id, lease)
        ).rowcount
    return count


def dlq_list(tx: Tx, limit: int, group: str | None, flow_id: str | None) -> list[DeadLetterRecord]:
    """Dead letters, newest first."""
    where, params = ["1 = 1"], []
    if group:
        where.append("grp = ?")
        params.append(group)
    if flow_id:
        where.append("flow_id = ?")
        params.append(flow_id)
    rows = tx.all(
        f"SELECT {_DLQ_COLUMNS} FROM ip_dlq WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [_dead_letter(r) for r in rows]


_DLQ_COLUMNS = "id, msg_id, grp, route, type, flow_id, body, reason, error, attempts, time, counted"


def _dead_letter(r: Sequence[Any]) -> DeadLetterRecord:
    return DeadLetterRecord(
        msg_id=r[1], group=r[2], route=r[3], type=r[4], flow_id=r[5], body=bytes(r[6]), reason=r[7],
        error=r[8], attempts=int(r[9]), id=int(r[0]), time=float(r[10]), counted=bool(r[11]),
    )


def dlq_take(tx: Tx, ids: Sequence[int]) -> list[DeadLetterRecord]:
    """Remove dead letters and return them (to replay them elsewhere)."""
    taken = []
    for dlq_id in ids:
        row = tx.one(f"SELECT {_DLQ_COLUMNS} FROM ip_dlq WHERE id = ?", (dlq_id,))
        if row is None:
            continue
        tx.execute("DELETE FROM ip_dlq WHERE id = ?", (dlq_id,))
        taken.append(_dead_letter(row))
    return taken


def dlq_replay(tx: Tx, ids: Sequence[int], now: float, requeue: bool) -> list[DeadLetterRecord]:
    """Take dead letters back: onto the failed group's queue (``requeue``) or out for a broker.

    The message keeps its id; the flow counts it as pending again.
    """
    taken = dlq_take(tx, ids)
    changes = FlowChanges()
    for d in taken:
        # The dead message was marked handled (so a redelivery does not fail it twice);
        # replaying it must let its handler run again.
        tx.execute("DELETE FROM ip_inbox WHERE grp = ? AND msg_id = ?", (d.group, d.msg_id))
        if requeue:
            tx.execute(
                "INSERT INTO ip_queue (grp, msg_id, flow_id, body, visible_at, route) VALUES (?, ?, ?, ?, ?, ?)",
                (d.group, d.msg_id, d.flow_id or d.msg_id, d.body, now, d.route),
            )
            tx.routes.add("@" + d.group)
        if d.counted and d.group:  # one of no service was never counted (dispatch.record_abandoned)
            changes.add(d.flow_id, pending=1, dead=-1)
    changes.apply(tx, now)
    return taken


def dlq_restore(tx: Tx, records: Sequence[DeadLetterRecord], now: float) -> None:
    """Put back dead letters whose replay could not be published."""
    changes = FlowChanges()
    for d in records:
        _insert_dead(tx, d, now)
        if d.counted and d.group:
            changes.add(d.flow_id, pending=-1, dead=1)
    changes.apply(tx, now)


def dlq_drop(tx: Tx, ids: Sequence[int]) -> int:
    """Delete dead letters for good; returns how many were there."""
    return sum(tx.execute("DELETE FROM ip_dlq WHERE id = ?", (i,)).rowcount for i in ids)


def outbox_pending(tx: Tx, older_than: float, limit: int) -> list[tuple[int, str, bytes]]:
    """Outbox rows not relayed by their writer in time (it may have crashed)."""
    return [
        (int(r[0]), r[1], bytes(r[2]))
        for r in tx.all(
            "SELECT id, route, body FROM ip_outbox WHERE created < ? ORDER BY id LIMIT ?",
            (older_than, limit),
        )
    ]


# A row is due when its writer's grace is over (never taken yet) or the relay loop that
# took it last let it go (published and deleted it, failed and set a retry time, or died).
_OUTBOX_DUE = "(relay_after <= ? OR (relay_after IS NULL AND created < ?))"

def outbox_due(tx: Tx, now: float, older_than: float) -> bool:
    """Whether any outbox row is due for relaying (a cheap look, on the reader)."""
    return tx.one(f"SELECT 1 FROM ip_outbox WHERE {_OUTBOX_DUE} LIMIT 1", (now, older_than)) is not None


def outbox_claim(
    tx: Tx, row_lock: str, now: float, older_than: float, hold_until: float, limit: int
) -> list[OutboxRow]:
    """Take up to ``limit`` due outbox rows for relaying, oldest first.

    Rows never taken are due once ``created < older_than`` (their writer's grace is
    over); taken rows when ``relay_after <= now``. A taken row is left to the taker
    until ``hold_until``: no other process relays it meanwhile, and if the taker dies
    it is due again then. Each claim bumps the row's ``attempts``. ``row_lock`` is the
    store's ``ROW_LOCK``.
    """
    rows = tx.all(
        "UPDATE ip_outbox SET relay_after = ?, attempts = attempts + 1 WHERE id IN "
        f"(SELECT id FROM ip_outbox WHERE {_OUTBOX_DUE} ORDER BY id LIMIT ?{row_lock}) "
        "RETURNING id, route, msg_id, body, attempts",
        (hold_until, now, older_than, limit),
    )
    return sorted(
        (OutboxRow(id=int(r[0]), route=r[1], msg_id=r[2], body=bytes(r[3]), attempts=int(r[4])) for r in rows),
        key=lambda row: row.id,
    )


def outbox_retry(tx: Tx, retries: Sequence[tuple[int, int, float]]) -> int:
    """Set when rows whose publish failed are due again: (id, attempts of the claim, time).

    A row claimed again since (its hold lapsed; ``attempts`` moved on) belongs to that
    claim now and is left alone. Returns how many rows were rescheduled.
    """
    return sum(
        tx.execute(
            "UPDATE ip_outbox SET relay_after = ? WHERE id = ? AND attempts = ?", (at, row_id, attempts)
        ).rowcount
        for row_id, attempts, at in retries
    )


def outbox_done(tx: Tx, ids: Sequence[int]) -> None:
    """Forget outbox rows the broker confirmed."""
    tx.executemany("DELETE FROM ip_outbox WHERE id = ?", [(i,) for i in ids])


def inbox_seen(tx: Tx, group: str, ids: Sequence[str]) -> dict[str, bytes | None]:
    """Which of ``ids`` the group has handled, with their stored replies."""
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    return {
        r[0]: None if r[1] is None else bytes(r[1])
        for r in tx.all(
            f"SELECT msg_id, reply FROM ip_inbox WHERE grp = ? AND msg_id IN ({marks})",
            (group, *ids),
        )
    }


def purge(tx: Tx, inbox_before: float, traces_before: float) -> dict[str, int]:
    """Delete inbox marks and finished flows' traces older than the retention."""
    counts: dict[str, Any] = {}
    counts["inbox"] = tx.execute("DELETE FROM ip_inbox WHERE handled_at < ?", (inbox_before,)).rowcount
    old = "SELECT flow_id FROM ip_flows WHERE updated < ? AND (status <> 'running' OR pending <= 0)"
    for table in ("ip_spans", "ip_messages"):
        counts[table] = tx.execute(
            f"DELETE FROM {table} WHERE flow_id IN ({old})", (traces_before,)
        ).rowcount
    counts["leases"] = tx.execute("DELETE FROM ip_leases WHERE lease_until < ?", (inbox_before,)).rowcount
    counts["flows"] = tx.execute(
        "DELETE FROM ip_flows WHERE updated < ? AND (status <> 'running' OR pending <= 0)", (traces_before,)
    ).rowcount
    return counts
