"""``interplay demo``: the seed's order flow, run for real three ways on the embedded default."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..errors import WorkflowFailed
from ..runtime import Runtime
from ..tracing.flows import Flow
from .common import StoreOption, console, run_async

__all__ = ["register"]


@dataclass
class StyleReport:
    """What one style's run measured."""

    style: str
    control: str
    handled_where: str
    flows: list[Flow] = field(default_factory=list)
    failures_handled: int = 0

    @property
    def kinds(self) -> Counter[str]:
        """Messages by kind (event, command, reply, ...) across the flows."""
        return Counter(m.kind for f in self.flows for m in f.messages)

    @property
    def p50_ms(self) -> float:
        """Median flow duration in milliseconds."""
        durations = [f.duration for f in self.flows if f.duration is not None]
        return statistics.median(durations) * 1000 if durations else 0.0


def _order(i: int, *, bad_payment: bool = False, out_of_stock: bool = False) -> object:
    from ..examples.orders import OUT_OF_STOCK, Order

    return Order(id=i, amount=-5.0 if bad_payment else 10.0 * i, item=OUT_OF_STOCK if out_of_stock else "book")


async def _choreography(rt: Runtime, ids: range, failing: int, bar: Progress) -> StyleReport:
    report = StyleReport("choreography", "distributed: each service reacts to events",
                         "in the services: payments emits payment.failed, orders cancels")
    task = bar.add_task("choreography ", total=len(ids))
    flow_ids = [await rt.publish("order.created", _order(i, bad_payment=i == failing)) for i in ids]
    for fid in flow_ids:
        await rt.wait_flow(fid, timeout=30)
        bar.advance(task)
    await rt.settled(timeout=30)
    for fid in flow_ids:
        flow = await rt.trace(fid)
        report.flows.append(flow)
        report.failures_handled += bool(flow.find("order.cancelled"))
    return report


async def _workflows(rt: Runtime, style: str, workflow: str, ids: range, failing: int | None, bar: Progress,
                     control: str, where: str) -> StyleReport:
    report = StyleReport(style, control, where)
    task = bar.add_task(f"{style:<13}", total=len(ids))
    handles = [await rt.start(workflow, _order(i, out_of_stock=i == failing)) for i in ids]
    for handle in handles:
        try:
            await handle.result(timeout=30)
        except WorkflowFailed as exc:
            report.failures_handled += exc.status == "compensated"
        bar.advance(task)
    await rt.settled(timeout=30)
    report.flows = [await rt.trace(h.flow_id) for h in handles]
    return report


def _comparison(reports: list[StyleReport]) -> Table:
    table = Table(title="the seed's comparison, filled in by this run", title_justify="left", show_lines=True)
    table.add_column("factor", style="bold")
    for r in reports:
        table.add_column(r.style)

    def row(name: str, values: list[str]) -> None:
        table.add_row(name, *values)

    row("control", [r.control for r in reports])
    plural = {"reply": "replies"}
    row("communication", [", ".join(f"{n} {plural.get(k, k + 's')}" for k, n in sorted(r.kinds.items()))
                          for r in reports])
    row("flows run", [f"{sum(f.status == 'completed' for f in r.flows)} of {len(r.flows)} completed" for r in reports])
    row("p50 flow latency", [f"{r.p50_ms:.1f} ms" for r in reports])
    row("failures handled", [f"{r.failures_handled}: {r.handled_where}" for r in reports])
    row("tracing", ["every flow as one tree (interplay trace)"] * len(reports))
    row("bottleneck / failure point", ["none: services scale as consumer groups",
                                       "none: runs leased by any number of orchestrators",
                                       "none: both of the above"][: len(reports)])
    return table


def demo(
    store: StoreOption = "sqlite:///interplay.db",
    orders: Annotated[int, typer.Option(min=2, max=10_000, help="Orders per style.")] = 5,
    trees: Annotated[int, typer.Option(help="Print the trees of at most this many flows per style.")] = 2,
) -> None:
    """Run the seed's order flow as choreography, orchestration and a mix of both."""
    from ..examples.orders import app

    failing = min(3, orders)

    async def main() -> None:
        console.print(Panel.fit(
            "[bold]interplay demo[/bold]: the seed's order flow, payment -> shipping -> notification,\n"
            f"{orders} orders in each of three styles, on {store}.\n"
            f"choreography: order {failing} has a negative amount; payments rejects it, the flow compensates.\n"
            f"orchestration: order {orders + failing}'s item is out of stock; the saga refunds the payment.\n"
            "mixed: a workflow emits order.shipped and waits for delivery.confirmed from a choreographed service.",
        ))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            async with app.run(store=store) as rt:
                reports = [
                    await _choreography(rt, range(1, orders + 1), failing, bar),
                    await _workflows(rt, "orchestration", "process_order", range(orders + 1, 2 * orders + 1),
                                     orders + failing, bar, "the workflow process_order",
                                     "in the workflow: its saga refunds the payment"),
                    await _workflows(rt, "mixed", "deliver_order", range(2 * orders + 1, 3 * orders + 1), None, bar,
                                     "the workflow deliver_order, and the delivery service",
                                     "(none failed)"),
                ]
        for report in reports:
            console.rule(f"[bold]{report.style}[/bold]")
            shown = sorted(report.flows, key=lambda f: f.status == "completed")[:trees]  # failures first
            for flow in shown:
                console.print(flow)
        console.print(_comparison(reports))
        hint = "" if store == "sqlite:///interplay.db" else f" --store {store}"
        console.print(
            f"Look again any time: [bold]interplay flows{hint}[/bold], [bold]interplay trace FLOW_ID{hint}[/bold], "
            f"[bold]interplay workflows list{hint}[/bold], [bold]interplay dlq list{hint}[/bold]",
            highlight=False,
        )

    run_async(main)


def register(app: typer.Typer) -> None:
    """Add the demo command."""
    app.command()(demo)
