"""Read-only queries behind traces and flow listings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .records import FlowRow, MessageRow, SpanRecord
from .schema import FLOW_COLUMNS, FLOW_STATUS
from .tx import Tx

__all__ = ["StuckFlow", "flow_records", "flow_row", "list_flows", "overdue_flows", "stuck_flows"]


def _flow(r: Any) -> FlowRow:
    return FlowRow(
        flow_id=r[0], name=r[1], kind=r[2], declared=bool(r[3]), started=float(r[4]),
        deadline=None if r[5] is None else float(r[5]), status=r[6],
        ended=None if r[7] is None else float(r[7]), pending=int(r[8]), dead=int(r[9]),
        last_type=r[10], updated=float(r[11]),
    )


def flow_row(tx: Tx, flow_id: str, now: float) -> FlowRow | None:
    """One flow's summary, with its status as of ``now``."""
    row = tx.one(f"SELECT {FLOW_COLUMNS} FROM ip_flows WHERE flow_id = ?", (now, flow_id))
    return None if row is None else _flow(row)


def flow_records(tx: Tx, flow_id: str) -> tuple[list[MessageRow], list[SpanRecord]]:
    """Every message of a flow and every handling of them, oldest first."""
    messages = [
        MessageRow(
            id=r[0], flow_id=r[1], causation_id=r[2], kind=r[3], type=r[4], source=r[5],
            time=float(r[6]), payload=None if r[7] is None else orjson.loads(r[7]),
        )
        for r in tx.all(
            "SELECT id, flow_id, causation_id, kind, type, source, time, payload FROM ip_messages "
            "WHERE flow_id = ? ORDER BY time, id",
            (flow_id,),
        )
    ]
    spans = [
        SpanRecord(
            flow_id=r[0], msg_id=r[1], service=r[2], handler=r[3], type=r[4], started=float(r[5]),
            ended=float(r[6]), outcome=r[7], error=r[8], attempt=int(r[9]),
        )
        for r in tx.all(
            "SELECT flow_id, msg_id, service, handler, type, started, ended, outcome, error, attempt "
            "FROM ip_spans WHERE flow_id = ? ORDER BY started, id",
            (flow_id,),
        )
    ]
    return messages, spans


def list_flows(
    tx: Tx, now: float, status: str | None, name: str | None, limit: int, since: float | None
) -> list[FlowRow]:
    """Flows, newest first, filtered by computed status, name and start time."""
    where: list[str] = ["1 = 1"]
    params: list[object] = [now]
    if status:
        where.append(f"({FLOW_STATUS}) = ?")
        params += [now, status]
    if name:
        where.append("name = ?")
        params.append(name)
    if since is not None:
        where.append("started >= ?")
        params.append(since)
    rows = tx.all(
        f"SELECT {FLOW_COLUMNS} FROM ip_flows WHERE {' AND '.join(where)} "
        "ORDER BY started DESC LIMIT ?",
        (*params, limit),
    )
    return [_flow(r) for r in rows]


def count_flows(tx: Tx, now: float) -> dict[str, int]:
    """How many flows are in each status."""
    return {
        str(r[0]): int(r[1])
        for r in tx.all(f"SELECT {FLOW_STATUS} AS s, COUNT(*) FROM ip_flows GROUP BY s", (now,))
    }


OVERDUE = "status = 'running' AND stuck_at IS NULL AND deadline IS NOT NULL AND deadline < ?"
"""Flows past their deadline and not yet announced (the partial index ip_flows_overdue)."""


def overdue_flows(tx: Tx, now: float, limit: int) -> list[FlowRow]:
    """Stuck flows not yet announced, the longest overdue first."""
    rows = tx.all(
        f"SELECT {FLOW_COLUMNS} FROM ip_flows WHERE {OVERDUE} AND ({FLOW_STATUS}) = 'stuck' "
        "ORDER BY deadline LIMIT ?",
        (now, now, now, limit),
    )
    return [_flow(r) for r in rows]


@dataclass(frozen=True, slots=True)
class StuckFlow:
    """A stuck flow as ``interplay flows --status stuck`` lists it.

    Attributes:
        flow: its record (``last_type`` is the last step it reached).
        announced: when ``interplay.flow.stuck`` was emitted for it (None: not yet).
    """

    flow: FlowRow
    announced: float | None


def stuck_flows(tx: Tx, now: float, name: str | None, limit: int) -> list[StuckFlow]:
    """Flows whose status is ``stuck`` as of ``now``, the longest overdue first."""
    where = f"({FLOW_STATUS}) = 'stuck'"
    params: list[object] = [now, now]
    if name:
        where += " AND name = ?"
        params.append(name)
    rows = tx.all(
        f"SELECT {FLOW_COLUMNS}, stuck_at FROM ip_flows WHERE {where} ORDER BY deadline LIMIT ?", (*params, limit)
    )
    return [StuckFlow(_flow(r), None if r[12] is None else float(r[12])) for r in rows]
