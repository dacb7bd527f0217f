"""The HTTP side of `altclip serve`: the routes (FastAPI) and the gate in front of them.

Routes (JSON in and out; errors are {"error": {"message", "type", "param", "code"}}):
  GET  /v1/health       what runs here: versions, model, weights, device, precision (resolved and
                        as asked for), decoding, logit scale, pid, uptime, limits, counters
  GET  /v1/models       OpenAI's model list (the one model)
  POST /v1/classify     images + labels -> the records of `altclip classify -f json`
  POST /v1/embed        texts or images -> embeddings (JSON arrays or base64 float32)
  POST /v1/embeddings   OpenAI's embeddings request and answer; data:image URIs are images
  POST /v1/search       index a folder and rank its images (the records of `altclip search -f
                        json`; Unix socket only: see searching.py)
  POST /v1/index        `altclip index` (Unix socket only)
  GET  /docs, /openapi.json

The gate (`Gate`, plain ASGI) checks each request before the routes see it: the bearer token,
over TCP the Host and Origin headers, and the body size (413); it logs one line per request.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import os
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from ..errors import InputError
from ..inputs.files import stuck_error
from ..inputs.pipeline import DaemonPool, _prepare
from ..inputs.sources import reason
from .batcher import Batcher, QueueFull, Stopped
from .client import PROTOCOL
from .requests import (ApiError, ClassifyRequest, EmbeddingsRequest, EmbedRequest, IndexRequest, SearchRequest,
                       bad_request, decode_base64, form_to_classify, is_image_uri, parse_json, parse_object)
from .searching import IndexLocks, run_index, run_search
from .transport import HostPolicy


@dataclass
class ServeState:
    """What the routes share: the model, its thread, the decoders, the limits and the counters."""

    model: object  # altclip_cli.runtime.altclip.AltCLIP
    batcher: Batcher
    decoder: "Decoder"
    transport: str  # "unix" or "tcp"
    max_request_bytes: int
    revision: str | None = None
    token: str | None = None
    host_policy: HostPolicy | None = None
    idle_timeout: float | None = None
    log: object = None  # callable(line) for the request log, or None
    started: float = field(default_factory=time.monotonic)
    started_epoch: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    requests: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    server: object = None  # the uvicorn.Server, for the idle timeout
    stop_reason: str | None = None
    indexing: dict = field(default_factory=dict)  # the index updates of searches under way: their progress

    def health(self) -> dict:
        m = self.model
        return {
            "status": "ok", "altclip": __version__, "protocol": PROTOCOL,
            "model": m.model_id, "model_folder": str(m.folder), "revision": self.revision,
            "weights": m.weights_id, "device": str(m.device), "precision": m.precision,
            "device_requested": _requested(m.device_reason, str(m.device)),
            "precision_requested": _requested(m.precision_reason, m.precision),
            "exact_decode": bool(m.exact_decode), "logit_scale": m.logit_scale,
            "embed_dim": m.embed_dim, "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3),
            "transport": self.transport, "paths": self.transport == "unix", "search": self.transport == "unix",
            "limits": {"max_pixels": self.decoder.max_pixels, "max_request_bytes": self.max_request_bytes,
                       "queue_size": self.batcher.max_waiting, "image_batch": self.batcher.image_batch,
                       "text_batch": self.batcher.text_batch, "batch_window_ms": self.batcher.window_s * 1000,
                       "idle_timeout_s": self.idle_timeout},
            "requests": self.requests, "in_flight": self.in_flight, "waiting": self.batcher.waiting,
            "indexing": [dict(update) for update in list(self.indexing.values())],
            "batching": self.batcher.stats.as_dict(),
        }


def _requested(reason: str, resolved: str) -> str:
    """What `serve` was asked for: "auto", or the device or precision named (runtime.device's
    reasons start with "auto" when it chose). A client's --precision auto matches only a server
    that chose too."""
    return "auto" if reason.startswith("auto") else resolved


# --- images -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    name: str
    data: bytes | None = None
    path: str | None = None

    def __str__(self) -> str:  # how pipeline._prepare names it in an error
        return self.name


class Decoder:
    """Decoding and preprocessing in daemon worker threads (PIL releases the GIL), bounded by
    the same caps as files on the command line: the pixel cap and the input timeout."""

    def __init__(self, model, workers: int, max_pixels: int | None, input_timeout: float | None):
        self.model, self.max_pixels, self.input_timeout = model, max_pixels, input_timeout
        self.workers = workers
        self.pool = DaemonPool(workers)

    def _open(self, item: ImageInput):
        from ..inputs.images import open_image

        source = item.data if item.path is None else item.path  # a path: regular files only (inputs/files.py)
        return open_image(source, name=item.name, max_pixels=self.max_pixels,
                          draft_min_side=self.model.draft_min_side)

    def _collect(self, tasks) -> list:
        out = []
        for item, task in tasks:
            try:
                out.append(self.pool.result(task, self.input_timeout))
            except InputError as exc:
                out.append(exc)
            except FutureTimeout:  # the worker is stuck on this input: it is replaced
                self.pool.abandon(task)
                out.append(stuck_error(item.name, self.input_timeout))
        return out

    async def decode(self, items: list[ImageInput]) -> list:
        """(3, H, W) float32 pixels or an InputError, per item, in order."""
        tasks = [(item, self.pool.submit(_prepare, item, self._open, self.model.preprocessor)) for item in items]
        return await run_in_threadpool(self._collect, tasks)

    def close(self) -> None:
        self.pool.close()


def _image_inputs(items, state: ServeState) -> list[ImageInput]:
    out = []
    for i, item in enumerate(items):
        where = f"images[{i}]"
        if item.path is not None:
            if state.transport != "unix":
                raise ApiError(403, f"{where}.path: server-side paths are read over the Unix socket only; "
                                    "send the image's bytes (data, base64) or upload it", param=f"{where}.path",
                               type="permission_error")
            if not os.path.isabs(item.path):
                raise bad_request(f"{where}.path must be absolute (the server's working folder is not yours): "
                                  f"{item.path!r}", f"{where}.path")
            out.append(ImageInput(item.name or item.path, path=item.path))
        else:
            out.append(ImageInput(item.name or where, data=decode_base64(item.data, f"{where}.data")))
    return out


def _image_failure(results, items) -> ApiError | None:
    for i, (item, r) in enumerate(zip(items, results)):
        if isinstance(r, InputError):
            return ApiError(422, r.message, param=f"images[{i}]", code="bad_image")
    return None


# --- helpers ------------------------------------------------------------------------------------------


async def _model_job(future):
    try:
        return await asyncio.wrap_future(future)
    except Stopped as exc:
        raise ApiError(503, str(exc), type="server_error", code="stopping") from None


def _submit(fn, *args):
    try:
        return fn(*args)
    except QueueFull as exc:
        raise ApiError(503, f"{exc}; try again in {exc.retry_after} s", type="server_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except Stopped as exc:
        raise ApiError(503, str(exc), type="server_error", code="stopping") from None


def _encode_row(row: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.tolist()


def _detail(request: Request, text: str) -> None:
    info = request.scope.get("altclip")
    if info is not None:
        info["detail"] = text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def _json_body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, f"send the request as application/json (got {ctype or 'no Content-Type'})",
                       code="unsupported_media_type")
    return await request.body()


# --- the app ------------------------------------------------------------------------------------------


def create_app(state: ServeState) -> FastAPI:
    model = state.model

    @asynccontextmanager
    async def lifespan(app):
        watchdog = asyncio.create_task(_idle_watchdog(state)) if state.idle_timeout else None
        yield
        if watchdog:
            watchdog.cancel()

    app = FastAPI(title="altclip", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="BAAI's multilingual AltCLIP: zero-shot classification and embeddings of "
                              "images and texts. Protocol " + str(PROTOCOL) + ".")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/v1/health", summary="What runs here")
    async def health():
        return JSONResponse(state.health())

    @app.get("/v1/models", summary="OpenAI's model list: the one model")
    async def models():
        return JSONResponse({"object": "list", "data": [
            {"id": model.model_id, "object": "model", "created": state.started_epoch, "owned_by": "altclip"}]})

    @app.post("/v1/classify", summary="Score images against labels", openapi_extra=_body_doc("ClassifyRequest", True))
    async def classify(request: Request):
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1000, max_fields=10000, max_part_size=state.max_request_bytes)
            try:
                fields, uploads = form_to_classify(form.multi_items())
                placeholders = [{"data": "-", "name": name} for name, _ in uploads]
                req = parse_object(ClassifyRequest, {**fields, "images": placeholders})
                items = [ImageInput(name, data=await upload.read()) for name, upload in uploads]
            finally:
                await form.close()  # uploads over 1 MB were spooled to temporary files
            for i, item in enumerate(items):
                if not item.data:
                    raise bad_request(f"images[{i}] ({item.name}) is empty (zero bytes)", f"images[{i}]")
        else:
            req = parse_json(ClassifyRequest, await _json_body(request))
            items = _image_inputs(req.images, state)
        _detail(request, f"{_plural(len(items), 'image')}, {_plural(len(req.labels), 'label')}")
        templates = list(req.templates) or None
        labels_job = _submit(state.batcher.submit_call,
                             lambda: model.label_embeddings(req.labels, templates, batch_size=state.batcher.text_batch))
        decoded, label_emb = await asyncio.gather(state.decoder.decode(items), _model_job(labels_job))
        if req.on_error == "fail" and (failure := _image_failure(decoded, items)):
            raise failure
        good = [r for r in decoded if not isinstance(r, InputError)]
        records = []
        if good:
            emb = await _model_job(_submit(state.batcher.submit_images, np.stack(good), True))
            probs, logits = await run_in_threadpool(model.scores, emb, label_emb)
        from ..cli.formats import error_record, score_record

        row = 0
        for item, r in zip(items, decoded):
            if isinstance(r, InputError):
                records.append(error_record(item.name, reason(r, item.name)))
            else:
                records.append(score_record(item.name, req.labels, probs[row], logits[row], req.top_k))
                row += 1
        return JSONResponse({"model": model.model_id, "results": records})

    @app.post("/v1/embed", summary="Embed texts or images", openapi_extra=_body_doc("EmbedRequest"))
    async def embed(request: Request):
        req = parse_json(EmbedRequest, await _json_body(request))
        records = []
        if req.texts is not None:
            _detail(request, _plural(len(req.texts), "text"))
            ids = await run_in_threadpool(model.tokenizer.encode, req.texts)
            emb = await _model_job(_submit(state.batcher.submit_texts, ids, req.normalize))
            records = [{"row": i, "text": t, "embedding": _encode_row(emb[i], req.encoding)}
                       for i, t in enumerate(req.texts)]
        else:
            items = _image_inputs(req.images, state)
            _detail(request, _plural(len(items), "image"))
            decoded = await state.decoder.decode(items)
            if req.on_error == "fail" and (failure := _image_failure(decoded, items)):
                raise failure
            good = [r for r in decoded if not isinstance(r, InputError)]
            emb = await _model_job(_submit(state.batcher.submit_images, np.stack(good), req.normalize)) if good else None
            row = 0
            for item, r in zip(items, decoded):
                if isinstance(r, InputError):
                    records.append({"row": None, "image": item.name, "error": reason(r, item.name)})
                else:
                    records.append({"row": row, "image": item.name, "embedding": _encode_row(emb[row], req.encoding)})
                    row += 1
        return JSONResponse({"model": model.model_id, "dim": model.embed_dim, "dtype": "float32",
                             "normalized": req.normalize, "encoding": req.encoding, "results": records})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings (texts; data:image URIs are images)",
              openapi_extra=_body_doc("EmbeddingsRequest"))
    async def embeddings(request: Request):
        req = parse_json(EmbeddingsRequest, await _json_body(request))
        _check_model_name(req.model, model)
        if req.dimensions is not None and req.dimensions != model.embed_dim:
            raise bad_request(f"dimensions {req.dimensions} is not available: this model's embeddings have "
                              f"{model.embed_dim}", "dimensions")
        inputs: list[str] = req.input
        image_at = [i for i, s in enumerate(inputs) if req.modality == "image" or
                    (req.modality is None and is_image_uri(s))]
        text_at = [i for i in range(len(inputs)) if i not in set(image_at)]
        for i in image_at:
            if not is_image_uri(inputs[i]):
                raise bad_request(f"input[{i}] is not a data:image/...;base64, URI (modality is image)", "input")
        _detail(request, ", ".join(x for x in (_plural(len(text_at), "text") if text_at else "",
                                              _plural(len(image_at), "image") if image_at else "") if x))
        out: list = [None] * len(inputs)
        tokens = 0

        async def texts():
            nonlocal tokens
            if not text_at:
                return
            ids = await run_in_threadpool(model.tokenizer.encode, [inputs[i] for i in text_at])
            tokens = sum(len(seq) for seq in ids)
            emb = await _model_job(_submit(state.batcher.submit_texts, ids, True))
            for row, i in enumerate(text_at):
                out[i] = emb[row]

        async def images():
            if not image_at:
                return
            items = [ImageInput(f"input[{i}]", data=decode_base64(inputs[i], f"input[{i}]")) for i in image_at]
            decoded = await state.decoder.decode(items)
            for i, r in zip(image_at, decoded):
                if isinstance(r, InputError):
                    raise ApiError(422, r.message, param="input", code="bad_image")
            emb = await _model_job(_submit(state.batcher.submit_images, np.stack(decoded), True))
            for row, i in enumerate(image_at):
                out[i] = emb[row]

        await asyncio.gather(texts(), images())
        data = [{"object": "embedding", "index": i, "embedding": _encode_row(e, req.encoding_format)}
                for i, e in enumerate(out)]
        return JSONResponse({"object": "list", "data": data, "model": model.model_id,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    search_locks = IndexLocks()

    @app.post("/v1/search", summary="Index a folder and rank its images against a query (Unix socket only)",
              openapi_extra=_body_doc("SearchRequest"))
    async def search(request: Request):
        if state.transport != "unix":
            raise ApiError(403, "search reads this machine's folders and index: it is served over the Unix socket "
                                "only", type="permission_error", code="unix_socket_only")
        req = parse_json(SearchRequest, await _json_body(request))
        _detail(request, f"{_plural(len(req.query), 'part')}, {req.dir}")
        return JSONResponse(await run_search(state, req, search_locks))

    @app.post("/v1/index", summary="Bring a search index up to date with folders (Unix socket only)",
              openapi_extra=_body_doc("IndexRequest"))
    async def index(request: Request):
        if state.transport != "unix":
            raise ApiError(403, "indexing reads this machine's folders: it is served over the Unix socket only",
                           type="permission_error", code="unix_socket_only")
        req = parse_json(IndexRequest, await _json_body(request))
        _detail(request, ", ".join(p.path for p in req.paths))
        return JSONResponse(await run_index(state, req, search_locks))

    app.openapi = lambda: _openapi(app)
    return app


def _check_model_name(name: str, model) -> None:
    """The served model by its id, its last path part (AltCLIP for BAAI/AltCLIP) or "altclip"."""
    served = model.model_id
    accepted = {served, served.rstrip("/").rsplit("/", 1)[-1], "altclip", os.path.realpath(str(model.folder))}
    if name not in accepted and name.lower() not in {a.lower() for a in accepted}:
        raise ApiError(404, f"model {name!r} is not served here; this server runs {served!r}",
                       param="model", code="model_not_found")


async def _idle_watchdog(state: ServeState) -> None:
    step = min(1.0, state.idle_timeout / 4)
    while True:
        await asyncio.sleep(step)
        idle = time.monotonic() - state.last_activity
        if state.in_flight == 0 and not state.batcher.busy and idle >= state.idle_timeout:
            state.stop_reason = f"no request for {state.idle_timeout:g} s (--idle-timeout)"
            if state.server is not None:
                state.server.should_exit = True
            return


def _body_doc(schema: str, multipart: bool = False) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "label": {"type": "array", "items": {"type": "string"}},
            "template": {"type": "array", "items": {"type": "string"}},
            "top_k": {"type": "integer"}, "on_error": {"type": "string", "enum": ["fail", "record"]}},
            "required": ["image", "label"]}}
    return {"requestBody": {"required": True, "content": content}}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ClassifyRequest, EmbedRequest, EmbeddingsRequest, SearchRequest, IndexRequest):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(s.pop("$defs", {}))
        components[model.__name__] = s
    app.openapi_schema = schema
    return schema


# --- the gate -----------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


class Gate:
    """Plain ASGI in front of the app: token, Host and Origin checks, the body-size cap, the
    request counters and one log line per request."""

    DRAIN_LIMIT = 256 * 1024 * 1024  # an over-size body up to this is read and dropped, so that the client reads our 413

    def __init__(self, app, state: ServeState):
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
                await _send_error(send, refusal)
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
                                     f"listens on (protection against DNS rebinding)", type="permission_error",
                                code="bad_host")
            origin = headers.get("origin")
            if origin is not None and not _origin_allowed(origin, state.host_policy, local):
                return ApiError(403, f"cross-origin request from {origin!r} refused (altclip serve allows no "
                                     "browser pages of other sites)", type="permission_error", code="bad_origin")
        if state.token is not None:
            given = headers.get("authorization", "")
            expected = f"Bearer {state.token}"
            if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
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
                return _too_large(size, state.max_request_bytes)
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
                    await _send_error(send, _too_large(None, limit))
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
                await _send_error(send, _too_large(None, limit))

    def _log(self, scope, info, seconds: float) -> None:
        client = scope.get("client")
        who = client[0] if client and client[0] else "unix"
        path = scope.get("path", "")
        detail = f" {info['detail']}" if info.get("detail") else ""
        self.state.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {who} {scope.get('method')} {path} "
                       f"{info['status']} {seconds * 1000:.1f} ms{detail}")


def _too_large(size: int | None, limit: int) -> ApiError:
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


async def _send_error(send, error: ApiError) -> None:
    import json

    body = json.dumps(error.body(), ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in error.headers.items()]
    if error.status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def stderr_log(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
