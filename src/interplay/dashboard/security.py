"""Who may use the dashboard and how: token, sessions, CSRF, host check, headers.

RELIABILITY S3: bind to loopback by default and refuse other addresses without a
token; with a token, every route (pages, static files, JSON) needs it; every request
that changes state is a POST carrying a CSRF token; secrets are compared in constant
time and exactly (no prefix, case or whitespace leniency).

* **Token**: ``Authorization: Bearer TOKEN``, or the login form, which sets a session
  cookie: ``s1.ISSUED.NONCE.MAC``, an HMAC-SHA256 under a key derived from the token
  (so changing the token logs everyone out), valid 12 hours, ``HttpOnly``,
  ``SameSite=Strict``, and ``Secure`` when the request came over HTTPS.
* **CSRF**: a per-session token in a cookie, ``NONCE.MAC`` (HMAC under a key random per
  process, so it cannot be planted from a sibling host), that every POST repeats in
  its ``csrf`` form field; both compared with ``hmac.compare_digest``. POSTs whose
  ``Origin`` or ``Sec-Fetch-Site`` shows another site are refused too.
* **Host check**: without a token, only loopback host names are answered, so a web
  page cannot reach the dashboard through DNS rebinding.
* **Headers**: a Content-Security-Policy without inline scripts or styles, no framing,
  no sniffing, no referrer to other sites, no caching of pages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ConfigurationError

__all__ = ["CSP", "MIN_TOKEN_LENGTH", "Guard", "Secrets", "check_token", "is_loopback", "safe_next", "style_hash"]

MIN_TOKEN_LENGTH = 16
SESSION_AGE = 12 * 3600
MAX_FORM_BYTES = 64 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" makes chromium send `Origin: null` on posts
    (b"cross-origin-resource-policy", b"same-origin"),
]

Form = dict[str, list[str]]
UnauthorizedPage = Callable[[Request], Awaitable[Response]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """Refuse tokens that are too short to resist guessing or cannot travel in a header.

    Raises:
        ConfigurationError: the token is unfit.
    """
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigurationError(
            f"the dashboard token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    return token


def safe_next(target: str | None) -> str:
    """A local path to return to after login; anything else (another site) becomes ``/flows``."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 32 or ord(c) == 127 for c in target)
    ):
        return "/flows"
    return target


def style_hash(css: str) -> str:
    """The CSP source (``sha256-...``) that allows exactly this inline style."""
    return "sha256-" + base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Secrets:
    """The keys of one dashboard: the token, the session key, the CSRF key."""

    def __init__(self, token: str | None) -> None:
        self.token = None if token is None else _bytes(check_token(token) or "")
        self._session_key = b"" if self.token is None else hmac.new(
            b"interplay-dashboard-session", self.token, hashlib.sha256).digest()
        self._csrf_key = secrets.token_bytes(32)

    @property
    def required(self) -> bool:
        """Whether requests must prove they know the token."""
        return self.token is not None

    def token_ok(self, presented: str) -> bool:
        """Whether ``presented`` is exactly the token (constant time)."""
        return self.token is not None and hmac.compare_digest(_bytes(presented), self.token)

    def _mac(self, key: bytes, text: str) -> str:
        return hmac.new(key, _bytes(text), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        """A session cookie value, issued now."""
        issued = str(int(time.time() if now is None else now))
        body = f"s1.{issued}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._mac(self._session_key, body)}"

    def session_ok(self, value: str, now: float | None = None) -> bool:
        """Whether a session cookie is ours and not expired."""
        if self.token is None:
            return False
        body, _, mac = value.rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or parts[0] != "s1":
            return False
        if not hmac.compare_digest(_bytes(mac), _bytes(self._mac(self._session_key, body))):
            return False
        if not parts[1].isdigit():
            return False
        age = (time.time() if now is None else now) - int(parts[1])
        return -60 <= age <= SESSION_AGE

    def new_csrf(self) -> str:
        """A fresh CSRF token."""
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._mac(self._csrf_key, 'csrf.' + nonce)}"

    def csrf_ok(self, value: str) -> bool:
        """Whether a CSRF token was made by this dashboard."""
        nonce, _, mac = value.partition(".")
        return bool(nonce) and hmac.compare_digest(_bytes(mac), _bytes(self._mac(self._csrf_key, "csrf." + nonce)))


