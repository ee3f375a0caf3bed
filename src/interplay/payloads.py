"""Payloads: validating what arrives against an annotation, and turning values into JSON.

pydantic does both, for every kind of annotation a handler may use: a model, a
dataclass, a TypedDict, ``dict``, a primitive, or none at all (anything JSON).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar, get_type_hints

import pydantic
import pydantic_core

from .errors import ValidationFailed

__all__ = ["PayloadType", "describe_validation_error", "remembered", "resolve_hints", "to_json"]

K = TypeVar("K")
V = TypeVar("V")


class PayloadType:
    """Validates incoming payload data against one annotation (cached adapter)."""

    __slots__ = ("_adapter", "annotation")

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation
        self._adapter: pydantic.TypeAdapter[Any] | None = (
            None if annotation in (inspect.Parameter.empty, Any) else _adapter(annotation)
        )

    def validate(self, data: Any) -> Any:
        """Return ``data`` as the annotated type.

        Raises:
            ValidationFailed: naming each field that is wrong and why.
        """
        if self._adapter is None:
            return data
        try:
            return self._adapter.validate_python(data)
        except pydantic.ValidationError as exc:
            raise ValidationFailed(describe_validation_error(exc, self.annotation)) from None

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of this payload type ({} when it accepts anything)."""
        return {} if self._adapter is None else self._adapter.json_schema()


def remembered(maxsize: int) -> Callable[[Callable[[K], V]], Callable[[K], V]]:
    """``functools.lru_cache`` for a function of one argument, except that an unhashable
    argument (an ``Annotated`` with a list in it, a callable object with ``__eq__`` only)
    is computed each time instead of raising TypeError. An exception is not remembered."""

    def decorate(fn: Callable[[K], V]) -> Callable[[K], V]:
        cached = lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(arg: K) -> V:
            try:
                hash(arg)
            except TypeError:
                return fn(arg)
            return cached(arg)

        return call

    return decorate


@remembered(512)
def _adapter(annotation: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(annotation)


_complete_hints = remembered(4096)(get_type_hints)


def resolve_hints(fn: Any) -> dict[str, Any]:
    """A function's annotations, resolved; one that cannot be resolved counts as absent.

    ``typing.get_type_hints`` fails as a whole when one name is unknown, e.g. a type
    imported inside the function that defines a handler under ``from __future__
    import annotations``; then each annotation is resolved on its own. A complete
    resolution is remembered per function (a workflow step asks at every call), so
    the dict returned is shared: do not change it.
    """
    try:
        return _complete_hints(fn)
    except Exception:  # a name not resolvable (yet): resolve the others one by one, each time
        pass
    hints: dict[str, Any] = {}
    namespace = dict(getattr(fn, "__globals__", {}))
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)
            except Exception:
                continue
        hints[name] = annotation
    return hints


def describe_validation_error(exc: pydantic.ValidationError, annotation: Any) -> str:
    """A one-line summary of a pydantic error: ``Order: id: Field required; ...``."""
    name = getattr(annotation, "__name__", None) or repr(annotation)
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(payload)"
        parts.append(f"{where}: {err['msg']}")
    return f"{name}: " + "; ".join(parts)


def to_json(value: Any) -> Any:
    """Turn a payload (model, dataclass, primitives, ...) into plain JSON data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    try:
        return pydantic_core.to_jsonable_python(value)
    except pydantic_core.PydanticSerializationError as exc:
        raise ValidationFailed(f"payload of type {type(value).__name__} is not JSON-serializable: {exc}") from None
