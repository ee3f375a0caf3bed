"""The ``interplay`` CLI in this process (typer's CliRunner) on real SQLite files.

What needs a real process (``interplay run`` until SIGTERM, runs and dead letters
handled by a runner) is in ``test_cli_runner.py``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from interplay.cli.main import cli

from .helpers import ORDERS, UUID, fails, flat, interplay, invoke, ok, rows


# --------------------------------------------------------------------------- --help
def _command_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        if hasattr(command, "list_commands"):  # a group
            ctx = typer.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, (*path, name))

    walk(typer.main.get_command(cli), ())
    return paths


COMMAND_PATHS = _command_paths()


def test_the_documented_commands_exist() -> None:
    documented = {
        ("demo",), ("run",), ("publish",), ("flows",), ("trace",), ("start",),
        ("dlq", "list"), ("dlq", "replay"), ("dlq", "drop"),
        ("workflows", "list"), ("workflows", "show"), ("workflows", "cancel"), ("workflows", "resume"),
    }
    assert documented <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "interplay")
def test_every_command_answers_help(path: tuple[str, ...]) -> None:
    output = ok(*path, "--help")
    assert "Usage:" in output
    if path:
        assert path[-1] in output


def test_python_dash_m_interplay_is_the_cli() -> None:
    done = interplay("--help")
    assert done.returncode == 0, done.stderr
    assert "workflows" in done.stdout
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- the demo, then looking at it
@dataclass
class Demo:
    url: str
    output: str
    flows: list[list[str]]
    """``interplay flows`` rows: id, name, kind, status, started, pending, dead, last step."""
    runs: list[list[str]]
    """``interplay workflows list`` rows: id, workflow, status, created, updated, owner, error."""

    def flow_ids(self, name: str, status: str | None = None) -> list[str]:
        return [r[0] for r in self.flows if r[1] == name and status in (None, r[3])]

    def run_ids(self, workflow: str, status: str | None = None) -> list[str]:
        return [r[0] for r in self.runs if r[1] == workflow and status in (None, r[2])]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    url = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'd.db'}"
    output = ok("demo", "--store", url, "--orders", "3")
    return Demo(url, output, rows(ok("flows", "--store", url)), rows(ok("workflows", "list", "--store", url)))


def test_demo_runs_the_three_styles_and_compares_them(demo: Demo) -> None:
    out = flat(demo.output)
    for style in ("choreography", "orchestration", "mixed"):
        assert f"─ {style} ─" in demo.output  # the rule that opens each style's trees
    assert "the seed's comparison, filled in by this run" in out
    comparison = {r[0]: r[1:] for r in rows(demo.output) if len(r) == 4}
    assert comparison["flows run"] == ["2 of 3 completed", "2 of 3 completed", "3 of 3 completed"]
    assert [c.split(":")[0] for c in comparison["failures handled"]] == ["1", "1", "0"]
    assert {"control", "communication", "p50 flow latency", "tracing", "bottleneck / failure point"} <= set(comparison)
    assert f"interplay flows --store {demo.url}" in out


def test_flows_lists_what_the_demo_ran(demo: Demo) -> None:
    assert len(demo.flows) == 9
    assert len(demo.flow_ids("order", "completed")) == 2
    assert len(demo.flow_ids("order", "failed")) == 1
    assert len(demo.flow_ids("process_order", "completed")) == 2
    assert len(demo.flow_ids("process_order", "compensated")) == 1
    assert len(demo.flow_ids("deliver_order", "completed")) == 3
    assert all(UUID.fullmatch(r[0]) for r in demo.flows)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--status", "failed"], {("order", "failed")}),
        (["--status", "compensated"], {("process_order", "compensated")}),
        (["--name", "deliver_order"], {("deliver_order", "completed")}),
        (["--name", "nothing.by.this.name"], set()),
    ],
)
def test_flows_filters(demo: Demo, options: list[str], expected: set[tuple[str, str]]) -> None:
    output = ok("flows", "--store", demo.url, *options)
    assert {(r[1], r[3]) for r in rows(output)} == expected
    if not expected:
        assert "no flows" in output


def test_flows_limit_shows_the_newest(demo: Demo) -> None:
    assert [r[0] for r in rows(ok("flows", "--store", demo.url, "--limit", "2"))] == [r[0] for r in demo.flows[:2]]


def test_trace_shows_a_failed_choreography_as_a_tree(demo: Demo) -> None:
    [flow_id] = demo.flow_ids("order", "failed")
    out = flat(ok("trace", flow_id, "--store", demo.url))
    assert flow_id in out
    for step in ("order.created", "payment.failed", "order.cancelled", "amount must be positive"):
        assert step in out


def test_trace_shows_a_compensated_workflow(demo: Demo) -> None:
    [flow_id] = demo.flow_ids("process_order", "compensated")
    out = flat(ok("trace", flow_id, "--store", demo.url))
    for step in ("payments.process_payment", "shipping.prepare_shipment", "payments.refund", "compensated"):
        assert step in out


def test_trace_json_is_valid_json_for_every_flow(demo: Demo) -> None:
    for flow_id, name, _, status, *_ in demo.flows:
        result = invoke("trace", flow_id, "--json", "--store", demo.url)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert (data["flow_id"], data["name"], data["status"]) == (flow_id, name, status)
        assert data["messages"], "a flow has at least the message that started it"
        assert all(m["flow_id"] == flow_id for m in data["messages"])
        assert data["spans"]


def test_workflows_list_shows_the_demo_runs(demo: Demo) -> None:
    assert len(demo.runs) == 6
    assert len(demo.run_ids("process_order", "completed")) == 2
    assert len(demo.run_ids("deliver_order", "completed")) == 3
    [failed] = [r for r in demo.runs if r[2] == "compensated"]
    assert failed[1] == "process_order"
    assert "unobtainium" in ok("workflows", "list", "--status", "compensated", "--store", demo.url)


@pytest.mark.parametrize(
    ("options", "count"),
    [(["--status", "completed"], 5), (["--workflow", "deliver_order"], 3), (["--limit", "1"], 1),
     (["--workflow", "no_such_workflow"], 0)],
)
def test_workflows_list_filters(demo: Demo, options: list[str], count: int) -> None:
    output = ok("workflows", "list", "--store", demo.url, *options)
    assert len(rows(output)) == count
    if not count:
        assert "no workflow runs" in output


def test_workflows_show_a_completed_run(demo: Demo) -> None:
    run_id = demo.run_ids("deliver_order")[0]
    out = flat(ok("workflows", "show", run_id, "--store", demo.url))
    assert f"deliver_order {run_id} completed" in out
    assert "result: \"order" in out
    assert "delivered" in out
    for step in ("payments.process_payment", "order.shipped", "delivery.confirmed", "notification.send_confirmation"):
        assert step in out


def test_workflows_show_a_compensated_run(demo: Demo) -> None:
    [run_id] = demo.run_ids("process_order", "compensated")
    out = flat(ok("workflows", "show", run_id, "--store", demo.url))
    assert f"process_order {run_id} compensated" in out
    assert "StepFailed: shipping.prepare_shipment failed: Reject:" in out
    assert "payments.refund" in out


def test_dlq_list_shows_the_rejected_payment(demo: Demo) -> None:
    dead = rows(ok("dlq", "list", "--store", demo.url))
    [payment] = [d for d in dead if d[2] == "payments"]
    assert payment[3:6] == ["order.created", "rejected", "1"]
    assert "amount must be positive" in payment[6]
    assert payment[7] == demo.flow_ids("order", "failed")[0]
    # The orchestrated failure is dead-lettered too: the command shipping rejected.
    assert {(d[2], d[3]) for d in dead} == {("payments", "order.created"), ("shipping", "shipping.prepare_shipment")}


def test_dlq_list_by_service(demo: Demo) -> None:
    assert [d[2] for d in rows(ok("dlq", "list", "--service", "shipping", "--store", demo.url))] == ["shipping"]
    assert "the dead-letter queue is empty" in ok("dlq", "list", "--service", "nobody", "--store", demo.url)


def test_ids_are_whole_in_an_80_column_terminal(demo: Demo) -> None:
    """Ids are what one copies into ``trace`` or ``workflows show``: folded, never cut short."""
    for args, ids in ((["flows"], [r[0] for r in demo.flows]), (["workflows", "list"], [r[0] for r in demo.runs])):
        output = ok(*args, "--store", demo.url, columns=80)
        assert max(len(line) for line in output.splitlines()) <= 80
        first_column = "".join(line.split("│")[1].strip() for line in output.splitlines() if line.startswith("│"))
        for id_ in ids:
            assert id_ in first_column, f"{args}: {id_} is not whole in\n{output}"


def test_resume_of_a_run_that_is_not_parked(demo: Demo) -> None:
    run_id = demo.run_ids("process_order", "completed")[0]
    assert f"run {run_id} is completed, not parked" in fails(1, "workflows", "resume", run_id, "--store", demo.url)


def test_cancel_of_a_finished_run(demo: Demo) -> None:
    run_id = demo.run_ids("deliver_order")[0]
    assert f"run {run_id} is already completed" in fails(1, "workflows", "cancel", run_id, "--store", demo.url)


# --------------------------------------------------------------------------- INTERPLAY_STORE and INTERPLAY_BUS
def test_interplay_store_is_the_default_store(demo: Demo, tmp_path: Path) -> None:
    env: dict[str, str | None] = {"INTERPLAY_STORE": demo.url}
    assert [r[0] for r in rows(ok("flows", env=env))] == [r[0] for r in demo.flows]
    assert [r[0] for r in rows(ok("workflows", "list", env=env))] == [r[0] for r in demo.runs]
    assert len(rows(ok("dlq", "list", env=env))) == 2
    [flow_id] = demo.flow_ids("order", "failed")
    assert "order.cancelled" in ok("trace", flow_id, env=env)
    # --store still wins over the environment.
    assert "no flows" in ok("flows", "--store", f"sqlite:///{tmp_path / 'other.db'}", env=env)


def test_interplay_store_for_publish_and_start(tmp_path: Path) -> None:
    env: dict[str, str | None] = {"INTERPLAY_STORE": f"sqlite:///{tmp_path / 'env.db'}"}
    flow_id = ok("publish", ORDERS, "order.created", '{"id": 1}', env=env).strip()
    run_id = ok("start", ORDERS, "process_order", '{"id": 2}', env=env).strip()
    assert (tmp_path / "env.db").exists()
    assert flow_id in [r[0] for r in rows(ok("flows", env=env))]
    assert [(r[0], r[2]) for r in rows(ok("workflows", "list", env=env))] == [(run_id, "pending")]


def test_interplay_bus_is_the_default_bus(tmp_path: Path) -> None:
    out = fails(1, "publish", ORDERS, "order.created", "{}", "--store", f"sqlite:///{tmp_path / 's.db'}",
                env={"INTERPLAY_BUS": "carrier-pigeon://coop"})
    assert "unknown bus URL 'carrier-pigeon://coop'" in out


def test_looking_at_a_store_needs_no_bus(demo: Demo, tmp_path: Path) -> None:
    """Commands without --bus read the store only: a broken or unreachable INTERPLAY_BUS (the
    moment one most wants to look) does not stop them."""
    env: dict[str, str | None] = {"INTERPLAY_BUS": "carrier-pigeon://coop", "INTERPLAY_STORE": demo.url}
    [flow_id] = demo.flow_ids("order", "failed")
    [run_id] = demo.run_ids("process_order", "compensated")
    assert len(rows(ok("flows", env=env))) == 9
    assert "order.cancelled" in ok("trace", flow_id, env=env)
    assert json.loads(invoke("trace", flow_id, "--json", env=env).stdout)["flow_id"] == flow_id
    assert len(rows(ok("dlq", "list", env=env))) == 2
    assert len(rows(ok("workflows", "list", env=env))) == 6
    assert "compensated" in ok("workflows", "show", run_id, env=env)
    assert "is compensated, not parked" in fails(1, "workflows", "resume", run_id, env=env)
    copy = _copy_of(demo, tmp_path)
    assert "dropped 2 dead letter(s)" in ok("dlq", "drop", "--all", "--store", copy, env=env)


# --------------------------------------------------------------------------- publishing and starting without a runner
def test_publish_prints_the_flow_id_and_queues_the_event(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    flow_id = ok("publish", ORDERS, "order.created", '{"id": 1, "amount": 20}', "--store", store).strip()
    assert UUID.fullmatch(flow_id)
    [row] = rows(ok("flows", "--store", store))
    assert (row[0], row[1], row[3], row[5]) == (flow_id, "order", "running", "1")  # one delivery pending
    data = json.loads(invoke("trace", flow_id, "--json", "--store", store).stdout)
    assert data["messages"][0]["payload"] == {"id": 1, "amount": 20}


def test_publish_into_an_existing_flow(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    flow_id = ok("publish", ORDERS, "order.created", '{"id": 1}', "--store", store).strip()
    joined = ok("publish", ORDERS, "order.noted", '"by the CLI"', "--flow-id", flow_id, "--store", store).strip()
    assert joined == flow_id
    data = json.loads(invoke("trace", flow_id, "--json", "--store", store).stdout)
    assert [m["type"] for m in data["messages"]] == ["order.created", "order.noted"]
    assert len(rows(ok("flows", "--store", store))) == 1


def test_start_twice_with_one_id_is_one_run(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    first = ok("start", ORDERS, "process_order", '{"id": 5}', "--id", "order-5", "--store", store).strip()
    again = ok("start", ORDERS, "process_order", '{"id": 5}', "--id", "order-5", "--store", store).strip()
    assert first == again == "order-5"
    assert [r[0] for r in rows(ok("workflows", "list", "--store", store))] == ["order-5"]
    out = flat(ok("workflows", "show", "order-5", "--store", store))
    assert "process_order order-5 pending" in out


def test_start_wait_without_an_orchestrator_times_out_with_a_hint(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    out = fails(1, "start", ORDERS, "process_order", '{"id": 1}', "--wait", "0.2", "--store", store)
    assert "timed out" in out
    assert "still pending" in out
    assert "interplay run" in out  # where the orchestrator would come from


def test_publish_wait_without_services_times_out_with_a_hint(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    out = fails(1, "publish", ORDERS, "order.created", '{"id": 1}', "--wait", "0.2", "--store", store)
    assert "timed out" in out
    assert "interplay run" in out


def test_publish_wait_for_an_event_nobody_handles(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    out = flat(ok("publish", ORDERS, "nobody.listens", '{"a": 1}', "--wait", "5", "--store", store))
    assert "nobody.listens" in out
    assert "completed" in out


# --------------------------------------------------------------------------- dead letters, without a runner
def _copy_of(demo: Demo, directory: Path) -> str:
    """A copy of the demo's store, to change without changing what other tests look at."""
    source = sqlite3.connect(demo.url.removeprefix("sqlite:///"))
    copy = sqlite3.connect(directory / "copy.db")
    try:
        source.backup(copy)
    finally:
        source.close()
        copy.close()
    return f"sqlite:///{directory / 'copy.db'}"


