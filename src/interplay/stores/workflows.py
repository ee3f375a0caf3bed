"""Ops for workflow runs: creation, leases, the journal, waits, completion.

Every journal write by the run's executor is *fenced*: it commits only if this
orchestrator still owns the run (``owner`` matches and the run is still running),
so an orchestrator that lost its lease (paused, partitioned) can never write over
the one that took the run over. Recording a command's reply is not fenced: it is a
fact about the world, the same whoever writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .messaging import Emitter
from .records import JournalEntry, Outgoing, RunRow, SpanRecord
from .tx import Tx

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "claim_runs",
    "create_run",
    "ended_runs",
    "finish_run",
    "get_run",
    "heartbeat",
    "list_runs",
    "load_journal",
    "load_journals",
    "record_reply",
    "register_wait",
    "release",
    "request_cancel",
    "resume_run",
    "woken_by",
    "write_step",
]

ACTIVE = ("pending", "running")
TERMINAL = frozenset({"completed", "failed", "compensated", "cancelled"})

RUN_COLUMNS = (
    "run_id, workflow, flow_id, parent_run, parent_seq, status, input, result, error_type, error, "
    "owner, lease_until, cancel_requested, created, updated, epoch"
)
_JOURNAL_COLUMNS = "run_id, seq, kind, name, status, msg_id, data, error_type, error, started, ended, deadline"


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _unjson(text: Any) -> Any:
    return None if text is None else orjson.loads(text)


def run_row(r: Any) -> RunRow:
    """A ``RUN_COLUMNS`` row as a record."""
    return RunRow(
        run_id=r[0], workflow=r[1], flow_id=r[2], parent_run=r[3],
        parent_seq=None if r[4] is None else int(r[4]), status=r[5], input=_unjson(r[6]),
        result=_unjson(r[7]), error_type=r[8], error=r[9], owner=r[10],
        lease_until=None if r[11] is None else float(r[11]), cancel_requested=bool(r[12]),
        created=float(r[13]), updated=float(r[14]), epoch=int(r[15]),
    )


def _entry(r: Any) -> JournalEntry:
    return JournalEntry(
        run_id=r[0], seq=int(r[1]), kind=r[2], name=r[3], status=r[4], msg_id=r[5], data=_unjson(r[6]),
        error_type=r[7], error=r[8], started=float(r[9]), ended=None if r[10] is None else float(r[10]),
        deadline=None if r[11] is None else float(r[11]),
    )


def get_run(tx: Tx, run_id: str) -> RunRow | None:
    """One run, or None."""
    row = tx.one(f"SELECT {RUN_COLUMNS} FROM ip_runs WHERE run_id = ?", (run_id,))
    return None if row is None else run_row(row)


RUNS_READY = "!runs"
"""A pseudo-route in ``Tx.routes``: runs became claimable (PostgreSQL notifies it)."""
RUNS_ENDED = "!ended"
"""A pseudo-route in ``Tx.routes``: runs ended or parked (wakes remote ``result()`` waiters)."""


def create_run(em: Emitter, run: RunRow, root: Outgoing) -> tuple[bool, RunRow]:
    """Insert a run unless one with its id exists; returns (created, the run).

    ``root`` is the run's start record in the trace (and opens its flow).
    """
    created = em.tx.expect(
        f"INSERT INTO ip_runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        (run.run_id, run.workflow, run.flow_id, run.parent_run, run.parent_seq, run.status, _json(run.input),
         None, None, None, run.owner, run.lease_until, 0, run.created, run.created, run.epoch),
    )
    if not created:
        existing = get_run(em.tx, run.run_id)
        assert existing is not None
        return False, existing
    em.emit([root])
    if run.owner is None:
        em.tx.routes.add(RUNS_READY)
    return True, run


def _renew(tx: Tx, owner: str, until: float) -> None:
    tx.execute(
        "INSERT INTO ip_leases (owner, lease_until) VALUES (?, ?) "
        "ON CONFLICT (owner) DO UPDATE SET lease_until = excluded.lease_until",
        (owner, until),
    )


def claim_runs(tx: Tx, row_lock: str, owner: str, limit: int, now: float, lease: float) -> list[RunRow]:
    """Take over runs nobody owns (new, or whose owner's lease lapsed).

    The run's own ``lease_until`` (what its last claim got) is checked too: under READ
    COMMITTED a claim that meets a run claimed since its snapshot re-checks that row's
    columns but not ``ip_leases``, where the new owner's lease is not visible to it yet.
    ``row_lock`` is the store's ``ROW_LOCK``: competing claimers skip each other's rows.
    """
    _renew(tx, owner, now + lease)  # what we claim is ours only while our lease holds
    rows = tx.all(
        "UPDATE ip_runs SET owner = ?, lease_until = ?, status = 'running', updated = ?, epoch = epoch + 1 "
        "WHERE run_id IN (SELECT run_id FROM ip_runs r WHERE status IN ('pending', 'running') "
        "AND (owner IS NULL OR (lease_until < ? AND NOT EXISTS (SELECT 1 FROM ip_leases l WHERE l.owner = r.owner "
        f"AND l.lease_until >= ?))) ORDER BY created LIMIT ?{row_lock}) RETURNING {RUN_COLUMNS}",
        (owner, now + lease, now, now, now, limit),
    )
    return [run_row(r) for r in rows]


def heartbeat(tx: Tx, owner: str, now: float, lease: float) -> set[str]:
    """Extend this owner's lease (one row, whatever it holds); returns the runs it holds."""
    _renew(tx, owner, now + lease)
    return {r[0] for r in tx.all("SELECT run_id FROM ip_runs WHERE owner = ? AND status = 'running'", (owner,))}


def release(tx: Tx, owner: str) -> None:
    """An orchestrator leaving: its runs are claimable at once, its lease is gone."""
    if tx.execute(
        "UPDATE ip_runs SET owner = NULL, lease_until = NULL WHERE owner = ? AND status = 'running'", (owner,)
    ).rowcount:
        tx.routes.add(RUNS_READY)
    tx.execute("DELETE FROM ip_leases WHERE owner = ?", (owner,))


Holder = tuple[str, int]
"""(owner, epoch) of a lease on a run: the fencing token of its writes."""


def holds(tx: Tx, run_id: str, holder: Holder, now: float) -> bool:
    """Whether ``holder`` still holds the run (and locks it for this transaction).

    Check it before doing anything in the run's name: every write of a step is fenced.
    In a batch this sends the deferred writes now, so the answer is the real one.
    """
    held = _fence(tx, run_id, holder, now)
    tx.flush()
    return held


def _fence(tx: Tx, run_id: str, holder: Holder, now: float) -> bool:
    return tx.expect(
        "UPDATE ip_runs SET updated = ? WHERE run_id = ? AND owner = ? AND epoch = ? AND status = 'running'",
        (now, run_id, holder[0], holder[1]),
    )


def _upsert(tx: Tx, e: JournalEntry) -> None:
    tx.later(
        f"INSERT INTO ip_journal ({_JOURNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status, data = excluded.data, "
        "error_type = excluded.error_type, error = excluded.error, ended = excluded.ended, "
        "msg_id = COALESCE(excluded.msg_id, ip_journal.msg_id)",
        (e.run_id, e.seq, e.kind, e.name, e.status, e.msg_id, _json(e.data), e.error_type, e.error, e.started,
         e.ended, e.deadline),
    )


def _spans(tx: Tx, spans: Sequence[SpanRecord]) -> None:
    for sp in spans:
        tx.later(
            "INSERT INTO ip_spans (flow_id, msg_id, service, handler, type, started, ended, outcome, error, "
            "attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sp.flow_id, sp.msg_id, sp.service, sp.handler, sp.type, sp.started, sp.ended, sp.outcome, sp.error,
             sp.attempt),
        )


