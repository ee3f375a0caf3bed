"""App: the registry of services, workflows and flows, and the entry to running them.

An App holds declarations only; nothing is global. ``app.run(...)`` makes a
:class:`~interplay.runtime.Runtime` that hosts some (or all) of its services.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigurationError
from .message import Message
from .payloads import PayloadType, resolve_hints
from .service import Handler, Service, check_name, inspect_handler
from .stores.records import FlowStart, Outgoing
from .transports.base import command_route, event_route, route_of

if TYPE_CHECKING:
    from .clock import Clock
    from .runtime import Runtime
    from .stores.base import Store
    from .tracing.hooks import Observer
    from .transports.base import Transport

__all__ = ["App", "FlowSpec", "WorkflowSpec"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A declared choreographed flow: how to tell it completed, failed or got stuck.

    Attributes:
        name: the flow's name (``order``).
        starts: event types that open a new flow of this kind.
        ends: event types that complete it.
        fails: event types that fail it.
        within: seconds after which a flow that neither ended nor failed is ``stuck``.
    """

    name: str
    starts: tuple[str, ...]
    ends: tuple[str, ...] = ()
    fails: tuple[str, ...] = ()
    within: float | None = None


@dataclass(slots=True)
class WorkflowSpec:
    """A registered workflow (durable orchestration)."""

    name: str
    fn: Callable[..., Any]
    payload: PayloadType
    payload_param: str | None
    ctx_param: str
    result: PayloadType


