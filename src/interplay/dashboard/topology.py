"""The system's map as a graph: message types -> services -> message types.

Two sources: the declarations of an :class:`~interplay.App` (who handles which event
or command, what a handler emits or emits on error) and the trace records of a store
(who actually published and handled what, with counts). When both are given they are
merged, each edge marked as declared, observed, or both.

The layout is a small layered ("Sugiyama-style") one, enough for the tens of nodes a
system of services has: cycles broken by a depth-first search, layers by longest path,
order within a layer by a few barycenter sweeps. No graphviz, no JavaScript, no CDN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .queries import ObservedEdges

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Edge", "Graph", "Node", "Placed", "declared_graph", "is_mixed", "layout", "merge", "observed_graph",
           "to_mermaid"]

NodeKind = Literal["client", "service", "workflow", "event", "command"]
Seen = Literal["declared", "observed", "both"]

CLIENT = "ext:client"


@dataclass(slots=True)
class Node:
    """A box on the map."""

    id: str
    label: str
    kind: NodeKind


@dataclass(slots=True)
class Edge:
    """An arrow: ``source`` publishes/handles into ``target``.

    Attributes:
        count: messages seen along it (observed edges).
        note: a short remark drawn with it (``on error``, ``start``).
        seen: whether it is declared, observed, or both.
    """

    source: str
    target: str
    count: int | None = None
    note: str = ""
    seen: Seen = "observed"


@dataclass(slots=True)
class Graph:
    """Nodes by id and the edges between them."""

    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)

    def node(self, node_id: str, label: str, kind: NodeKind) -> str:
        """Add a node (once); its id."""
        self.nodes.setdefault(node_id, Node(node_id, label, kind))
        return node_id

    def edge(self, source: str, target: str, *, count: int | None = None, note: str = "", seen: Seen) -> None:
        """Add an edge, or add ``count`` to the one already there."""
        have = self.edges.get((source, target))
        if have is None:
            self.edges[(source, target)] = Edge(source, target, count, note, seen)
        elif count is not None:
            have.count = (have.count or 0) + count

    def service(self, name: str) -> str:
        """The node of a trace ``source``/span ``service``: a service, a workflow or the outside."""
        if name.startswith("workflow:"):
            workflow = name.removeprefix("workflow:")
            return self.node(f"wf:{workflow}", workflow, "workflow")
        if name in ("client", "interplay", ""):
            return self.node(CLIENT, "client", "client")
        return self.node(f"svc:{name}", name, "service")

    def message(self, kind: str, type_: str) -> str:
        """The node of a message type."""
        node_kind: NodeKind = "command" if kind == "command" else "event"
        return self.node(f"msg:{node_kind}:{type_}", type_, node_kind)


def declared_graph(app: App) -> Graph:
    """The graph an app declares: handled events and commands, ``emits``, ``on_error``.

    What handlers emit through ``ctx.emit`` and what workflows call is known only by
    running them: it shows up in the observed graph.
    """
    g = Graph()
    for svc in app.services.values():
        node = g.service(svc.name)
        for event, handler in svc.events.items():
            g.edge(g.message("event", event), node, seen="declared")
            if handler.emits:
                g.edge(node, g.message("event", handler.emits), seen="declared")
            if handler.on_error:
                g.edge(node, g.message("event", handler.on_error), note="on error", seen="declared")
        for handler in svc.commands.values():
            g.edge(g.message("command", handler.topic), node, seen="declared")
    for workflow in app.workflows:
        g.node(f"wf:{workflow}", workflow, "workflow")
    return g


def observed_graph(observed: ObservedEdges) -> Graph:
    """The graph the trace records show, with message counts on the edges."""
    g = Graph()
    kinds: dict[str, str] = {}
    for (source, kind, type_), count in sorted(observed.sent.items()):
        if kind == "workflow":  # a run's start: straight to the workflow
            g.edge(g.service(source), g.service(f"workflow:{type_}"), count=count, note="start", seen="observed")
            continue
        kinds[type_] = kind
        g.edge(g.service(source), g.message(kind, type_), count=count, seen="observed")
    for (type_, service), count in sorted(observed.handled.items()):
        if service == f"workflow:{type_}":  # the run's own span, drawn as the start edge
            continue
        g.edge(g.message(kinds.get(type_, "event"), type_), g.service(service), count=count, seen="observed")
    return g


def merge(declared: Graph, observed: Graph) -> Graph:
    """Both graphs in one, each edge marked declared, observed or both."""
    g = Graph(dict(declared.nodes), {k: Edge(e.source, e.target, e.count, e.note, e.seen)
                                     for k, e in declared.edges.items()})
    for node in observed.nodes.values():
        g.nodes.setdefault(node.id, node)
    for key, edge in observed.edges.items():
        have = g.edges.get(key)
        if have is None:
            g.edges[key] = Edge(edge.source, edge.target, edge.count, edge.note, "observed")
        else:
            have.count, have.seen = edge.count, "both"
    return g


# ---------------------------------------------------------------------- layout
@dataclass(slots=True)
class Placed:
    """A node's box on the canvas."""

    node: Node
    layer: int
    x: float
    y: float
    w: float
    h: float