def write_step(
    em: Emitter,
    holder: Holder,
    entry: JournalEntry,
    outgoing: Sequence[Outgoing] = (),
    spans: Sequence[SpanRecord] = (),
    *,
    only_if_scheduled: bool = False,
    clear_wait: bool = False,
) -> bool:
    """Journal a step (and send what it sends), if this owner still holds the run.

    With ``only_if_scheduled`` the entry is only moved out of ``scheduled`` (a timer
    firing, a timeout) and False is returned if something else finished it first.
    """
    tx = em.tx
    if not _fence(tx, entry.run_id, holder, em.now):
        return False
    if only_if_scheduled:
        changed = tx.execute(
            "UPDATE ip_journal SET status = ?, data = ?, error_type = ?, error = ?, ended = ? "
            "WHERE run_id = ? AND seq = ? AND status = 'scheduled'",
            (entry.status, _json(entry.data), entry.error_type, entry.error, entry.ended, entry.run_id, entry.seq),
        ).rowcount
        if not changed:
            return False
    else:
        _upsert(tx, entry)
    if clear_wait:
        tx.execute("DELETE FROM ip_waits WHERE run_id = ? AND seq = ?", (entry.run_id, entry.seq))
    em.emit(outgoing)
    _spans(tx, spans)
    return True


