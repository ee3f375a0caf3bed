"""Serving the dashboard: where it may bind, and running uvicorn."""

from __future__ import annotations

from ..app import App
from ..errors import ConfigurationError
from .app import create_app
from .security import check_token, is_loopback

__all__ = ["check_bind", "serve"]


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token (RELIABILITY S3).

    Raises:
        ConfigurationError: ``host`` is not a loopback address and there is no token,
            or the token is too weak.
    """
    check_token(token)
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host} without a token: anyone who can reach it could replay, "
            "drop and cancel. Give --token (or INTERPLAY_DASHBOARD_TOKEN), or bind to 127.0.0.1"
        )


def serve(
    store_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8321,
    bus: str | None = None,
    token: str | None = None,
    app: App | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the dashboard until interrupted (blocking).

    Raises:
        ConfigurationError: see :func:`check_bind`.
    """
    import uvicorn

    check_bind(host, token)
    asgi = create_app(store_url, bus=bus, token=token, app=app)
    config = uvicorn.Config(
        asgi, host=host, port=port, log_level=log_level, lifespan="on", server_header=False,
        proxy_headers=False, ws="none",
    )
    uvicorn.Server(config).run()