def test_dlq_drop_all_and_replay_all_of_an_empty_queue(demo: Demo, tmp_path: Path) -> None:
    store = _copy_of(demo, tmp_path)
    assert len(rows(ok("dlq", "list", "--store", store))) == 2
    assert "dropped 2 dead letter(s)" in ok("dlq", "drop", "--all", "--store", store)
    assert "the dead-letter queue is empty" in ok("dlq", "list", "--store", store)
    assert "dropped 0 dead letter(s)" in ok("dlq", "drop", "--all", "--store", store)
    assert "nothing to replay" in ok("dlq", "replay", "--all", "--store", store)


def test_dlq_drop_by_id(demo: Demo, tmp_path: Path) -> None:
    store = _copy_of(demo, tmp_path)
    [payment] = [d[0] for d in rows(ok("dlq", "list", "--store", store)) if d[2] == "payments"]
    assert "dropped 1 dead letter(s)" in ok("dlq", "drop", payment, "--store", store)
    assert [d[2] for d in rows(ok("dlq", "list", "--store", store))] == ["shipping"]
    # Again: it is gone, and the command says so.
    assert "1 id(s) were not in the dead-letter queue" in fails(1, "dlq", "drop", payment, "--store", store)


# --------------------------------------------------------------------------- clear errors, no tracebacks
def _write_module(directory: Path, name: str, source: str) -> str:
    (directory / f"{name}.py").write_text(source)
    return name


