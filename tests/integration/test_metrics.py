"""``interplay run --metrics-port``: Prometheus metrics over HTTP, on loopback only, that follow the work.

A child ``interplay run`` hosts tests/integration/metrics_app.py; this process publishes
and starts a workflow through the shared SQLite store (its own queue is the bus) and
scrapes the child's ``/metrics`` before and after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from interplay.testing import wait_until
from interplay.tracing.metrics import MetricsObserver

from .metrics_app import app

REPO = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``interplay run ARGS`` as a child process, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "interplay", "run", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words))
    return found


@pytest.mark.slow  # a child process
async def test_metrics_follow_the_work_and_are_served_on_loopback_only(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log_path = tmp_path / "run.log"
    job = {"service": "worker", "type": "job.requested"}
    child: subprocess.Popen[bytes] | None = None
    try:
        # opened first: the store file exists before the child shares it
        async with app.run(store=store, services=[], orchestrator=False) as rt:
            child = started = spawn(
                ["tests.integration.metrics_app:app", "--store", store, "--metrics-port", str(port)], log_path
            )

            async def serving() -> bool:
                assert started.poll() is None, log_path.read_text()
                try:
                    await asyncio.to_thread(scrape, url)
                except OSError:
                    return False
                return True

            await wait_until(serving, timeout=30, interval=0.05, message="/metrics answering")
            before = await asyncio.to_thread(scrape, url)
            assert listening_addresses(port) == {"127.0.0.1"}

            flows = [await rt.publish("job.requested", n) for n in (1, 2, 3, -1, 0)]
            run = await rt.start("twice", 21)
            assert await run.result(timeout=20) == 42
            for flow_id in flows:
                await rt.wait_flow(flow_id, timeout=20)

            async def counted() -> bool:
                # counters move as the child works; the store's gauges are re-read at most once a second
                now = await asyncio.to_thread(scrape, url)
                handled = [value(now, "interplay_messages_handled_total", **job, outcome=outcome)
                           for outcome in ("ok", "rejected", "retry", "dead")]
                return (
                    handled == [3, 1, 1, 1]
                    and value(now, "interplay_workflows_ended_total", workflow="twice", status="completed") == 1
                    and value(now, "interplay_workflow_runs", status="completed") == 1
                )

            await wait_until(counted, timeout=20, interval=0.05, message="the handlings counted")
            after = await asyncio.to_thread(scrape, url)
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
        if child is not None:
            await asyncio.to_thread(child.wait, 30)

    def changed(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert changed("interplay_messages_handled_total", **job, outcome="ok") == 3
    assert changed("interplay_messages_handled_total", **job, outcome="rejected") == 1
    assert changed("interplay_messages_handled_total", **job, outcome="retry") == 1
    assert changed("interplay_messages_handled_total", **job, outcome="dead") == 1
    assert changed("interplay_messages_handled_total", service="worker", type="worker.double", outcome="ok") == 1
    assert changed("interplay_messages_failed_total", **job) == 3
    assert changed("interplay_messages_retried_total", **job) == 1
    assert changed("interplay_messages_dead_lettered_total", **job, outcome="rejected") == 1
    assert changed("interplay_messages_dead_lettered_total", **job, outcome="dead") == 1
    assert changed("interplay_handler_duration_seconds_count", **job) == 6  # every attempt
    assert changed("interplay_queue_lag_seconds_count", service="worker") == 7  # 6 attempts + the command
    assert changed("interplay_queue_lag_seconds_sum", service="worker") > 0
    assert changed("interplay_queue_lag_seconds_bucket", service="worker", le="+Inf") == 7
    # lag counts from the message's creation: the failing job's retry waited out its 10 ms backoff first
    assert changed("interplay_queue_lag_seconds_bucket", service="worker", le="0.01") <= 6
    assert changed("interplay_messages_published_total", kind="command", type="worker.double") == 1
    assert changed("interplay_workflows_ended_total", workflow="twice", status="completed") == 1
    assert changed("interplay_workflow_duration_seconds_count", workflow="twice") == 1
    # gauges: read from the store, so they see what this process published too
    assert value(before, "interplay_workflow_runs", status="completed") == 0
    assert value(after, "interplay_workflow_runs", status="completed") == 1
    assert value(after, "interplay_workflow_runs", status="running") == 0
    assert value(after, "interplay_dead_letters", service="worker") == 2
    assert value(after, "interplay_flows", status="failed") == 2
    assert value(after, "interplay_flows", status="completed") == 4  # 3 jobs and the workflow's flow
    assert value(after, "interplay_flows", status="running") == 0
    output = log_path.read_text()
    assert f"metrics: http://127.0.0.1:{port}/metrics" in output
    assert child.returncode == 0, output


async def test_an_app_serves_its_own_metrics_and_reads_gauges_on_scrape(sqlite_url: str) -> None:
    metrics = MetricsObserver()
    async with app.run(store=sqlite_url, observers=[metrics]) as rt:
        with metrics.serve(rt, port=0) as server:  # any free port, on loopback
            assert server.host == "127.0.0.1"
            assert await (await rt.start("twice", 2)).result(timeout=10) == 4

            async def ended() -> bool:
                # the scrape runs in a thread of its own and reads the store through this loop
                now = await asyncio.to_thread(scrape, server.url)
                return value(now, "interplay_workflow_runs", status="completed") == 1

            await wait_until(ended, timeout=10, interval=0.05, message="the run counted")
            samples = await asyncio.to_thread(scrape, server.url)
        with pytest.raises(urllib.error.URLError, match="refused"):  # closed: the port is free again
            await asyncio.to_thread(scrape, server.url)
    assert value(samples, "interplay_workflows_ended_total", workflow="twice", status="completed") == 1
    assert value(samples, "interplay_messages_handled_total", service="worker", type="worker.double",
                 outcome="ok") == 1
    assert value(samples, "interplay_flows", status="stuck") == 0  # every status reported, 0 when none
