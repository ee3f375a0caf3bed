"""Group commit for a transport's round trips: what concurrent callers submit while one
round trip is under way goes together in the next (acks, publishes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

from ..errors import TransportError

__all__ = ["Coalescer", "Refused"]

T = TypeVar("T")


class Refused(TransportError):
    """Some items of a coalesced round trip failed (by position); the others went through.

    Attributes:
        what: what failed, e.g. ``"redis: publish failed"``; each caller's error starts with it.
        failed: the error of each failed item, by its position in the round trip.
    """

    def __init__(self, what: str, failed: Mapping[int, BaseException]) -> None:
        super().__init__(f"{what}: {next(iter(failed.values()), '')}")
        self.what = what
        self.failed = failed


class Coalescer(Generic[T]):
    """Runs what concurrent callers submit in one round trip (a group commit for acks).

    ``run`` gets every item submitted meanwhile, in submission order. If it fails, every
    caller gets the error - unless it is :class:`Refused`: then only the callers whose
    items it names do, each with a :class:`TransportError` of its own.
    """

    def __init__(self, name: str, run: Callable[[list[T]], Awaitable[None]]) -> None:
        self._name = name
        self._run = run
        self._queue: list[tuple[Sequence[T], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, items: Sequence[T]) -> None:
        """Have ``items`` go in the next round trip; return when it is done.

        Raises:
            TransportError: the round trip (or this caller's part of it) failed, or the
                transport was closed meanwhile.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        batch: list[tuple[Sequence[T], asyncio.Future[None]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._run([item for items, _ in batch for item in items])
                except Refused as exc:
                    start = 0
                    for items, future in batch:
                        mine = [exc.failed[i] for i in range(start, start + len(items)) if i in exc.failed]
                        start += len(items)
                        if future.done():
                            continue
                        if mine:
                            error = TransportError(f"{exc.what}: {mine[0]}")
                            error.__cause__ = mine[0]
                            future.set_exception(error)
                        else:
                            future.set_result(None)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            for _, future in batch:  # only pending when cancelled (transport closed)
                if not future.done():
                    future.set_exception(TransportError(f"{self._name}: the transport was closed"))

    async def drain(self, timeout: float) -> None:
        """Let the round trips under way and queued finish (closing), at most ``timeout``
        seconds; then :meth:`cancel` what is left."""
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout)
        self.cancel()

    def cancel(self) -> None:
        """Stop the round trip under way; its callers and those waiting fail (closing)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # its finally fails the batch it holds (if it ever started)
        queued, self._queue = self._queue, []
        for _, future in queued:  # a task cancelled before its first step runs no finally
            if not future.done():
                future.set_exception(TransportError(f"{self._name}: the transport was closed"))
