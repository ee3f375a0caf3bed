"""The dashboard's pieces without a server: keys, tokens, the map's graph, SVG escaping.

The served dashboard is tested end to end in tests/browser.
"""

from __future__ import annotations

import itertools

import pytest

from interplay.dashboard import check_bind
from interplay.dashboard.queries import ObservedEdges
from interplay.dashboard.security import Secrets, check_token, is_loopback, safe_next
from interplay.dashboard.svg import graph_svg, timeline_svg
from interplay.dashboard.topology import Graph, declared_graph, layout, merge, observed_graph, to_mermaid
from interplay.errors import ConfigurationError
from interplay.stores.records import MessageRow, SpanRecord
from interplay.tracing.flows import Flow, FlowSummary

TOKEN = "user@corp.com-0123456789abcdef"


# ------------------------------------------------------------------ keys
@pytest.mark.parametrize("presented", [
    TOKEN + ".evil.io", TOKEN[:-1], TOKEN.upper(), " " + TOKEN, TOKEN + " ", "", "user@corp.com", TOKEN + "\x00",
    "\ud800" + TOKEN[1:],
])
def test_only_the_exact_token_matches(presented: str) -> None:
    keys = Secrets(TOKEN)
    assert keys.token_ok(TOKEN)
    assert not keys.token_ok(presented)


def test_no_token_matches_when_none_is_set() -> None:
    keys = Secrets(None)
    assert not keys.required
    assert not keys.token_ok("")
    assert not keys.session_ok(Secrets(TOKEN).new_session())


def test_sessions_are_signed_and_expire() -> None:
    keys = Secrets(TOKEN)
    session = keys.new_session(now=1_000_000)
    assert keys.session_ok(session, now=1_000_000 + 3600)
    assert not keys.session_ok(session, now=1_000_000 + 13 * 3600)  # 12 hours at most
    assert not keys.session_ok(session, now=1_000_000 - 3600)  # from the future
    assert not Secrets(TOKEN + "-rotated").session_ok(session, now=1_000_000)  # a new token logs everyone out
    body, _, mac = session.rpartition(".")
    issued = body.split(".")[1]
    assert not keys.session_ok(session.replace(issued, str(int(issued) + 10**6), 1), now=1_000_000)
    assert not keys.session_ok(body + "." + mac[:-1] + ("1" if mac.endswith("0") else "0"), now=1_000_000)
    for junk in ("", "s1", "s1.x.y.z", TOKEN, "....", "s1.1.2.3.4"):
        assert not keys.session_ok(junk)


def test_csrf_tokens_are_made_by_this_dashboard_only() -> None:
    keys = Secrets(None)
    token = keys.new_csrf()
    assert keys.csrf_ok(token)
    assert not Secrets(None).csrf_ok(token)  # another process's key
    for forged in ("", "abc.def", token.split(".")[0] + ".", "." + token.split(".")[1], token + "0"):
        assert not keys.csrf_ok(forged)


@pytest.mark.parametrize("token", [
    "short", "x" * 15, "sixteen chars ok", "tab\tseparated-token", "ünïcödé-tøken-12345",
])
def test_weak_or_untypable_tokens_are_refused(token: str) -> None:
    with pytest.raises(ConfigurationError):
        check_token(token)


def test_binding_beyond_loopback_needs_a_token() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.2", "example.com", "127.0.0.1.nip.io", "localhost.evil.io"):
        assert not is_loopback(host)
        with pytest.raises(ConfigurationError, match="without a token"):
            check_bind(host, None)
        check_bind(host, TOKEN)


