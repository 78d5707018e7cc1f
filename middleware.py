"""What wraps every request: who is asking (the client, the optional API-key check), CORS,
the access log with the request metrics, and closing a connection whose body was left
unread.

All are plain ASGI middleware, so streamed responses pass through untouched; a new
reply's events even go past them (PassBodyThrough). They read their settings from the
app's Config, which the lifespan puts on `app.state`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any
from urllib.parse import parse_qs

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import metrics

access_log = logging.getLogger("chatterd.access")

# Answered without an API key: for load balancers and monitors, and the playground's page
# (which asks for a key itself).
OPEN_PATHS = ("/health", "/health/", "/playground", "/playground/")
RESUME_PATHS = ("/llmchat", "/llmchat/", "/llmtools", "/llmtools/")
METRICS_PATHS = ("/metrics", "/metrics/")
NEEDS_KEY = "an API key is required: send the header Authorization: Bearer <key>"


BODY_SEND = "chatterd.body_send"  # in the scope: PassBodyThrough's `send`


class PassBodyThrough:
    """Lets a response send its body past the layers inside this one, the outermost of ours.

    Each layer that looks at a response wraps `send` (CloseUnreadBody, AccessLog, and
    Starlette's own two around the route), so every event of a stream would go through
    all of them, though they look only at the response's start. This one leaves its own
    `send` in the scope; EventStream sends its events with it, once the start has gone
    the whole way (README, Performance). A layer that must see bodies (compression, say)
    goes outside this one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[BODY_SEND] = send
        await self.app(scope, receive, send)


class Authenticate:
    """Who is asking: every request gets its client's identity in `request.state.client`.

    With CHATTERD_API_KEYS set, every route but /health needs `Authorization: Bearer <key>`,
    and the client is that key (named by its place in the list, never by the key itself).
    /metrics needs CHATTERD_METRICS_KEY instead when that is set, so that a Prometheus server
    can scrape without holding a key the apps use.
    Without keys, the client is its address: the peer's, or, when the peer is one of
    CHATTERD_TRUSTED_PROXIES, the address that proxy reports in X-Forwarded-For.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = scope["app"].state.config
        state = scope.setdefault("state", {})
        if scope["path"] in METRICS_PATHS and config.metrics_key:
            if _presented_key(scope, (config.metrics_key,)) is None:
                await _refuse(scope, receive, send)
                return
            state["client"] = "metrics"
        elif config.api_keys:
            key = _presented_key(scope, config.api_keys)
            if key is not None:
                state["client"] = f"key #{key + 1}"
            elif scope["path"] in OPEN_PATHS:
                state["client"] = "anonymous"
            elif _resume_with_token(scope, config):
                state["client"] = "resume token"
            else:
                await _refuse(scope, receive, send)
                return
        else:
            state["client"] = client_address(scope, config.trusted_proxies)
        await self.app(scope, receive, send)


def resume_token(config: Any, app_id: str) -> str:
    """A token that lets a browser's EventSource resume the appID's streams without a key.

    EventSource cannot send an Authorization header, and a long-lived key must not go in a
    URL; this one is bound to one appID and expires after CHATTERD_RESUME_TOKEN_SECONDS.
    Every host with the same keys accepts it.
    """
    expires = int(time.time() + config.resume_token_seconds)
    return f"{expires}.{_token_mac(config, app_id, expires)}"


def _resume_with_token(scope: Scope, config: Any) -> bool:
    """A GET of a resume route whose `token` is valid for its `appID`."""
    if scope["method"] not in ("GET", "HEAD") or scope["path"] not in RESUME_PATHS:
        return False
    query = parse_qs(scope["query_string"].decode("latin-1"))
    token, app_id = query.get("token", [""])[0], query.get("appID", [""])[0]
    expires, _, mac = token.partition(".")
    if not re.fullmatch("[0-9]{1,12}", expires) or int(expires) < time.time():
        return False
    return hmac.compare_digest(mac, _token_mac(config, app_id, int(expires)))


def _token_mac(config: Any, app_id: str, expires: int) -> str:
    secret = hashlib.sha256(
        b"chatterd resume tokens\0" + "\0".join(sorted(config.api_keys)).encode()
    ).digest()
    message = f"{app_id}\0{expires}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(
        {"error": NEEDS_KEY}, 401, headers={"WWW-Authenticate": 'Bearer realm="chatterd"'}
    )
    await response(scope, receive, send)


def _presented_key(scope: Scope, keys: tuple[str, ...]) -> int | None:
    """The index of the key the request presents, or None."""
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    # Compare with every key, in constant time, so timing tells nothing about them.
    matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]
    return matches.index(True) if any(matches) else None


def client_address(scope: Scope, trusted: tuple[IPv4Network | IPv6Network, ...]) -> str:
    """The client's address; behind trusted proxies, the nearest one they did not add."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not trusted or not _within(peer, trusted):
        return peer
    forwarded = b",".join(
        value for name, value in scope["headers"] if name == b"x-forwarded-for"
    ).decode("latin-1")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _within(address: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        parsed = ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)


class CrossOrigin:
    """CORS, for web pages on other origins: Starlette's own CORSMiddleware, set up from
    CHATTERD_CORS_ORIGINS once the lifespan has read the configuration; off when unset.

    Preflights are answered for every route (before the API-key check: a browser sends
    them without credentials); origins not listed get no CORS headers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: CORSMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origins = scope["app"].state.config.cors_origins if scope["type"] == "http" else ()
        if not origins:
            await self.app(scope, receive, send)
            return
        if self._cors is None:
            self._cors = CORSMiddleware(
                self.app,
                allow_origins=list(origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Last-Event-ID",
                    "Cache-Control",  # SSE client libraries send it
                    "X-Requested-With",
                ],
                expose_headers=["Retry-After", "Chatterd-Resume-Token", "WWW-Authenticate"],
                max_age=600,
            )
        await self._cors(scope, receive, send)


class CloseUnreadBody:
    """Answer `Connection: close` when the response starts before the request body was read.

    A refusal that does not read the body (401, an early 413) leaves the rest of it on the
    connection, so granian closes the connection after the response; without this header it
    does so unannounced, and a client that reuses the connection for its next request sees
    "Server disconnected without sending a response".
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        body_read = False

        async def receive_and_note_the_end() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                body_read = True
            return message

        async def send_closing_if_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_and_note_the_end, send_closing_if_unread)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


