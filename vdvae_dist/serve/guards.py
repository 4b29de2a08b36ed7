"""ASGI middleware of the ingress: the request body limit, enforced while the body streams
in (chunked and multipart bodies included), a bound on the values of a JSON body (parsing
runs on the event loop), and optional bearer-token authentication.

Plain ASGI (no BaseHTTPMiddleware): the limit counts the bytes as the app receives them and
stops the read at the limit, so no layer below buffers or spools more than the limit.
Errors are JSON `{error, field, allowed}` like every other error of the service.
"""
from __future__ import annotations

import json
import os
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Guard:
    """Settings of this replica, set by `Service.__init__` from the serve config.
    They live here, in a module imported by reference, because Serve ships the FastAPI
    app (and the ingress class) by value."""

    body_bytes = 16 * 2**20  # serve.max_body_mb
    token = ""  # the bearer token; "" = no authentication (serve.auth_token_env unset)
    token_env = ""  # the variable it came from, named in 401 answers
    open_paths = frozenset({"/healthz"})  # answered without a token


# A JSON body is parsed and validated on the event loop, where /healthz and the batching run:
# its cost grows with its values (a 2 MB list of numbers took 0.1 s; a 16 MB body of base64
# text takes a few ms). Every request's JSON has a handful of values, plus one per latent
# group in a temperature list, so commas (which also separate object members) bound it.
MAX_JSON_VALUES = 4096


class BodyTooLarge(Exception):
    """Raised to the app when the body it reads passes the limit."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _too_large(what: str, limit: int) -> dict:
    return {"error": f"{what} is too large", "field": "body", "allowed": f"at most {limit:,} bytes (serve.max_body_mb)"}


def _too_many_values() -> dict:
    return {"error": f"a JSON body with more than {MAX_JSON_VALUES:,} values (commas) is too large", "field": "body",
            "allowed": f"a JSON body of at most {MAX_JSON_VALUES:,} values (a temperature list holds one per latent "
                       "group)"}


def _parsed_as_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON: none given, application/json or
    application/<anything>+json."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return not kind or kind == "application/json" or kind.startswith("application/") and kind.endswith("+json")


class BodyLimitMiddleware:
    """413 for a body longer than Guard.body_bytes: at once when Content-Length says so,
    otherwise as soon as the bytes received pass the limit (the read stops there). A JSON
    body also gets 413 once it holds more than MAX_JSON_VALUES commas, before anything
    parses it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = Guard.body_bytes
        length = _header(scope, b"content-length")
        if length is not None and not length.strip().isdigit():
            return await send_json(send, 400, {"error": f"Content-Length {length[:40]!r} is not a byte count",
                                               "field": "content-length", "allowed": "a non-negative integer"})
        if length is not None and (len(length.strip()) > 18 or int(length) > limit):  # 19+ digits: at least 10^18
            shown = f"{int(length):,}" if len(length.strip()) <= 18 else "more than 10^18"
            return await send_json(send, 413, _too_large(f"a body of {shown} bytes", limit))
        is_json = _parsed_as_json(_header(scope, b"content-type"))
        received = commas = 0
        exceeded: dict | None = None  # the 413's body once the read was stopped

        async def limited_receive() -> Message:
            nonlocal received, commas, exceeded
            if exceeded:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                commas += chunk.count(b",") if is_json else 0
                if received > limit:
                    exceeded = _too_large(f"a body of more than {limit:,} bytes", limit)
                elif commas > MAX_JSON_VALUES:
                    exceeded = _too_many_values()
                if exceeded:
                    raise BodyTooLarge()
            return message

        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if exceeded:  # a layer below answered the aborted read its own way (FastAPI: 400)
                    raise BodyTooLarge()
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:  # BodyTooLarge, or whatever a layer below made of it
            if not exceeded or started:
                raise
            await send_json(send, 413, exceeded)


class TokenAuthMiddleware:
    """When Guard.token is set: 401 unless `Authorization: Bearer <token>`, on every path
    but Guard.open_paths (relative to the app's route prefix)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = Guard.token
        if not token or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root + "/"):
            path = path[len(root):]
        if path in Guard.open_paths:
            return await self.app(scope, receive, send)
        scheme, _, given = (_header(scope, b"authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode()):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send_json(send, 401, {"error": "missing or wrong bearer token" if scheme else "authentication required",
                                    "field": "authorization",
                                    "allowed": f"Authorization: Bearer <the token in ${Guard.token_env}>"},
                        headers=[(b"www-authenticate", b'Bearer realm="vdvae"')])


def token_from_env(env: str) -> str:
    """The bearer token in the environment variable serve.auth_token_env names ("" = off)."""
    if not env:
        return ""
    token = os.environ.get(env, "").strip()
    if not token:
        raise ValueError(f"serve.auth_token_env={env!r}, but {env} is unset or empty where the service replicas "
                         f"run; allowed: a token in {env} on the Serve nodes (a secret in the nodes' environment; not "
                         f"runtime_env, which the Ray dashboard shows), or "
                         'serve.auth_token_env="" for no authentication')
    return token

