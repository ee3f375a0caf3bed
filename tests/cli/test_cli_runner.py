"""The CLI against a real ``interplay run`` process: handling, signals, replays, parked runs.

Every runner is ``python -m interplay run ...`` in its own process on a SQLite file
in ``tmp_path``; the commands that talk to it run in this process (CliRunner).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (
    APPS,
    ORDERS,
    REPO,
    fails,
    flat,
    interplay,
    invoke,
    new_store,
    ok,
    rows,
    running,
    subprocess_env,
    wait_until,
)


def _status(store: str, flow_id: str) -> str | None:
    result = invoke("trace", flow_id, "--json", "--store", store)
    return json.loads(result.stdout)["status"] if result.exit_code == 0 else None


def _run_status(store: str, run_id: str) -> str:
    return next(r[2] for r in rows(ok("workflows", "list", "--store", store)) if r[0] == run_id)


def _dead_letters(store: str) -> list[list[str]]:
    return rows(ok("dlq", "list", "--store", store))


# --------------------------------------------------------------------------- interplay run until SIGTERM
def test_run_handles_a_published_event_until_sigterm(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    with running(ORDERS, store, tmp_path / "run.log") as runner:
        flow_id = ok("publish", ORDERS, "order.created", '{"id": 1, "amount": 20}', "--store", store).strip()
        wait_until(
            lambda: flow_id in [r[0] for r in rows(ok("flows", "--status", "completed", "--store", store))],
            "completed flow in `interplay flows`",
        )
        code = runner.stop()
        output = runner.output()
    assert code == 0, output
    assert "shop: hosting orders, payments, shipping, notification, delivery + workflows" in flat(output)
    assert output.rstrip().endswith("stopped")
    assert "Traceback" not in output
    tree = flat(ok("trace", flow_id, "--store", store))
    for step in ("order.created", "payment.completed", "shipment.prepared", "customer.notified", "completed"):
        assert step in tree


def test_run_hosts_only_the_services_asked_for(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    with running(ORDERS, store, tmp_path / "run.log", "--service", "payments", "--no-orchestrator") as runner:
        flow_id = ok("publish", ORDERS, "order.created", '{"id": 1}', "--store", store).strip()
        # payments takes the order; shipping is not running, so the flow waits there.
        wait_until(lambda: [r for r in rows(ok("flows", "--store", store)) if r[7] == "payment.completed"],
                   "payment.completed as the flow's last step")
        assert _status(store, flow_id) == "running"
        assert runner.stop() == 0
        assert "shop: hosting payments on" in flat(runner.output())


def test_run_in_a_terminal_shows_live_counts(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "interplay", "run", ORDERS, "--store", store],
        cwd=REPO, env=subprocess_env(), stdin=terminal, stdout=terminal, stderr=terminal,
    )
    os.close(terminal)
    seen = bytearray()

    def screen() -> str:
        while select.select([controller], [], [], 0)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            seen.extend(chunk)
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))

    try:
        wait_until(lambda: "in flight" in screen(), "the live status table")
        ok("publish", ORDERS, "order.created", '{"id": 1}', "--wait", "10", "--store", store)
        wait_until(lambda: re.search(r"notification\s+1\s+0", screen()), "notification: 1 handled, 0 in flight")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped" in screen()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        ([ORDERS, "--service", "warehouse"], 1, "unknown service(s) ['warehouse']; the app has ['delivery',"),
        (["no_such_module_here:app"], 2, "cannot import 'no_such_module_here'"),
        ([ORDERS, "--log-level", "LOUD"], 2, "unknown log level 'LOUD'"),
    ],
    ids=["unknown-service", "bad-module", "bad-log-level"],
)
def test_run_refuses_clearly(tmp_path: Path, args: list[str], code: int, expected: str) -> None:
    done = interplay("run", *args, "--store", f"sqlite:///{tmp_path / 's.db'}")
    assert done.returncode == code, done.stdout + done.stderr
    assert expected in flat(done.stderr)
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- start --wait against a runner
@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store with the orders example hosted (services and workflows) by one runner."""
    directory = tmp_path_factory.mktemp("shop")
    store = new_store(directory)
    with running(ORDERS, store, directory / "run.log"):
        yield store


