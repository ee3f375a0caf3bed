"""``interplay map``: the system's map from its code (and a store's records), and a CI check of it."""

from __future__ import annotations

import asyncio
import enum
import time
from pathlib import Path
from typing import Annotated

import orjson
import typer

from ..app import App
from ..errors import InterplayError
from ..stores import open_store
from ..tracing.asyncapi import render_asyncapi
from ..tracing.maprender import render_dot, render_mermaid, render_svg, render_text
from ..tracing.observed import observe, read_observations
from ..tracing.topology import Finding, TopologyMap, allowed, declared_map, find_drift
from .common import StoreOption, err_console, fail, load_app

__all__ = ["Format", "build_map", "map_command", "register"]

DRIFT_EXIT = 1
"""Exit code of ``--check`` when it finds drift (2: the map could not be made)."""


class Format(enum.StrEnum):
    """Output formats of ``interplay map``."""

    text = "text"
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    asyncapi = "asyncapi"


async def build_map(app: App, store: str | None = None, since: float | None = None) -> TopologyMap:
    """The declared map of ``app``, with the records of ``store`` added if given
    (only those of the last ``since`` seconds, if given)."""
    m = declared_map(app)
    if store is None:
        return m
    opened = open_store(store)
    await opened.open()
    try:
        start = None if since is None else time.time() - since
        observations = await read_observations(opened, start)
    finally:
        await opened.close()
    return observe(m, observations, app.services, since)


def map_command(
    target: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The app, e.g. interplay.examples.orders:app.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="What to write.")] = Format.text,
    observed: Annotated[bool, typer.Option("--observed", help="Add what the store's records show: counts, "
                                                               "p50 latency, and drift against them.")] = False,
    store: StoreOption = "sqlite:///interplay.db",
    since: Annotated[float | None, typer.Option(min=0, help="With --observed: only records of the last "
                                                            "SECONDS.", metavar="SECONDS")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if there is any drift (listed on stderr), "
                                                        "for CI.")] = False,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", metavar="PATTERN",
        help="Accept findings whose KIND:SUBJECT or SUBJECT matches this glob (repeatable), "
             "e.g. 'unhandled:payment.refunded' or 'unseen:*'.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.",
                                                dir_okay=False, writable=True)] = None,
) -> None:
    """Draw the system: services, events, commands, workflows and what flows between them.

    From the code: what handlers handle and emit (emits=, on_error=, ctx.emit), what workflows call, emit, wait for and start (read from their source).

    With --observed, also what the store's records show, and drift against it: declared but never seen, seen but not declared. Always flagged: events nobody handles, handlers nothing feeds.

    Exit codes: 0 no drift (or no --check), 1 drift found with --check, 2 no map could be made.
    """  # noqa: E501 - typer re-flows each paragraph of --help itself
    app = load_app(target)
    try:
        m = asyncio.run(build_map(app, store if observed else None, since))
        kept, waived = allowed(find_drift(m), allow or [])
        text = _render(fmt, app, m, kept, waived)
    except (InterplayError, OSError) as exc:
        raise fail(str(exc), 2) from None
    if output is not None:
        try:
            output.write_text(text)
        except OSError as exc:
            raise fail(f"cannot write {output}: {exc}", 2) from None
    else:
        typer.echo(text, nl=False)
    if check and kept:
        if output is not None or fmt is not Format.text:  # else the text above already lists it
            err_console.print(f"drift ({len(kept)}):", highlight=False, markup=False)
            for finding in kept:
                err_console.print(f"  {finding}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(DRIFT_EXIT)


def _render(fmt: Format, app: App, m: TopologyMap, kept: list[Finding], waived: list[Finding]) -> str:
    if fmt is Format.text:
        return render_text(m, kept, waived)
    if fmt is Format.mermaid:
        return render_mermaid(m, kept)
    if fmt is Format.dot:
        return render_dot(m, kept)
    if fmt is Format.svg:
        return render_svg(m, kept)
    return orjson.dumps(render_asyncapi(app, m), option=orjson.OPT_INDENT_2).decode() + "\n"


def register(app: typer.Typer) -> None:
    """Add the map command."""
    app.command("map")(map_command)