def record_reply(tx: Tx, run_id: str, seq: int, ok: bool, data: Any, error_type: str | None, error: str | None,
                 now: float) -> bool:
    """Record a command's reply on its scheduled step; False if the step was already settled."""
    return bool(
        tx.execute(
            "UPDATE ip_journal SET status = ?, data = ?, error_type = ?, error = ?, ended = ? "
            "WHERE run_id = ? AND seq = ? AND status = 'scheduled'",
            ("completed" if ok else "failed", _json(data), error_type, error, now, run_id, seq),
        ).rowcount
    )


def register_wait(
    em: Emitter, holder: Holder, entry: JournalEntry, flow_id: str, wait_type: str, consumed: Sequence[str]
) -> list[tuple[str, Any]] | None:
    """Journal a wait and subscribe the run to ``wait_type`` in its flow.

    Returns what already happened (events of that type in the flow not consumed by
    this run, oldest first; or a finished child run), or None if the lease was lost.
    Registering and scanning in one transaction leaves no gap for an event to slip by.
    """
    tx = em.tx
    tx.lock_flow(flow_id, exclusive=True)  # an event emitted concurrently waits, then sees the wait
    if not _fence(tx, entry.run_id, holder, em.now):
        return None
    _upsert(tx, entry)
    tx.execute(
        "INSERT INTO ip_waits (run_id, seq, flow_id, type) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (entry.run_id, entry.seq, flow_id, wait_type),
    )
    tx.waits = True
    if wait_type.startswith("@run:"):
        ended = _child_end(tx, wait_type)
        return [] if ended is None else [("", ended)]
    seen = set(consumed)
    return [
        (r[0], _unjson(r[1]))
        for r in tx.all(
            "SELECT id, payload FROM ip_messages WHERE flow_id = ? AND type = ? AND kind = 'event' "
            "ORDER BY time, id",
            (flow_id, wait_type),
        )
        if r[0] not in seen
    ]


def woken_by(tx: Tx, wait_type: str, message_id: str) -> tuple[bool, Any]:
    """What a wake from another process names: (found, the event's payload, or the
    child run's end for a ``@run:`` wait)."""
    if wait_type.startswith("@run:"):
        ended = _child_end(tx, wait_type)
        return ended is not None, ended
    row = tx.one("SELECT payload FROM ip_messages WHERE id = ?", (message_id,))
    return row is not None, None if row is None else _unjson(row[0])


def _child_end(tx: Tx, wait_type: str) -> dict[str, Any] | None:
    child = get_run(tx, wait_type[5:])
    if child is None or child.status not in TERMINAL:
        return None
    return {"status": child.status, "result": child.result, "error_type": child.error_type, "error": child.error}


def finish_run(
    em: Emitter, run: RunRow, holder: Holder, status: str, result: Any, error_type: str | None, error: str | None,
    span: SpanRecord,
) -> bool:
    """End a run: its status and result, its flow's status, and wake a waiting parent."""
    tx = em.tx
    ended = tx.expect(
        "UPDATE ip_runs SET status = ?, result = ?, error_type = ?, error = ?, owner = NULL, lease_until = NULL, "
        "updated = ? WHERE run_id = ? AND owner = ? AND epoch = ? AND status = 'running'",
        (status, _json(result), error_type, error, em.now, run.run_id, holder[0], holder[1]),
    )
    if not ended:
        return False
    tx.routes.add(RUNS_ENDED)
    tx.later("DELETE FROM ip_waits WHERE run_id = ?", (run.run_id,))
    if run.flow_id == run.run_id:  # the run opened this flow: the flow ends with it
        tx.later(
            "UPDATE ip_flows SET status = ?, ended = ?, updated = ? WHERE flow_id = ? AND kind = 'workflow'",
            (status, em.now, em.now, run.flow_id),
        )
    _spans(tx, [span])
    if run.parent_run is not None:  # only a parent waits for a run's end (ctx.start_child)
        em.wake_waiters(
            run.flow_id, f"@run:{run.run_id}", None,
            payload={"status": status, "result": result, "error_type": error_type, "error": error},
        )
    return True


