"""Server-rendered SVG: the topology map and a flow's timeline (a waterfall of spans).

Every piece of text that came from the store or the app goes through :func:`esc`; the
rest is numbers. Styling is by ``class`` (the dashboard's stylesheet), so the page's
Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

from .topology import Graph, Placed, is_mixed, layout

if TYPE_CHECKING:
    from ..stores.records import SpanRecord
    from ..tracing.flows import Flow, FlowNode

__all__ = ["TimelineRow", "esc", "graph_svg", "ms", "timeline_rows", "timeline_svg"]


def esc(text: object) -> str:
    """Escape for SVG/HTML text and attribute values."""
    return escape(str(text), quote=True)


def ms(seconds: float) -> str:
    """A duration for people: ``0.8ms``, ``12.3ms``, ``4.2s``."""
    if seconds < 10:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.1f}s"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------- the map
def graph_svg(graph: Graph) -> str:
    """The graph, laid out and drawn; an empty string for an empty graph."""
    if not graph.nodes:
        return ""
    placed, width, height = layout(graph)
    mixed = is_mixed(graph)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="map" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="topology map">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>',
    ]
    labels: list[str] = []
    for (s, t), edge in sorted(graph.edges.items()):
        a, b = placed[s], placed[t]
        path, (lx, ly) = _edge_path(a, b)
        seen = edge.seen if mixed else "plain"
        parts.append(
            f'<path d="{path}" class="edge edge-{seen}" marker-end="url(#arrow)" '
            f'data-source="{esc(a.node.label)}" data-target="{esc(b.node.label)}">'
            f"<title>{esc(a.node.label)} → {esc(b.node.label)}"
            + (f" ({edge.count})" if edge.count is not None else "") + "</title></path>"
        )
        text = " ".join(x for x in (edge.note, "" if edge.count is None else str(edge.count)) if x)
        if text:
            labels.append(f'<text x="{lx:.1f}" y="{ly:.1f}" class="edge-label">{esc(text)}</text>')
    parts += labels
    for p in placed.values():
        radius = {"event": 14, "client": 15, "command": 3}.get(p.node.kind, 5)
        parts.append(
            f'<g class="node node-{p.node.kind}" data-id="{esc(p.node.id)}">'
            f"<title>{esc(p.node.kind)}: {esc(p.node.label)}</title>"
            f'<rect x="{p.x:.1f}" y="{p.y:.1f}" width="{p.w:.1f}" height="{p.h:.1f}" rx="{radius}"/>'
            f'<text x="{p.x + p.w / 2:.1f}" y="{p.y + p.h / 2 + 4:.1f}">{esc(p.node.label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _edge_path(a: Placed, b: Placed) -> tuple[str, tuple[float, float]]:
    """A cubic curve from ``a`` down to ``b`` (or around the right side, back up) and a point for its label."""
    if b.layer > a.layer:
        x1, y1 = a.x + a.w / 2, a.y + a.h
        x2, y2 = b.x + b.w / 2, b.y
        dy = max(20.0, (y2 - y1) / 2)
        return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + dy:.1f} {x2:.1f},{y2 - dy:.1f} {x2:.1f},{y2:.1f}", (
            (x1 + x2) / 2 + 4, (y1 + y2) / 2 + 4)
    # Back up (a cycle) or within a layer: out of a's right side and into b's.
    x1, y1 = a.x + a.w, a.y + a.h / 2
    x2, y2 = b.x + b.w, b.y + b.h / 2
    out = max(x1, x2) + 40 + abs(y1 - y2) / 8
    return f"M{x1:.1f},{y1:.1f} C{out:.1f},{y1:.1f} {out:.1f},{y2:.1f} {x2:.1f},{y2:.1f}", (
        out - 8, (y1 + y2) / 2)


# ---------------------------------------------------------------------- the waterfall
@dataclass(slots=True)
class TimelineRow:
    """One row of the waterfall: a message being published, or one handling of it."""

    label: str
    depth: int
    start: float
    end: float
    kind: str
    """``message`` or ``span``."""
    outcome: str = ""
    detail: str = ""


def timeline_rows(flow: Flow) -> list[TimelineRow]:
    """The flow's messages in tree order, each followed by its handlings."""
    rows: list[TimelineRow] = []

    def visit(node: FlowNode, depth: int) -> None:
        m = node.message
        first = min((s.started for s in node.spans), default=m.time)
        source = f" from {m.source}" if m.source else ""
        rows.append(TimelineRow(f"{m.type}", depth, m.time, max(first, m.time), "message",
                                detail=f"{m.kind}{source}, published +{ms(max(0.0, m.time - flow.started))}"))
        for span in node.spans:
            rows.append(_span_row(span, depth + 1))
        for child in node.children:
            visit(child, depth + 1)

    for root in flow.roots:
        visit(root, 0)
    return rows


