"""The gate in front of the routes (plain ASGI): each request's bearer token, over TCP its Host
and Origin headers, its body size (413), the request counters and one log line per request; and
the error answers, `{"error": {"message", "type", "param", "code"}}`, whoever refuses."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .requests import ApiError, bad_request
from .transport import HostPolicy, token_matches


class BodyTooLarge(Exception):
    pass


class Gate:
    """Plain ASGI in front of the app: token, Host and Origin checks, the body-size cap, the
    request counters and one log line per request. state: the ServeState."""

    DRAIN_LIMIT = 256 * 1024 * 1024  # an over-size body up to this is read and dropped, so that the client reads our 413

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        started = time.monotonic()
        info = {"status": 0, "detail": ""}
        scope["altclip"] = info
        state.in_flight += 1
        state.requests += 1
        try:
            refusal = self._refusal(scope)
            if refusal is None:
                await self._forward(scope, receive, send, info)
            else:
                if refusal.status == 413:
                    await self._drain(scope, receive)
                info["status"] = refusal.status
                await send_error(send, refusal)
        finally:
            state.in_flight -= 1
            state.last_activity = time.monotonic()
            if state.log is not None:
                self._log(scope, info, time.monotonic() - started)

    def _refusal(self, scope) -> ApiError | None:
        state = self.state
        headers = _headers(scope)
        if state.host_policy is not None:
            local = (scope.get("server") or (None, None))[0]
            host = headers.get("host")
            if not state.host_policy.allows(host, local):
                return ApiError(403, f"Host {host!r} is not this server's name; requests must name the address it "
                                     f"listens on (protection against DNS rebinding; serve --allow-host NAME "
                                     f"accepts another name)", type="permission_error", code="bad_host")
            origin = headers.get("origin")
            if origin is not None and not _origin_allowed(origin, state.host_policy, local):
                return ApiError(403, f"cross-origin request from {origin!r} refused (altclip serve allows no "
                                     "browser pages of other sites)", type="permission_error", code="bad_origin")
        if state.token is not None:
            if not token_matches(headers.get("authorization"), state.token):
                return ApiError(401, "missing or wrong token: send Authorization: Bearer <the token in the "
                                     "server's --token-file>", type="authentication_error", code="bad_token",
                                headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return bad_request("Content-Length is not a number")
            if size > state.max_request_bytes:
                return too_large(size, state.max_request_bytes)
        return None

    async def _drain(self, scope, receive) -> None:
        """Read and drop a refused body of modest size, unless the client waits for 100-continue:
        a client still sending when the connection closes would miss the answer."""
        headers = _headers(scope)
        if "100-continue" in headers.get("expect", "").lower():
            return
        try:
            if int(headers.get("content-length", "0")) > self.DRAIN_LIMIT:
                return
        except ValueError:
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _forward(self, scope, receive, send, info) -> None:
        limit = self.state.max_request_bytes
        received = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge()
            return message

        async def checked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                if over:  # whatever the app made of BodyTooLarge, the answer is 413
                    info["status"] = 413
                    started = True
                    await send_error(send, too_large(None, limit))
                    return
                info["status"] = message["status"]
                started = True
            elif over:
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, checked_send)
        except BodyTooLarge:
            if not started:
                info["status"] = 413
                await send_error(send, too_large(None, limit))
        except asyncio.CancelledError:  # a forced stop (Ctrl-C twice) cuts the request short: say so
            if started or not getattr(self.state.server, "force_exit", False):
                raise
            info["status"] = 503
            await send_error(send, ApiError(503, "the server was stopped at once (Ctrl-C twice) before it answered",
                                            type="server_error", code="stopping",
                                            hint="send it again once a server is up"))

    def _log(self, scope, info, seconds: float) -> None:
        client = scope.get("client")
        who = client[0] if client and client[0] else "unix"
        path = scope.get("path", "")
        detail = f" {info['detail']}" if info.get("detail") else ""
        self.state.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {who} {scope.get('method')} {path} "
                       f"{info['status']} {seconds * 1000:.1f} ms{detail}")


def describe(request, text: str) -> None:
    """What the request asked for, in a few words for its log line ("3 images, 2 labels")."""
    info = request.scope.get("altclip")
    if info is not None:
        info["detail"] = text


def answer_errors(app) -> None:
    """The app's errors answered in the gate's shape: ApiError as it is, Starlette's own
    (404, 405) as an ApiError with their status."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code,
                            headers=getattr(exc, "headers", None))


def too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size:,} bytes" if size is not None else "over the limit"
    return ApiError(413, f"the request is {what}; this server takes at most {limit:,} bytes "
                         f"(--max-request-mb {limit / 1e6:g})", code="request_too_large")


def _headers(scope) -> dict:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _origin_allowed(origin: str, policy: HostPolicy, local_ip) -> bool:
    try:
        url = urlsplit(origin)
        host = url.netloc or ""
    except ValueError:
        return False
    if url.scheme not in ("http", "https") or not host:
        return False
    if ":" not in host.rsplit("]", 1)[-1]:
        host += ":443" if url.scheme == "https" else ":80"
    return policy.allows(host, local_ip)


async def send_error(send, error: ApiError) -> None:
    """An error answer sent straight through ASGI (before or instead of the app)."""
    body = json.dumps(error.body(), ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in error.headers.items()]
    if error.status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def stderr_log(line: str) -> None:
    """The request log's default sink."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
