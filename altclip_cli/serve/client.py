"""A small client for `altclip serve`: http.client over a Unix socket or TCP, standard library
only (no torch, numpy or PIL), so a command can ask a warm server before deciding to load the
model itself.

    info = health("/run/user/1000/altclip/altclip.sock")           # or "http://127.0.0.1:8790"
    check_compatible(info, model="BAAI/AltCLIP")                     # ServerMismatch if not
    out = post_json(target, "/v1/embed", {"texts": ["a cat"]})

Strings a server sends that the commands show (its /v1/health, its error messages and hints)
come back with their control characters escaped (`printable`): a server cannot move the cursor,
recolour or retitle the terminal of whoever reads them.

Failures are typed: `ServerDown` (nothing answers, or the connection was lost before the answer:
the caller may fall back to loading the model itself), `ServerMismatch` (a server answers but
runs another model or protocol), `RequestFailed` (the server answered with an error; `ServerBusy`
for a full queue, with `retry_after`) and `ServerTimeout`. All are `AltclipError`s, so a command
that meets one ends with its `error:` and `hint:` lines and exit status 1.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import AltclipError

PROTOCOL = 1  # bumped when a request or response shape changes incompatibly
DEFAULT_TIMEOUT = 300.0  # seconds to wait for an answer (the server bounds its own work too)
HEALTH_TIMEOUT = 5.0


class ServerError(AltclipError):
    """Base class: a message for people and an optional hint."""


class ServerDown(ServerError):
    """Nothing answers at the target, or the server went away before it answered."""


class ServerLost(ServerDown):
    """The connection closed before the answer came (the server stopped or was killed mid-request)."""


class ServerTimeout(ServerError):
    """The server did not answer in time."""


class ServerMismatch(ServerError):
    """A server answers, but not with the model or protocol the caller needs."""


class RequestFailed(ServerError):
    """The server answered with an error status; `error` is its JSON error object."""

    def __init__(self, status: int, message: str, error: dict | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status
        self.error = error or {}


class ServerBusy(RequestFailed):
    """503: the server cannot take the request now (its queue is full, it is stopping, its
    decoders are stuck); try again after `retry_after` seconds when it says so. The hint is the
    server's when it gives one."""

    def __init__(self, status, message, error=None, retry_after: float | None = None, hint: str | None = None):
        super().__init__(status, message, error,
                         hint=hint or "try again shortly, or start the server with a larger --queue-size")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Target:
    """Where a server listens: a Unix socket path, or an http(s) base URL (host, port, prefix)."""

    socket_path: str | None = None
    scheme: str = "http"
    host: str = "localhost"
    port: int | None = None
    prefix: str = ""  # a path the routes live under, e.g. for http://host:port/altclip
    token: str | None = None

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{'' if self.port is None else f':{self.port}'}{self.prefix}"

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None


def parse_target(spec: str | os.PathLike | Target, token: str | None = None) -> Target:
    """A Target from a socket path (`/run/.../altclip.sock`, `unix:PATH`) or a URL
    (`http://127.0.0.1:8790`). A bearer token may come with it."""
    if isinstance(spec, Target):
        return spec if token is None else Target(**{**spec.__dict__, "token": token})
    text = os.fspath(spec)
    if text.startswith("unix:"):
        text = text[len("unix:"):]
        if text.startswith("//"):
            text = text[2:]
        return Target(socket_path=os.path.expanduser(text), token=token)
    if "://" not in text:
        return Target(socket_path=os.path.expanduser(text), token=token)
    url = urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{text!r} is not a server address: use a socket path or an http(s):// URL")
    return Target(scheme=url.scheme, host=url.hostname, port=url.port, prefix=url.path.rstrip("/"),
                  token=token)


