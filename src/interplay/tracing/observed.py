"""The map as a store's trace records show it: who sent and who handled what, how often, how fast.

Every published message is in ``ip_messages`` with its ``source`` (a service, a
``workflow:NAME``, ``interplay`` for the runtime, or a client's name) and the message
that caused it; every handling is a span in ``ip_spans``. Aggregated, they are edges:

* ``message -> service``: handlings (retries and duplicates not counted), how many
  failed for good, and the median time from publication to the end of the handling;
* ``event -> workflow``: events a workflow's ``wait_for`` took;
* ``service -> event`` (with the message type whose handling emitted it, from the
  causation link), ``workflow -> command / event / child workflow``, and what clients
  published, called and started.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection
from dataclasses import dataclass

from ..stores.base import Store
from ..stores.tx import Tx
from .stuck import SYSTEM_SOURCE
from .topology import Node, TopologyMap

__all__ = ["Handled", "Observations", "Sent", "observe", "read_observations"]

FAILED = frozenset({"rejected", "dead", "invalid"})
"""Span outcomes of a handling that failed for good."""


@dataclass(frozen=True, slots=True)
class Sent:
    """Messages of one type one source sent (``after``: the type whose handling caused them)."""

    source: str | None
    kind: str
    type: str
    after: str | None
    count: int


@dataclass(frozen=True, slots=True)
class Handled:
    """Handlings of one message type by one service (or waits of one workflow)."""

    type: str
    kind: str | None
    service: str
    waits: bool
    count: int
    errors: int
    p50: float | None


@dataclass(frozen=True, slots=True)
class Observations:
    """The aggregated records of a store."""

    sent: list[Sent]
    handled: list[Handled]


async def read_observations(store: Store, since: float | None = None) -> Observations:
    """Aggregate a store's trace records (only those at or after ``since``, if given)."""
    return await store.read(lambda tx: _read(tx, -1.0 if since is None else since))


def _read(tx: Tx, since: float) -> Observations:
    sent = [
        Sent(r[0], str(r[1]), str(r[2]), r[3], int(r[4]))
        for r in tx.all(
            "SELECT m.source, m.kind, m.type, p.type, COUNT(*) FROM ip_messages m "
            "LEFT JOIN ip_messages p ON p.id = m.causation_id "
            "WHERE m.kind IN ('event', 'command', 'workflow') AND m.time >= ? "
            "GROUP BY m.source, m.kind, m.type, p.type",
            (since,),
        )
    ]
    groups: dict[tuple[str, str | None, str, bool], tuple[list[float], list[int]]] = {}
    for type_, kind, service, outcome, latency in tx.all(
        "SELECT s.type, m.kind, s.service, s.outcome, s.ended - m.time FROM ip_spans s "
        "LEFT JOIN ip_messages m ON m.id = s.msg_id "
        "WHERE s.started >= ? AND s.outcome NOT IN ('retry', 'duplicate') "
        "AND (s.service NOT LIKE 'workflow:%' OR s.handler = 'wait_for')",
        (since,),
    ):
        waits = str(service).startswith("workflow:")
        latencies, counts = groups.setdefault((str(type_), kind, str(service), waits), ([], [0, 0]))
        counts[0] += 1
        counts[1] += outcome in FAILED
        if latency is not None:
            latencies.append(max(0.0, float(latency)))
    handled = [
        Handled(type_, kind, service, waits, counts[0], counts[1], statistics.median(lat) if lat else None)
        for (type_, kind, service, waits), (lat, counts) in groups.items()
    ]
    return Observations(sent, handled)


def observe(m: TopologyMap, observations: Observations, services: Collection[str],
            window: float | None = None) -> TopologyMap:
    """Add observations to a map (in place; returns it): counts on edges, new edges for the undeclared.

    ``services``: names that are services (the app's); any other source is a client,
    unless it handled messages too (a service the app no longer declares).
    """
    m.observed = True
    m.window = window
    handlers = set(services) | {h.service for h in observations.handled if not h.waits}
    for h in sorted(observations.handled, key=lambda h: (h.type, h.service)):
        message = _message(m, h.kind, h.type)
        if h.waits:
            edge = m.edge(message, m.node("workflow", h.service.removeprefix("workflow:")))
        else:
            edge = m.edge(message, m.node("service", h.service))
        if not edge.relations:  # an edge only observed: say what it is
            edge.relations.add("waits for" if h.waits else "handles")
        edge.seen += h.count
        edge.errors += h.errors
        edge.p50 = h.p50
    for s in sorted(observations.sent, key=lambda s: (s.source or "", s.kind, s.type, s.after or "")):
        source = _sender(m, s.source, handlers)
        if s.kind == "workflow":
            target, relation = m.node("workflow", s.type), "starts"
        elif s.kind == "command":
            target, relation = _message(m, s.kind, s.type), "calls"
        else:
            target = _message(m, s.kind, s.type)
            relation = "publishes" if source.kind == "external" else "emits"
        edge = m.edge(source, target)
        if not edge.relations:
            edge.relations.add(relation)
        edge.seen += s.count
        if source.kind == "service" and s.after is not None:
            edge.seen_after[s.after] = edge.seen_after.get(s.after, 0) + s.count
    return m


def _message(m: TopologyMap, kind: str | None, type_: str) -> Node:
    if kind is None:  # the message itself was purged: go by what the map knows
        kind = "command" if f"command:{type_}" in m.nodes else "event"
    return m.node("command" if kind == "command" else "event", type_)


def _sender(m: TopologyMap, source: str | None, services: set[str]) -> Node:
    if source is None:
        return m.node("external", "unknown")
    if source.startswith("workflow:"):
        return m.node("workflow", source.removeprefix("workflow:"))
    if source == SYSTEM_SOURCE:
        return m.node("system", SYSTEM_SOURCE)
    return m.node("service" if source in services else "external", source)
