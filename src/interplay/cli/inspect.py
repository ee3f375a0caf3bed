"""``interplay flows``, ``interplay trace`` and ``interplay dlq``: look at a store."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated

import orjson
import typer
from rich.table import Table

from ..app import App
from ..runtime import Runtime
from ..stores import traces
from ..tracing.render import STATUS_STYLE
from .common import BusOption, StoreOption, console, fail, run_async

__all__ = ["dlq_app", "register", "tool_runtime"]

dlq_app = typer.Typer(help="Inspect, replay and drop dead letters.", no_args_is_help=True)

FLOW_STATUSES = ("running", "completed", "failed", "stuck", "compensated", "cancelled", "parked")


STORE_ONLY = "memory://"
"""The bus of commands that only read or change the store. Not INTERPLAY_BUS's broker: it
may be down exactly when one wants to look at flows and dead letters."""


def tool_runtime(store: str, bus: str | None = STORE_ONLY) -> Runtime:
    """A runtime that hosts nothing: just the store (and, for commands that send, the bus)."""
    return App("interplay-cli").run(store=store, bus=bus, services=[], orchestrator=False)


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def flows(
    store: StoreOption = "sqlite:///interplay.db",
    status: Annotated[str | None, typer.Option(help=f"Only flows in this status: {', '.join(FLOW_STATUSES)}.")] = None,
    name: Annotated[str | None, typer.Option(help="Only flows of this name.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 30,
) -> None:
    """List flows (choreographed flows and workflow runs), newest first."""
    if status is not None and status not in FLOW_STATUSES:
        raise fail(f"unknown status {status!r}; use one of {', '.join(FLOW_STATUSES)}", 2)

    if status == "stuck":
        run_async(lambda: _stuck(store, name, limit))
        return

    async def main() -> None:
        async with tool_runtime(store) as rt:
            rows = await rt.flows(status=status, name=name, limit=limit)
        table = Table(title=f"flows in {rt.store.url}", title_justify="left")
        for col in ("flow id", "name", "kind", "status", "started", "pending", "dead", "last step"):
            table.add_column(col, overflow="fold")  # ids are copied into `trace`: fold them, never cut them short
        for f in rows:
            style = STATUS_STYLE.get(f.status, "white")
            table.add_row(
                f.flow_id, f.name, f.kind, f"[{style}]{f.status}[/{style}]", _when(f.started),
                str(f.pending), str(f.dead), f.last_type or "",
            )
        console.print(table if rows else "no flows")

    run_async(main)


async def _stuck(store: str, name: str | None, limit: int) -> None:
    """Stuck flows, the longest overdue first: where each got to and whether it was announced."""
    async with tool_runtime(store) as rt:
        now = rt.clock.now()
        found = await rt.store.read(lambda tx: traces.stuck_flows(tx, now, name, limit))
    table = Table(title=f"stuck flows in {rt.store.url}", title_justify="left")
    for col in ("flow id", "name", "started", "deadline", "overdue", "last step", "pending", "dead", "announced"):
        table.add_column(col, overflow="fold")
    for s in found:
        f = s.flow
        table.add_row(
            f.flow_id, f.name, _when(f.started), _when(f.deadline), _span(now - (f.deadline or now)), f.last_type or "",
            str(f.pending), str(f.dead), _when(s.announced) if s.announced is not None else "not yet",
        )
    console.print(table if found else "no stuck flows")


def trace(
    flow_id: Annotated[str, typer.Argument(help="The flow's id (as printed by publish, start or flows).")],
    store: StoreOption = "sqlite:///interplay.db",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw records as JSON.")] = False,
) -> None:
    """Show one flow as a tree: every message, who handled it, how it went."""

    async def main() -> None:
        async with tool_runtime(store) as rt:
            flow = await rt.trace(flow_id)
        if as_json:
            data = {
                "flow_id": flow.flow_id, "name": flow.name, "status": flow.status,
                "messages": [asdict(m) for m in flow.messages],
                "spans": [asdict(s) for s in flow.spans],
            }
            typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        else:
            console.print(flow)

    run_async(main)


@dlq_app.command("list")
def dlq_list(
    store: StoreOption = "sqlite:///interplay.db",
    service: Annotated[str | None, typer.Option(help="Only this service's dead letters.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
) -> None:
    """List dead letters with their reason and last error."""

    async def main() -> None:
        async with tool_runtime(store) as rt:
            rows = await rt.dlq(limit, service=service)
        table = Table(title="dead letters", title_justify="left")
        for col in ("id", "time", "service", "type", "reason", "attempts", "error", "flow id"):
            table.add_column(col, overflow="fold")
        for d in rows:
            table.add_row(
                str(d.id), _when(d.time), d.group, d.type, d.reason, str(d.attempts), (d.error or "")[:200],
                d.flow_id or "",
            )
        console.print(table if rows else "the dead-letter queue is empty")

    run_async(main)


def _check_ids(ids: list[int], everything: bool) -> None:
    if ids and everything:
        raise fail("give ids or --all, not both", 2)
    if not ids and not everything:
        raise fail("give the dead letters' ids (see `interplay dlq list`) or --all", 2)


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    store: StoreOption = "sqlite:///interplay.db",
    bus: BusOption = None,
) -> None:
    """Send dead letters back to the service that failed them (same message id)."""
    _check_ids(ids or [], everything)

    async def main() -> None:
        async with tool_runtime(store, bus) as rt:
            chosen = ids or []
            if everything:
                chosen = [d.id for d in await rt.dlq(1_000_000)]
            taken = await rt.replay(chosen)
        for d in taken:
            console.print(f"replayed {d.id}: {d.type} -> {d.group or 'its route'} (message {d.msg_id})")
        missing = set(chosen) - {d.id for d in taken}
        if missing:
            raise fail(f"no dead letter with id(s) {sorted(missing)}")
        if not taken:
            console.print("nothing to replay")

    run_async(main)


@dlq_app.command("drop")
def dlq_drop(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Drop every dead letter.")] = False,
    store: StoreOption = "sqlite:///interplay.db",
) -> None:
    """Delete dead letters for good."""
    _check_ids(ids or [], everything)

    async def main() -> None:
        async with tool_runtime(store) as rt:
            chosen = ids or []
            if everything:
                chosen = [d.id for d in await rt.dlq(1_000_000)]
            dropped = await rt.drop(chosen)
        console.print(f"dropped {dropped} dead letter(s)")
        if dropped < len(chosen):
            raise fail(f"{len(chosen) - dropped} id(s) were not in the dead-letter queue")

    run_async(main)


def register(app: typer.Typer) -> None:
    """Add these commands to the main CLI."""
    app.command()(flows)
    app.command()(trace)
    app.add_typer(dlq_app, name="dlq")