@pytest.fixture
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project directory as the current one (MODULE:app resolves there)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the cwd on it: undo that after the test
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_an_app_in_the_current_directory(in_project: Path) -> None:
    _write_module(in_project, "cli_shop_here", "from interplay import App\nshop = App('here')\n")
    flow_id = ok("publish", "cli_shop_here:shop", "thing.happened", "{}", "--store", "sqlite:///here.db").strip()
    assert UUID.fullmatch(flow_id)
    assert (in_project / "here.db").exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('no config file')\n", "RuntimeError: no config file"),
        ("import a_module_that_is_not_there_at_all\n", "No module named 'a_module_that_is_not_there_at_all'"),
    ],
    ids=["syntax-error", "raises-on-import", "missing-dependency"],
)
def test_an_app_module_that_cannot_be_imported(in_project: Path, source: str, expected: str) -> None:
    _write_module(in_project, "cli_broken_app", source)
    out = fails(2, "publish", "cli_broken_app:app", "x.happened", "{}", "--store", "sqlite:///s.db")
    assert "cannot import 'cli_broken_app'" in out
    assert expected in out


ERRORS = [
    # (exit code, arguments, what the message says)
    (2, ["publish", "no_such_module_here:app", "x.y"], "cannot import 'no_such_module_here'"),
    (2, ["publish", "interplay.examples.orders:Order", "x.y"], "is ModelMetaclass, not an interplay App"),
    (2, ["publish", "interplay.examples.orders:missing", "x.y"], "is nothing, not an interplay App"),
    (2, ["publish", ":app", "x.y"], "expected MODULE:APP"),
    (2, ["start", "interplay.examples", "book_trip"], "'interplay.examples' is nothing, not an interplay App"),
    (2, ["publish", ORDERS, "order.created", "{bad json"], "payload is not valid JSON"),
    (2, ["start", ORDERS, "process_order", "[1, 2"], "payload is not valid JSON"),
    (2, ["publish", ORDERS, "order created", "{}"], "invalid event name 'order created'"),
    (2, ["publish", ORDERS, "order/created#", "{}"], "invalid event name 'order/created#'"),
    (1, ["start", ORDERS, "no_such_workflow", "{}"], "unknown workflow 'no_such_workflow'; known: ['deliver_order',"),
    (1, ["start", ORDERS, "process_order", '{"id": "seven"}'], "id: Input should be a valid integer"),
    (1, ["trace", "no-such-flow"], "no flow with id 'no-such-flow'"),
    (1, ["trace", "no-such-flow", "--json"], "no flow with id 'no-such-flow'"),
    (1, ["workflows", "show", "no-such-run"], "no workflow run 'no-such-run'"),
    (1, ["workflows", "cancel", "no-such-run"], "no workflow run 'no-such-run'"),
    (1, ["workflows", "resume", "no-such-run"], "no workflow run 'no-such-run'"),
    (2, ["dlq", "replay"], "give the dead letters' ids (see `interplay dlq list`) or --all"),
    (2, ["dlq", "drop"], "give the dead letters' ids (see `interplay dlq list`) or --all"),
    (2, ["dlq", "replay", "1", "--all"], "give ids or --all, not both"),
    (2, ["dlq", "replay", "one"], "Invalid value for 'ids'"),
    (1, ["dlq", "replay", "999"], "no dead letter with id(s) [999]"),
    (1, ["dlq", "drop", "998", "999"], "2 id(s) were not in the dead-letter queue"),
    (2, ["flows", "--status", "finished"], "unknown status 'finished'; use one of running, completed"),
    (2, ["workflows", "list", "--status", "finished"], "unknown status 'finished'; use one of pending"),
    (2, ["demo", "--orders", "1"], "Invalid value for '--orders': Input should be greater than or equal to 2"),
    (2, ["trace"], "Missing argument 'flow_id'"),
    (2, ["no-such-command"], "No such command 'no-such-command'"),
]


