"""``interplay demo``: the seed's order flow, run for real on the embedded default."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..runtime import Runtime
from ..tracing.flows import Flow
from .common import StoreOption, console, run_async

__all__ = ["register"]


@dataclass
class StyleReport:
    """What one style's run measured."""

    style: str
    flows: list[Flow] = field(default_factory=list)
    failures_handled: int = 0
    handled_where: str = ""

    @property
    def messages(self) -> int:
        """Messages published across the flows."""
        return sum(len(f.messages) for f in self.flows)

    @property
    def p50_ms(self) -> float:
        """Median flow duration in milliseconds."""
        durations = [f.duration for f in self.flows if f.duration is not None]
        return statistics.median(durations) * 1000 if durations else 0.0


async def _choreography(rt: Runtime, orders: int, failing: int, progress: Progress) -> StyleReport:
    from ..examples.orders import Order

    report = StyleReport("choreography", handled_where="payments emits payment.failed; orders cancels the order")
    task = progress.add_task("choreography: orders", total=orders)
    flow_ids = []
    for i in range(1, orders + 1):
        amount = -5.0 if i == failing else 10.0 * i
        flow_ids.append(await rt.publish("order.created", Order(id=i, amount=amount)))
    for fid in flow_ids:
        await rt.wait_flow(fid, timeout=30)
        progress.advance(task)
    await rt.settled(timeout=30)
    for fid in flow_ids:
        flow = await rt.trace(fid)
        report.flows.append(flow)
        if flow.status == "failed" and flow.find("order.cancelled"):
            report.failures_handled += 1
    return report


def _summary(reports: list[StyleReport]) -> Table:
    table = Table(title="what this run measured", title_justify="left")
    for col in ("style", "flows", "completed", "failed", "messages", "p50 flow latency", "failures handled", "where"):
        table.add_column(col)
    for r in reports:
        completed = sum(f.status == "completed" for f in r.flows)
        failed = len(r.flows) - completed
        table.add_row(
            r.style, str(len(r.flows)), str(completed), str(failed), str(r.messages), f"{r.p50_ms:.1f} ms",
            str(r.failures_handled), r.handled_where,
        )
    return table


def demo(
    store: StoreOption = "sqlite:///interplay.db",
    orders: Annotated[int, typer.Option(min=2, max=10_000, help="How many orders to run.")] = 5,
    trees: Annotated[int, typer.Option(help="Print the trees of at most this many flows per style.")] = 5,
) -> None:
    """Run the seed's order flow (payment -> shipping -> notification), one order failing."""
    from ..examples.orders import app

    failing = min(3, orders)

    async def main() -> None:
        console.print(Panel.fit(
            f"[bold]interplay demo[/bold]: {orders} orders through payments -> shipping -> notification\n"
            f"order {failing} has a negative amount: payments rejects it and the flow compensates.\n"
            f"store: {store}",
        ))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            async with app.run(store=store) as rt:
                reports = [await _choreography(rt, orders, failing, bar)]
        for report in reports:
            console.rule(f"[bold]{report.style}[/bold]")
            for flow in report.flows[:trees]:
                console.print(flow)
        console.print(_summary(reports))
        console.print(
            "Look again any time: [bold]interplay flows[/bold], [bold]interplay trace FLOW_ID[/bold], "
            "[bold]interplay dlq list[/bold]"
            + ("" if store == "sqlite:///interplay.db" else f" (with --store {store})"),
            highlight=False,
        )

    run_async(main)


def register(app: typer.Typer) -> None:
    """Add the demo command."""
    app.command()(demo)