class AccessLog:
    """One line per request, once its response has ended: method, path, status, duration, appID.
    It counts the request in chatterd_requests_total too.

    Handlers put the appID in `request.state.app_id`. Message contents are not logged
    unless CHATTERD_LOG_CONTENT is set, when handlers put them in `request.state.content`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering
        state = scope.setdefault("state", {})

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            fields = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            if "app_id" in state:
                fields["app_id"] = state["app_id"]
            if "content" in state:
                fields["content"] = state["content"]
            json_lines = scope["app"].state.config.log_format == "json"
            access_log.info(_as_json(fields) if json_lines else _as_text(fields))
            metrics.request(route_template(scope), scope["method"], status)


def route_template(scope: Scope) -> str:
    """The route a request went to, as declared (`/conversations/{appID}`), for metrics."""
    route = scope.get("route")
    if route is None:  # refused before routing (401): find the route it was meant for
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] != Match.NONE), None)
    template = getattr(route, "path_format", None)  # without converters: {appID}
    return (template.rstrip("/") or "/") if template else "unmatched"


def _as_json(fields: dict[str, object]) -> str:
    return json.dumps({"time": datetime.now(UTC).isoformat(), **fields}, ensure_ascii=False)


def _as_text(fields: dict[str, object]) -> str:
    line = f"{fields['method']} {fields['path']} {fields['status']} {fields['duration_ms']}ms"
    if "app_id" in fields:
        line += f" appID={fields['app_id']}"
    if "content" in fields:
        line += f" content={json.dumps(fields['content'], ensure_ascii=False)}"
    return line


def configure_logging(log_format: str) -> None:
    """chatterd's own log lines go to stderr: plain text, or one JSON object per line."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    logger = logging.getLogger("chatterd")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "chatterd.access":
            return record.getMessage()  # already a JSON object
        entry = {
            "time": datetime.now(UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