def _span_row(span: SpanRecord, depth: int) -> TimelineRow:
    attempt = f" (attempt {span.attempt})" if span.attempt > 1 else ""
    error = f": {span.error}" if span.error else ""
    return TimelineRow(
        f"→ {span.service}", depth, span.started, span.ended, "span", span.outcome,
        detail=f"{span.outcome}{attempt} in {ms(max(0.0, span.ended - span.started))}{error}",
    )


LABEL_W = 320.0
CHART_W = 560.0
TEXT_W = 250.0
ROW_H = 22.0
AXIS_H = 26.0


def _took(row: TimelineRow, x2: float, y: float) -> str:
    """The span's outcome and duration, after its bar (the full text is in the row's tooltip)."""
    return f'<text x="{x2 + 5:.1f}" y="{y + 15:.1f}" class="took">{esc(_short(row.detail, 40))}</text>'


def timeline_svg(flow: Flow) -> str:
    """The flow as a waterfall: when each message was published and each handling ran."""
    rows = timeline_rows(flow)
    if not rows:
        return ""
    t0 = flow.started
    t_end = max([r.end for r in rows] + [t0 + (flow.duration or 0.0)])
    total = max(t_end - t0, 1e-6)
    width = LABEL_W + CHART_W + TEXT_W
    height = AXIS_H + ROW_H * len(rows) + 8

    def x(t: float) -> float:
        return LABEL_W + max(0.0, t - t0) / total * CHART_W

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="timeline">'
    ]
    for i in range(5):
        tx = LABEL_W + CHART_W * i / 4
        parts.append(f'<line x1="{tx:.1f}" y1="{AXIS_H - 6}" x2="{tx:.1f}" y2="{height:.0f}" class="tick"/>')
        anchor = "end" if i == 4 else "middle" if i else "start"
        parts.append(f'<text x="{tx:.1f}" y="{AXIS_H - 10}" class="axis" text-anchor="{anchor}">'
                     f"+{esc(ms(total * i / 4))}</text>")
    for i, row in enumerate(rows):
        y = AXIS_H + i * ROW_H
        label = _short(row.label, 44 - 2 * min(row.depth, 8))
        parts.append(f'<g class="row row-{row.kind}"><title>{esc(row.label)}: {esc(row.detail)}</title>')
        parts.append(f'<text x="{8 + 14 * min(row.depth, 8)}" y="{y + 15:.1f}" class="label">{esc(label)}</text>')
        x1, x2 = x(row.start), x(row.end)
        if row.kind == "message":
            parts.append(f'<line x1="{x1:.1f}" y1="{y + 11:.1f}" x2="{max(x2, x1):.1f}" y2="{y + 11:.1f}" '
                         'class="wait"/>')
            parts.append(f'<circle cx="{x1:.1f}" cy="{y + 11:.1f}" r="4" class="published"/>')
        else:
            parts.append(f'<rect x="{x1:.1f}" y="{y + 4:.1f}" width="{max(x2 - x1, 2.0):.1f}" height="14" '
                         f'class="span outcome-{esc(row.outcome)}"/>')
            parts.append(_took(row, x2, y))
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)
