"""A small app for the dashboard tests: a failure whose cause a test fixes from outside.

``job.requested`` fails (straight to the dead-letter queue, no retry) until the file
its payload names exists; ``wait_forever`` is a run that waits until cancelled.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from interplay import App, Retry, WorkflowContext

app = App("browsertest")
jobs = app.service("jobs")


class Job(BaseModel):
    """A unit of work; ``marker`` is the file whose existence fixes it; ``note`` is shown in errors."""

    id: int
    marker: str
    note: str = ""

    def fixed(self) -> bool:
        """Whether the marker file exists (a stat: cheap enough inside a handler)."""
        return Path(self.marker).exists()


@jobs.on("job.requested", emits="job.done", retry=Retry(attempts=1))
async def do_job(job: Job) -> Job:
    """Fail until the marker file exists."""
    if not job.fixed():
        raise RuntimeError(f"job {job.id}: marker missing {job.note}")
    return job


app.flow("job", starts="job.requested", ends="job.done", within=300)


@app.workflow("wait_forever")
async def wait_forever(ctx: WorkflowContext, job: Job) -> str:
    """Wait for an event nobody sends: a run that stays running until cancelled."""
    await ctx.wait_for("never.happens", timeout=3600)
    return "woke up"