def _names(what: str, value: str | Sequence[str]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(check_name(what, v) for v in items)


class App:
    """A system of services, workflows and flows.

    Example:
        >>> app = App("shop")
        >>> payments = app.service("payments")
    """

    def __init__(self, name: str) -> None:
        self.name = check_name("app", name)
        self.services: dict[str, Service] = {}
        self.workflows: dict[str, WorkflowSpec] = {}
        self.flows: dict[str, FlowSpec] = {}
        self._topology: _Topology | None = None

    def __repr__(self) -> str:
        return f"App({self.name!r}, services={sorted(self.services)}, workflows={sorted(self.workflows)})"

    def service(self, name: str) -> Service:
        """The service called ``name`` (created on first use)."""
        svc = self.services.get(name)
        if svc is None:
            if name.startswith("_"):
                raise ConfigurationError(f"service names starting with '_' are reserved: {name!r}")
            svc = self.services[name] = Service(self, name)
            self._topology = None
        return svc

    def flow(
        self,
        name: str,
        *,
        starts: str | Sequence[str],
        ends: str | Sequence[str] = (),
        fails: str | Sequence[str] = (),
        within: float | None = None,
    ) -> FlowSpec:
        """Declare a choreographed flow so interplay can judge its status.

        A flow starts when one of ``starts`` is published outside any flow; it
        completes when one of ``ends`` is emitted in it, fails on one of ``fails``,
        and is ``stuck`` if neither happened ``within`` seconds of its start.
        """
        check_name("flow", name)
        if name in self.flows:
            raise ConfigurationError(f"flow {name!r} is already declared")
        if within is not None and within <= 0:
            raise ConfigurationError("within must be a positive number of seconds")
        spec = FlowSpec(name, _names("event", starts), _names("event", ends), _names("event", fails), within)
        if not spec.starts:
            raise ConfigurationError(f"flow {name!r} needs at least one start event")
        self.flows[name] = spec
        self._topology = None
        return spec

    def workflow(self, name: str | None = None) -> Callable[[F], F]:
        """Register a durable workflow: ``async def wf(ctx: WorkflowContext, payload) -> result``.

        The payload is validated at ``rt.start`` (a bad one is refused before anything
        is stored); the result is JSON data, validated into the return annotation.
        """

        def register(fn: F) -> F:
            wf_name = check_name("workflow", name or fn.__name__)
            if wf_name in self.workflows:
                raise ConfigurationError(f"workflow {wf_name!r} is already registered")
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(f"workflow {wf_name!r} must be an async function")
            from .workflow.context import WorkflowContext

            payload_param, payload, ctx_param = inspect_handler(fn, context_types=(WorkflowContext,))
            if ctx_param is None:
                raise ConfigurationError(
                    f"workflow {wf_name!r} must take a WorkflowContext (named ctx) as a parameter"
                )
            returns = resolve_hints(fn).get("return", inspect.Parameter.empty)
            result = PayloadType(inspect.Parameter.empty if returns in (None, type(None)) else returns)
            self.workflows[wf_name] = WorkflowSpec(wf_name, fn, payload, payload_param, ctx_param, result)
            return fn

        return register

    def command_handler(self, target: str) -> Handler:
        """The handler of ``service.command``.

        Raises:
            ConfigurationError: no such service or command.
        """
        svc_name, _, cmd = target.partition(".")
        svc = self.services.get(svc_name)
        handler = svc.commands.get(cmd) if svc else None
        if handler is None:
            known = sorted(f"{s.name}.{c}" for s in self.services.values() for c in s.commands)
            raise ConfigurationError(f"unknown command {target!r}; known: {known}")
        return handler

    @property
    def topology(self) -> _Topology:
        """Derived routing facts (rebuilt after any declaration changes)."""
        if self._topology is None:
            self._topology = _Topology(self)
        return self._topology

    def run(
        self,
        *,
        bus: str | Transport | None = None,
        store: str | Store | None = None,
        services: Sequence[str] | None = None,
        orchestrator: bool = True,
        clock: Clock | None = None,
        observers: Sequence[Observer] = (),
        **options: Any,
    ) -> Runtime:
        """A runtime for this app; use as ``async with app.run(...) as rt:``.

        Args:
            bus: a transport URL or object; default ``INTERPLAY_BUS``, else the
                store's own queue.
            store: a store URL or object; default ``INTERPLAY_STORE``, else
                ``sqlite:///interplay.db``.
            services: the services this process hosts (default: all).
            orchestrator: whether this process runs workflows.
            clock: a clock (``interplay.testing.VirtualClock`` in tests).
            observers: instrumentation (OpenTelemetry, metrics): see ``interplay.tracing.hooks``.
            **options: see :class:`~interplay.runtime.RuntimeOptions`.
        """
        from .runtime import Runtime, RuntimeOptions

        return Runtime(
            self,
            bus=bus,
            store=store,
            services=services,
            orchestrator=orchestrator,
            clock=clock,
            options=RuntimeOptions(**options),
            observers=observers,
        )


class _Topology:
    """Who receives what, and which flows an event type starts, ends or fails."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.routes: dict[str, list[str]] = {}  # service -> routes it consumes
        subscribers: dict[str, int] = {}
        for svc in app.services.values():
            routes = [event_route(e) for e in svc.events] + [
                command_route(h.topic) for h in svc.commands.values()
            ]
            self.routes[svc.name] = routes
            for route in routes:
                subscribers[route] = subscribers.get(route, 0) + 1
        self.fanout = subscribers
        self.starts: dict[str, FlowSpec] = {}
        self.completes: dict[str, tuple[str, ...]] = {}
        self.fails: dict[str, tuple[str, ...]] = {}
        for spec in app.flows.values():
            for event in spec.starts:
                self.starts.setdefault(event, spec)
            for event in spec.ends:
                self.completes[event] = (*self.completes.get(event, ()), spec.name)
            for event in spec.fails:
                self.fails[event] = (*self.fails.get(event, ()), spec.name)

    def flow_start(self, message: Message, now: float) -> FlowStart:
        """The flow record that a root message opens."""
        spec = self.starts.get(message.type) if message.kind == "event" else None
        if spec is None:
            return FlowStart(name=message.type)
        deadline = None if spec.within is None else now + spec.within
        return FlowStart(name=spec.name, declared=True, deadline=deadline)

    def outgoing(self, message: Message, *, flow_start: FlowStart | None = None) -> Outgoing:
        """Wrap a message for publishing, with its route and flow bookkeeping."""
        route = route_of(message)
        is_event = message.kind == "event"
        return Outgoing(
            message=message,
            route=route,
            body=message.encode(),
            fanout=1 if message.kind == "reply" else self.fanout.get(route, 0),
            flow_start=flow_start,
            completes=self.completes.get(message.type, ()) if is_event else (),
            fails=self.fails.get(message.type, ()) if is_event else (),
        )
