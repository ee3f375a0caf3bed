"""Services and their handlers: what a service reacts to (events) and answers (commands).

Decorators only record metadata on the :class:`Service` (which belongs to an
:class:`~interplay.app.App`) and return the function unchanged, so one function can
carry both ``@svc.on(...)`` and ``@svc.command(...)`` and serve both styles.
"""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel

from .errors import ConfigurationError
from .payloads import PayloadType, resolve_hints

if TYPE_CHECKING:
    from .app import App

__all__ = ["Failure", "Handler", "Retry", "Service", "check_name"]

F = TypeVar("F", bound=Callable[..., Any])

_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def check_name(what: str, name: str) -> str:
    """Refuse names that would not be valid subjects, stream keys or routing keys."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 200:
        raise ConfigurationError(
            f"invalid {what} name {name!r}: use letters, digits, '_' and '-', "
            "in dot-separated parts (e.g. 'order.created')"
        )
    return name


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failing handler (or workflow step) is retried.

    The n-th retry waits ``backoff * multiplier**(n-1)`` seconds, capped at
    ``max_backoff``, with +-50% jitter so that retries of many messages spread out.
    After ``attempts`` attempts in all the message goes to the dead-letter queue.

    Attributes:
        attempts: total attempts, the first included (1 = no retry).
        backoff: seconds before the first retry.
        max_backoff: cap of any single wait.
        multiplier: growth factor between waits.
        jitter: spread each wait randomly between 50% and 150%.
    """

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("Retry.attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ConfigurationError("Retry backoff values must be >= 0 and multiplier >= 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * self.multiplier ** max(0, attempt - 1))
        if self.jitter:
            base *= random.uniform(0.5, 1.5)
        return min(base, self.max_backoff)


DEFAULT_RETRY = Retry()


class Failure(BaseModel):
    """The payload of an ``on_error`` event, and of a failed command's reply.

    Attributes:
        event: the type of the message that failed.
        service: the service whose handler failed.
        handler: the handler's name.
        error_type: the exception class name (``Reject``, ``ValidationFailed``, ...).
        error: the exception message.
        attempts: how many times the handler was tried.
        payload: the original payload, as received.
        message_id: the id of the message that failed.
    """

    event: str
    service: str
    handler: str
    error_type: str
    error: str
    attempts: int
    payload: Any = None
    message_id: str | None = None


HandlerKind = Literal["event", "command"]


@dataclass(slots=True)
class Handler:
    """A registered handler: the function plus how to call it."""

    service: str
    fn: Callable[..., Any]
    kind: HandlerKind
    topic: str
    """The event type, or the full command name ``service.command``."""
    emits: str | None
    on_error: str | None
    retry: Retry
    payload: PayloadType
    payload_param: str | None
    ctx_param: str | None
    concurrency: int | None
    is_async: bool

    @property
    def name(self) -> str:
        """``module.function`` of the handler."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


class Service:
    """A named service: a consumer group on the bus, with its handlers.

    Create with :meth:`App.service`; every replica of a service shares its messages
    (competing consumers), while each service gets its own copy of an event (fan-out).
    """

    def __init__(self, app: App, name: str) -> None:
        self.app = app
        self.name = check_name("service", name)
        self.events: dict[str, Handler] = {}
        self.commands: dict[str, Handler] = {}

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    def on(
        self,
        event: str,
        *,
        emits: str | None = None,
        on_error: str | None = None,
        retry: Retry | None = None,
        concurrency: int | None = None,
    ) -> Callable[[F], F]:
        """Handle ``event``: choreography.

        Args:
            event: the event type to react to.
            emits: emit the handler's return value (when not None) as this event.
            on_error: when the handler fails for good, emit this event in the same
                flow with a :class:`Failure` payload (compensation by choreography).
            retry: the retry policy (default :class:`Retry()`).
            concurrency: at most this many messages in this handler at once.
        """
        check_name("event", event)
        for name in (emits, on_error):
            if name is not None:
                check_name("event", name)

        def register(fn: F) -> F:
            if event in self.events:
                raise ConfigurationError(
                    f"service {self.name!r} already handles {event!r} with "
                    f"{self.events[event].name}; one handler per event and service"
                )
            self.events[event] = _make_handler(self.name, fn, "event", event, emits, on_error, retry, concurrency)
            return fn

        return register

    def command(
        self,
        name: str,
        *,
        retry: Retry | None = None,
        concurrency: int | None = None,
    ) -> Callable[[F], F]:
        """Answer the command ``name`` (called as ``"service.name"``): orchestration.

        The return value is the reply; raising :class:`~interplay.Reject` (or any error
        once retries are spent) fails the caller's step with ``StepFailed``.
        """
        check_name("command", name)

        def register(fn: F) -> F:
            if name in self.commands:
                raise ConfigurationError(f"service {self.name!r} already has command {name!r}")
            topic = f"{self.name}.{name}"
            self.commands[name] = _make_handler(self.name, fn, "command", topic, None, None, retry, concurrency)
            return fn

        return register


def _make_handler(
    service: str,
    fn: Callable[..., Any],
    kind: HandlerKind,
    topic: str,
    emits: str | None,
    on_error: str | None,
    retry: Retry | None,
    concurrency: int | None,
) -> Handler:
    payload_param, payload, ctx_param = inspect_handler(fn)
    if concurrency is not None and concurrency < 1:
        raise ConfigurationError("concurrency must be at least 1")
    return Handler(
        service=service,
        fn=fn,
        kind=kind,
        topic=topic,
        emits=emits,
        on_error=on_error,
        retry=retry or DEFAULT_RETRY,
        payload=payload,
        payload_param=payload_param,
        ctx_param=ctx_param,
        concurrency=concurrency,
        is_async=inspect.iscoroutinefunction(fn),
    )


def inspect_handler(
    fn: Callable[..., Any], *, context_types: tuple[type, ...] = ()
) -> tuple[str | None, PayloadType, str | None]:
    """Find the payload parameter, its type and the context parameter of a handler.

    The context is the parameter named ``ctx``/``context`` or annotated with a
    context type; the payload is the first other parameter.
    """
    if not context_types:
        from .context import Context

        context_types = (Context,)
    if not callable(fn):
        raise ConfigurationError(f"handler {fn!r} is not callable")
    params = list(inspect.signature(fn).parameters.values())
    hints = resolve_hints(fn)
    payload: PayloadType | None = None
    payload_param: str | None = None
    ctx_param: str | None = None
    for param in params:
        annotation = hints.get(param.name, inspect.Parameter.empty)
        is_context = param.name in ("ctx", "context") or (
            isinstance(annotation, type) and issubclass(annotation, context_types)
        )
        if is_context and ctx_param is None:
            ctx_param = param.name
        elif payload is None and param.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            payload = PayloadType(annotation)
            payload_param = param.name
        elif param.default is inspect.Parameter.empty and param.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            raise ConfigurationError(
                f"handler {fn.__qualname__} has an unexpected required parameter {param.name!r}; "
                "a handler takes the payload and optionally a Context"
            )
    return payload_param, payload or PayloadType(inspect.Parameter.empty), ctx_param