@pytest.mark.parametrize(("target", "expected"), [
    ("/dlq?service=a", "/dlq?service=a"), ("/flow?id=1#tree", "/flow?id=1#tree"), ("//evil.example", "/flows"),
    ("https://evil.example/", "/flows"), ("/\\evil.example", "/flows"), ("", "/flows"), (None, "/flows"),
    ("/ok\r\nSet-Cookie: x=1", "/flows"), ("javascript:alert(1)", "/flows"),
])
def test_login_returns_only_to_local_paths(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


# ------------------------------------------------------------------ the map
def test_the_declared_graph_of_the_order_example() -> None:
    from interplay.examples.orders import app

    g = declared_graph(app)
    edges = {(g.nodes[s].label, g.nodes[t].label, e.note) for (s, t), e in g.edges.items()}
    assert edges == {
        ("order.created", "payments", ""), ("payments", "payment.completed", ""), ("payments", "payment.failed",
                                                                                   "on error"),
        ("payments.process_payment", "payments", ""), ("payments.refund", "payments", ""),
        ("shipment.failed", "payments", ""), ("payments", "payment.refunded", ""),
        ("payment.completed", "shipping", ""), ("shipping", "shipment.prepared", ""),
        ("shipping", "shipment.failed", "on error"), ("shipping.prepare_shipment", "shipping", ""),
        ("shipment.prepared", "notification", ""), ("notification.send_confirmation", "notification", ""),
        ("payment.failed", "orders", ""), ("orders", "order.cancelled", ""),
        ("order.shipped", "delivery", ""), ("delivery", "delivery.confirmed", ""),
    }
    assert {n.label for n in g.nodes.values() if n.kind == "workflow"} == {"process_order", "deliver_order"}


def test_the_observed_graph_and_the_merge() -> None:
    seen = ObservedEdges(
        sent={("client", "event", "order.created"): 3, ("client", "workflow", "process_order"): 2,
              ("workflow:process_order", "command", "payments.refund"): 1,
              ("payments", "event", "payment.completed"): 3},
        handled={("order.created", "payments"): 4, ("process_order", "workflow:process_order"): 2,
                 ("payments.refund", "payments"): 1},
    )
    g = observed_graph(seen)
    edges = {(g.nodes[s].label, g.nodes[t].label): (e.count, e.note) for (s, t), e in g.edges.items()}
    assert edges == {
        ("client", "order.created"): (3, ""), ("client", "process_order"): (2, "start"),
        ("process_order", "payments.refund"): (1, ""), ("payments", "payment.completed"): (3, ""),
        ("order.created", "payments"): (4, ""), ("payments.refund", "payments"): (1, ""),
    }
    assert g.nodes["msg:command:payments.refund"].kind == "command"

    declared = Graph()
    declared.edge(declared.message("event", "order.created"), declared.service("payments"), seen="declared")
    declared.edge(declared.service("payments"), declared.message("event", "payment.failed"), seen="declared")
    both = merge(declared, g)
    assert both.edges[("msg:event:order.created", "svc:payments")].seen == "both"
    assert both.edges[("svc:payments", "msg:event:payment.failed")].seen == "declared"
    assert both.edges[("ext:client", "wf:process_order")].seen == "observed"
    assert "-.->" in to_mermaid(both)  # declared but never seen: dashed


def test_the_layout_places_every_node_without_overlap() -> None:
    g = Graph()
    for s, t in [("a", "b"), ("b", "c"), ("c", "a"), ("a", "d"), ("d", "e"), ("b", "e")]:  # with a cycle
        g.edge(g.service(s), g.message("event", t + ".x"), seen="observed")
        g.edge(g.message("event", t + ".x"), g.service(t), seen="observed")
    placed, width, height = layout(g)
    assert set(placed) == set(g.nodes)
    for p in placed.values():
        assert 0 <= p.x <= p.x + p.w <= width
        assert 0 <= p.y <= p.y + p.h <= height
    boxes = sorted((p.layer, p.x, p.w) for p in placed.values())
    for (l1, x1, w1), (l2, x2, _) in itertools.pairwise(boxes):
        assert l1 != l2 or x1 + w1 <= x2
    upwards = [(s, t) for s, t in g.edges if placed[t].layer <= placed[s].layer]
    assert len(upwards) == 1  # arrows go down, except one that closes the cycle a -> b -> c -> a
    assert graph_svg(g).count('class="node ') == len(g.nodes)


def test_text_in_svg_is_escaped() -> None:
    g = Graph()
    g.edge(g.service('<script>alert("x")</script>'), g.message("event", "a&b"), count=1, seen="observed")
    svg = graph_svg(g)
    assert "<script>" not in svg
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in svg
    assert "a&amp;b" in svg

    attack = '<img src=x onerror="alert(1)">'
    summary = FlowSummary("f1", attack, "flow", "failed", 100.0, 101.0, 0, 1, "x")
    messages = [MessageRow("m1", "f1", None, "event", "job.requested", attack, 100.0, {"note": attack})]
    spans = [SpanRecord("f1", "m1", attack, None, "job.requested", 100.1, 100.2, "dead", attack, 1)]
    timeline = timeline_svg(Flow(summary, messages, spans))
    assert "<img" not in timeline
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in timeline


def test_mermaid_labels_are_quoted() -> None:
    g = Graph()
    g.edge(g.service('we"ird'), g.message("event", "<b>"), seen="observed")
    text = to_mermaid(g)
    assert '"' not in text.replace('["', "").replace('"]', "").replace('(["', "").replace('"])', "")
    assert "#quot;" in text
    assert "#lt;b#gt;" in text