def cookie_names(scope: Scope) -> tuple[str, str]:
    """``(session, csrf)`` cookie names: per port, since cookies ignore ports."""
    server = scope.get("server") or ("", 0)
    port = server[1] if server and server[1] else 0
    return f"interplay_session_{port}", f"interplay_csrf_{port}"


def cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value with the attributes every dashboard cookie gets."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


class Guard:
    """ASGI middleware in front of every route: host check, auth, CSRF, headers.

    Puts ``csrf`` (the token for forms), ``form`` (a POST's parsed fields) and
    ``authenticated`` into the request's state for the app.
    """

    def __init__(self, app: ASGIApp, keys: Secrets, unauthorized: UnauthorizedPage) -> None:
        self.app = app
        self.keys = keys
        self.unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the dashboard has none; never let one in
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        session_name, csrf_name = cookie_names(scope)
        secure = request.url.scheme == "https"
        csrf = request.cookies.get(csrf_name, "")
        new_cookies: list[str] = []
        if not self.keys.csrf_ok(csrf):
            csrf = self.keys.new_csrf()
            new_cookies.append(cookie(csrf_name, csrf, secure=secure))
        send = _decorated(send, new_cookies, static=scope["path"].startswith("/static/"))

        if not self.keys.required and not is_loopback(_host_name(request.headers.get("host") or "")):
            denied = _deny(403, "this dashboard has no token, so it answers only to loopback host names "
                                "(127.0.0.1, localhost, [::1]); start it with --token to serve others")
            await denied(scope, receive, send)
            return

        authenticated = not self.keys.required or self._authenticated(request, session_name)
        state: dict[str, Any] = scope.setdefault("state", {})
        state.update(csrf=csrf, form={}, authenticated=authenticated)
        method = scope["method"]
        login = scope["path"] == "/login" and method == "POST"
        if not authenticated and not login:
            if method == "GET" and "text/html" in request.headers.get("accept", ""):
                await (await self.unauthorized(request))(scope, receive, send)
                return
            response = _deny(401, "authentication required: Authorization: Bearer TOKEN, or log in at /login")
            response.headers["www-authenticate"] = 'Bearer realm="interplay dashboard"'
            await response(scope, receive, send)
            return
        if method in SAFE_METHODS:
            await self.app(scope, receive, send)
            return

        refusal, body = await self._check_post(request, receive, csrf_name)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        state["form"] = _parse_form(body)
        await self.app(scope, _replay(body, receive), send)

    def _authenticated(self, request: Request, session_name: str) -> bool:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            return scheme.lower() == "bearer" and self.keys.token_ok(value)
        session = request.cookies.get(session_name)
        return session is not None and self.keys.session_ok(session)

    async def _check_post(self, request: Request, receive: Receive, csrf_name: str) -> tuple[Response | None, bytes]:
        """Read a POST's form and check its CSRF token and origin; a refusal, or None."""
        body = await _read_body(receive, MAX_FORM_BYTES)
        if body is None:
            return _deny(413, "form too large"), b""
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            body = b""  # only HTML forms change state: anything else carries no CSRF token
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if site is not None and site not in ("same-origin", "none"):
            return _deny(403, f"cross-site request refused (Sec-Fetch-Site: {site})"), b""
        if origin is not None and urlsplit(origin).netloc.lower() != (request.headers.get("host") or "").lower():
            return _deny(403, "cross-origin request refused (Origin does not match Host)"), b""
        cookie_value = request.cookies.get(csrf_name, "")
        sent = _parse_form(body).get("csrf", [""])
        if (
            len(sent) != 1
            or not cookie_value
            or not self.keys.csrf_ok(cookie_value)
            or not hmac.compare_digest(_bytes(sent[0]), _bytes(cookie_value))
        ):
            return _deny(403, "missing or wrong CSRF token: reload the page and try again"), b""
        return None, body


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` -> ``[::1]``)."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _deny(status: int, text: str) -> Response:
    return PlainTextResponse(f"{status}: {text}\n", status_code=status)


def _parse_form(body: bytes) -> Form:
    form: Form = {}
    for key, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True, max_num_fields=200,
                                encoding="utf-8", errors="replace"):
        form.setdefault(key, []).append(value)
    return form


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _decorated(send: Send, cookies: list[str], *, static: bool) -> Send:
    async def decorated(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {name.lower() for name, _ in headers}
            headers += [h for h in _HEADERS if h[0] not in present]
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-cache" if static else b"no-store"))
            headers += [(b"set-cookie", c.encode("latin-1")) for c in cookies]
            message = {**message, "headers": headers}
        await send(message)

    return decorated