@pytest.mark.parametrize(("code", "args", "expected"), ERRORS, ids=[" ".join(e[1])[:50] for e in ERRORS])
def test_clear_errors(tmp_path: Path, code: int, args: list[str], expected: str) -> None:
    out = fails(code, *args, "--store", f"sqlite:///{tmp_path / 's.db'}")
    assert expected in out


def test_usage_errors_touch_no_store(tmp_path: Path) -> None:
    """A command that cannot run because of its arguments does not create the store file."""
    store = f"sqlite:///{tmp_path / 's.db'}"
    fails(2, "publish", ORDERS, "order created", "{}", "--store", store)
    fails(2, "dlq", "replay", "--store", store)
    fails(2, "dlq", "drop", "--store", store)
    fails(2, "flows", "--status", "finished", "--store", store)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(
    ("store", "expected"),
    [("carrier-pigeon://coop", "unknown store URL 'carrier-pigeon://coop'"),
     ("sqlite://host/file.db", "invalid SQLite URL"),
     ("sqlite:///{tmp}/s.db?journal=off", "unknown SQLite store option(s) ['journal']")],
)
def test_bad_store_urls(tmp_path: Path, store: str, expected: str) -> None:
    assert expected in fails(1, "flows", "--store", store.format(tmp=tmp_path))


