"""``interplay start`` and ``interplay workflows list|show|cancel|resume``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import orjson
import typer
from rich.table import Table

from ..errors import NotFound, WorkflowFailed
from ..stores.records import JournalEntry
from ..tracing.render import STATUS_STYLE
from ..workflow.context import SUB
from .common import BusOption, StoreOption, console, fail, load_app, parse_json, run_async
from .inspect import tool_runtime

__all__ = ["register", "workflows_app"]

workflows_app = typer.Typer(help="List, inspect, cancel and resume workflow runs.", no_args_is_help=True)
RUN_STATUSES = ("pending", "running", "completed", "failed", "compensated", "cancelled", "parked")


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def start(
    target: Annotated[str, typer.Argument(help="The app, as MODULE:ATTRIBUTE.")],
    workflow: Annotated[str, typer.Argument(help="The workflow's name.")],
    payload: Annotated[str, typer.Argument(help="Its input as JSON.")] = "null",
    run_id: Annotated[str | None, typer.Option("--id", help="The run id (starting twice returns one run).")] = None,
    wait: Annotated[float | None, typer.Option(help="Wait up to this many seconds for the result.")] = None,
    store: StoreOption = "sqlite:///interplay.db",
    bus: BusOption = None,
) -> None:
    """Start a workflow run and print its id (its result with --wait)."""
    app = load_app(target)
    data = parse_json(payload)

    async def main() -> None:
        async with app.run(store=store, bus=bus, services=[], orchestrator=False) as rt:
            handle = await rt.start(workflow, data, id=run_id)
            console.print(handle.id, highlight=False)
            if wait is not None:
                try:
                    result = await handle.result(timeout=wait)
                except WorkflowFailed as exc:
                    console.print(await rt.trace(handle.flow_id))
                    raise fail(f"run {handle.id} {exc.status}: {exc.error_type}: {exc.error}") from None
                except TimeoutError as exc:
                    # Nothing here runs workflows: a run still pending means no orchestrator took it.
                    pending = await handle.status() == "pending"
                    hint = f"; is an orchestrator running? (interplay run {target})" if pending else ""
                    raise fail(f"timed out: {exc}{hint}") from None
                console.print(await rt.trace(handle.flow_id))
                typer.echo(orjson.dumps(result).decode())

    run_async(main)


@workflows_app.command("list")
def list_runs(
    store: StoreOption = "sqlite:///interplay.db",
    status: Annotated[str | None, typer.Option(help=f"Only runs in this status: {', '.join(RUN_STATUSES)}.")] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 30,
) -> None:
    """List workflow runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise fail(f"unknown status {status!r}; use one of {', '.join(RUN_STATUSES)}", 2)

    async def main() -> None:
        async with tool_runtime(store) as rt:
            runs = await rt.workflows(status=status, workflow=workflow, limit=limit)
        table = Table(title="workflow runs", title_justify="left")
        for col in ("run id", "workflow", "status", "created", "updated", "owner", "error"):
            table.add_column(col, overflow="fold")
        for r in runs:
            style = STATUS_STYLE.get(r.status, "white")
            table.add_row(r.run_id, r.workflow, f"[{style}]{r.status}[/{style}]", _when(r.created), _when(r.updated),
                          r.owner or "", f"{r.error_type}: {r.error}" if r.error else "")
        console.print(table if runs else "no workflow runs")

    run_async(main)


def _step(entry: JournalEntry) -> str:
    seq, sub = divmod(entry.seq, SUB)
    return str(seq) if sub == 0 else f"{seq}.{sub}"


@workflows_app.command("show")
def show(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    store: StoreOption = "sqlite:///interplay.db",
) -> None:
    """Show a run: its status, its journal step by step, and its flow as a tree."""

    async def main() -> None:
        async with tool_runtime(store) as rt:
            handle = await rt.workflow(run_id)
            run = await handle.run()
            journal = await handle.journal()
            try:
                flow = await rt.trace(run.flow_id)
            except NotFound:
                flow = None
        style = STATUS_STYLE.get(run.status, "white")
        console.print(f"[bold]{run.workflow}[/bold] {run.run_id}  [{style}]{run.status}[/{style}]", highlight=False)
        if run.error:
            console.print(f"[red]{run.error_type}: {run.error}[/red]", highlight=False)
        if run.status == "completed":
            console.print(f"result: {orjson.dumps(run.result).decode()}", highlight=False)
        table = Table(title="journal", title_justify="left")
        for col in ("step", "kind", "name", "status", "started", "took", "result / error"):
            table.add_column(col, overflow="fold")
        for e in journal:
            took = "" if e.ended is None else f"{(e.ended - e.started) * 1000:.1f}ms"
            outcome = f"{e.error_type}: {e.error}" if e.error else orjson.dumps(e.data).decode()[:120]
            table.add_row(_step(e), e.kind, e.name, e.status, _when(e.started), took, outcome)
        console.print(table)
        if flow is not None:
            console.print(flow)

    run_async(main)


@workflows_app.command("cancel")
def cancel(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    store: StoreOption = "sqlite:///interplay.db",
    bus: BusOption = None,
) -> None:
    """Cancel a run: its current step raises WorkflowCancelled and its saga compensates."""

    async def main() -> None:
        async with tool_runtime(store, bus) as rt:
            handle = await rt.workflow(run_id)
            if not await handle.cancel():
                raise fail(f"run {run_id} is already {await handle.status()}")
        console.print(f"cancellation of {run_id} requested")

    run_async(main)


@workflows_app.command("resume")
def resume(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    store: StoreOption = "sqlite:///interplay.db",
) -> None:
    """Let a parked run (its replay diverged) run again once its code is fixed."""

    async def main() -> None:
        async with tool_runtime(store) as rt:
            if not await rt.resume(run_id):
                status = await (await rt.workflow(run_id)).status()
                raise fail(f"run {run_id} is {status}, not parked")
        console.print(f"{run_id} resumed: an orchestrator will pick it up")

    run_async(main)


def register(app: typer.Typer) -> None:
    """Add these commands to the main CLI."""
    app.command()(start)
    app.add_typer(workflows_app, name="workflows")
