"""WorkflowHandle: a client's grip on one workflow run."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..errors import NotFound, WorkflowFailed
from ..stores.records import JournalEntry, RunRow
from ..stores.workflows import TERMINAL

ENDED = TERMINAL | {"parked"}

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["WorkflowHandle"]


class WorkflowHandle:
    """A workflow run, started or looked up through a runtime.

    Attributes:
        id: the run id (starting again with the same id returns the same run).
        flow_id: the flow the run belongs to (``rt.trace(handle.flow_id)``).
        workflow: the workflow's name.
    """

    def __init__(self, runtime: Runtime, run: RunRow) -> None:
        self._rt = runtime
        self.id = run.run_id
        self.flow_id = run.flow_id
        self.workflow = run.workflow

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.workflow!r}, id={self.id!r})"

    async def run(self) -> RunRow:
        """The run's record as stored now."""
        row = await self._rt.store.get_run(self.id)
        if row is None:
            raise NotFound(f"no workflow run {self.id!r}")
        return row

    async def status(self) -> str:
        """``pending``, ``running``, ``completed``, ``failed``, ``compensated``, ``cancelled`` or ``parked``."""
        return (await self.run()).status

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end; its result.

        Raises:
            WorkflowFailed: it ended failed, compensated, cancelled, or parked.
            TimeoutError: it is still going after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        engine = self._rt.engine
        while True:
            # Ended or executing here: known without asking the store.
            row = engine.ended_here(self.id)
            if row is None and engine.active_state(self.id) is None:
                row = await self.run()
            if row is not None and row.status in ENDED:
                return self._outcome(row)
            status = "running" if row is None else row.status
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"workflow run {self.id} still {status} after {timeout}s")
            # Executing here: woken the moment it ends; elsewhere: by the runtime's one
            # watcher, which asks the store about every awaited run at once.
            await engine.watch(self.id, remaining)

    def _outcome(self, row: RunRow) -> Any:
        if row.status == "completed":
            spec = self._rt.app.workflows.get(row.workflow)
            return row.result if spec is None else spec.result.validate(row.result)
        raise WorkflowFailed(row.run_id, row.status, row.error_type or row.status, row.error or "")

    async def cancel(self) -> bool:
        """Cancel the run: its current step raises WorkflowCancelled, its saga compensates.

        Returns False when the run had already ended.
        """
        return await self._rt.engine.cancel(self.id) is not None

    async def journal(self) -> list[JournalEntry]:
        """The run's journal, step by step."""
        return await self._rt.store.load_journal(self.id)
