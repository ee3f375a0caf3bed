"""The coalescer that shares a transport's round trips among concurrent callers."""

from __future__ import annotations

import asyncio

import pytest

from interplay.errors import TransportError
from interplay.transports.coalesce import Coalescer, Refused


class Trips:
    """A round trip that records its batches and waits until the test lets it finish."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.go = asyncio.Event()
        self.go.set()

    async def __call__(self, items: list[int]) -> None:
        self.batches.append(items)
        await self.go.wait()
        if 13 in items:
            raise Refused("test: refused", {items.index(13): ValueError("unlucky")})


async def test_callers_arriving_during_a_round_trip_share_the_next() -> None:
    trips = Trips()
    trips.go.clear()
    coalescer = Coalescer("test", trips)
    first = asyncio.ensure_future(coalescer.submit([1]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(coalescer.submit([n])) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    trips.go.set()
    await asyncio.gather(first, *rest)
    assert trips.batches == [[1], [2, 3, 4]]


async def test_a_refused_item_fails_only_its_caller() -> None:
    coalescer = Coalescer("test", Trips())
    results = await asyncio.gather(
        coalescer.submit([1, 2]), coalescer.submit([3, 13]), coalescer.submit([4]), return_exceptions=True
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], TransportError)
    assert str(results[1]) == "test: refused: unlucky"


async def test_cancelling_before_the_round_trip_started_fails_its_callers_instead_of_hanging() -> None:
    coalescer = Coalescer("test", Trips())
    waiting = asyncio.ensure_future(coalescer.submit([1]))
    await asyncio.sleep(0)  # submitted: its round trip is scheduled, not started
    coalescer.cancel()
    with pytest.raises(TransportError, match="test: the transport was closed"):
        await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(coalescer.submit([2]), 1)  # and the next caller is served


async def test_drain_lets_the_round_trips_under_way_finish() -> None:
    trips = Trips()
    trips.go.clear()
    coalescer = Coalescer("test", trips)
    callers = [asyncio.ensure_future(coalescer.submit([n])) for n in range(3)]
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.05, trips.go.set)
    await coalescer.drain(5)
    assert [c.result() for c in callers] == [None] * 3


async def test_drain_gives_up_after_its_timeout() -> None:
    trips = Trips()
    trips.go.clear()
    coalescer = Coalescer("test", trips)
    stuck = asyncio.ensure_future(coalescer.submit([1]))
    await asyncio.sleep(0)
    await coalescer.drain(0.05)
    with pytest.raises(TransportError, match="closed"):
        await asyncio.wait_for(stuck, 1)
