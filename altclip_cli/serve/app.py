"""The HTTP routes of `altclip serve` (FastAPI), one router per endpoint family.

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

The gate in front of them (gate.py) checks the token, Host, Origin and body size first; the
requests' work runs in jobs.py's decoders and on the model thread (batcher.py).
"""
from __future__ import annotations

import asyncio
import base64
import os
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..version import __version__
from ..errors import InputError
from ..inputs.sources import reason
from ..outputs.records import error_record, score_record
from .client import PROTOCOL
from .gate import answer_errors, describe
from .jobs import ImageInput, embed_images, image_failure, image_inputs, model_job, submit
from .requests import (ApiError, ClassifyRequest, EmbeddingsRequest, EmbedRequest, IndexRequest, SearchRequest,
                       bad_request, decode_base64, form_to_classify, is_image_uri, parse_json, parse_object)
from .searching import IndexLocks, run_index, run_search
from .state import ServeState


def create_app(state: ServeState) -> FastAPI:
    search_locks = IndexLocks()

    @asynccontextmanager
    async def lifespan(app):
        watchdog = asyncio.create_task(_idle_watchdog(state)) if state.idle_timeout else None
        yield
        if watchdog:
            watchdog.cancel()
        search_locks.close()

    app = FastAPI(title="altclip", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="BAAI's multilingual AltCLIP: zero-shot classification and embeddings of "
                              "images and texts. Protocol " + str(PROTOCOL) + ".")
    answer_errors(app)
    routers = (info_routes(state), model_routes(state), openai_routes(state), search_routes(state, search_locks))
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


# --- GET /v1/health, GET /v1/models ---------------------------------------------------------------------


def info_routes(state: ServeState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/health", summary="What runs here")
    async def health():
        return JSONResponse(state.health())

    return router


# --- POST /v1/classify, POST /v1/embed ------------------------------------------------------------------


def model_routes(state: ServeState) -> APIRouter:
    router = APIRouter()
    model = state.model

    @router.post("/v1/classify", summary="Score images against labels",
                 openapi_extra=_body_doc("ClassifyRequest", True))
    async def classify(request: Request):
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=max(1000, state.max_images + 1), max_fields=10000,
                                      max_part_size=state.max_request_bytes)
            try:
                fields, uploads = form_to_classify(form.multi_items())
                check_count(len(uploads), state.max_images, "images")
                placeholders = [{"data": "-", "name": name} for name, _ in uploads]
                req = parse_object(ClassifyRequest, {**fields, "images": placeholders})
                items = [ImageInput(name, data=await upload.read()) for name, upload in uploads]
            finally:
                await form.close()  # uploads over 1 MB were spooled to temporary files
            for i, item in enumerate(items):
                if not item.data:
                    raise bad_request(f"images[{i}] ({item.name}) is empty (zero bytes)", f"images[{i}]")
        else:
            req = await _parse(request, ClassifyRequest)
            check_count(len(req.images), state.max_images, "images")
            items = await run_in_threadpool(image_inputs, req.images, state)
        describe(request, f"{_plural(len(items), 'image')}, {_plural(len(req.labels), 'label')}")
        templates = list(req.templates) or None
        labels_job = submit(state.batcher.submit_call,
                            lambda: model.label_embeddings(req.labels, templates, batch_size=state.batcher.text_batch))
        embedded, label_emb = await asyncio.gather(
            embed_images(state, items, True, stop_at_failure=req.on_error == "fail"), model_job(labels_job))
        if req.on_error == "fail" and (failure := image_failure(embedded, items)):
            raise failure

        def answer() -> JSONResponse:
            good = [r for r in embedded if not isinstance(r, InputError)]
            if good:
                probs, logits = model.scores(np.stack(good), label_emb)
            records, row = [], 0
            for item, r in zip(items, embedded):
                if isinstance(r, InputError):
                    records.append(error_record(item.name, reason(r, item.name)))
                else:
                    records.append(score_record(item.name, req.labels, probs[row], logits[row], req.top_k))
                    row += 1
            return JSONResponse({"model": model.model_id, "results": records})

        return await run_in_threadpool(answer)

    @router.post("/v1/embed", summary="Embed texts or images", openapi_extra=_body_doc("EmbedRequest"))
    async def embed(request: Request):
        req = await _parse(request, EmbedRequest)
        head = {"model": model.model_id, "dim": model.embed_dim, "dtype": "float32", "normalized": req.normalize,
                "encoding": req.encoding}
        if req.texts is not None:
            check_count(len(req.texts), state.max_texts, "texts")
            describe(request, _plural(len(req.texts), "text"))
            ids = await run_in_threadpool(model.tokenizer.encode, req.texts)
            emb = await model_job(submit(state.batcher.submit_texts, ids, req.normalize))
            return await run_in_threadpool(lambda: JSONResponse({**head, "results": [
                {"row": i, "text": t, "embedding": _encode_row(emb[i], req.encoding)} for i, t in enumerate(req.texts)]}))
        check_count(len(req.images), state.max_images, "images")
        items = await run_in_threadpool(image_inputs, req.images, state)
        describe(request, _plural(len(items), "image"))
        embedded = await embed_images(state, items, req.normalize, stop_at_failure=req.on_error == "fail")
        if req.on_error == "fail" and (failure := image_failure(embedded, items)):
            raise failure

        def answer() -> JSONResponse:
            records, row = [], 0
            for item, r in zip(items, embedded):
                if isinstance(r, InputError):
                    records.append({"row": None, "image": item.name, "error": reason(r, item.name)})
                else:
                    records.append({"row": row, "image": item.name, "embedding": _encode_row(r, req.encoding)})
                    row += 1
            return JSONResponse({**head, "results": records})

        return await run_in_threadpool(answer)

    return router