def test_start_wait_prints_the_tree_and_the_result(shop: str) -> None:
    output = ok("start", ORDERS, "process_order", '{"id": 7, "amount": 12}', "--wait", "10", "--store", shop)
    run_id, *_, result = output.strip().splitlines()
    assert result == '"order 7 shipped"'
    tree = flat(output)
    for step in ("payments.process_payment", "shipping.prepare_shipment", "notification.send_confirmation"):
        assert step in tree
    assert f"process_order {run_id} completed" in tree
    assert _run_status(shop, run_id) == "completed"


def test_start_wait_of_a_failing_run_exits_non_zero_with_the_reason(shop: str) -> None:
    out = fails(1, "start", ORDERS, "process_order", '{"id": 8, "item": "unobtainium"}', "--wait", "10",
                "--store", shop)
    run_id = out.split()[0]
    assert f"run {run_id} compensated: StepFailed: shipping.prepare_shipment failed: Reject: " in out
    assert "order 8: unobtainium is out of stock" in out
    assert "payments.refund" in out  # the tree shows the compensation
    assert _run_status(shop, run_id) == "compensated"


def test_start_wait_of_the_mixed_workflow(shop: str) -> None:
    output = ok("start", ORDERS, "deliver_order", '{"id": 9}', "--id", "delivery-9", "--wait", "10", "--store", shop)
    assert output.strip().splitlines()[-1] == '"order 9 delivered"'
    assert "delivery.confirmed" in output
    # Starting it again with the same id returns the same run, already done.
    again = ok("start", ORDERS, "deliver_order", '{"id": 9}', "--id", "delivery-9", "--wait", "10", "--store", shop)
    assert again.strip().splitlines()[0] == "delivery-9"
    assert again.strip().splitlines()[-1] == '"order 9 delivered"'


def test_publish_wait_shows_the_completed_flow(shop: str) -> None:
    output = ok("publish", ORDERS, "order.created", '{"id": 10, "amount": 5}', "--wait", "10", "--store", shop)
    flow_id = output.splitlines()[0]
    assert f"order {flow_id} completed" in flat(output)
    assert "customer.notified" in output


def test_publish_wait_of_a_failing_flow_exits_non_zero(shop: str) -> None:
    out = fails(1, "publish", ORDERS, "order.created", '{"id": 11, "amount": -1}', "--wait", "10", "--store", shop)
    flow_id = out.split()[0]
    assert "order.cancelled" in out  # the tree, with the choreographed compensation
    assert f"flow {flow_id} failed" in out


