"""Terminal rendering of flows with rich: a tree of messages and who handled them."""

from __future__ import annotations

import io
from datetime import datetime
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

if TYPE_CHECKING:
    from ..stores.records import SpanRecord
    from .flows import Flow, FlowNode

__all__ = ["STATUS_STYLE", "flow_tree", "render_flow"]

STATUS_STYLE = {
    "completed": "green",
    "compensated": "yellow",
    "running": "cyan",
    "pending": "cyan",
    "failed": "red",
    "stuck": "magenta",
    "parked": "magenta",
    "cancelled": "dim",
}
_OUTCOME_STYLE = {
    "ok": "green",
    "retry": "yellow",
    "rejected": "red",
    "dead": "red",
    "invalid": "red",
}
_KIND_LABEL = {"event": "event", "command": "command", "reply": "reply"}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else f"{seconds:.1f}s"


def flow_tree(flow: Flow) -> Tree:
    """The flow as a rich Tree."""
    style = STATUS_STYLE.get(flow.status, "white")
    started = datetime.fromtimestamp(flow.started).strftime("%H:%M:%S")
    duration = flow.duration
    head = (
        f"[bold]{escape(flow.name)}[/bold] [dim]{flow.flow_id}[/dim]  "
        f"[{style}]{flow.status}[/{style}]  [dim]started {started}"
        + (f", {_ms(duration)}" if duration is not None else "")
        + "[/dim]"
    )
    tree = Tree(head)
    for root in flow.roots:
        _add_node(tree, root, flow.started)
    return tree


def _add_node(parent: Tree, node: FlowNode, t0: float) -> None:
    m = node.message
    label = (
        f"[bold]{escape(m.type)}[/bold] [dim]{_KIND_LABEL.get(m.kind, m.kind)}"
        + (f" from {escape(m.source)}" if m.source else "")
        + f" +{_ms(max(0.0, m.time - t0))}[/dim]"
    )
    branch = parent.add(label)
    by_service: dict[str, list[SpanRecord]] = {}
    for span in node.spans:
        by_service.setdefault(span.service, []).append(span)
    placed: set[int] = set()
    for service, spans in by_service.items():
        last = spans[-1]
        style = _OUTCOME_STYLE.get(last.outcome, "white")
        tries = f" after {len(spans)} attempts" if len(spans) > 1 else ""
        took = _ms(last.ended - last.started)
        text = f"[{style}]→ {escape(service)}[/{style}] [{style}]{last.outcome}[/{style}]{tries} [dim]{took}[/dim]"
        if last.error:
            text += f" [red]{escape(last.error[:160])}[/red]"
        span_branch = branch.add(text)
        for i, child in enumerate(node.children):
            if child.message.source == service:
                placed.add(i)
                _add_node(span_branch, child, t0)
    for i, child in enumerate(node.children):
        if i not in placed:
            _add_node(branch, child, t0)


def render_flow(flow: Flow, *, width: int = 110, color: bool = False) -> str:
    """The flow's tree as a string."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system="standard" if color else None, force_terminal=color)
    console.print(flow_tree(flow))
    return out.getvalue()
