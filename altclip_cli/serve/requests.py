"""The request bodies `altclip serve` accepts, validated by pydantic, and the one error type the
routes raise (`ApiError`, answered as `{"error": {"message", "type", "param", "code"}}`, the
shape OpenAI's clients read).

An image item is a string (an absolute path, Unix socket only, or a `data:image/...;base64,`
URI) or an object with exactly one of `path` and `data` (base64, or a data URI) and an optional
`name` that the answer's records use.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator,
                      model_validator)


class ApiError(Exception):
    """An HTTP error answer: status, a message that names the problem, OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.hint = hint  # what to do about it, as the command line's hint: line

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.hint:
            error["hint"] = self.hint
        return {"error": error}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- what the OpenAPI schema declares beyond the types (JSON Schema patterns, as the validators check) ---

BASE64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)"  # not empty
DATA_URI = r"data:(?:image/[^;,]*|application/octet-stream)?(?:;[^;,]*)*;base64," + BASE64  # decode_base64's
# An embeddings input that is an image: is_image_uri takes it (";base64," within its first 100
# characters), decode_base64 reads it.
DATA_URI_SCHEMA = {"type": "string", "pattern": r"^data:[Ii][Mm][Aa][Gg][Ee]/[^;,]{0,30}(?:;[^;,]{0,11}){0,4};base64,"
                   + BASE64 + "$", "description": "A data:image/...;base64, URI."}
# An embeddings input that is_image_uri does not take for an image: any other string is a text.
TEXT_SCHEMA = {"type": "string", "pattern": r"^(?![Dd][Aa][Tt][Aa]:[Ii][Mm][Aa][Gg][Ee]/[\s\S]{0,81};[Bb][Aa][Ss][Ee]64,)",
               "description": "A text."}
NOT_BLANK = {"type": "string", "pattern": r"\S"}
SOME = {"minItems": 1}


def _integral(value):
    """JSON's 3.0 is the integer 3 (JSON Schema's integer too); parsing is strict otherwise."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]  # 1 or more


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _image_item(value):
    if isinstance(value, str):
        return {"data": value} if value.startswith("data:") else {"path": value}
    return value


class ImageItem(_Strict):
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"properties": {"path": {"type": "string"}}, "required": ["path"]},
        {"properties": {"data": {"type": "string"}}, "required": ["data"]}]})

    path: str | None = Field(None, description="An absolute path the server reads (Unix socket only).",
                             json_schema_extra={"pattern": "^/"})
    data: str | None = Field(None, description="The image file's bytes in base64, or a data:image/...;base64, URI.",
                             json_schema_extra={"pattern": f"^(?:{BASE64}|{DATA_URI})$"})
    name: str | None = Field(None, description="How the answer names this image [default: the path, or images[i]].")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("give exactly one of path and data")
        return self


class _StringOrItem:
    """An image item's schema: the item, or the string that stands for one (_image_item)."""

    def __get_pydantic_json_schema__(self, core_schema, handler):
        return {"anyOf": [{"type": "string", "pattern": f"^(?:/|{DATA_URI}$)",
                           "description": "An absolute path (Unix socket only) or a data:image/...;base64, URI."},
                          handler(core_schema)]}


ImageRef = Annotated[ImageItem, BeforeValidator(_image_item), _StringOrItem()]
Label = Annotated[str, WithJsonSchema({**NOT_BLANK, "description": "A label: not blank."})]
Template = Annotated[str, WithJsonSchema({"type": "string", "pattern": r"\{\}", "description": "{} marks the label."})]


class ClassifyRequest(_Strict):
    images: list[ImageRef] = Field(description="Images to score (at least one).", json_schema_extra=SOME)
    labels: list[Label] = Field(description="Labels in any language, kept in order.", json_schema_extra=SOME)
    templates: list[Template] = Field(default_factory=list, description='Text around each label, {} marks the label.')
    top_k: Count | None = Field(None, description="Only the K most likely labels per image.")
    on_error: Literal["fail", "record"] = Field(
        "fail", description="fail: an unusable image fails the request (422); record: it gets an error record.")

    @field_validator("images")
    @classmethod
    def _some_images(cls, v):
        if not v:
            raise ValueError("images is empty: give at least one image")
        return v

    @field_validator("labels")
    @classmethod
    def _good_labels(cls, v):
        if not v:
            raise ValueError("labels is empty: give at least one label")
        for i, label in enumerate(v):
            if not label.strip():
                raise ValueError(f"label {i} ({label!r}) is empty")
        return v

    @field_validator("templates")
    @classmethod
    def _good_templates(cls, v):
        for template in v:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no {{}} where the label goes")
        return v


class EmbedRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"oneOf": [  # texts or images
        {"properties": {"texts": {"type": "array"}}, "required": ["texts"]},
        {"properties": {"images": {"type": "array"}}, "required": ["images"]}]})

    texts: list[str] | None = Field(None, description="Texts to embed (give texts or images).", json_schema_extra=SOME)
    images: list[ImageRef] | None = Field(None, description="Images to embed.", json_schema_extra=SOME)
    normalize: bool = Field(True, description="L2-normalise the embeddings.")
    encoding: Literal["float", "base64"] = Field(
        "float", description="float: JSON arrays; base64: the float32 little-endian bytes in base64.")
    on_error: Literal["fail", "record"] = "fail"

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.texts is None) == (self.images is None):
            raise ValueError("give either texts or images")
        if self.images is not None and not self.images:
            raise ValueError("images is empty: give at least one image")
        if self.texts is not None and not self.texts:
            raise ValueError("texts is empty: give at least one text")
        return self


class QueryPart(_Strict):
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"properties": {"text": {"type": "string"}}, "required": ["text"]},
        {"properties": {"image": {"not": {"type": "null"}}}, "required": ["image"]}]})

    text: str | None = Field(None, description="A text part, in any language (not blank).",
                             json_schema_extra={"pattern": NOT_BLANK["pattern"]})
    image: ImageRef | None = Field(None, description="An image part: an image item (a path or data).")
    weight: float = Field(1.0, description="Its weight; negative subtracts it.")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text and image")
        if self.text is not None and not self.text.strip():
            raise ValueError("the text is empty")
        if not math.isfinite(self.weight):
            raise ValueError("the weight must be a finite number")
        return self


class _Indexing(_Strict):
    """What search and index requests share: where the index is and how folders are walked."""

    index: str = Field("auto", description='Where the index lives: "auto" (the model\'s own) or an absolute folder.',
                       json_schema_extra={"pattern": "^(?:auto$|/)"})
    include_hidden: bool = False
    exclude_dirs: list[str] | None = Field(
        None, description="Folder names not to index [default: .git, node_modules, ...].")
    wait: float = Field(0.0, ge=0, le=86_400, description="Seconds to wait for another process updating the index.")


class SearchRequest(_Indexing):
    """`altclip search` as a request: the server indexes the folder `dir` (unless update is
    false) and ranks the images below it. Paths are the server's: Unix socket only."""

    query: list[QueryPart] = Field(description="The query's parts: their weighted sum is the query.",
                                   json_schema_extra=SOME)
    dir: str = Field(description="An absolute folder: the images below it are indexed and searched.",
                     json_schema_extra={"pattern": "^/"})
    top_k: Count = Field(10, description="The number of results.")
    min_score: float | None = Field(None, description="Only results whose cosine is at least this.")
    update: bool = Field(True, description="Index new and changed images below dir first.")
    after: str | None = Field(None, description="Only photos taken on or after this date: YYYY, YYYY-MM or YYYY-MM-DD.")
    before: str | None = Field(None, description="Only photos taken on or before this date (its period included).")
    near: str | list[float] | None = Field(
        None, description='Only photos taken near this place: "LAT,LON" or [LAT, LON] in decimal degrees.')
    within: str | None = Field(None, description='With near: how far, e.g. "5km" or "500m" [default: 1km].')
    camera: str | None = Field(None, description="Only photos whose camera make and model contain this (any case).")
    sort: str | None = Field(None, description='"score" (best first, the default) or "date" (the results kept by '
                                               'top_k and min_score, oldest first; those without a date last).')

    @field_validator("query")
    @classmethod
    def _some_parts(cls, v):
        if not v:
            raise ValueError("query is empty: give at least one part")
        return v


class IndexPath(_Strict):
    path: str = Field(description="An absolute file or folder on the server's machine.",
                      json_schema_extra={"pattern": "^/"})
    name: str | None = Field(None, description="How messages name it [default: the path].")


class IndexRequest(_Indexing):
    """`altclip index` as a request: the server brings the index up to date with the images at or
    below `paths`. Paths are the server's: Unix socket only."""

    paths: list[IndexPath] = Field(description="What to index: absolute files or folders.", json_schema_extra=SOME)
    retry_failed: bool = Field(False, description="Try again the images that failed before, changed or not.")
    rebuild: bool = Field(False, description="Start the index over and embed every image.")
    compact: bool = Field(False, description="Rewrite the vector file without the vectors no file uses.")

    @field_validator("paths")
    @classmethod
    def _some_paths(cls, v):
        if not v:
            raise ValueError("paths is empty: give at least one file or folder")
        return v


def _inputs(item: dict, most: int | None = None) -> dict:
    """The schema of an embeddings request's input: one string or a list of them (at most
    `most`), each `item`."""
    array = {"type": "array", "items": item, "minItems": 1, **({"maxItems": most} if most else {})}
    return {"anyOf": [item, array]}


def modality_rules(max_images: int | None = None, max_texts: int | None = None) -> dict:
    """What each modality asks of an embeddings request's inputs (JSON Schema): "text" any
    strings, "image" data URIs, none: texts and data URIs, each as is_image_uri takes it; at
    most max_texts inputs (max_images when all are images)."""
    def modality(name, item, most):
        return {"properties": {"modality": {"const": name} if name else {"type": "null"}, "input": _inputs(item, most)},
                **({"required": ["modality"]} if name else {})}

    return {"anyOf": [modality("text", {"type": "string"}, max_texts), modality("image", DATA_URI_SCHEMA, max_images),
                      modality(None, {"anyOf": [TEXT_SCHEMA, DATA_URI_SCHEMA]}, max_texts)]}


