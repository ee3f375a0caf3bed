"""Drawing a :class:`~interplay.tracing.topology.TopologyMap`: text, mermaid, Graphviz dot and SVG.

Every format lists the same edges in the same (sorted) order, so outputs are stable
and can be compared in tests and reviews. In a map with observations, edges declared
but never seen are dashed, edges seen but not declared are red, inferred edges dotted.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from ..errors import ConfigurationError
from .topology import Edge, Finding, Node, TopologyMap

__all__ = ["render_dot", "render_mermaid", "render_svg", "render_text"]

_NOUNS = {"service": ("service", "services"), "workflow": ("workflow", "workflows"), "event": ("event", "events"),
          "command": ("command", "commands"), "external": ("client", "clients"), "system": ("runtime", "runtimes")}


def _status(m: TopologyMap, edge: Edge) -> str:
    if not m.observed:
        return ""
    if m.undeclared(edge):
        return f"UNDECLARED ({edge.stats})"
    if m.unseen(edge):
        return "NOT SEEN"
    return edge.stats or "not seen"


def render_text(m: TopologyMap, findings: list[Finding], waived: list[Finding] | None = None) -> str:
    """The map for a terminal or a review: edges, flows, blind spots, drift."""
    counts = m.counts()
    summary = ", ".join(f"{counts[k]} {_NOUNS[k][counts[k] != 1]}" for k in _NOUNS if counts.get(k))
    source = "declared + observed" + (f" (last {m.window:g}s)" if m.window else "") if m.observed else "declared"
    lines = [f"map of {m.app} ({source}): {summary}", "", "edges"]
    edges = m.sorted_edges()
    left = max((len(str(e.source)) for e in edges), default=0)
    right = max((len(str(e.target)) for e in edges), default=0)
    labels = max((len(e.label) for e in edges), default=0)
    for e in edges:
        line = f"  {e.source!s:<{left}}  ->  {e.target!s:<{right}}  {e.label:<{labels}}  {_status(m, e)}"
        lines.append(line.rstrip())
    if m.flows:
        lines += ["", "flows"]
        for f in sorted(m.flows, key=lambda f: f.name):
            parts = [f"starts {', '.join(f.starts)}"]
            if f.ends:
                parts.append(f"ends {', '.join(f.ends)}")
            if f.fails:
                parts.append(f"fails {', '.join(f.fails)}")
            if f.within is not None:
                parts.append(f"stuck after {f.within:g}s")
            lines.append(f"  {f.name}: {'; '.join(parts)}")
    if m.notes:
        lines += ["", "not seen statically"]
        lines += [f"  {n.where}: {n.text}" for n in m.notes]
    lines += ["", f"drift ({len(findings)})" if findings else "drift: none"]
    lines += [f"  {f}" for f in findings]
    if waived:
        lines += ["", f"allowed ({len(waived)})"] + [f"  {f}" for f in waived]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- mermaid
_MERMAID_SHAPES = {"service": ('["', '"]'), "workflow": ('[["', '"]]'), "event": ('(["', '"])'),
                   "command": ('[/"', '"/]'), "external": ('(("', '"))'), "system": ('{{"', '"}}')}
_MERMAID_CLASSES = {
    "service": "fill:#dbeafe,stroke:#1d4ed8", "workflow": "fill:#ede9fe,stroke:#6d28d9",
    "event": "fill:#fef9c3,stroke:#a16207", "command": "fill:#dcfce7,stroke:#15803d",
    "external": "fill:#f3f4f6,stroke:#6b7280", "system": "fill:#f3f4f6,stroke:#6b7280",
    "drift": "stroke:#dc2626,stroke-width:3px",
}


def _ids(m: TopologyMap) -> dict[str, str]:
    """Short identifiers for diagram languages: ``event_order_created`` (unique)."""
    ids: dict[str, str] = {}
    taken: set[str] = set()
    for node in m.sorted_nodes():
        base = re.sub(r"\W", "_", f"{node.kind}_{node.name}")
        short, n = base, 2
        while short in taken:
            short, n = f"{base}_{n}", n + 1
        taken.add(short)
        ids[node.id] = short
    return ids


def _flagged(findings: list[Finding]) -> set[str]:
    """Names of message types with an unhandled or unfed finding."""
    return {f.message for f in findings if f.message is not None}


def _mermaid_text(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def render_mermaid(m: TopologyMap, findings: list[Finding]) -> str:
    """A mermaid ``flowchart`` (renders in GitHub, GitLab and most docs tools)."""
    ids = _ids(m)
    lines = ["flowchart LR"]
    for node in m.sorted_nodes():
        opening, closing = _MERMAID_SHAPES[node.kind]
        lines.append(f"  {ids[node.id]}{opening}{_mermaid_text(node.name)}{closing}")
    styles: list[str] = []
    for i, e in enumerate(m.sorted_edges()):
        text = " · ".join(x for x in (e.label, e.stats) if x)
        arrow = "-.->" if e.inferred and not e.declared else "-->"
        lines.append(f'  {ids[e.source.id]} {arrow}|"{_mermaid_text(text)}"| {ids[e.target.id]}')
        if m.undeclared(e):
            styles.append(f"  linkStyle {i} stroke:#dc2626,stroke-width:2px")
        elif m.unseen(e):
            styles.append(f"  linkStyle {i} stroke:#9ca3af,stroke-dasharray:5 5")
    lines += styles
    for kind, style in _MERMAID_CLASSES.items():
        lines.append(f"  classDef {kind} {style}")
    by_kind: dict[str, list[str]] = {}
    for node in m.sorted_nodes():
        by_kind.setdefault(node.kind, []).append(ids[node.id])
    for kind, members in by_kind.items():
        lines.append(f"  class {','.join(members)} {kind}")
    flagged = [ids[n.id] for n in m.sorted_nodes() if n.kind in ("event", "command") and n.name in _flagged(findings)]
    if flagged:
        lines.append(f"  class {','.join(flagged)} drift")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- dot / svg
_DOT_NODES = {
    "service": 'shape=box, style="rounded,filled", fillcolor="#dbeafe", color="#1d4ed8"',
    "workflow": 'shape=box, peripheries=2, style=filled, fillcolor="#ede9fe", color="#6d28d9"',
    "event": 'shape=ellipse, style=filled, fillcolor="#fef9c3", color="#a16207"',
    "command": 'shape=cds, style=filled, fillcolor="#dcfce7", color="#15803d"',
    "external": 'shape=circle, style=filled, fillcolor="#f3f4f6", color="#6b7280"',
    "system": 'shape=hexagon, style=filled, fillcolor="#f3f4f6", color="#6b7280"',
}


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(node: Node, flagged: set[str]) -> str:
    extra = ', penwidth=3, color="#dc2626"' if node.kind in ("event", "command") and node.name in flagged else ""
    return f"  {_dot_string(node.id)} [label={_dot_string(node.name)}, {_DOT_NODES[node.kind]}{extra}];"


def render_dot(m: TopologyMap, findings: list[Finding]) -> str:
    """A Graphviz ``digraph`` (``dot -Tsvg``, ``-Tpng``, ...)."""
    flagged = _flagged(findings)
    lines = [
        f"digraph {_dot_string(m.app)} {{",
        "  rankdir=LR;",
        '  graph [fontname="Helvetica", fontsize=11, nodesep=0.3, ranksep=0.6];',
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9, color="#374151"];',
    ]
    lines += [_dot_node(n, flagged) for n in m.sorted_nodes()]
    for e in m.sorted_edges():
        attrs = [f"label={_dot_string(chr(10).join(x for x in (e.label, e.stats) if x))}"]
        if e.inferred and not e.declared:
            attrs.append("style=dotted")
        if m.undeclared(e):
            attrs += ['color="#dc2626"', 'fontcolor="#dc2626"', "penwidth=2"]
        elif m.unseen(e):
            attrs += ["style=dashed", 'color="#9ca3af"', 'fontcolor="#6b7280"']
        lines.append(f"  {_dot_string(e.source.id)} -> {_dot_string(e.target.id)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(m: TopologyMap, findings: list[Finding], *, timeout: float = 60.0) -> str:
    """The dot drawing laid out by Graphviz as SVG.

    Raises:
        ConfigurationError: Graphviz's ``dot`` program is not installed, or it failed.
    """
    program = shutil.which("dot")
    if program is None:
        raise ConfigurationError(
            "the svg format needs Graphviz's `dot` program, which is not installed "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz); "
            "--format dot writes the graph for any Graphviz, --format mermaid needs none"
        )
    try:
        done = subprocess.run([program, "-Tsvg"], input=render_dot(m, findings), capture_output=True,
                              text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigurationError(f"Graphviz's dot failed: {exc}") from None
    if done.returncode != 0:
        raise ConfigurationError(f"Graphviz's dot failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
