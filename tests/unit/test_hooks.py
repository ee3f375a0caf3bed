"""Observers see publishes, handlings (with outcomes) and run ends, and can stamp headers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from interplay import App, Context, Reject, WorkflowContext
from interplay.message import Message
from interplay.stores.records import RunRow, SpanRecord
from interplay.tracing.hooks import Observer


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def published(self, message: Message) -> None:
        self.events.append(("published", message.type))

    @contextmanager
    def handling(self, message: Message, service: str, handler: str | None) -> Iterator[dict[str, str]]:
        self.events.append(("handling", service, message.type))
        yield {"x-observed-by": service}

    def handled(self, span: SpanRecord, queued_for: float) -> None:
        assert queued_for >= 0
        self.events.append(("handled", span.service, span.type, span.outcome))

    def run_ended(self, run: RunRow, status: str, seconds: float) -> None:
        self.events.append(("run_ended", run.workflow, status))


class Broken(Observer):
    def published(self, message: Message) -> None:
        raise RuntimeError("observers must not break the runtime")


async def test_observers_see_the_flow_and_stamp_emitted_messages(tmp_path: Path) -> None:
    app = App("observed")

    @app.service("a").on("ping", emits="pong")
    async def ping(n: int) -> int:
        if n < 0:
            raise Reject("negative")
        return n

    pong_headers: list[dict[str, str]] = []

    @app.service("c").on("pong")
    async def pong(n: int, ctx: Context) -> None:
        pong_headers.append(dict(ctx.message.headers))

    @app.service("b").command("double")
    async def double(n: int) -> int:
        return 2 * n

    @app.workflow("wf")
    async def wf(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call("b.double", n))

    seen = Recorder()
    async with app.run(store=f"sqlite:///{tmp_path / 's.db'}", observers=[Broken(), seen]) as rt:
        flow_id = await rt.publish("ping", 1)
        await rt.publish("ping", -1)
        assert await (await rt.start("wf", 4)).result(timeout=10) == 8
        await rt.settled()
        assert (await rt.trace(flow_id)).find("pong")
    assert pong_headers == [{"x-observed-by": "a"}]  # stamped by the observer of the handling that emitted it
    assert ("handled", "a", "ping", "ok") in seen.events
    assert ("handled", "a", "ping", "rejected") in seen.events
    assert ("handled", "b", "b.double", "ok") in seen.events
    assert ("run_ended", "wf", "completed") in seen.events
    assert seen.events.count(("published", "ping")) == 2
    assert ("published", "b.double") in seen.events
    assert ("published", "pong") in seen.events