def park_flow(tx: Tx, run: RunRow, status: str, now: float) -> None:
    """Mirror a run's status on the flow it opened."""
    if run.flow_id == run.run_id:
        tx.execute(
            "UPDATE ip_flows SET status = ?, updated = ? WHERE flow_id = ? AND kind = 'workflow'",
            (status, now, run.flow_id),
        )


def request_cancel(em: Emitter, run_id: str, control: Callable[[str], Outgoing]) -> RunRow | None:
    """Flag a run for cancellation; returns it (None if it is not active)."""
    changed = em.tx.execute(
        "UPDATE ip_runs SET cancel_requested = 1, updated = ? WHERE run_id = ? AND status IN ('pending', 'running')",
        (em.now, run_id),
    ).rowcount
    run = get_run(em.tx, run_id)
    if not changed or run is None:
        return None
    if run.owner:
        em.route(control(run.owner))
    return run


def resume_run(tx: Tx, run_id: str, now: float) -> RunRow | None:
    """Make a parked run claimable again (after its code was fixed)."""
    changed = tx.execute(
        "UPDATE ip_runs SET status = 'running', owner = NULL, lease_until = NULL, error_type = NULL, "
        "error = NULL, updated = ? WHERE run_id = ? AND status = 'parked'",
        (now, run_id),
    ).rowcount
    run = get_run(tx, run_id)
    if changed and run is not None:
        park_flow(tx, run, "running", now)
        tx.routes.add(RUNS_READY)
        return run
    return None


def park_run(tx: Tx, run: RunRow, holder: Holder, error_type: str, error: str, now: float) -> bool:
    """Park a run whose replay diverged from its journal (visible, resumable)."""
    parked = tx.execute(
        "UPDATE ip_runs SET status = 'parked', error_type = ?, error = ?, owner = NULL, lease_until = NULL, "
        "updated = ? WHERE run_id = ? AND owner = ? AND epoch = ? AND status = 'running'",
        (error_type, error, now, run.run_id, holder[0], holder[1]),
    ).rowcount
    if parked:
        park_flow(tx, run, "parked", now)
        tx.routes.add(RUNS_ENDED)
    return bool(parked)


def load_journal(tx: Tx, run_id: str) -> list[JournalEntry]:
    """A run's journal in step order."""
    return load_journals(tx, [run_id])[run_id]


def load_journals(tx: Tx, run_ids: Sequence[str]) -> dict[str, list[JournalEntry]]:
    """The journals of several runs (each in step order; an empty one for a run without entries)."""
    journals: dict[str, list[JournalEntry]] = {run_id: [] for run_id in run_ids}
    # A run's entries all come in one chunk, so step order holds across chunks.
    for r in _select_in(tx, f"SELECT {_JOURNAL_COLUMNS} FROM ip_journal WHERE run_id IN", run_ids,
                        "ORDER BY run_id, seq"):
        journals[r[0]].append(_entry(r))
    return journals


def ended_runs(tx: Tx, run_ids: Sequence[str]) -> set[str]:
    """Which of these runs have ended (or were parked)."""
    rows = _select_in(tx, "SELECT run_id FROM ip_runs WHERE run_id IN", run_ids,
                      f"AND status NOT IN ({', '.join(repr(status) for status in ACTIVE)})")
    return {r[0] for r in rows}


_IN_LIST = 500
"""Ids per ``IN (...)`` list, under SQLite's limit on parameters (999 before 3.32)."""


def _select_in(tx: Tx, head: str, ids: Sequence[str], tail: str = "") -> list[Any]:
    """The rows of ``head (?, ?, ...) tail`` for all ``ids``, in chunks of :data:`_IN_LIST`."""
    rows: list[Any] = []
    for i in range(0, len(ids), _IN_LIST):
        chunk = ids[i:i + _IN_LIST]
        rows += tx.all(f"{head} ({', '.join('?' * len(chunk))}) {tail}", chunk)
    return rows


def list_runs(tx: Tx, status: str | None, workflow: str | None, limit: int) -> list[RunRow]:
    """Runs, newest first."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if status:
        where.append("status = ?")
        params.append(status)
    if workflow:
        where.append("workflow = ?")
        params.append(workflow)
    rows = tx.all(
        f"SELECT {RUN_COLUMNS} FROM ip_runs WHERE {' AND '.join(where)} ORDER BY created DESC LIMIT ?",
        (*params, limit),
    )
    return [run_row(r) for r in rows]
