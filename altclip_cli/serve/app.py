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
from .requests import (NOT_BLANK, ApiError, ClassifyRequest, EmbeddingsRequest, EmbedRequest, ErrorAnswer, ImageItem,
                       IndexRequest, SearchRequest, bad_request, decode_base64, form_to_classify, is_image_uri,
                       modality_rules, parse_json, parse_object)
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
    app.openapi = lambda: _openapi(app, state)
    return app


# --- GET /v1/health ---------------------------------------------------------------------------------------


def info_routes(state: ServeState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/health", summary="What runs here", responses=_errors())
    async def health():
        return JSONResponse(state.health())

    return router


# --- POST /v1/classify, POST /v1/embed ------------------------------------------------------------------


def model_routes(state: ServeState) -> APIRouter:
    router = APIRouter()
    model = state.model

    @router.post("/v1/classify", summary="Score images against labels", responses=_errors(*MODEL_ERRORS),
                 openapi_extra=_body_doc("ClassifyRequest", multipart=_classify_form(state)))
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

    @router.post("/v1/embed", summary="Embed texts or images", responses=_errors(*MODEL_ERRORS),
                 openapi_extra=_body_doc("EmbedRequest"))
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

    @router.get("/v1/models", summary="OpenAI's model list: the one model", responses=_errors())
    async def models():
        return JSONResponse({"object": "list", "data": [
            {"id": model.model_id, "object": "model", "created": state.started_epoch, "owned_by": "altclip"}]})

    @router.post("/v1/embeddings", summary="OpenAI-compatible embeddings (texts; data:image URIs are images)",
                 responses=_errors(*MODEL_ERRORS, 404), openapi_extra=_body_doc("EmbeddingsRequest"))
    async def embeddings(request: Request):
        req = await _parse(request, EmbeddingsRequest)
        _check_model_name(req.model, model)
        if req.dimensions is not None and req.dimensions != model.embed_dim:
            raise bad_request(f"dimensions {req.dimensions} is not available: this model's embeddings have "
                              f"{model.embed_dim}", "dimensions")
        inputs: list[str] = req.input
        check_count(len(inputs), max(state.max_images, state.max_texts), "inputs")  # before any pass over them
        text_at, image_at = await run_in_threadpool(_by_kind, inputs, req.modality)
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


def _served_names(model) -> set[str]:
    """The names /v1/embeddings takes for the served model (in any case): its id, its last path
    part (AltCLIP for BAAI/AltCLIP), "altclip", and its folder."""
    served = model.model_id
    return {served, served.rstrip("/").rsplit("/", 1)[-1], "altclip", os.path.realpath(str(model.folder))}


def _check_model_name(name: str, model) -> None:
    accepted = _served_names(model)
    if name not in accepted and name.lower() not in {a.lower() for a in accepted}:
        raise ApiError(404, f"model {name!r} is not served here; this server runs {model.model_id!r}",
                       param="model", code="model_not_found")


def _any_case_pattern(names) -> str:
    """A JSON Schema pattern matching exactly these names, in any case."""
    def char(c: str) -> str:
        if c.lower() != c.upper():
            return f"[{c.lower()}{c.upper()}]" if len(c.lower()) == len(c.upper()) == 1 else c
        return "\\" + c if c in ".^$*+?()[]{}|\\" else c

    return "^(?:" + "|".join("".join(map(char, name)) for name in sorted({n.lower() for n in names})) + ")$"


# --- POST /v1/search, POST /v1/index (Unix socket only) ---------------------------------------------------


def search_routes(state: ServeState, search_locks: IndexLocks) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/search", summary="Index a folder and rank its images against a query (Unix socket only)",
                 responses=_errors(*SEARCH_ERRORS), openapi_extra=_body_doc("SearchRequest"))
    async def search(request: Request):
        if state.transport != "unix":
            raise ApiError(403, "search reads this machine's folders and index: it is served over the Unix socket "
                                "only", type="permission_error", code="unix_socket_only")
        req = await _parse(request, SearchRequest)
        check_count(len(req.query), max(state.max_images, state.max_texts), "query parts")
        check_count(sum(p.image is not None for p in req.query), state.max_images, "query images")
        check_count(sum(p.text is not None for p in req.query), state.max_texts, "query texts")
        describe(request, f"{_plural(len(req.query), 'part')}, {req.dir}")
        return JSONResponse(await run_search(state, req, search_locks))

    @router.post("/v1/index", summary="Bring a search index up to date with folders (Unix socket only)",
                 responses=_errors(*SEARCH_ERRORS), openapi_extra=_body_doc("IndexRequest"))
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


