"""The dashboard: flows, workflows, dead letters and the topology map in a browser.

``create_app(store_url)`` is a small ASGI app (starlette, server-rendered pages, a
little JavaScript for the live counters, no front-end build, nothing from a CDN).
``interplay dashboard --store URL`` serves it with uvicorn on 127.0.0.1; see
:mod:`interplay.dashboard.security` for the token, CSRF and host rules.
"""

from __future__ import annotations

from .app import create_app
from .server import check_bind, serve

__all__ = ["check_bind", "create_app", "serve"]
