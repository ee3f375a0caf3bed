"""The dashboard's routes: server-rendered pages over one store, and four POST actions.

Pages (GET, never change anything): ``/flows``, ``/flow?id=``, ``/workflows``,
``/workflow?id=``, ``/dlq``, ``/map``, and ``/api/counters`` (JSON for the live
counters). Actions (POST with a CSRF token, answered with a redirect back):
``/workflow/cancel``, ``/workflow/resume``, ``/dlq/replay``, ``/dlq/drop``. Ids travel
as query or form fields, never in the path, because run and flow ids are free text.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..app import App
from ..errors import ConfigurationError, NotFound, TransportError
from ..runtime import Runtime
from ..workflow.context import SUB
from ..workflow.handle import ENDED
from . import queries
from .security import CSP, Guard, Secrets, cookie, cookie_names, safe_next, style_hash
from .svg import graph_svg, ms, timeline_svg
from .topology import declared_graph, merge, observed_graph, to_mermaid
from .views import DeadLetterView, decode_body, flow_tree, pretty, when

if TYPE_CHECKING:
    from starlette.types import ASGIApp

__all__ = ["FLOW_STATUSES", "RUN_STATUSES", "Dashboard", "create_app"]

HERE = Path(__file__).parent
FLOW_STATUSES = ("running", "completed", "failed", "stuck", "compensated", "cancelled", "parked")
RUN_STATUSES = ("pending", "running", "completed", "failed", "compensated", "cancelled", "parked")
SINCE = {"15m": ("last 15 minutes", 900), "1h": ("last hour", 3600), "24h": ("last 24 hours", 86400),
         "7d": ("last 7 days", 7 * 86400)}
FLASH = {
    "replayed": "Dead letter {id} replayed: it is back with its service, same message id.",
    "dropped": "Dead letter {id} dropped.",
    "missing": "Dead letter {id} is no longer in the queue.",
    "cancel-requested": "Cancellation requested: the run's current step raises WorkflowCancelled and its saga "
                        "compensates.",
    "already-ended": "The run had already ended: nothing to cancel.",
    "resumed": "Run resumed: an orchestrator will pick it up.",
    "not-parked": "The run is not parked: nothing to resume.",
}
LOGIN_CSS = (
    "body{margin:0;font:15px/1.5 system-ui,sans-serif;background:#f6f7f9;color:#1d2430}"
    "header{padding:12px 24px;background:#1f3b57;color:#fff}main{max-width:520px;margin:48px auto;padding:0 24px}"
    "form{display:flex;gap:10px;align-items:center}input{font:inherit;padding:4px 8px}"
    "button{font:inherit;padding:4px 14px}.error-box{color:#b42318;background:#fde8e6;padding:8px 12px}"
)
LOGIN_CSP = CSP.replace("style-src 'self'", f"style-src '{style_hash(LOGIN_CSS)}'").replace(
    "script-src 'self'", "script-src 'none'")
"""The login page's policy: no script at all, and only its own inline style (pinned by hash)."""
READ_ONLY_BUS = "memory://"
"""The pages' bus: none that could be down (as for the CLI's read-only commands)."""
NEVER_PURGE = 10 * 365 * 24 * 3600.0
"""The dashboard only looks: retention sweeps are left to the services' runtimes."""


def create_app(store_url: str, *, bus: str | None = None, token: str | None = None, app: App | None = None) -> ASGIApp:
    """The dashboard as an ASGI app over the store at ``store_url``.

    Args:
        store_url: the store to show (``sqlite:///interplay.db``, ``postgresql://...``).
        bus: where replays and cancellations are sent; default ``INTERPLAY_BUS``, else the
            store's own queue (as ``interplay dlq replay`` does).
        token: if set, every request must carry it (``Authorization: Bearer``) or a
            session cookie from the login form. Needed when serving beyond loopback.
        app: draw this app's declared topology on the map (beside what the store saw).

    Raises:
        ConfigurationError: the token is too weak to use.
    """
    dashboard = Dashboard(store_url, bus, Secrets(token), app)
    starlette = Starlette(
        routes=dashboard.routes(),
        lifespan=dashboard.lifespan,
        exception_handlers={HTTPException: dashboard.http_error, NotFound: dashboard.not_found},
    )
    return Guard(starlette, dashboard.keys, dashboard.login_page)


