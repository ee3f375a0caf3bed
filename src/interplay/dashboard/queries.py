"""Read-only queries the dashboard needs that the Store API does not offer.

Plain SQL with ``?`` placeholders, run through ``store.read`` (the store rewrites the
placeholders for its driver), so they work on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stores.base import Store
from ..stores.tx import Tx

__all__ = [
    "FlowRun", "ObservedEdges", "dlq_count", "flow_names", "flow_runs", "observed_edges", "run_counts",
]


async def run_counts(store: Store) -> dict[str, int]:
    """Workflow runs in each status."""

    def op(tx: Tx) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in tx.all("SELECT status, COUNT(*) FROM ip_runs GROUP BY status")}

    return await store.read(op)


async def dlq_count(store: Store) -> int:
    """Messages in the dead-letter queue."""
    return int(await store.read(lambda tx: tx.one("SELECT COUNT(*) FROM ip_dlq")[0]))


async def flow_names(store: Store, limit: int = 200) -> list[str]:
    """The distinct flow names (for the name filter's suggestions)."""
    return await store.read(
        lambda tx: [str(r[0]) for r in tx.all("SELECT DISTINCT name FROM ip_flows ORDER BY name LIMIT ?", (limit,))]
    )


@dataclass(frozen=True, slots=True)
class FlowRun:
    """A workflow run that belongs to a flow."""

    run_id: str
    workflow: str
    status: str


async def flow_runs(store: Store, flow_id: str) -> list[FlowRun]:
    """The workflow runs of a flow, oldest first."""

    def op(tx: Tx) -> list[FlowRun]:
        rows = tx.all("SELECT run_id, workflow, status FROM ip_runs WHERE flow_id = ? ORDER BY created", (flow_id,))
        return [FlowRun(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    return await store.read(op)


@dataclass(slots=True)
class ObservedEdges:
    """What the trace records say flowed where, with counts.

    Attributes:
        sent: ``(source, kind, type) -> count``: who published which message
            (replies left out: they go back to whoever called).
        handled: ``(type, service) -> count``: who handled which message type
            (every attempt counts).
    """

    sent: dict[tuple[str, str, str], int]
    handled: dict[tuple[str, str], int]


async def observed_edges(store: Store, since: float | None = None) -> ObservedEdges:
    """Aggregate the trace into edges, optionally only records at or after ``since``."""

    def op(tx: Tx) -> ObservedEdges:
        window = -1.0 if since is None else since
        sent = {
            (str(r[0]), str(r[1]), str(r[2])): int(r[3])
            for r in tx.all(
                "SELECT source, kind, type, COUNT(*) FROM ip_messages "
                "WHERE kind <> 'reply' AND source IS NOT NULL AND time >= ? GROUP BY source, kind, type",
                (window,),
            )
        }
        handled = {
            (str(r[0]), str(r[1])): int(r[2])
            for r in tx.all(
                "SELECT type, service, COUNT(*) FROM ip_spans WHERE started >= ? GROUP BY type, service",
                (window,),
            )
        }
        return ObservedEdges(sent, handled)

    return await store.read(op)
