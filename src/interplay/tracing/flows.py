"""Flows rebuilt from the trace: the causation tree of one business flow, with status.

A flow is every message sharing a ``flow_id``. Each message is a node; under it hang
the handlings of it (spans, one per service and attempt) and the messages they
caused. Choreography and orchestration produce the same structure, so one trace
shows both styles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..stores.records import FlowRow, MessageRow, SpanRecord

__all__ = ["Flow", "FlowNode", "FlowSummary"]

TERMINAL = frozenset({"completed", "failed", "compensated", "cancelled"})


@dataclass(slots=True)
class FlowNode:
    """One message in a flow, the handlings of it, and what they caused.

    Attributes:
        message: the message.
        spans: each handling of it (service, outcome, attempt, timing).
        children: messages whose ``causation_id`` is this message.
    """

    message: MessageRow
    spans: list[SpanRecord] = field(default_factory=list)
    children: list[FlowNode] = field(default_factory=list)

    @property
    def type(self) -> str:
        """The message type."""
        return self.message.type

    def shape(self) -> tuple[str, tuple[Any, ...]]:
        """``(type, (child shapes...))`` - the tree without ids and times, for comparisons."""
        return (self.message.type, tuple(child.shape() for child in self.children))


@dataclass(slots=True)
class FlowSummary:
    """A flow as listed: no tree, just its record.

    Attributes:
        flow_id: the flow's id.
        name: the declared flow (or workflow) name, else the first message type.
        kind: ``flow`` (choreography) or ``workflow`` (orchestration).
        status: ``running``, ``completed``, ``failed``, ``stuck``, or a workflow status.
        started: when its first message was published.
        ended: when it completed or failed, if it did.
        pending: deliveries not yet settled.
        dead: messages of the flow in the dead-letter queue.
        last_type: the last message type published in it (where it got to).
    """

    flow_id: str
    name: str
    kind: str
    status: str
    started: float
    ended: float | None
    pending: int
    dead: int
    last_type: str | None

    @classmethod
    def from_row(cls, row: FlowRow) -> FlowSummary:
        """From the store's record."""
        return cls(
            flow_id=row.flow_id, name=row.name, kind=row.kind, status=row.status, started=row.started,
            ended=row.ended, pending=row.pending, dead=row.dead, last_type=row.last_type,
        )

    @property
    def done(self) -> bool:
        """Whether the flow reached a final status."""
        return self.status in TERMINAL


class Flow(FlowSummary):
    """A whole flow: its summary plus the causation tree.

    Attributes:
        roots: the messages that started it (usually one).
        messages: every message, oldest first.
        spans: every handling, oldest first.
    """

    roots: list[FlowNode]
    messages: list[MessageRow]
    spans: list[SpanRecord]

    def __init__(self, summary: FlowSummary, messages: list[MessageRow], spans: list[SpanRecord]) -> None:
        for name in FlowSummary.__dataclass_fields__:
            setattr(self, name, getattr(summary, name))
        self.messages = messages
        self.spans = spans
        nodes = {m.id: FlowNode(m) for m in messages}
        for span in spans:
            node = nodes.get(span.msg_id)
            if node is not None:
                node.spans.append(span)
        self.roots = []
        for m in messages:
            parent = nodes.get(m.causation_id) if m.causation_id else None
            (parent.children if parent is not None else self.roots).append(nodes[m.id])

    @property
    def duration(self) -> float | None:
        """Seconds from the first message to the end (or the last handling)."""
        ends = [s.ended for s in self.spans] + [m.time for m in self.messages]
        if self.ended is not None:
            ends.append(self.ended)
        return (max(ends) - self.started) if ends else None

    def nodes(self) -> list[FlowNode]:
        """Every node, depth first."""
        out: list[FlowNode] = []
        stack = list(reversed(self.roots))
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(node.children))
        return out

    def find(self, type: str) -> list[FlowNode]:
        """Nodes whose message has this type."""
        return [n for n in self.nodes() if n.message.type == type]

    def shape(self) -> tuple[Any, ...]:
        """The tree as nested ``(type, children)`` tuples, one per root."""
        return tuple(root.shape() for root in self.roots)

    def render(self, *, width: int = 110, color: bool = False) -> str:
        """The tree as text for a terminal."""
        from .render import render_flow

        return render_flow(self, width=width, color=color)

    def __rich__(self) -> Any:
        from .render import flow_tree

        return flow_tree(self)

    def __repr__(self) -> str:
        return f"Flow({self.flow_id!r}, name={self.name!r}, status={self.status!r}, messages={len(self.messages)})"
