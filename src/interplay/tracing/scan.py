"""What a handler or workflow sends, read from its source code with :mod:`ast`.

Decorators say what a handler handles and what it ``emits``; what it sends through
its context (``ctx.emit("shipment.prepared", ...)``) and what a workflow calls, emits,
waits for and starts (``ctx.call("payments.refund", ...)``) is only in its body. This
module finds those calls in the function's own source:

* a string literal is a name (``ctx.emit("a.b")``); so is a module-level constant
  (``ctx.emit(SHIPPED)``) or attribute that holds a string (``Events.SHIPPED``);
* an f-string or a concatenation becomes a pattern (``f"{service}.book"`` is
  ``.+\\.book``), to be matched against the names the app declares;
* anything else cannot be known before the code runs, and is reported as such.

What cannot be seen this way: calls made by other functions the handler calls (with
``ctx`` passed along - reported when it is passed - or not), a context method stored
in a variable first, and code whose source is not available (built at run time).
The observed map (``interplay map --observed``) shows what really happened.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ContextUse", "SourceScan", "scan_function"]

CONTEXT_METHODS = ("emit", "call", "wait_for", "start_child")
"""Context methods whose first argument names a message or a workflow."""
_NAME_ARGUMENT = {"emit": "event", "call": "target", "wait_for": "event", "start_child": "workflow",
                  "compensate": "action"}


@dataclass(frozen=True, slots=True)
class ContextUse:
    """One ``ctx.<method>(name, ...)`` call found in a function's body.

    Attributes:
        method: ``emit``, ``call``, ``wait_for``, ``start_child`` or ``compensate``
            (``saga.compensate`` of a saga opened with ``ctx.saga()``).
        name: the name, when it is known before running (a literal or a constant).
        pattern: a regular expression the name matches, when it is built from parts
            (an f-string, a concatenation); None when nothing is known of it.
        expression: the argument as written.
        line: its line in the source file.
        call: the called method as written (``ctx.emit``, ``saga.compensate``).
    """

    method: str
    name: str | None
    pattern: str | None
    expression: str
    line: int
    call: str = ""


@dataclass(slots=True)
class SourceScan:
    """What a function's source says it sends.

    Attributes:
        uses: the context calls found, in source order.
        handed_to: functions the context is passed to (what they send is not seen).
        problem: why the source could not be read (then nothing is known).
    """

    uses: list[ContextUse] = field(default_factory=list)
    handed_to: list[tuple[str, int]] = field(default_factory=list)
    problem: str | None = None


def scan_function(fn: Callable[..., Any], ctx_param: str | None) -> SourceScan:
    """Find the context calls in ``fn``'s body (``ctx_param``: the context parameter's name)."""
    if ctx_param is None:
        return SourceScan()
    target = inspect.unwrap(fn)
    try:
        source = textwrap.dedent(inspect.getsource(target))
        first_line = inspect.getsourcelines(target)[1]
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as exc:
        return SourceScan(problem=f"its source is not available ({type(exc).__name__})")
    func = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)), None)
    if func is None:
        return SourceScan(problem="its source has no function definition")
    return _Scanner(ctx_param, getattr(target, "__globals__", {}), first_line - 1).run(func)


class _Scanner:
    def __init__(self, ctx_param: str, namespace: dict[str, Any], line_offset: int) -> None:
        self.ctx = ctx_param
        self.namespace = namespace
        self.offset = line_offset
        self.sagas: set[str] = set()

    def run(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> SourceScan:
        result = SourceScan()
        nodes = list(ast.walk(func))
        for node in nodes:  # first the names bound by `async with ctx.saga() as saga`
            if isinstance(node, ast.AsyncWith | ast.With):
                for item in node.items:
                    if self._is_ctx_call(item.context_expr, "saga") and isinstance(item.optional_vars, ast.Name):
                        self.sagas.add(item.optional_vars.id)
        calls = sorted((n for n in nodes if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
        for call in calls:
            method = self._method(call)
            if method is not None:
                argument = _argument(call, _NAME_ARGUMENT[method])
                use = None if argument is None else self._use(method, argument, ast.unparse(call.func))
                if use is not None:
                    result.uses.append(use)
            elif any(isinstance(a, ast.Name) and a.id == self.ctx for a in (*call.args, *_keyword_values(call))):
                result.handed_to.append((ast.unparse(call.func), call.lineno + self.offset))
        return result

    def _is_ctx_call(self, node: ast.expr, method: str) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method
                and isinstance(node.func.value, ast.Name) and node.func.value.id == self.ctx)

    def _method(self, call: ast.Call) -> str | None:
        func = call.func
        if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
            return None
        if func.value.id == self.ctx and func.attr in CONTEXT_METHODS:
            return func.attr
        if func.value.id in self.sagas and func.attr == "compensate":
            return "compensate"
        return None

    def _use(self, method: str, node: ast.expr, called: str) -> ContextUse | None:
        line = node.lineno + self.offset
        expression = ast.unparse(node)
        value = self._constant(node)
        if isinstance(value, str):
            return ContextUse(method, value, None, expression, line, called)
        if isinstance(node, ast.Lambda) or (value is not None and callable(value)):
            return None  # a compensation by a local function: no message
        return ContextUse(method, None, self._pattern(node), expression, line, called)

    def _constant(self, node: ast.expr) -> Any:
        """A literal, or what a (dotted) global name holds; None if neither."""
        if isinstance(node, ast.Constant):
            return node.value
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.namespace:
            return None
        value = self.namespace[node.id]
        for attr in reversed(parts):
            value = getattr(value, attr, None)
        return value

    def _pattern(self, node: ast.expr) -> str | None:
        pieces = self._pieces(node)
        if pieces is None or all(p is None for p in pieces):
            return None
        return "".join(".+" if p is None else re.escape(p) for p in pieces)

    def _pieces(self, node: ast.expr) -> list[str | None] | None:
        """The constant parts of a name built from parts (None for each unknown part)."""
        if isinstance(node, ast.JoinedStr):
            out: list[str | None] = []
            for part in node.values:
                value = self._constant(part) if isinstance(part, ast.Constant) else None
                if isinstance(part, ast.FormattedValue):
                    value = self._constant(part.value)
                out.append(value if isinstance(value, str) else None)
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self._pieces(node.left), self._pieces(node.right)
            return None if left is None or right is None else left + right
        value = self._constant(node)
        return [value] if isinstance(value, str) else [None]


def _argument(call: ast.Call, keyword: str) -> ast.expr | None:
    if call.args and not isinstance(call.args[0], ast.Starred):
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def _keyword_values(call: ast.Call) -> list[ast.expr]:
    return [k.value for k in call.keywords]
