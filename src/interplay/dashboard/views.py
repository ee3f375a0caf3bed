"""What the templates show, prepared in Python: the flow tree, payloads, times.

Templates only loop and print; Jinja escapes everything they print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from ..errors import MessageDecodeError
from ..message import Message
from ..stores.records import MessageRow, SpanRecord
from ..tracing.flows import Flow, FlowNode
from .svg import ms

__all__ = ["DeadLetterView", "SpanGroup", "TreeItem", "decode_body", "flow_tree", "pretty", "when"]

MAX_SHOWN = 20_000
"""Characters of a payload shown at most (the rest is cut with a note)."""


def when(ts: float | None) -> str:
    """A timestamp as local date and time; empty for None."""
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def pretty(data: Any) -> str:
    """JSON data indented for reading, cut at :data:`MAX_SHOWN` characters."""
    try:
        text = orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(data)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"\n… ({len(text) - MAX_SHOWN} more characters)"


@dataclass(slots=True)
class SpanGroup:
    """A service's handlings of one message (its attempts) and the messages it caused."""

    service: str
    spans: list[SpanRecord]
    children: list[TreeItem] = field(default_factory=list)

    @property
    def last(self) -> SpanRecord:
        """The latest attempt."""
        return self.spans[-1]

    @property
    def took(self) -> str:
        """How long the latest attempt ran."""
        return ms(max(0.0, self.last.ended - self.last.started))


@dataclass(slots=True)
class TreeItem:
    """A message in the tree: what it was, who handled it, what followed."""

    message: MessageRow
    offset: str
    payload: str
    groups: list[SpanGroup]
    loose: list[TreeItem]
    """Children not emitted by one of the handling services (e.g. a workflow's steps)."""


def flow_tree(flow: Flow) -> list[TreeItem]:
    """The flow's causation tree, each child placed under the service that emitted it."""

    def item(node: FlowNode) -> TreeItem:
        m = node.message
        groups: dict[str, SpanGroup] = {}
        for span in node.spans:
            groups.setdefault(span.service, SpanGroup(span.service, [])).spans.append(span)
        loose: list[TreeItem] = []
        for child in node.children:
            group = groups.get(child.message.source or "")
            (group.children if group is not None else loose).append(item(child))
        return TreeItem(m, "+" + ms(max(0.0, m.time - flow.started)), pretty(m.payload), list(groups.values()), loose)

    return [item(root) for root in flow.roots]


@dataclass(slots=True)
class DeadLetterView:
    """A dead letter with its envelope decoded for reading."""

    id: int
    time: float
    service: str
    type: str
    reason: str
    error: str
    attempts: int
    flow_id: str | None
    msg_id: str
    payload: str
    headers: str


def decode_body(body: bytes) -> tuple[str, str]:
    """``(payload, headers)`` of a stored envelope, pretty; the raw text if it is not one."""
    try:
        msg = Message.decode(body)
    except MessageDecodeError:
        text = body.decode("utf-8", "replace")
        return (text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + " …"), ""
    return pretty(msg.payload), pretty(msg.headers) if msg.headers else ""
