"""A small app for the CLI tests: failures whose cause a test can fix from outside.

Every payload names a marker file; whether it exists is the "cause" a test fixes
(by creating or deleting it) between two CLI commands, in another process.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from interplay import App, Retry, WorkflowContext

app = App("clitest")
fragile = app.service("fragile")


class Job(BaseModel):
    """A unit of work; ``marker`` is the file the handlers look at."""

    id: int
    marker: str

    def fixed(self) -> bool:
        """Whether the marker file exists (a stat: cheap enough to do inside a handler)."""
        return Path(self.marker).exists()


@fragile.on("job.requested", emits="job.done", retry=Retry(attempts=1))
async def do_job(job: Job) -> Job:
    """Fail (to the dead-letter queue, no retry) until the marker file exists."""
    if not job.fixed():
        raise RuntimeError(f"job {job.id}: {job.marker} is missing")
    return job


app.flow("job", starts="job.requested", ends="job.done", within=60)


def _noted(job_id: int) -> int:
    return job_id


@app.workflow("wait_forever")
async def wait_forever(ctx: WorkflowContext, job: Job) -> str:
    """Wait for an event nobody sends: a run that stays running until cancelled."""
    await ctx.wait_for("never.happens", timeout=3600)
    return "woke up"


@app.workflow("shifty")
async def shifty(ctx: WorkflowContext, job: Job) -> str:
    """Its first step's name depends on the marker: changing it diverges replay (the run parks)."""
    name = "after_fix" if job.fixed() else "before_fix"
    await ctx.step(_noted, job.id, name=name)
    await ctx.wait_for("never.happens", timeout=3600)
    return "woke up"
