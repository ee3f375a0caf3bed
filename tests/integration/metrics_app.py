"""The app ``interplay run --metrics-port`` hosts in tests/integration/test_metrics.py.

``job.requested`` with a positive number is handled; a negative one is rejected (DLQ at
once); zero fails every time (one retry, then the DLQ). The ``double`` workflow calls
``worker.double``.
"""

from __future__ import annotations

from interplay import App, Reject, Retry, WorkflowContext

app = App("measured")
worker = app.service("worker")


@worker.on("job.requested", retry=Retry(attempts=2, backoff=0.01, jitter=False))
async def do_job(n: int) -> None:
    if n < 0:
        raise Reject("negative")
    if n == 0:
        raise RuntimeError("zero never works")


@worker.command("double")
async def double(n: int) -> int:
    return 2 * n


@app.workflow("twice")
async def twice(ctx: WorkflowContext, n: int) -> int:
    return int(await ctx.call("worker.double", n))