# Every error status an endpoint answers, with why (the body is always ErrorAnswer). The gate's
# (401 with --token-file, 403 for Host or Origin over TCP, 413 over the size cap, 503 when a
# forced stop cuts a request short) apply to all.
ERROR_WHY = {
    400: "The request is malformed: not JSON, a missing, unknown or invalid field (the message names it).",
    401: "The token is missing or wrong (a server started with --token-file).",
    403: "Refused: the Host or Origin header (a TCP server without a token), or what only the Unix socket serves "
         "(server-side paths, search, index).",
    404: "The model named is not the one served here.",
    409: "Another process is updating the index (after waiting `wait` seconds).",
    413: "The body is over --max-request-mb, or holds more images or texts than --max-items.",
    415: "The body is not application/json (nor, for classify, multipart/form-data).",
    422: "Well-formed, but unusable: an image that does not decode (not an image, over the pixel cap, unreadable), "
         "or a folder or index that cannot be used.",
    500: "The index could not be updated or read (the message says why).",
    503: "The server is busy (its queue is full: come back after Retry-After seconds) or stopping (a request "
         "cut short by a forced stop, on any endpoint).",
}
GATE_ERRORS = (401, 403, 413, 503)
MODEL_ERRORS = (400, 415, 422)
SEARCH_ERRORS = (400, 409, 415, 422, 500)


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorAnswer, "description": ERROR_WHY[status]}
            for status in sorted({*GATE_ERRORS, *statuses})}


LABEL = {"pattern": NOT_BLANK["pattern"]}  # any value whose text is not blank (a list's text is "[...]")
TEMPLATE = {"type": "string", "pattern": r"\{\}"}


def _classify_form(state: ServeState) -> dict:
    """The multipart form of /v1/classify (requests.form_to_classify). A form's values are text,
    so a field is one value or several (repeated), and a label is any value whose text is not
    blank."""
    return {"type": "object", "required": ["image", "label"], "additionalProperties": False, "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary", "minLength": 1},  # files only
                  "minItems": 1, "maxItems": state.max_images},
        "label": {"anyOf": [{**LABEL, "type": ["string", "number", "boolean", "object", "null"]},
                            {"type": "array", "items": LABEL, "minItems": 1}]},
        "template": {"anyOf": [TEMPLATE, {"type": "array", "items": TEMPLATE}]},  # none is fine
        "top_k": {"type": "integer", "minimum": 1}, "on_error": {"type": "string", "enum": ["fail", "record"]}}}


def _body_doc(schema: str, multipart: dict | None = None) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if multipart:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}


def _openapi(app: FastAPI, state: ServeState) -> dict:
    """The schema, with the request models as components and this server's own limits: the
    images and texts one request may hold, the embeddings' dimension."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ImageItem, ClassifyRequest, EmbedRequest, EmbeddingsRequest, SearchRequest, IndexRequest):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(s.pop("$defs", {}))
        components[model.__name__] = s
    components["ClassifyRequest"]["properties"]["images"]["maxItems"] = state.max_images
    embed = components["EmbedRequest"]["properties"]
    for name, most in (("images", state.max_images), ("texts", state.max_texts)):
        embed[name]["maxItems"] = most
    embeddings = components["EmbeddingsRequest"]
    embeddings.update(modality_rules(state.max_images, state.max_texts))
    embeddings["properties"]["model"] = {"type": "string", "pattern": _any_case_pattern(_served_names(state.model)),
                                         "description": f"{state.model.model_id}, its last part or altclip, in any case."}
    embeddings["properties"]["dimensions"] = {
        "anyOf": [{"const": state.model.embed_dim}, {"type": "null"}],
        "description": f"The embeddings' dimension: only {state.model.embed_dim}, this model's."}
    app.openapi_schema = schema
    return schema
