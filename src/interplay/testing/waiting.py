"""Waiting on conditions with a deadline."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["wait_until"]


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    *,
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Poll ``condition`` (sync or async) until it is true.

    Raises:
        TimeoutError: naming ``message``, if it is still false after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s")
        await asyncio.sleep(interval)
