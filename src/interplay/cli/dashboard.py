"""``interplay dashboard``: flows, workflows, dead letters and the map in a browser."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import ConfigurationError
from .common import BusOption, StoreOption, console, fail, load_app

__all__ = ["dashboard", "register"]


def dashboard(
    store: StoreOption = "sqlite:///interplay.db",
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8321,
    token: Annotated[
        str | None,
        typer.Option(envvar="INTERPLAY_DASHBOARD_TOKEN", show_default=False,
                     help="Require this token on every request (Bearer header or the login form)."),
    ] = None,
    bus: BusOption = None,
    app: Annotated[
        str | None, typer.Option("--app", help="Also draw this app's declared topology (MODULE:ATTRIBUTE).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level (info shows every request).")] = "warning",
) -> None:
    """Serve the dashboard: flows, workflow runs, dead letters, the topology map."""
    from ..dashboard import check_bind, serve

    try:
        check_bind(host, token or None)
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None
    declared = load_app(app) if app else None
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"interplay dashboard on [bold]http://{shown}:{port}[/bold] for {store}"
        + (" (token required)" if token else ""),
        highlight=False,
    )
    try:
        serve(store, host=host, port=port, bus=bus, token=token or None, app=declared, log_level=log_level)
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None


def register(app: typer.Typer) -> None:
    """Add the dashboard command."""
    app.command()(dashboard)