class Dashboard:
    """The state behind the routes: the runtime on the store, templates, keys."""

    def __init__(self, store_url: str, bus: str | None, keys: Secrets, app: App | None) -> None:
        self.store_url = store_url
        self.bus = bus
        self.keys = keys
        self.app = app
        self._rt: Runtime | None = None
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
            trim_blocks=True, lstrip_blocks=True,
        )
        self.env.globals.update(when=when, ms=ms, pretty=pretty, query=_query)

    @property
    def rt(self) -> Runtime:
        """The runtime (open while the server runs)."""
        if self._rt is None:
            raise RuntimeError("the dashboard's runtime is not open (serve it with its lifespan)")
        return self._rt

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        """Open the store for as long as the server runs (no broker: pages only read)."""
        viewer = App("interplay-dashboard")
        async with viewer.run(store=self.store_url, bus=READ_ONLY_BUS, services=[], orchestrator=False,
                              purge_interval=NEVER_PURGE) as rt:
            self._rt = rt
            try:
                yield
            finally:
                self._rt = None

    @contextlib.asynccontextmanager
    async def acting(self) -> AsyncIterator[Runtime]:
        """A runtime on the open store and the real bus, for one action that sends (replay, cancel).

        Opened per action, as the CLI does, so that a broker that is down spoils only the
        actions that need it (502), never the pages.
        """
        actor = App("interplay-dashboard").run(store=self.rt.store, bus=self.bus, services=[], orchestrator=False,
                                               purge_interval=NEVER_PURGE)
        try:
            async with actor as rt:
                yield rt
        except TransportError as exc:
            raise HTTPException(502, f"the bus is unavailable: {exc}") from None
        except ConfigurationError as exc:  # e.g. the bus's driver is not installed
            raise HTTPException(500, f"cannot open the bus: {exc}") from None

    def routes(self) -> list[Route | Mount]:
        """Every route of the dashboard."""
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/flows", self.flows, methods=["GET"]),
            Route("/flow", self.flow, methods=["GET"]),
            Route("/workflows", self.workflows, methods=["GET"]),
            Route("/workflow", self.workflow, methods=["GET"]),
            Route("/workflow/cancel", self.cancel, methods=["POST"]),
            Route("/workflow/resume", self.resume, methods=["POST"]),
            Route("/dlq", self.dlq, methods=["GET"]),
            Route("/dlq/replay", self.replay, methods=["POST"]),
            Route("/dlq/drop", self.drop, methods=["POST"]),
            Route("/map", self.map, methods=["GET"]),
            Route("/api/counters", self.counters, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # ------------------------------------------------------------------ rendering
    async def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        """A page: the template with the counters, the CSRF token and any flash message."""
        counters = await self._counts() if self._rt is not None else None
        html = self.env.get_template(template).render(
            request_path=request.url.path, csrf=request.state.csrf, counters=counters,
            flash=_flash(request), auth=self.keys.required, store=self.rt.store.url if self._rt else "",
            **context,
        )
        return HTMLResponse(html, status_code=status_code)

    async def login_page(self, request: Request, error: str = "", next_path: str | None = None) -> Response:
        """The login form, with status 401: what an unauthenticated browser gets on any page."""
        if next_path is None:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            next_path = request.query_params.get("next") if request.url.path == "/login" else here
        html = self.env.get_template("login.html").render(
            csrf=request.state.csrf, next=safe_next(next_path), error=error, login_css=LOGIN_CSS,
        )
        return HTMLResponse(html, status_code=401, headers={"content-security-policy": LOGIN_CSP})

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Errors as pages (keeping e.g. a 405's Allow header)."""
        assert isinstance(exc, HTTPException)
        if not hasattr(request.state, "csrf"):  # not behind the guard: plain text
            return Response(exc.detail, status_code=exc.status_code, headers=exc.headers)
        response = await self.render(request, "error.html", exc.status_code, title=str(exc.status_code),
                                     message=exc.detail)
        response.headers.update(exc.headers or {})
        return response

    async def not_found(self, request: Request, exc: Exception) -> Response:
        """A flow, run or dead letter that does not exist."""
        return await self.render(request, "error.html", 404, title="not found", message=str(exc))

    async def _counts(self) -> dict[str, Any]:
        store = self.rt.store
        return {
            "flows": await store.count_flows(self.rt.clock.now()),
            "runs": await queries.run_counts(store),
            "dlq": await queries.dlq_count(store),
        }

    # ------------------------------------------------------------------ pages
    async def home(self, request: Request) -> Response:
        """``/``: the flows."""
        return RedirectResponse("/flows", status_code=303)

    async def flows(self, request: Request) -> Response:
        """Flows, newest first, filtered by status, name and start time."""
        q = request.query_params
        status = _choice(q.get("status"), FLOW_STATUSES, "status")
        since_key = _choice(q.get("since"), tuple(SINCE), "since")
        name = (q.get("name") or "").strip()[:200] or None
        limit = _int(q.get("limit"), 100, 1, 1000)
        since = None if since_key is None else self.rt.clock.now() - SINCE[since_key][1]
        rows = await self.rt.flows(status=status, name=name, limit=limit, since=since)
        return await self.render(
            request, "flows.html", title="Flows", flows=rows, statuses=FLOW_STATUSES, since_options=SINCE,
            names=await queries.flow_names(self.rt.store), filters={
                "status": status or "", "name": name or "", "since": since_key or "", "limit": limit},
        )

    async def flow(self, request: Request) -> Response:
        """One flow: its tree, its timeline, its runs and dead letters."""
        flow_id = _required(request, "id")
        flow = await self.rt.trace(flow_id)
        return await self.render(
            request, "flow.html", title=f"Flow {flow.name}", flow=flow, tree=flow_tree(flow),
            timeline=Markup(timeline_svg(flow)),  # safe: every text in it went through svg.esc
            runs=await queries.flow_runs(self.rt.store, flow_id),
            dead=[_dead_view(d) for d in await self.rt.store.dlq_list(100, flow_id=flow_id)],
        )

    async def workflows(self, request: Request) -> Response:
        """Workflow runs, newest first, filtered by status and workflow."""
        q = request.query_params
        status = _choice(q.get("status"), RUN_STATUSES, "status")
        workflow = (q.get("workflow") or "").strip()[:200] or None
        limit = _int(q.get("limit"), 100, 1, 1000)
        runs = await self.rt.workflows(status=status, workflow=workflow, limit=limit)
        return await self.render(
            request, "workflows.html", title="Workflows", runs=runs, statuses=RUN_STATUSES,
            filters={"status": status or "", "workflow": workflow or "", "limit": limit},
        )

    async def workflow(self, request: Request) -> Response:
        """One run: status, input, result or error, journal, and its buttons."""
        handle = await self.rt.workflow(_required(request, "id"))
        run = await handle.run()
        journal = [(_step_no(e.seq), e) for e in await handle.journal()]
        return await self.render(
            request, "workflow.html", title=f"Run {run.workflow}", run=run, journal=journal,
            can_cancel=run.status not in ENDED, can_resume=run.status == "parked",
        )

    async def dlq(self, request: Request) -> Response:
        """The dead-letter queue, newest first, each entry with its payload and buttons."""
        service = (request.query_params.get("service") or "").strip()[:200] or None
        limit = _int(request.query_params.get("limit"), 100, 1, 1000)
        entries = await self.rt.store.dlq_list(limit, group=service)
        return await self.render(request, "dlq.html", title="Dead letters", entries=[_dead_view(d) for d in entries],
                                 filters={"service": service or "", "limit": limit})

    async def map(self, request: Request) -> Response:
        """The topology: declared by the app (if given), observed in the store, or both."""
        default = "both" if self.app is not None else "observed"
        sources = ("both", "declared", "observed") if self.app is not None else ("observed",)
        source = _choice(request.query_params.get("source"), sources, "source") or default
        observed = observed_graph(await queries.observed_edges(self.rt.store))
        if self.app is None or source == "observed":
            graph = observed
        elif source == "declared":
            graph = declared_graph(self.app)
        else:
            graph = merge(declared_graph(self.app), observed)
        edges = sorted(graph.edges.values(), key=lambda e: (graph.nodes[e.source].label, graph.nodes[e.target].label))
        return await self.render(
            request, "map.html", title="Map", graph=graph, edges=edges, source=source, sources=sources,
            svg=Markup(graph_svg(graph)),  # safe: every text in it went through svg.esc
            mermaid=to_mermaid(graph), app_name=self.app.name if self.app else None,
        )

    async def counters(self, request: Request) -> Response:
        """Flows and runs by status and the dead-letter count, as JSON (polled by the pages)."""
        body = orjson.dumps({**await self._counts(), "time": time.time()})
        return Response(body, media_type="application/json")

    # ------------------------------------------------------------------ actions
    async def cancel(self, request: Request) -> Response:
        """Cancel a run (POST)."""
        run_id = _form_value(request, "id")
        async with self.acting() as rt:
            done = await (await rt.workflow(run_id)).cancel()
        return _back("/workflow", id=run_id, flash="cancel-requested" if done else "already-ended")

    async def resume(self, request: Request) -> Response:
        """Resume a parked run (POST)."""
        run_id = _form_value(request, "id")
        await self.rt.workflow(run_id)  # 404 for an unknown run
        done = await self.rt.resume(run_id)
        return _back("/workflow", id=run_id, flash="resumed" if done else "not-parked")

    async def replay(self, request: Request) -> Response:
        """Send dead letters back to their service (POST)."""
        ids = _form_ids(request)
        async with self.acting() as rt:
            taken = await rt.replay(ids)
        return _back("/dlq", flash="replayed" if taken else "missing", id=",".join(str(i) for i in ids))

    async def drop(self, request: Request) -> Response:
        """Delete dead letters for good (POST)."""
        ids = _form_ids(request)
        dropped = await self.rt.drop(ids)
        return _back("/dlq", flash="dropped" if dropped else "missing", id=",".join(str(i) for i in ids))

    # ------------------------------------------------------------------ login
    async def login_form(self, request: Request) -> Response:
        """``GET /login``: the form, or straight on when already signed in (or no token is set)."""
        if not self.keys.required or request.state.authenticated:
            return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        return await self.login_page(request)

    async def login(self, request: Request) -> Response:
        """``POST /login``: check the token, set the session cookie, go on."""
        form = request.state.form
        target = safe_next((form.get("next") or [""])[0])
        if not self.keys.required:
            return RedirectResponse(target, status_code=303)
        if not self.keys.token_ok((form.get("token") or [""])[0]):
            return await self.login_page(request, error="wrong token", next_path=target)
        response = RedirectResponse(target, status_code=303)
        session_name, _ = cookie_names(request.scope)
        response.headers.append("set-cookie", cookie(
            session_name, self.keys.new_session(), secure=request.url.scheme == "https", max_age=12 * 3600))
        return response

    async def logout(self, request: Request) -> Response:
        """``POST /logout``: forget the session cookie."""
        response = RedirectResponse("/login", status_code=303)
        session_name, _ = cookie_names(request.scope)
        response.headers.append("set-cookie", cookie(session_name, "", secure=request.url.scheme == "https",
                                                     max_age=0))
        return response


# ---------------------------------------------------------------------- helpers
def _query(**params: object) -> str:
    """A query string from the non-empty params (for links that keep filters)."""
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _choice(value: str | None, allowed: tuple[str, ...], what: str) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise HTTPException(400, f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def _int(value: str | None, default: int, low: int, high: int) -> int:
    if not value:
        return default
    try:
        return min(max(int(value), low), high)
    except ValueError:
        raise HTTPException(400, f"not a number: {value!r}") from None


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise HTTPException(400, f"missing ?{name}=")
    return value


def _form_value(request: Request, name: str) -> str:
    values: list[str] = request.state.form.get(name) or []
    if len(values) != 1 or not values[0]:
        raise HTTPException(400, f"the form needs one {name!r} field")
    return values[0]


def _form_ids(request: Request) -> list[int]:
    values: list[str] = request.state.form.get("id") or []
    try:
        ids = [int(v) for v in values]
    except ValueError:
        raise HTTPException(400, "dead letter ids are numbers") from None
    if not ids:
        raise HTTPException(400, "the form needs at least one 'id' field")
    return ids


def _back(path: str, **params: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode(params)}", status_code=303)


def _flash(request: Request) -> str | None:
    template = FLASH.get(request.query_params.get("flash") or "")
    if template is None:
        return None
    ids = [part for part in (request.query_params.get("id") or "").split(",") if part.isdigit()]
    return template.format(id=", ".join(ids) or "")


def _step_no(seq: int) -> str:
    step, sub = divmod(seq, SUB)
    return str(step) if sub == 0 else f"{step}.{sub}"


def _dead_view(d: Any) -> DeadLetterView:
    payload, headers = decode_body(d.body)
    return DeadLetterView(
        id=d.id, time=d.time, service=d.group, type=d.type, reason=d.reason, error=d.error or "",
        attempts=d.attempts, flow_id=d.flow_id, msg_id=d.msg_id, payload=payload, headers=headers,
    )

