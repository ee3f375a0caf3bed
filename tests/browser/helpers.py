"""Processes, HTTP requests and store look-ups for the dashboard tests."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
IN_CI = bool(os.environ.get("CI"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
"""Debian's chromium (packages chromium and chromium-driver); ``CHROMIUM=path`` to use another."""
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOKEN = "user@corp.com-9f8e7d6c5b4a3210"
"""The token of the dashboard served beyond loopback (shaped like an identity, for S3's exact-match test)."""


def env(**extra: str) -> dict[str, str]:
    """The environment of a child ``interplay``: no developer INTERPLAY_*, unbuffered."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INTERPLAY_")}
    clean.update(PYTHONUNBUFFERED="1", COLUMNS="200", **extra)
    return clean


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Call ``probe`` until it returns something truthy; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(pause)  # between two looks at the condition
        pause = min(pause * 2, 0.25)


def demo_store(directory: Path) -> str:
    """Run ``interplay demo`` into a new SQLite store in ``directory``; its URL."""
    url = f"sqlite:///{directory / 'demo.db'}"
    done = subprocess.run([sys.executable, "-m", "interplay", "demo", "--store", url], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return url


def interplay_process(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m interplay ARGS`` in the background, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "interplay", *args], cwd=REPO, env=env(**(extra_env or {})),
                                stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Runner:
    """An ``interplay run`` process."""

    proc: subprocess.Popen[bytes]
    log: Path

    def wait_until_hosting(self) -> None:
        """Wait for its start-up line; fail if it exits."""
        wait_until(lambda: "hosting" in self.log.read_text() or self.proc.poll() is not None, "runner start-up")
        assert self.proc.poll() is None, self.log.read_text()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            address: str = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@dataclass
class Response:
    """What an HTTP request got back."""

    status: int
    headers: http.client.HTTPMessage
    body: str

    def cookies(self) -> dict[str, str]:
        """The cookies it set (name -> value)."""
        found = {}
        for header in self.headers.get_all("set-cookie") or []:
            name, _, rest = header.partition("=")
            found[name] = rest.split(";", 1)[0]
        return found


@dataclass
class Dashboard:
    """A running ``interplay dashboard``: where to reach it."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: str | None = None) -> Response:
        """One HTTP request, redirects not followed."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            got = conn.getresponse()
            return Response(got.status, got.headers, got.read().decode("utf-8", "replace"))
        finally:
            conn.close()


@contextmanager
def start_dashboard(store: str, log: Path, *, host: str = "127.0.0.1", connect: str | None = None,
                    env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[Dashboard]:
    """``interplay dashboard`` in a process on a free port, up and answering; stopped at the end."""
    port = free_port()
    proc = interplay_process(["dashboard", "--store", store, "--host", host, "--port", str(port), *args], log, env)
    dash = Dashboard(proc, connect or host, port, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard exited {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection((dash.host, port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(up, "dashboard listening")
        yield dash
    finally:
        stop_process(proc)


def in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end on its own event loop (the browser's sync API owns this thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def publish_job(store: str, job: dict[str, Any]) -> str:
    """Publish ``job.requested`` into the store; the new flow's id."""
    from .apps import app

    async def main() -> str:
        async with app.run(store=store, services=[], orchestrator=False) as rt:
            return await rt.publish("job.requested", job)

    return in_thread(main)


def start_run(store: str, workflow: str, job: dict[str, Any]) -> str:
    """Start a workflow run (the runner's orchestrator executes it); its id."""
    from .apps import app

    async def main() -> str:
        async with app.run(store=store, services=[], orchestrator=False) as rt:
            return (await rt.start(workflow, job)).id

    return in_thread(main)


def query(store: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the SQLite store."""
    db = sqlite3.connect(f"file:{store.removeprefix('sqlite:///')}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def dead_letter_of(store: str, flow_id: str) -> int | None:
    """The id of the flow's dead letter, once it has one."""
    rows = query(store, "SELECT id FROM ip_dlq WHERE flow_id = ?", (flow_id,))
    return int(rows[0][0]) if rows else None
