"""Shared fixtures: per-test stores (servers: see tests/servers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite store file for this test."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def repo_root() -> Path:
    """The repository root (for running examples and scripts)."""
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests pass URLs explicitly; a developer's INTERPLAY_* must not redirect them.
    monkeypatch.delenv("INTERPLAY_STORE", raising=False)
    monkeypatch.delenv("INTERPLAY_BUS", raising=False)