# --- GET /v1/models, POST /v1/embeddings (OpenAI's shapes) ------------------------------------------------


def openai_routes(state: ServeState) -> APIRouter:
    router = APIRouter()
    model = state.model

    @router.get("/v1/models", summary="OpenAI's model list: the one model")
    async def models():
        return JSONResponse({"object": "list", "data": [
            {"id": model.model_id, "object": "model", "created": state.started_epoch, "owned_by": "altclip"}]})

    @router.post("/v1/embeddings", summary="OpenAI-compatible embeddings (texts; data:image URIs are images)",
                 openapi_extra=_body_doc("EmbeddingsRequest"))
    async def embeddings(request: Request):
        req = await _parse(request, EmbeddingsRequest)
        _check_model_name(req.model, model)
        if req.dimensions is not None and req.dimensions != model.embed_dim:
            raise bad_request(f"dimensions {req.dimensions} is not available: this model's embeddings have "
                              f"{model.embed_dim}", "dimensions")
        inputs: list[str] = req.input
        text_at, image_at = _by_kind(inputs, req.modality)
        check_count(len(image_at), state.max_images, "images")
        check_count(len(text_at), state.max_texts, "texts")
        describe(request, ", ".join(x for x in (_plural(len(text_at), "text") if text_at else "",
                                                _plural(len(image_at), "image") if image_at else "") if x))
        out: list = [None] * len(inputs)
        tokens = 0

        async def texts():
            nonlocal tokens
            if not text_at:
                return
            ids = await run_in_threadpool(model.tokenizer.encode, [inputs[i] for i in text_at])
            tokens = sum(len(seq) for seq in ids)
            emb = await model_job(submit(state.batcher.submit_texts, ids, True))
            for row, i in enumerate(text_at):
                out[i] = emb[row]

        async def images():
            if not image_at:
                return
            items = await run_in_threadpool(
                lambda: [ImageInput(f"input[{i}]", data=decode_base64(inputs[i], f"input[{i}]")) for i in image_at])
            embedded = await embed_images(state, items, True, stop_at_failure=True)
            if (failure := image_failure(embedded, items)) is not None:
                raise ApiError(422, failure.message, param="input", code="bad_image")
            for i, row in zip(image_at, embedded):
                out[i] = row

        await asyncio.gather(texts(), images())
        return await run_in_threadpool(lambda: JSONResponse({
            "object": "list", "model": model.model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": _encode_row(e, req.encoding_format)}
                     for i, e in enumerate(out)]}))

    return router