# --------------------------------------------------------------------------- dead letters replayed by a runner
def test_dlq_replay_after_the_cause_is_fixed(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    marker = tmp_path / "marker"
    with running(APPS, store, tmp_path / "run.log"):
        flow_id = ok("publish", APPS, "job.requested", json.dumps({"id": 1, "marker": str(marker)}),
                     "--store", store).strip()
        [dead] = wait_until(lambda: _dead_letters(store), "dead letter")
        assert dead[2:6] == ["fragile", "job.requested", "retries_exhausted", "1"]
        assert "RuntimeError: job 1:" in dead[6]
        assert dead[7] == flow_id
        # A dead letter fails a choreographed flow (pending 0, dead 1) until it is replayed.
        [flow] = rows(ok("flows", "--store", store))
        assert (flow[0], flow[3], flow[5], flow[6]) == (flow_id, "failed", "0", "1")

        marker.touch()  # the fix
        assert f"replayed {dead[0]}: job.requested -> fragile" in ok("dlq", "replay", dead[0], "--store", store)
        wait_until(lambda: _status(store, flow_id) == "completed", "completed flow after the replay")
    assert "the dead-letter queue is empty" in ok("dlq", "list", "--store", store)
    assert "job.done" in ok("trace", flow_id, "--store", store)


def test_dlq_replay_all_and_drop_all(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    markers = [tmp_path / f"marker-{i}" for i in range(3)]
    with running(APPS, store, tmp_path / "run.log"):
        flow_ids = [
            ok("publish", APPS, "job.requested", json.dumps({"id": i, "marker": str(m)}), "--store", store).strip()
            for i, m in enumerate(markers)
        ]
        wait_until(lambda: len(_dead_letters(store)) == 3, "three dead letters")
        markers[0].touch()  # only the first one's cause is fixed
        replayed = ok("dlq", "replay", "--all", "--store", store)
        assert replayed.count("replayed ") == 3
        wait_until(lambda: _status(store, flow_ids[0]) == "completed", "the fixed job's flow completed")
        wait_until(lambda: len(_dead_letters(store)) == 2, "the two unfixed jobs back in the dead-letter queue")
        assert "dropped 2 dead letter(s)" in ok("dlq", "drop", "--all", "--store", store)
    assert "the dead-letter queue is empty" in ok("dlq", "list", "--store", store)
    assert "nothing to replay" in ok("dlq", "replay", "--all", "--store", store)


# --------------------------------------------------------------------------- cancelling, parking and resuming runs
def test_cancel_a_running_workflow(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    job = json.dumps({"id": 1, "marker": str(tmp_path / "marker")})
    with running(APPS, store, tmp_path / "run.log"):
        run_id = ok("start", APPS, "wait_forever", job, "--store", store).strip()
        wait_until(lambda: _run_status(store, run_id) == "running", "the run running")
        assert f"cancellation of {run_id} requested" in ok("workflows", "cancel", run_id, "--store", store)
        wait_until(lambda: _run_status(store, run_id) == "cancelled", "the run cancelled")
        assert f"run {run_id} is already cancelled" in fails(1, "workflows", "cancel", run_id, "--store", store)
        out = fails(1, "start", APPS, "wait_forever", job, "--id", run_id, "--wait", "5", "--store", store)
        assert f"run {run_id} cancelled: WorkflowCancelled" in out
    assert "WorkflowCancelled" in flat(ok("workflows", "show", run_id, "--store", store))


def test_a_parked_run_is_shown_and_resumed(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    marker = tmp_path / "marker"
    with running(APPS, store, tmp_path / "first.log") as first:
        run_id = ok("start", APPS, "shifty", json.dumps({"id": 1, "marker": str(marker)}), "--store", store).strip()
        wait_until(lambda: "before_fix" in ok("workflows", "show", run_id, "--store", store), "the first step")
        assert first.stop() == 0

    marker.touch()  # a code change: replay now takes another first step
    with running(APPS, store, tmp_path / "second.log"):
        wait_until(lambda: _run_status(store, run_id) == "parked", "the run parked")
        assert [r[0] for r in rows(ok("workflows", "list", "--status", "parked", "--store", store))] == [run_id]
        assert run_id in [r[0] for r in rows(ok("flows", "--status", "parked", "--store", store))]
        shown = flat(ok("workflows", "show", run_id, "--store", store))
        assert f"shifty {run_id} parked" in shown
        assert "NonDeterminismError" in shown
        assert "'before_fix' but the workflow now does step 'after_fix'" in shown

        marker.unlink()  # the code is fixed
        assert f"{run_id} resumed" in ok("workflows", "resume", run_id, "--store", store)
        wait_until(lambda: _run_status(store, run_id) == "running", "the resumed run running")
        assert f"run {run_id} is running, not parked" in fails(1, "workflows", "resume", run_id, "--store", store)
        ok("workflows", "cancel", run_id, "--store", store)
        wait_until(lambda: _run_status(store, run_id) == "cancelled", "the run cancelled")
