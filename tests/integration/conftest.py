"""The ``bus`` fixture: a test taking it runs on every bus of tests/buses.py.

``@pytest.mark.buses("store", "memory")`` on a test (or as a module's ``pytestmark``)
narrows it to those buses; an entry may be a ``pytest.param`` carrying marks, e.g. an
``xfail`` for a known library bug on one bus.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..buses import BUS_NAMES, Bus, open_bus


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "buses(*names): run a test taking the `bus` fixture on these buses only (default: all)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bus" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("buses")
    names = marker.args if marker is not None else BUS_NAMES
    metafunc.parametrize("bus", names, indirect=True)


@pytest.fixture
async def bus(request: pytest.FixtureRequest, sqlite_url: str) -> AsyncIterator[Bus]:
    """This test's bus (see tests/buses.py), in a namespace of its own."""
    async with open_bus(request.param, sqlite_url) as opened:
        yield opened