class EmbeddingsRequest(_Strict):
    """OpenAI's embeddings request; an input that is a data:image/...;base64, URI is an image
    (or every input, with "modality": "image", as Infinity has it)."""

    model_config = ConfigDict(json_schema_extra=lambda schema: schema.update(modality_rules()))

    model: str
    input: object = Field(description="A string or a list of strings; token arrays are not accepted.",
                          json_schema_extra=_inputs({"type": "string"}))
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None
    modality: Literal["text", "image"] | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, v):
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise ValueError("input must be a string or a list of strings")
        if not v:
            raise ValueError("input is empty: give at least one string")
        for i, item in enumerate(v):
            if not isinstance(item, str):
                what = "token ids" if isinstance(item, (int, list)) else type(item).__name__
                raise ValueError(f"input[{i}] is {what}: this server takes strings (texts, or "
                                 "data:image/...;base64, URIs), not token arrays")
        return v


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, naming the field or input.")
    type: str = Field(description="invalid_request_error, authentication_error, permission_error or server_error.")
    param: str | None = Field(description="The field at fault (images[2].data), or null.")
    code: str | None = Field(description="A stable name for the problem (too_many_items, bad_image, ...), or null.")
    hint: str = Field(None, description="What to do about it, when there is something to say.")


class ErrorAnswer(BaseModel):
    """The body of every error answer (OpenAI's shape)."""

    error: ErrorDetail


def parse_json(model: type[BaseModel], body: bytes):
    """A validated request from a JSON body; ApiError(400) naming the first problem otherwise."""
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(body, strict=True)  # JSON's types as the schema has them: no "1" for 1
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_object(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """One ApiError for pydantic's errors: the first, named by its field path (`labels`, `images[2].data`)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = _field_path(first.get("loc", ()))
    kind = first.get("type", "")
    message = first.get("msg", "invalid")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', message)})")
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {where!r}", param=where, code="unknown_field")
    if kind == "missing":
        return bad_request(f"missing field {where!r}", param=where, code="missing_field")
    if kind == "model_type" and not where:
        return bad_request("the request body must be a JSON object")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        return bad_request(message if not where or where in message else f"{where}: {message}", param=where or None)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return bad_request(f"{where or 'body'}: {message}{more}", param=where or None)


def _field_path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_one_source()]", "function-before[_image_item()]") or "[" in str(part):
            continue  # pydantic's validator wrappers
        else:
            out += ("." if out else "") + str(part)
    return out


# --- image items --------------------------------------------------------------------------------------


def decode_base64(text: str, where: str) -> bytes:
    """The bytes of base64 text or of a `data:...;base64,` URI; ApiError naming `where` otherwise."""
    if text.startswith("data:"):
        head, sep, payload = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad_request(f"{where} is a data URI without ;base64, (only base64 data URIs are accepted)", where)
        media = head[len("data:"):-len(";base64")].split(";")[0].strip().lower()
        if media and not media.startswith("image/") and media != "application/octet-stream":
            raise bad_request(f"{where} is a data URI of type {media!r}, not an image", where)
        text = payload
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not valid base64", where) from None
    if not data:
        raise bad_request(f"{where} is empty (zero bytes)", where)
    return data


def is_image_uri(text: str) -> bool:
    return text[:11].lower() == "data:image/" and ";base64," in text[:100].lower()


def form_to_classify(fields: list[tuple[str, object]]) -> tuple[dict, list[tuple[str, object]]]:
    """A multipart classify form -> (a ClassifyRequest dict without images, the uploads as
    (filename, UploadFile)). Fields: image (files, repeatable), label, template (repeatable),
    top_k, on_error; `labels`/`templates` may also hold a JSON array."""
    data: dict = {"labels": [], "templates": []}
    uploads = []
    for key, value in fields:
        is_file = not isinstance(value, str)
        if key in ("image", "images", "file", "files"):
            if not is_file:
                raise bad_request(f"form field {key!r} must be a file upload (curl -F {key}=@photo.jpg)", key)
            uploads.append((getattr(value, "filename", None) or f"images[{len(uploads)}]", value))
        elif is_file:
            raise bad_request(f"form field {key!r} is a file; only image may be", key)
        elif key in ("label", "template"):
            data[key + "s"].append(value)
        elif key in ("labels", "templates"):
            try:
                items = json.loads(value)
            except ValueError:
                items = None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise bad_request(f"form field {key!r} must be a JSON array of strings (or use {key[:-1]}=... repeatedly)", key)
            data[key].extend(items)
        elif key == "top_k":
            data["top_k"] = value
        elif key == "on_error":
            data["on_error"] = value
        else:
            raise bad_request(f"unknown form field {key!r}", key, code="unknown_field")
    return data, uploads