def test_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("these are not the tables you are looking for\n" * 100)
    out = fails(1, "trace", "x", "--store", f"sqlite:///{tmp_path / 'notes.txt'}")
    assert "cannot open store" in out
    assert "file is not a database" in out


def test_publish_to_an_unknown_bus(tmp_path: Path) -> None:
    out = fails(1, "publish", ORDERS, "order.created", "{}", "--bus", "carrier-pigeon://coop",
                "--store", f"sqlite:///{tmp_path / 's.db'}")
    assert "unknown bus URL" in out


# --------------------------------------------------------------------------- found outside the CLI layer
def test_opening_a_new_store_waits_for_its_creator(tmp_path: Path) -> None:
    # Another process has just created the file and is writing its schema.
    creator = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
    creator.execute("BEGIN IMMEDIATE")
    finished = threading.Timer(3.0, creator.execute, ("ROLLBACK",))  # ...and is done a moment later
    finished.start()
    try:
        result = invoke("flows", "--store", f"sqlite:///{tmp_path / 's.db'}")
    finally:
        finished.cancel()
        finished.join()
        if creator.in_transaction:
            creator.execute("ROLLBACK")
        creator.close()
    # The store's busy_timeout (30 s) is how long opening may wait for the creator.
    assert result.exit_code == 0, result.output