def _by_kind(inputs: list[str], modality: str | None) -> tuple[list[int], list[int]]:
    """(the positions of texts, those of images) among an embeddings request's inputs; 400 for
    an input that must be an image and is not a data URI."""
    text_at, image_at = [], []
    for i, s in enumerate(inputs):
        if modality == "image":
            if not is_image_uri(s):
                raise bad_request(f"input[{i}] is not a data:image/...;base64, URI (modality is image)", "input")
            image_at.append(i)
        elif modality is None and is_image_uri(s):
            image_at.append(i)
        else:
            text_at.append(i)
    return text_at, image_at


def _check_model_name(name: str, model) -> None:
    """The served model by its id, its last path part (AltCLIP for BAAI/AltCLIP) or "altclip"."""
    served = model.model_id
    accepted = {served, served.rstrip("/").rsplit("/", 1)[-1], "altclip", os.path.realpath(str(model.folder))}
    if name not in accepted and name.lower() not in {a.lower() for a in accepted}:
        raise ApiError(404, f"model {name!r} is not served here; this server runs {served!r}",
                       param="model", code="model_not_found")


# --- POST /v1/search, POST /v1/index (Unix socket only) ---------------------------------------------------


def search_routes(state: ServeState, search_locks: IndexLocks) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/search", summary="Index a folder and rank its images against a query (Unix socket only)",
                 openapi_extra=_body_doc("SearchRequest"))
    async def search(request: Request):
        if state.transport != "unix":
            raise ApiError(403, "search reads this machine's folders and index: it is served over the Unix socket "
                                "only", type="permission_error", code="unix_socket_only")
        req = await _parse(request, SearchRequest)
        check_count(sum(p.image is not None for p in req.query), state.max_images, "query images")
        check_count(sum(p.text is not None for p in req.query), state.max_texts, "query texts")
        describe(request, f"{_plural(len(req.query), 'part')}, {req.dir}")
        return JSONResponse(await run_search(state, req, search_locks))

    @router.post("/v1/index", summary="Bring a search index up to date with folders (Unix socket only)",
                 openapi_extra=_body_doc("IndexRequest"))
    async def index(request: Request):
        if state.transport != "unix":
            raise ApiError(403, "indexing reads this machine's folders: it is served over the Unix socket only",
                           type="permission_error", code="unix_socket_only")
        req = await _parse(request, IndexRequest)
        describe(request, ", ".join(p.path for p in req.paths))
        return JSONResponse(await run_index(state, req, search_locks))

    return router


# --- helpers ------------------------------------------------------------------------------------------


def _encode_row(row: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.tolist()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def _parse(request: Request, model):
    """The request's JSON body validated as `model` (requests.py), in a worker thread (a body
    may be tens of megabytes); 415 for another media type."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, f"send the request as application/json (got {ctype or 'no Content-Type'})",
                       code="unsupported_media_type")
    return await run_in_threadpool(parse_json, model, await request.body())


def check_count(n: int, cap: int, what: str) -> None:
    """413 when a request holds more than `cap` images or texts: each request's work stays bounded."""
    if n > cap:
        raise ApiError(413, f"the request holds {n:,} {what}; this server takes at most {cap:,} per request "
                            f"(--max-items): send them in several requests", code="too_many_items")


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


# --- the OpenAPI schema ---------------------------------------------------------------------------------


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