def printable(text: str) -> str:
    """`text` with every character that is not printable (control characters: C0, DEL, C1, the
    bidirectional overrides; line breaks and tabs too) written as a Python escape (\\x1b, \\u202e)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def printable_strings(value):
    """A JSON value with each string in it made printable (keys too)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_strings(k): printable_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_strings(v) for v in value]
    return value


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket; the Host header says localhost."""

    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connection(target: Target, timeout: float | None) -> http.client.HTTPConnection:
    if target.is_unix:
        return _UnixConnection(target.socket_path, timeout)
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    return cls(target.host, target.port, timeout=timeout)


def request(target, method: str, path: str, body: bytes | None = None, *,
            headers: dict | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one request. Raises ServerDown when
    nothing answers or the connection is lost before the whole answer came, ServerTimeout when
    no answer comes within `timeout` seconds. An error status is returned, not raised."""
    target = parse_target(target)
    conn = _connection(target, timeout)
    all_headers = {"Accept": "application/json", **(headers or {})}
    if target.token:
        all_headers["Authorization"] = f"Bearer {target.token}"
    try:
        try:
            conn.connect()
        except OSError as exc:  # no such socket, connection refused, ...
            if isinstance(exc, TimeoutError):
                raise ServerTimeout(f"{target}: no connection within {timeout:g} s") from exc
            raise ServerDown(f"no server answers at {target} ({_why(exc)})",
                             hint="start one with `altclip serve`") from exc
        try:
            conn.request(method, target.prefix + path, body=body, headers=all_headers)
        except (BrokenPipeError, ConnectionResetError):
            # The server may have answered early (413 on an over-size body) and closed: read it.
            pass
        try:
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError as exc:
            raise ServerTimeout(f"{target}: no answer within {timeout:g} s",
                                hint="the server may be overloaded; a larger timeout waits longer") from exc
        except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionError,
                http.client.BadStatusLine) as exc:
            raise ServerLost(f"the server at {target} closed the connection before it answered "
                             f"({_why(exc)}): it stopped or was killed",
                             hint="see the server's log; start it again with `altclip serve`") from exc
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _json_or_raise(target, status: int, headers: dict, data: bytes) -> dict:
    try:
        payload = json.loads(data) if data else {}
    except ValueError:
        payload = None
    if 200 <= status < 300 and isinstance(payload, dict):
        return payload
    if 200 <= status < 300:
        raise RequestFailed(status, f"{target}: the answer is not a JSON object")
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {"message": data[:200].decode("utf-8", "replace")}
    error = printable_strings(error)
    message = error.get("message") or f"HTTP {status}"
    hint = error.get("hint") if isinstance(error.get("hint"), str) else None
    if status == 503:
        raw = headers.get("retry-after")
        try:
            retry = float(raw) if raw is not None else None
        except ValueError:
            retry = None
        raise ServerBusy(status, message, error, retry_after=retry, hint=hint)
    if status == 401:
        hint = "this server needs a token: pass the one in its --token-file"
    raise RequestFailed(status, message, error, hint=hint)


def get_json(target, path: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> dict:
    target = parse_target(target)
    return _json_or_raise(target, *request(target, "GET", path, timeout=timeout))


def post_json(target, path: str, payload: dict, *, timeout: float | None = DEFAULT_TIMEOUT) -> dict:
    """POST a JSON object and return the JSON answer; an error status raises RequestFailed
    (ServerBusy for 503)."""
    target = parse_target(target)
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    status, headers, data = request(target, "POST", path, body,
                                    headers={"Content-Type": "application/json"}, timeout=timeout)
    return _json_or_raise(target, status, headers, data)


def health(target, *, timeout: float | None = HEALTH_TIMEOUT) -> dict:
    """GET /v1/health: the server's version, protocol, model, weights, device, precision, pid,
    uptime (strings made printable). ServerDown when nothing answers; ServerMismatch when what answers is not an
    altclip server."""
    target = parse_target(target)
    try:
        info = printable_strings(get_json(target, "/v1/health", timeout=timeout))
    except RequestFailed as exc:
        if exc.status in (401, 403):
            raise
        raise ServerMismatch(f"{target} answers, but not as an altclip server (HTTP {exc.status})") from exc
    if "protocol" not in info or "model" not in info:
        raise ServerMismatch(f"{target} answers, but not as an altclip server")
    return info


def check_compatible(info: dict, *, model: str | None = None, revision: str | None = None,
                     protocol: int = PROTOCOL) -> None:
    """Raise ServerMismatch unless the server's health `info` speaks `protocol` and runs `model`
    (a hub id as given, or a local folder: compared by absolute path) at `revision`."""
    if info.get("protocol") != protocol:
        raise ServerMismatch(f"the server speaks protocol {info.get('protocol')} (altclip {info.get('altclip')}), "
                             f"this client {protocol}",
                             hint="restart the server with this altclip version")
    if model is not None and not _same_model(model, info):
        raise ServerMismatch(f"the server runs {info.get('model')}, not {model}",
                             hint="stop it and start `altclip serve --model ...` with the model you want")
    if (revision or "main") != (info.get("revision") or "main"):
        raise ServerMismatch(f"the server runs revision {info.get('revision') or 'main'} of {info.get('model')}, "
                             f"not {revision or 'main'}")


def _same_model(model: str, info: dict) -> bool:
    """A local folder by its real path (the same relative name may be another folder where the
    server runs); a hub id by name."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return os.path.realpath(local) == os.path.realpath(info.get("model_folder") or "\0")
    return model == info.get("model")
