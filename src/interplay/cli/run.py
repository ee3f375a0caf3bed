"""``interplay run`` (host services) and ``interplay publish`` (send one event)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from ..errors import ConfigurationError
from ..runtime import Runtime
from ..service import check_name
from .common import BusOption, StoreOption, console, fail, load_app, parse_json, run_async
from .observe import MetricsPortOption, Observability, OtelOption

__all__ = ["register"]


def run(
    target: Annotated[str, typer.Argument(help="The app, as MODULE:ATTRIBUTE (e.g. examples.orders:app).")],
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help="Host this service (repeatable; default: all).")
    ] = None,
    store: StoreOption = "sqlite:///interplay.db",
    bus: BusOption = None,
    orchestrator: Annotated[bool, typer.Option(help="Also run workflows in this process.")] = True,
    lease: Annotated[
        float, typer.Option(help="Seconds before an unacknowledged message is redelivered (visibility timeout).")
    ] = 30.0,
    prefetch: Annotated[int, typer.Option(help="Messages each service holds in flight at most.")] = 128,
    run_lease: Annotated[
        float, typer.Option(help="Seconds before another orchestrator takes over a run whose owner went silent.")
    ] = 5.0,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "WARNING",
    metrics_port: MetricsPortOption = None,
    otel: OtelOption = None,
) -> None:
    """Host services (and workflows) until stopped with Ctrl-C or SIGTERM."""
    if log_level.upper() not in logging.getLevelNamesMapping():
        raise fail(f"unknown log level {log_level!r}; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL", 2)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_app(target)
    observing = Observability(otel=otel, metrics_port=metrics_port, bus=bus)  # after the app set up any OTel SDK

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)  # `kill -USR1 PID`: where is everything waiting?
        async with app.run(
            store=store, bus=bus, services=service, orchestrator=orchestrator, lease=lease, prefetch=prefetch,
            run_lease=run_lease, observers=observing.observers,
        ) as rt, observing.serving(rt):
            hosted = ", ".join(rt.hosted) or "no services"
            console.print(
                f"[bold]{app.name}[/bold]: hosting {hosted}"
                + (" + workflows" if orchestrator and app.workflows else "")
                + f" on {rt.store.url}" + (f" via {bus}" if bus else "")
                + f" (instance {rt.instance})",
                highlight=False,
            )
            if console.is_terminal:
                with Live(_status(rt), console=console, refresh_per_second=2) as live:
                    while not stop.is_set():
                        try:
                            await asyncio.wait_for(stop.wait(), 0.5)
                        except TimeoutError:
                            live.update(_status(rt))
            else:
                await stop.wait()
            console.print("stopping: letting handlers in flight finish...")
        console.print("stopped")

    run_async(main)


def _dump_tasks() -> None:
    """Print every asyncio task's stack to stderr (a live process's answer to "what is it waiting for?")."""
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} tasks ---", file=sys.stderr)
    for task in tasks:
        print(f"{task.get_name()}:", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def _status(rt: Runtime) -> Table:
    table = Table(box=None, show_header=True)
    table.add_column("service")
    table.add_column("handled", justify="right")
    table.add_column("in flight", justify="right")
    for name, consumer in rt.consumers.items():
        table.add_row(name, str(consumer.handled), str(consumer.inflight))
    return table


def publish(
    target: Annotated[str, typer.Argument(help="The app, as MODULE:ATTRIBUTE.")],
    event: Annotated[str, typer.Argument(help="The event type, e.g. order.created.")],
    payload: Annotated[str, typer.Argument(help="The payload as JSON.")] = "null",
    store: StoreOption = "sqlite:///interplay.db",
    bus: BusOption = None,
    flow_id: Annotated[str | None, typer.Option(help="Join this flow instead of starting one.")] = None,
    wait: Annotated[
        float | None, typer.Option(help="Wait up to this many seconds for the flow to finish, then show it.")
    ] = None,
) -> None:
    """Publish one event and print its flow id (with --wait, its tree; exit 1 unless it completed)."""
    app = load_app(target)
    data = parse_json(payload)
    try:
        check_name("event", event)
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None

    async def main() -> None:
        async with app.run(store=store, bus=bus, services=[], orchestrator=False) as rt:
            fid = await rt.publish(event, data, flow_id=flow_id)
            console.print(fid, highlight=False)
            if wait is not None:
                try:
                    summary = await rt.wait_flow(fid, timeout=wait)
                except TimeoutError as exc:
                    console.print(await rt.trace(fid))
                    raise fail(f"timed out: {exc}; are its services running? (interplay run {target})") from None
                # A failed flow may still be compensating: show its tree once quiet.
                loop = asyncio.get_running_loop()
                quiet_by = loop.time() + min(wait, 5.0)
                while loop.time() < quiet_by:
                    row = await rt.store.flow(fid, rt.clock.now())
                    if row is None or row.pending <= 0:
                        break
                    await asyncio.sleep(0.02)
                console.print(await rt.trace(fid))
                if summary.status != "completed":
                    raise fail(f"flow {fid} {summary.status}")

    run_async(main)


def register(app: typer.Typer) -> None:
    """Add these commands to the main CLI."""
    app.command()(run)
    app.command()(publish)