NODE_H = 30.0
ROW_GAP = 52.0  # between layers (rows): room for the arrows and their counts
COL_GAP = 22.0  # between boxes in one layer
MARGIN = 20.0
LOOP_ROOM = 70.0  # right of the widest row, for edges that go back up
CHAR_W = 7.0  # average width of a 12px sans-serif character


def _order_for_search(graph: Graph) -> list[str]:
    rank = {"client": 0, "workflow": 1, "event": 2, "command": 2, "service": 3}
    has_pred = {e.target for e in graph.edges.values() if e.source != e.target}
    return sorted(graph.nodes, key=lambda n: (n in has_pred, rank[graph.nodes[n].kind], n))


def _acyclic_edges(graph: Graph) -> list[tuple[str, str]]:
    """The edges with those closing a cycle turned around (for layering only)."""
    succ: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for s, t in graph.edges:
        if s != t:
            succ[s].append(t)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    back: set[tuple[str, str]] = set()
    for start in _order_for_search(graph):
        if start in state:
            continue
        stack = [(start, iter(succ[start]))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                back.add((node, child))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(succ[child])))
    return [(t, s) if (s, t) in back else (s, t) for s, t in graph.edges if s != t]


def layout(graph: Graph) -> tuple[dict[str, Placed], float, float]:
    """Place every node, layer by layer from the top; returns the boxes and the canvas size."""
    edges = _acyclic_edges(graph)
    preds: dict[str, list[str]] = {n: [] for n in graph.nodes}
    succs: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for s, t in edges:
        preds[t].append(s)
        succs[s].append(t)
    layer: dict[str, int] = {}
    ready = [n for n in _order_for_search(graph) if not preds[n]]
    remaining = {n: len(preds[n]) for n in graph.nodes}
    while ready:
        n = ready.pop(0)
        layer[n] = max((layer[p] + 1 for p in preds[n]), default=0)
        for t in succs[n]:
            remaining[t] -= 1
            if remaining[t] == 0:
                ready.append(t)
    layers: dict[int, list[str]] = {}
    for n in _order_for_search(graph):
        layers.setdefault(layer.get(n, 0), []).append(n)
    _sweep(layers, preds, succs)
    return _coordinates(graph, layers)


def _sweep(layers: dict[int, list[str]], preds: dict[str, list[str]], succs: dict[str, list[str]]) -> None:
    """Reorder each layer by the mean position of its neighbours (fewer crossings)."""
    depth = max(layers, default=0)
    for rounds in range(4):
        down = rounds % 2 == 0
        for i in range(1, depth + 1) if down else range(depth - 1, -1, -1):
            fixed = {n: k for k, n in enumerate(layers.get(i - 1 if down else i + 1, []))}
            current = layers.get(i, [])
            neighbours = preds if down else succs
            was = {n: float(k) for k, n in enumerate(current)}
            centre = {}
            for n in current:
                linked = [fixed[m] for m in neighbours[n] if m in fixed]
                centre[n] = sum(linked) / len(linked) if linked else was[n]
            current.sort(key=centre.__getitem__)


def _coordinates(graph: Graph, layers: dict[int, list[str]]) -> tuple[dict[str, Placed], float, float]:
    """Layers as rows from top to bottom (tall and narrow beats one very wide line)."""
    placed: dict[str, Placed] = {}
    widths = {n: max(80.0, CHAR_W * len(graph.nodes[n].label) + 24.0) for n in graph.nodes}
    row_widths = {i: sum(widths[n] for n in row) + COL_GAP * (len(row) - 1) for i, row in layers.items()}
    widest = max(row_widths.values(), default=0.0)
    y = MARGIN
    for i in sorted(layers):
        x = MARGIN + (widest - row_widths[i]) / 2
        for n in layers[i]:
            placed[n] = Placed(graph.nodes[n], i, x, y, widths[n], NODE_H)
            x += widths[n] + COL_GAP
        y += NODE_H + ROW_GAP
    height = y - ROW_GAP + MARGIN if layers else 2 * MARGIN
    return placed, widest + 2 * MARGIN + LOOP_ROOM, height


def to_mermaid(graph: Graph) -> str:
    """The graph as a mermaid ``flowchart`` (to paste into docs that render mermaid)."""
    shapes = {"client": ('(("', '"))'), "service": ('["', '"]'), "workflow": ('[["', '"]]'),
              "event": ('(["', '"])'), "command": ('>"', '"]')}
    ids = {n: f"n{i}" for i, n in enumerate(sorted(graph.nodes))}
    lines = ["flowchart LR"]
    mixed = is_mixed(graph)
    for n, short in ids.items():
        node = graph.nodes[n]
        opening, closing = shapes[node.kind]
        lines.append(f"  {short}{opening}{_mermaid_text(node.label)}{closing}")
    for (s, t), e in sorted(graph.edges.items()):
        label = " ".join(x for x in (e.note, "" if e.count is None else str(e.count)) if x)
        arrow = "-.->" if e.seen == "declared" and mixed else "-->"
        middle = f'|"{_mermaid_text(label)}"|' if label else ""
        lines.append(f"  {ids[s]} {arrow}{middle} {ids[t]}")
    return "\n".join(lines) + "\n"


def is_mixed(graph: Graph) -> bool:
    """Whether the graph merges declarations and observations (then edges are told apart)."""
    seen = {e.seen for e in graph.edges.values()}
    return bool(seen) and seen != {"declared"} and seen != {"observed"}


def _mermaid_text(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
