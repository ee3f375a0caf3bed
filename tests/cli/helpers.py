"""Driving the ``interplay`` CLI in tests: in this process, and as real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from typer.testing import CliRunner, Result

from interplay.cli.main import cli

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
ORDERS = "interplay.examples.orders:app"
APPS = "tests.cli.apps:app"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
COLUMNS = 200
"""Wide enough that no table folds an id: rows are one line each, ids whole."""


def invoke(*args: str, env: dict[str, str | None] | None = None, columns: int = COLUMNS) -> Result:
    """Run ``interplay ARGS`` in this process; INTERPLAY_* are unset unless ``env`` sets them."""
    base: dict[str, str | None] = {"COLUMNS": str(columns), "INTERPLAY_STORE": None, "INTERPLAY_BUS": None}
    return CliRunner().invoke(cli, list(args), env={**base, **(env or {})})


def ok(*args: str, env: dict[str, str | None] | None = None, columns: int = COLUMNS) -> str:
    """Run a command that must succeed; its output (stdout and stderr)."""
    result = invoke(*args, env=env, columns=columns)
    assert result.exit_code == 0, f"interplay {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    assert result.exception is None, repr(result.exception)
    return result.output


def fails(code: int, *args: str, env: dict[str, str | None] | None = None) -> str:
    """Run a command that must fail cleanly with ``code``; its output, whitespace collapsed."""
    result = invoke(*args, env=env)
    # CliRunner catches stray exceptions: a clean failure is a SystemExit, never anything else.
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}\n{result.output}"
    assert result.exit_code == code, f"interplay {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    return flat(result.output)


def flat(text: str) -> str:
    """``text`` with every run of whitespace (line wraps included) as one space."""
    return " ".join(text.split())


def rows(output: str) -> list[list[str]]:
    """The data rows of the rich tables in ``output``, as lists of stripped cells."""
    found = []
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            if cells and cells[0]:
                found.append(cells)
    return found


def new_store(directory: Path, name: str = "store.db") -> str:
    """A SQLite store URL in ``directory``, created before any process shares it.

    Two processes that create one new store at the same instant can fail with
    "database is locked" (see ``test_cli.py::test_opening_a_new_store_waits_for_its_creator``),
    so the tests that start runner processes create the file first.
    """
    url = f"sqlite:///{directory / name}"
    ok("flows", "--store", url)
    return url


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Call ``probe`` until it returns something truthy; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(pause)  # between two looks at the condition, not instead of one
        pause = min(pause * 2, 0.25)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m interplay``: no developer INTERPLAY_*, wide and unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERPLAY_")}
    env.update(COLUMNS=str(COLUMNS), PYTHONUNBUFFERED="1", **extra)
    return env


def interplay(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m interplay ARGS`` to the end."""
    return subprocess.run(
        [sys.executable, "-m", "interplay", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
        text=True, timeout=timeout, check=False,
    )


@dataclass
class Runner:
    """An ``interplay run`` process; its stdout and stderr go to ``log``."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """Everything it printed so far."""
        return self.log.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM it and wait for it to exit; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"interplay run ignored SIGTERM for {timeout}s:\n{self.output()}") from None


@contextmanager
def running(target: str, store: str, log: Path, *options: str) -> Iterator[Runner]:
    """``interplay run TARGET --store STORE OPTIONS`` in a process, up and hosting, stopped at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interplay", "run", target, "--store", store, *options],
            cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
        )
    runner = Runner(proc, log)
    try:
        wait_until(lambda: "hosting" in runner.output() or proc.poll() is not None, "runner start-up")
        assert proc.poll() is None, f"interplay run exited {proc.returncode}:\n{runner.output()}"
        yield runner
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
