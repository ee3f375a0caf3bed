"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .. import pg
from ..servers import require


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new database on the shared PostgreSQL server, dropped after the test."""
    require("postgres")
    with pg.database("interplay_e2e") as url:
        yield url
