"""RELIABILITY S3 for the dashboard: loopback by default, a token beyond it, CSRF, no GET mutations.

Requests go over real sockets to ``interplay dashboard`` processes; only the login
test needs the browser.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlencode

import pytest
from starlette.routing import Mount, Route
from typer.testing import CliRunner

import interplay.dashboard
from interplay.cli.main import cli
from interplay.dashboard.app import Dashboard as DashboardApp
from interplay.dashboard.security import Secrets

from .helpers import TOKEN, Dashboard, Response, query, start_dashboard

STATIC = Path(interplay.dashboard.__file__).parent / "static"
FORM = "application/x-www-form-urlencoded"


def every_route() -> list[tuple[str, str]]:
    """``(method, path)`` of every route the app has, static files included, plus an unknown path."""
    found: list[tuple[str, str]] = []
    for route in DashboardApp("memory://", None, Secrets(None), None).routes():
        if isinstance(route, Route):
            found += [(method, route.path) for method in sorted(route.methods or ())]
        else:
            assert isinstance(route, Mount)
            found += [("GET", f"{route.path}/{f.name}") for f in sorted(STATIC.iterdir())]
    return [*found, ("GET", "/no/such/page"), ("POST", "/no/such/page")]


def form_token(response: Response) -> str:
    """The CSRF token a page put in its forms."""
    match = re.search(r'name="csrf" value="([^"]+)"', response.body)
    assert match, response.body[:500]
    return match.group(1)


def csrf_pair(dash: Dashboard, path: str = "/dlq", headers: dict[str, str] | None = None) -> tuple[str, str, str]:
    """``(cookie name, cookie value, form token)`` from a page."""
    page = dash.request("GET", path, headers={"Accept": "text/html", **(headers or {})})
    name, value = next((k, v) for k, v in page.cookies().items() if k.startswith("interplay_csrf_"))
    return name, value, form_token(page)


# ------------------------------------------------------------------ binding
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "dashboard.example.com"])
def test_refuses_to_serve_beyond_loopback_without_a_token(host: str, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    result = CliRunner().invoke(cli, ["dashboard", "--store", store, "--host", host],
                                env={"INTERPLAY_DASHBOARD_TOKEN": None, "COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "refusing to serve the dashboard" in result.output
    assert not (tmp_path / "store.db").exists()  # it stopped before opening anything


def test_refuses_a_weak_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--store", f"sqlite:///{tmp_path / 's.db'}", "--host", "0.0.0.0",
                                      "--token", "secret"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "at least 16" in result.output


# ------------------------------------------------------------------ the token
def test_every_route_refuses_requests_without_the_token(guarded: Dashboard) -> None:
    routes = every_route()
    assert len(routes) > 15
    for method, path in routes:
        for accept in ("text/html", "application/json"):
            got = guarded.request(method, f"{path}?id=1", headers={"Accept": accept, "Content-Type": FORM},
                                  body="id=1" if method == "POST" else None)
            assert got.status in (401, 403), (method, path, accept, got.status, got.body[:200])
            assert "interplay_session" not in (got.headers.get("set-cookie") or "")


@pytest.mark.parametrize("authorization", [
    f"Bearer {TOKEN}.evil.io",  # a longer string that starts with the token
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN.upper()}",
    f"Bearer  {TOKEN}",
    f"Bearer {TOKEN.split('@')[0]}",
    f"Basic {TOKEN}",
    TOKEN,
    "Bearer ",
    "Bearer \u00fc" + TOKEN[1:],
])
def test_only_the_exact_token_is_accepted(guarded: Dashboard, authorization: str) -> None:
    for path in ("/flows", "/static/dashboard.js", "/api/counters"):
        got = guarded.request("GET", path, headers={"Authorization": authorization})
        assert got.status == 401, (authorization, path, got.status)
        assert got.headers["www-authenticate"].startswith("Bearer")


def test_forged_session_cookies_are_refused(guarded: Dashboard) -> None:
    name = f"interplay_session_{guarded.port}"
    for value in (TOKEN, "s1.9999999999.abc.def", f"s1.1.x.{'0' * 64}", ""):
        assert guarded.request("GET", "/api/counters", headers={"Cookie": f"{name}={value}"}).status == 401


def test_the_token_opens_every_page(guarded: Dashboard) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/flows", "/workflows", "/dlq", "/map", "/api/counters", "/static/dashboard.css",
                 "/static/dashboard.js", "/static/favicon.svg"):
        got = guarded.request("GET", path, headers=bearer)
        assert got.status == 200, (path, got.status, got.body[:200])
    assert guarded.request("GET", "/", headers=bearer).status == 303


def test_login_goes_back_only_to_this_site(guarded: Dashboard) -> None:
    login = guarded.request("GET", "/login", headers={"Accept": "text/html"})
    assert login.status == 401
    name, value, token = next((k, v, form_token(login)) for k, v in login.cookies().items() if "csrf" in k)
    for target, expected in (("//evil.example/x", "/flows"), ("https://evil.example", "/flows"),
                             ("/\\evil.example", "/flows"), ("/dlq?service=x", "/dlq?service=x")):
        got = guarded.request("POST", "/login", headers={"Content-Type": FORM, "Cookie": f"{name}={value}"},
                              body=urlencode({"csrf": token, "token": TOKEN, "next": target}))
        assert got.status == 303
        assert got.headers["location"] == expected
        session = got.cookies()[f"interplay_session_{guarded.port}"]
        assert "HttpOnly" in got.headers["set-cookie"]
        assert "SameSite=Strict" in got.headers["set-cookie"]
        cookie = f"interplay_session_{guarded.port}={session}"
        assert guarded.request("GET", "/api/counters", headers={"Cookie": cookie}).status == 200


def test_the_login_form_in_a_browser(guarded: Dashboard, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    response = page.goto(guarded.url + "/dlq")
    assert response is not None
    assert response.status == 401
    page.fill("input[name=token]", TOKEN + "x")
    page.click("form.login button")
    expect(page.locator(".error-box")).to_have_text("wrong token")
    page.fill("input[name=token]", TOKEN)
    page.click("form.login button")
    expect(page).to_have_url(re.compile(r"/dlq$"))  # back where it was going
    expect(page.locator("h1")).to_have_text("Dead letters")
    session = next(c for c in page.context.cookies() if c["name"].startswith("interplay_session_"))
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    page.click("form.logout button")
    expect(page.locator("form.login")).to_be_visible()
    assert page.goto(guarded.url + "/flows") is not None
    expect(page.locator("form.login")).to_be_visible()


# ------------------------------------------------------------------ no state change by GET, CSRF
@pytest.mark.parametrize("path", ["/dlq/replay?id=1", "/dlq/drop?id=1", "/workflow/cancel?id=x",
                                  "/workflow/resume?id=x", "/logout"])
def test_a_state_changing_get_is_refused(dashboard: Dashboard, store: str, path: str) -> None:
    before = query(store, "SELECT id FROM ip_dlq ORDER BY id")
    got = dashboard.request("GET", path, headers={"Accept": "text/html"})
    assert got.status == 405
    assert got.headers["allow"] == "POST"
    assert query(store, "SELECT id FROM ip_dlq ORDER BY id") == before


def test_a_post_without_the_right_csrf_token_is_refused(dashboard: Dashboard, store: str) -> None:
    before = query(store, "SELECT id FROM ip_dlq ORDER BY id")
    victim = before[0][0]
    name, cookie, token = csrf_pair(dashboard)
    assert token == cookie
    good = {"Content-Type": FORM, "Cookie": f"{name}={cookie}"}

    def post(headers: dict[str, str], fields: dict[str, str]) -> int:
        return dashboard.request("POST", "/dlq/drop", headers=headers, body=urlencode(fields)).status

    assert post({"Content-Type": FORM}, {"id": str(victim)}) == 403  # neither
    assert post(good, {"id": str(victim)}) == 403  # cookie, no field
    wrong = token[:-1] + ("1" if token.endswith("0") else "0")
    assert post(good, {"id": str(victim), "csrf": wrong}) == 403  # wrong field
    assert post({"Content-Type": FORM}, {"id": str(victim), "csrf": token}) == 403  # field, no cookie
    forged = "abc.def"
    assert post({"Content-Type": FORM, "Cookie": f"{name}={forged}"}, {"id": str(victim), "csrf": forged}) == 403
    assert post({**good, "Origin": "http://evil.example"}, {"id": str(victim), "csrf": token}) == 403
    assert post({**good, "Sec-Fetch-Site": "cross-site"}, {"id": str(victim), "csrf": token}) == 403
    assert post({**good, "Content-Type": "text/plain"}, {"id": str(victim), "csrf": token}) == 403
    assert query(store, "SELECT id FROM ip_dlq ORDER BY id") == before

    # The same request with the right token goes through (to an id that is not there: nothing changes).
    got = dashboard.request("POST", "/dlq/drop", headers={**good, "Origin": dashboard.url},
                            body=urlencode({"id": "999999999", "csrf": token}))
    assert got.status == 303
    assert got.headers["location"] == "/dlq?flash=missing&id=999999999"


def test_a_broker_that_is_down_spoils_only_the_actions(store: str, tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="the redis extra is not installed")
    with start_dashboard(store, tmp_path / "dashboard.log", args=("--bus", "redis://127.0.0.1:1")) as dash:
        assert dash.request("GET", "/dlq").status == 200  # pages read the store only
        before = query(store, "SELECT id FROM ip_dlq ORDER BY id")
        name, cookie, token = csrf_pair(dash)
        got = dash.request("POST", "/dlq/replay", headers={"Content-Type": FORM, "Cookie": f"{name}={cookie}"},
                           body=urlencode({"csrf": token, "id": str(before[0][0])}))
        assert got.status == 502
        assert "the bus is unavailable" in got.body
        assert query(store, "SELECT id FROM ip_dlq ORDER BY id") == before


# ------------------------------------------------------------------ host names, headers
def test_without_a_token_only_loopback_host_names_are_answered(dashboard: Dashboard) -> None:
    port = dashboard.port
    for host in ("evil.example", f"evil.example:{port}", f"192.0.2.2:{port}", f"127.0.0.1.evil.example:{port}"):
        assert dashboard.request("GET", "/api/counters", headers={"Host": host}).status == 403, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert dashboard.request("GET", "/api/counters", headers={"Host": host}).status == 200, host


def test_pages_carry_security_headers(dashboard: Dashboard) -> None:
    got = dashboard.request("GET", "/flows", headers={"Accept": "text/html"})
    csp = got.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "style-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert got.headers["x-frame-options"] == "DENY"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["cache-control"] == "no-store"
    assert "server" not in got.headers
    cookie = got.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
