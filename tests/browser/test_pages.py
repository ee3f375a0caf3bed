"""The dashboard in headless chromium: flows, a flow's tree and timeline, replay, cancel, map.

The store is filled by ``interplay demo``; dead letters and runs of the test app are
handled by a real ``interplay run`` process (see conftest.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import IN_CI, Dashboard, Runner, dead_letter_of, publish_job, query, start_run, wait_until

if not IN_CI:  # in CI a missing playwright fails the run instead
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")

from playwright.sync_api import Page, expect

DEMO_FLOWS = ("order", "process_order", "deliver_order")


def reload_until(page: Page, selector: str, text: str, timeout: float = 20.0) -> None:
    """Reload until ``selector``'s text is ``text`` (the page is server-rendered)."""

    def there() -> bool:
        page.reload()
        return page.locator(selector).inner_text().strip() == text

    wait_until(there, f"{selector} showing {text!r}", timeout)


def test_the_flows_page_shows_every_demo_flow(page: Page, dashboard: Dashboard, store: str) -> None:
    demo = {row[0] for row in query(store, "SELECT flow_id FROM ip_flows WHERE name IN (?, ?, ?)", DEMO_FLOWS)}
    assert len(demo) == 15  # 5 orders in each of three styles

    page.goto(dashboard.url + "/")
    expect(page).to_have_url(re.compile(r"/flows$"))
    shown = set(page.locator("tr[data-flow-id]").evaluate_all("rows => rows.map(r => r.dataset.flowId)"))
    assert demo <= shown
    expect(page.locator('[data-counter="flows.completed"] b')).to_have_text(re.compile(r"\d+"))

    page.select_option("select[name=status]", "failed")
    page.fill("input[name=name]", "order")
    page.select_option("select[name=since]", "15m")
    page.click("form.filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"status=failed"))
    rows = page.locator("tr[data-flow-id]")
    expect(rows).to_have_count(1)  # the demo's order with a negative amount
    expect(rows.first.locator(".badge")).to_have_text("failed")


def test_a_flow_shows_its_tree_and_timeline(page: Page, dashboard: Dashboard, store: str) -> None:
    page.goto(dashboard.url + "/flows?name=order&status=failed")
    link = page.locator("tr[data-flow-id] a").first
    flow_id = link.inner_text()
    link.click()

    expect(page).to_have_url(re.compile(r"/flow\?id="))
    expect(page.locator("#flow-status")).to_have_text("failed")
    tree = page.locator("#tree")
    assert {"order.created", "payment.failed", "order.cancelled"} <= set(tree.locator(".type").all_inner_texts())
    # Causation: payments rejected order.created, emitted payment.failed; orders reacted with order.cancelled.
    rejected = tree.locator("li.handling-rejected")
    expect(rejected.locator("> .line .service")).to_have_text("payments")
    expect(rejected.locator("li.msg .type", has_text="order.cancelled")).to_have_count(1)

    page.click("nav.tabs >> text=Timeline")
    spans = query(store, "SELECT COUNT(*) FROM ip_spans WHERE flow_id = ?", (flow_id,))[0][0]
    expect(page.locator("#timeline svg.timeline rect.span")).to_have_count(spans)
    expect(page.locator("#timeline svg.timeline rect.outcome-rejected")).to_have_count(1)


def test_a_workflow_flow_shows_the_saga(page: Page, dashboard: Dashboard) -> None:
    page.goto(dashboard.url + "/flows?status=compensated")
    page.locator("tr[data-flow-id] a").first.click()
    tree = page.locator("#tree")
    expect(tree.locator("li.handling-compensated > .line .service")).to_have_text("workflow:process_order")
    assert {"payments.process_payment", "shipping.prepare_shipment", "payments.refund"} <= set(
        tree.locator(".type").all_inner_texts())
    page.locator("dl.facts a", has_text="process_order").click()
    expect(page.locator("#run-status")).to_have_text("compensated")
    expect(page.locator("#journal tbody tr")).to_have_count(3)  # pay, ship (failed), refund
    expect(page.locator("#cancel")).to_have_count(0)  # nothing to cancel on an ended run


def test_replay_a_dead_letter_after_fixing_its_cause(
    page: Page, dashboard: Dashboard, runner: Runner, store: str, tmp_path: Path
) -> None:
    marker = tmp_path / "fixed"
    flow_id = publish_job(store, {"id": 1, "marker": str(marker)})
    dlq_id = wait_until(lambda: dead_letter_of(store, flow_id), "dead letter")

    page.goto(dashboard.url + "/dlq")
    entry = page.locator(f'tbody[data-dlq-id="{dlq_id}"]')
    expect(entry).to_contain_text("marker missing")
    entry.locator("summary").click()  # inspect
    expect(entry.locator("pre.payload")).to_contain_text(str(marker))

    marker.touch()  # the fix
    entry.locator("button.replay").click()
    expect(page.locator(".flash")).to_contain_text(f"Dead letter {dlq_id} replayed")
    expect(page.locator(f'tbody[data-dlq-id="{dlq_id}"]')).to_have_count(0)

    page.goto(dashboard.url + f"/flow?id={flow_id}")
    reload_until(page, "#flow-status", "completed")
    expect(page.locator("#tree .type", has_text="job.done")).to_have_count(1)
    expect(page.locator("#tree li.handling-ok .attempts")).to_have_text("after 2 attempts")


def test_cancel_a_waiting_workflow(page: Page, dashboard: Dashboard, runner: Runner, store: str) -> None:
    run_id = start_run(store, "wait_forever", {"id": 2, "marker": "/nonexistent"})
    wait_until(lambda: query(store, "SELECT 1 FROM ip_journal WHERE run_id = ? AND kind = 'wait'", (run_id,)),
               "the run waiting")

    page.goto(dashboard.url + "/workflows?status=running")
    page.locator(f'tr[data-run-id="{run_id}"] a').click()
    expect(page.locator("#run-status")).to_have_text("running")
    page.click("#cancel")  # confirm() is accepted by the page fixture
    expect(page.locator(".flash")).to_contain_text("Cancellation requested")
    reload_until(page, "#run-status", "cancelled")
    expect(page.locator("#cancel")).to_have_count(0)


def test_payloads_are_shown_as_text_and_counters_follow_live(
    page: Page, dashboard: Dashboard, runner: Runner, store: str
) -> None:
    page.goto(dashboard.url + "/flows")
    counter = page.locator('[data-counter="dlq"] b')
    before = int(counter.inner_text())
    attack = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    flow_id = publish_job(store, {"id": 3, "marker": "/nonexistent/never", "note": attack})
    wait_until(lambda: dead_letter_of(store, flow_id), "dead letter")
    expect(counter).to_have_text(str(before + 1), timeout=10_000)  # fetch()ed, no reload

    for path in ("/dlq", f"/flow?id={flow_id}"):
        page.goto(dashboard.url + path)
        expect(page.get_by_text(attack).first).to_be_visible()
        assert page.evaluate("window.__xss") is None
        assert page.locator("main img, main script").count() == 0


def test_the_map_draws_what_flowed_and_what_is_declared(page: Page, dashboard: Dashboard) -> None:
    page.goto(dashboard.url + "/map")
    expect(page.locator("h1")).to_have_text("Map of shop")
    svg = page.locator("svg.map")
    for node in ("svc:payments", "svc:shipping", "msg:event:order.created", "wf:process_order",
                 "msg:command:payments.refund", "ext:client"):
        expect(svg.locator(f'g.node[data-id="{node}"]')).to_have_count(1)

    def edge(source: str, target: str) -> str:
        return f'path.edge[data-source="{source}"][data-target="{target}"]'

    # Declared and seen; declared, never seen in the demo; seen (a workflow's call), never declared.
    expect(svg.locator(edge("order.created", "payments"))).to_have_class(re.compile(r"\bedge-both\b"))
    expect(svg.locator(edge("shipment.failed", "payments"))).to_have_class(re.compile(r"\bedge-declared\b"))
    expect(svg.locator(edge("process_order", "payments.refund"))).to_have_class(re.compile(r"\bedge-observed\b"))
    expect(page.locator("details.mermaid-source pre")).to_contain_text("flowchart LR")

    page.locator("nav.tabs").get_by_role("link", name="observed", exact=True).click()
    expect(page).to_have_url(re.compile(r"source=observed"))
    expect(svg.locator(edge("shipment.failed", "payments"))).to_have_count(0)
    expect(svg.locator(edge("order.created", "payments"))).to_have_class(re.compile(r"\bedge-plain\b"))
