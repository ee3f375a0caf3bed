"""What every CLI command shares: options, loading an app, running async code, errors."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console

from ..app import App
from ..errors import ConfigurationError, InterplayError
from ..runtime import DEFAULT_STORE

__all__ = ["BusOption", "StoreOption", "console", "err_console", "fail", "load_app", "parse_json", "run_async"]

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

StoreOption = Annotated[
    str,
    typer.Option(
        "--store", envvar="INTERPLAY_STORE", help="Store URL: sqlite:///file.db, memory://, postgresql://...",
        show_default=True,
    ),
]
BusOption = Annotated[
    str | None,
    typer.Option(
        "--bus", envvar="INTERPLAY_BUS",
        help="Bus URL: redis://, nats://, amqp://, memory://; default: the store's own queue.",
    ),
]
DEFAULT_STORE_URL = DEFAULT_STORE


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error and make the exit to raise."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(code)


def load_app(target: str) -> App:
    """Import ``module:attribute`` (the current directory is importable) and return the App."""
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise fail(f"expected MODULE:APP (e.g. examples.orders:app), got {target!r}", 2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise fail(f"cannot import {module_name!r}: {exc}", 2) from None
    except Exception as exc:  # the module itself is broken (SyntaxError, or it raised): no traceback
        raise fail(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}", 2) from None
    obj: Any = getattr(module, attr or "app", None)
    if not isinstance(obj, App):
        what = "nothing" if obj is None else type(obj).__name__
        raise fail(f"{target!r} is {what}, not an interplay App", 2)
    return obj


def parse_json(text: str, what: str = "payload") -> Any:
    """Parse a JSON argument, with a clear error."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise fail(f"{what} is not valid JSON: {exc}", 2) from None


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function; interplay errors become a red message and exit 1."""
    try:
        return asyncio.run(_call(fn))
    except (InterplayError, ConfigurationError) as exc:
        raise fail(str(exc)) from None
    except TimeoutError as exc:
        raise fail(f"timed out: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
