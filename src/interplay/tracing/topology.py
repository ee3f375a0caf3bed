"""The system's map: services, events, commands and workflows, and what flows between them.

:func:`declared_map` draws it from an :class:`~interplay.App` without running anything:

* ``event -> service`` for each ``@svc.on(event)``, ``command -> service`` for each
  ``@svc.command``;
* ``service -> event`` for each ``emits=`` and ``on_error=``, and for each
  ``ctx.emit("...")`` in a handler's body;
* ``workflow -> command`` (``ctx.call``, ``saga.compensate``), ``workflow -> event``
  (``ctx.emit``), ``event -> workflow`` (``ctx.wait_for``) and ``workflow -> workflow``
  (``ctx.start_child``), from the workflow function's body.

The bodies are read with :mod:`ast` (see :mod:`interplay.tracing.scan`): names built
at run time are matched against the declared names as patterns (those edges are
*inferred*) or, when nothing is known of them, listed as :attr:`TopologyMap.notes`.

:func:`interplay.tracing.observed.observe` adds what a store's records show (counts,
p50 latency) and :func:`find_drift` compares the two: declared but never seen, seen
but not declared, events nobody handles, handlers nothing feeds.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .scan import ContextUse, SourceScan, scan_function
from .stuck import FLOW_STUCK, SYSTEM_SOURCE

if TYPE_CHECKING:
    from ..app import App, FlowSpec

__all__ = [
    "Edge", "Finding", "Node", "Note", "TopologyMap", "allowed", "declared_map", "find_drift",
]

NodeKind = Literal["service", "workflow", "event", "command", "external", "system"]
FindingKind = Literal["unseen", "undeclared", "unhandled", "unfed"]
KIND_ORDER: dict[str, int] = {"external": 0, "system": 1, "workflow": 2, "service": 3, "command": 4, "event": 5}
_RELATION = {"emit": "emits", "call": "calls", "compensate": "compensates", "wait_for": "waits for",
             "start_child": "starts"}


@dataclass(frozen=True, slots=True, order=True)
class Node:
    """A box on the map: a service, a workflow, a message type, or who publishes from outside.

    Attributes:
        kind: ``service``, ``workflow``, ``event``, ``command``, ``external`` (a client:
            whoever publishes with ``rt.publish``/``rt.start``/``rt.call``) or
            ``system`` (the runtime itself, which announces stuck flows).
        name: the service, workflow, message type or publisher's name.
    """

    kind: NodeKind
    name: str

    @property
    def id(self) -> str:
        """``kind:name``, unique in a map."""
        return f"{self.kind}:{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(slots=True)
class Edge:
    """An arrow of the map.

    Attributes:
        source: where messages come from.
        target: where they go.
        relations: what it means (``handles``, ``emits``, ``on error``, ``calls``,
            ``compensates``, ``waits for``, ``starts``, ``publishes``).
        via: the functions that make it (handler or workflow names).
        declared: stated in the code (a decorator, or a name in a handler's body).
        inferred: known only by matching a name pattern (``f"{service}.book"``).
        system: drawn by interplay itself (the stuck-flow announcement).
        triggers: for a service's ``emits``: the message types whose handlers declare it.
        seen: messages observed along it (0 until observed).
        errors: observed handlings that failed (rejected, dead, invalid).
        p50: median seconds from a message's publication to the end of its handling.
        seen_after: observed emits by the type of the message whose handling emitted them.
    """

    source: Node
    target: Node
    relations: set[str] = field(default_factory=set)
    via: set[str] = field(default_factory=set)
    declared: bool = False
    inferred: bool = False
    system: bool = False
    triggers: set[str] = field(default_factory=set)
    seen: int = 0
    errors: int = 0
    p50: float | None = None
    seen_after: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """``(source id, target id)``."""
        return (self.source.id, self.target.id)

    @property
    def label(self) -> str:
        """Relations and the functions behind them: ``handles (take_payment)``."""
        text = ", ".join(sorted(self.relations))
        if self.via:
            text += f" ({', '.join(sorted(self.via))})"
        return text + (" [inferred]" if self.inferred and not self.seen else "")

    @property
    def stats(self) -> str:
        """``12 seen, 1 failed, p50 3.1ms`` (empty when nothing was observed)."""
        if not self.seen:
            return ""
        parts = [f"{self.seen} seen"]
        if self.errors:
            parts.append(f"{self.errors} failed")
        if self.p50 is not None:
            parts.append(f"p50 {_duration(self.p50)}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}"


@dataclass(frozen=True, slots=True)
class Note:
    """Something about the code that the static map cannot tell.

    Attributes:
        where: the function (``workflow book_trip``, ``handler payments.take_payment``).
        text: what cannot be seen, and what was made of it.
    """

    where: str
    text: str


@dataclass(frozen=True, slots=True)
class Finding:
    """A difference between what is declared, what happens, and what is connected.

    Attributes:
        kind: ``unseen`` (declared but never seen in the store), ``undeclared`` (seen
            but not declared), ``unhandled`` (sent, but nothing handles or waits for
            it), ``unfed`` (handled or waited for, but nothing sends it).
        subject: what it is about: a message type, or ``source -> target``.
        detail: one sentence for a person.
        message: the message type it is about, for ``unhandled`` and ``unfed``.
    """

    kind: FindingKind
    subject: str
    detail: str
    message: str | None = None

    @property
    def key(self) -> str:
        """``kind:subject``: what ``--allow`` patterns match (as does the subject alone)."""
        return f"{self.kind}:{self.subject}"

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


@dataclass(slots=True)
class TopologyMap:
    """A map of one app (see the module's docstring).

    Attributes:
        app: the app's name.
        nodes: every node by id.
        edges: every edge by ``(source id, target id)``.
        flows: the app's declared flows.
        notes: what the static view cannot see.
        observed: whether a store's records were added (then drift includes unseen/undeclared).
        window: the seconds of records observed, or None for all of them.
        known: ids of the nodes the declarations name.
    """

    app: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    flows: list[FlowSpec] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    observed: bool = False
    window: float | None = None
    known: set[str] = field(default_factory=set)

    def node(self, kind: NodeKind, name: str) -> Node:
        """The node (added on first use)."""
        found = Node(kind, name)
        return self.nodes.setdefault(found.id, found)

    def edge(self, source: Node, target: Node) -> Edge:
        """The edge from ``source`` to ``target`` (added on first use)."""
        key = (source.id, target.id)
        edge = self.edges.get(key)
        if edge is None:
            edge = self.edges[key] = Edge(source, target)
        return edge

    def declare(self, source: Node, target: Node, relation: str, *, via: str | None = None,
                inferred: bool = False, trigger: str | None = None) -> Edge:
        """Add a declared (or inferred) edge."""
        edge = self.edge(source, target)
        edge.relations.add(relation)
        if via:
            edge.via.add(via)
        if inferred:
            edge.inferred = edge.inferred or not edge.declared
        else:
            edge.declared, edge.inferred = True, False
        if trigger:
            edge.triggers.add(trigger)
        return edge

    def sorted_edges(self) -> list[Edge]:
        """Edges in a stable order: by source (kind, name), then target."""
        return sorted(self.edges.values(), key=lambda e: (_rank(e.source), _rank(e.target)))

    def sorted_nodes(self) -> list[Node]:
        """Nodes in a stable order: by kind, then name."""
        return sorted(self.nodes.values(), key=_rank)

    def into(self, node: Node) -> list[Edge]:
        """Edges ending at ``node``."""
        return [e for e in self.edges.values() if e.target == node]

    def out_of(self, node: Node) -> list[Edge]:
        """Edges leaving ``node``."""
        return [e for e in self.edges.values() if e.source == node]

    def undeclared(self, edge: Edge) -> bool:
        """Seen but not declared (a client's message of a type the app knows is not: it starts flows)."""
        if not edge.seen or edge.declared or edge.inferred or edge.system:
            return False
        if edge.source.kind == "system":
            return False
        return not (edge.source.kind == "external" and edge.target.id in self.known)

    def unseen(self, edge: Edge) -> bool:
        """Declared but never seen (only in a map with observations; the runtime's own edges never are)."""
        return self.observed and edge.declared and not edge.seen and not edge.system

    def counts(self) -> dict[str, int]:
        """How many nodes of each kind."""
        out: dict[str, int] = {}
        for node in self.nodes.values():
            out[node.kind] = out.get(node.kind, 0) + 1
        return out


def _rank(node: Node) -> tuple[int, str]:
    return (KIND_ORDER[node.kind], node.name)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s" if seconds < 60 else f"{seconds / 60:.1f}min"


# ---------------------------------------------------------------------------------- declared
def declared_map(app: App) -> TopologyMap:
    """The map as the app's code declares it (nothing runs; handler bodies are read)."""
    m = TopologyMap(app.name, flows=list(app.flows.values()))
    scans: list[tuple[Node, str, str | None, SourceScan]] = []  # (who, function, trigger, scan)
    scanned: dict[tuple[int, str | None], SourceScan] = {}

    def scan(fn: Callable[..., Any], ctx_param: str | None) -> SourceScan:
        key = (id(fn), ctx_param)
        if key not in scanned:
            scanned[key] = scan_function(fn, ctx_param)
        return scanned[key]

    for svc in sorted(app.services.values(), key=lambda s: s.name):
        service = m.node("service", svc.name)
        for topic, handler in sorted(svc.events.items()):
            fn_name = _function_name(handler.fn)
            m.declare(m.node("event", topic), service, "handles", via=fn_name)
            if handler.emits:
                m.declare(service, m.node("event", handler.emits), "emits", via=fn_name, trigger=topic)
            if handler.on_error:
                m.declare(service, m.node("event", handler.on_error), "on error", via=fn_name, trigger=topic)
            scans.append((service, fn_name, topic, scan(handler.fn, handler.ctx_param)))
        for handler in sorted(svc.commands.values(), key=lambda h: h.topic):
            fn_name = _function_name(handler.fn)
            m.declare(m.node("command", handler.topic), service, "handles", via=fn_name)
            scans.append((service, fn_name, handler.topic, scan(handler.fn, handler.ctx_param)))
    for name, spec in sorted(app.workflows.items()):
        scans.append((m.node("workflow", name), _function_name(spec.fn), None, scan(spec.fn, spec.ctx_param)))
    for flow in app.flows.values():
        for event in (*flow.starts, *flow.ends, *flow.fails):
            m.node("event", event)

    pending: list[tuple[Node, str, str | None, ContextUse]] = []
    for who, fn_name, trigger, found in scans:
        where = f"{who.kind} {who.name}" + (f" ({fn_name})" if who.kind == "service" else "")
        if found.problem:
            m.notes.append(Note(where, f"{fn_name}: {found.problem}; what it sends is not on the map"))
        for callee, line in found.handed_to:
            m.notes.append(Note(where, f"line {line}: the context is passed to {callee}(); what it sends there "
                                       "is not on the map"))
        for use in found.uses:
            if use.name is not None:
                _link(m, who, use, use.name, fn_name, trigger, inferred=False)
            else:
                pending.append((who, fn_name, trigger, use))
    # Names built at run time: matched against every name declared above.
    for who, fn_name, trigger, use in pending:
        where = f"{who.kind} {who.name}" + (f" ({fn_name})" if who.kind == "service" else "")
        candidates = _candidates(m, use.method)
        matches = [c for c in candidates if use.pattern and re.fullmatch(use.pattern, c)]
        call = f"{use.call}({use.expression})"
        if matches:
            for name in matches:
                _link(m, who, use, name, fn_name, trigger, inferred=True)
            m.notes.append(Note(where, f"line {use.line}: {call} is only known at run time; "
                                       f"it matches {', '.join(matches)} (drawn as inferred)"))
        else:
            m.notes.append(Note(where, f"line {use.line}: {call} is only known at run time"
                                       + (" and matches nothing declared" if use.pattern else "")
                                       + "; not on the map"))
    # The runtime announces stuck flows; drawn when someone listens for it.
    stuck = m.nodes.get(Node("event", FLOW_STUCK).id)
    if stuck is not None and any(f.within is not None for f in app.flows.values()):
        edge = m.declare(m.node("system", SYSTEM_SOURCE), stuck, "emits", via="stuck-flow watch")
        edge.system = True
    m.known = set(m.nodes)
    return m


def _function_name(fn: Callable[..., Any]) -> str:
    """``take_payment``, ``Billing.charge`` (without the ``make_app.<locals>.`` of a nested definition)."""
    return str(getattr(fn, "__qualname__", fn)).rsplit("<locals>.", 1)[-1]


def _link(m: TopologyMap, who: Node, use: ContextUse, name: str, fn_name: str, trigger: str | None,
          *, inferred: bool) -> None:
    relation = _RELATION[use.method]
    via = fn_name if who.kind == "service" else None  # a workflow is its function
    if use.method == "emit":
        m.declare(who, m.node("event", name), relation, via=via, inferred=inferred, trigger=trigger)
    elif use.method in ("call", "compensate"):
        m.declare(who, m.node("command", name), relation, via=via, inferred=inferred)
    elif use.method == "wait_for":
        m.declare(m.node("event", name), who, relation, inferred=inferred)
    else:
        m.declare(who, m.node("workflow", name), relation, inferred=inferred)


def _candidates(m: TopologyMap, method: str) -> list[str]:
    kind = {"emit": "event", "wait_for": "event", "call": "command", "compensate": "command",
            "start_child": "workflow"}[method]
    return sorted(n.name for n in m.nodes.values() if n.kind == kind)


# ---------------------------------------------------------------------------------- drift
def find_drift(m: TopologyMap) -> list[Finding]:
    """What does not add up, sorted by kind, then subject.

    Always:

    * ``unhandled``: an event something sends that no service handles and no workflow
      waits for - unless it ends or fails a declared flow (an outcome) or is interplay's
      own (``interplay.*``); a command something calls that no service answers;
    * ``unfed``: an event a service handles or a workflow waits for that nothing sends
      and no declared flow starts with. Commands are never unfed: any client may call them.

    With observations, also:

    * ``unseen``: a declared edge without a record (inferred edges and the runtime's own
      are not promises, so never unseen);
    * ``undeclared``: an edge with records that the code does not declare - a client
      publishing a type the app knows is how flows begin, not drift - and a service
      emitting an event while handling a type whose handler does not declare it.
    """
    findings: list[Finding] = []
    outcomes = {e for f in m.flows for e in (*f.ends, *f.fails)}
    starts = {e for f in m.flows for e in f.starts}
    for node in m.sorted_nodes():
        if node.kind not in ("event", "command"):
            continue
        # Edges into a message node send it; edges out of one take it off the bus.
        producers = [e for e in m.into(node) if e.declared or e.inferred or e.seen]
        consumers = [e for e in m.out_of(node) if e.declared or e.inferred or e.seen]
        system_event = node.name.startswith("interplay.")
        if producers and not consumers and node.name not in outcomes and not system_event:
            by = ", ".join(sorted({str(e.source) for e in producers}))
            what = "no service answers it" if node.kind == "command" else "nothing handles or waits for it"
            findings.append(Finding("unhandled", node.name, f"sent by {by} but {what}", node.name))
        if node.kind == "event" and consumers and not producers and node.name not in starts:
            why = ("no declared flow has within=, so it is never announced" if node.name == FLOW_STUCK
                   else "nothing emits it and no declared flow starts with it")
            for edge in consumers:
                findings.append(Finding("unfed", str(edge), f"{edge.target} {edge.label} {node.name}, but {why}",
                                        node.name))
    if m.observed:
        findings += _observed_drift(m)
    order = {"undeclared": 0, "unseen": 1, "unhandled": 2, "unfed": 3}
    return sorted(findings, key=lambda f: (order[f.kind], f.subject))


def _observed_drift(m: TopologyMap) -> list[Finding]:
    findings = []
    for edge in m.sorted_edges():
        if m.unseen(edge):
            findings.append(Finding("unseen", str(edge), f"declared ({edge.label}) but not seen in the store"))
        elif m.undeclared(edge):
            findings.append(Finding("undeclared", str(edge), f"seen {edge.seen} time(s) but not declared"))
        elif edge.seen_after and edge.source.kind == "service" and (edge.declared or edge.inferred):
            for trigger, count in sorted(edge.seen_after.items()):
                if trigger not in edge.triggers:
                    findings.append(Finding(
                        "undeclared", f"{edge} (after {trigger})",
                        f"emitted {count} time(s) while handling {trigger}, whose handler does not declare it",
                    ))
    return findings


def allowed(findings: Iterable[Finding], patterns: Sequence[str]) -> tuple[list[Finding], list[Finding]]:
    """Split findings into (kept, allowed by a glob pattern on their key or subject)."""
    kept: list[Finding] = []
    waived: list[Finding] = []
    for f in findings:
        hit = any(fnmatch.fnmatchcase(f.key, p) or fnmatch.fnmatchcase(f.subject, p) for p in patterns)
        (waived if hit else kept).append(f)
    return kept, waived
