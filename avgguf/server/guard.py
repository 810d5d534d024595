"""What the local server trusts, as one ASGI middleware in front of the app (the owner of these rules):

- Host allow-list: a server bound to loopback answers only to loopback names (`localhost`, `127.0.0.1`,
  `[::1]`), so a DNS-rebinding page (attacker.example -> 127.0.0.1) gets 403 (Ollama's CVE-2024-28224 class).
- The API key (constant-time compare) on every route but the page, its static files and /health.
- Every POST: `Content-Type: application/json` (a cross-site page cannot send it without a CORS preflight,
  which this server never grants) and no foreign `Origin` / `Sec-Fetch-Site: cross-site` (CSRF).
- The body cap counted while the body arrives (a chunked body has no Content-Length to check up front).
- Security headers on every answer: the page may not be framed, sniffed or leak its address.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import threading
import time
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from avgguf.server.protocol import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")
HANDOFF_PATH = "/avgguf/session"  # POST {"code"} -> the key, once (Handoff): public, but JSON + same-origin
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
BODY_METHODS = ("POST", "PUT", "PATCH")


DRAIN_LIMIT = 16 << 20  # a declared body up to this is read and dropped after the 413 (the client sees it)


class BodyTooLarge(APIError):
    def __init__(self, limit: int, close: bool = True):
        super().__init__(
            413, f"request body over {limit} bytes: send a shorter prompt (the limit is {limit} bytes)", code="body_too_large"
        )
        self.close = close  # end the connection after the answer (a flood is not read to its end)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """The Host names a server bound to `bind_host` answers to; None (any) when it listens beyond loopback,
    where the operator chose the network (a reverse proxy's name, the LAN address...)."""
    if not is_loopback(bind_host):
        return None
    return LOOPBACK_NAMES | {bind_host.strip("[]")}


def host_name(host_header: str) -> str:
    """`[::1]:8080` -> `::1`, `localhost:8080` -> `localhost` (lower case)."""
    try:
        name = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return ""
    return (name or "").lower()


class Handoff:
    """How `desktop` hands its key to the page it opens: the browser is started with `URL#code=CODE` (a command
    line other local users can read in `ps`), and the page trades the code for the key once, within `ttl`
    seconds; a used or late code is worth nothing."""

    def __init__(self, key: str, ttl: float = 120.0):
        self.code = secrets.token_urlsafe(24)
        self._key, self._deadline, self._used = key, time.monotonic() + ttl, False
        self._lock = threading.Lock()

    def redeem(self, code: str) -> str | None:
        with self._lock:
            if (
                self._used
                or time.monotonic() > self._deadline
                or not hmac.compare_digest(code.encode("utf-8", "replace"), self.code.encode())
            ):
                return None
            self._used = True
            return self._key


def keys_match(sent: str | None, key: str) -> bool:
    expected = f"Bearer {key}".encode()
    return sent is not None and hmac.compare_digest(sent.encode("latin-1", "replace"), expected)


class Guard:
    """Pure ASGI (streamed responses pass through untouched; the body counter wraps `receive`)."""

    def __init__(self, app, *, api_key: str | None, hosts: frozenset[str] | None, max_body: int):
        self.app, self.api_key, self.hosts, self.max_body = app, api_key, hosts, max_body
        self.state = app.state  # the registry, as the routes see it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.refuse(scope)
        if problem is not None:
            return await _reply(send, problem)
        await self.app(scope, self._counted(receive), _with_headers(send))

    def refuse(self, scope) -> APIError | None:
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        host = host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return APIError(
                403,
                f"Host {headers.get('host', '')!r} is not this server's name: a server on "
                f"loopback answers to {', '.join(sorted(self.hosts))} only (start it with --host NAME "
                f"to serve another name)",
                code="forbidden_host",
                type_="permission_error",
            )
        public = (method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith("/static/"))) or (
            method == "POST" and path == HANDOFF_PATH
        )
        if self.api_key is not None and not public and not keys_match(headers.get("authorization"), self.api_key):
            return APIError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                code="invalid_api_key",
                type_="authentication_error",
            )
        if method not in SAFE_METHODS:
            return self.refuse_write(headers, method in BODY_METHODS)
        return None

    def refuse_write(self, headers: Headers, has_body: bool) -> APIError | None:
        if headers.get("sec-fetch-site") == "cross-site" or not _same_origin(headers):
            return APIError(
                403,
                f"cross-origin request refused (Origin {headers.get('origin')!r}): this server "
                f"takes requests from its own page and from non-browser clients only",
                code="cross_origin",
                type_="permission_error",
            )
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and media != "application/json":
            return APIError(
                415,
                f"Content-Type {media or '(none)'!r}: send the body as application/json",
                param="Content-Type",
                code="unsupported_media_type",
            )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            # a modest overshoot is drained (closing with unread data resets the connection before the
            # client reads the 413); a huge one ends the connection
            return BodyTooLarge(self.max_body, close=not length.isdigit() or int(length) > DRAIN_LIMIT)
        return None

    def _counted(self, receive):
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return counted


def _same_origin(headers: Headers) -> bool:
    """No Origin (curl, SDKs, same-origin GET) or one whose host:port is the Host asked for."""
    origin = headers.get("origin")
    if origin is None:
        return True
    try:
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower() != ""
    except ValueError:
        return False


def _with_headers(send):
    async def sending(message):
        if message["type"] == "http.response.start":
            names = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


async def _reply(send, err: APIError) -> None:
    body = json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]
    if getattr(err, "close", False):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
