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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _image_item(value):
    if isinstance(value, str):
        return {"data": value} if value.startswith("data:") else {"path": value}
    return value


class ImageItem(_Strict):
    path: str | None = Field(None, description="An absolute path the server reads (Unix socket only).")
    data: str | None = Field(None, description="The image file's bytes in base64, or a data:image/...;base64, URI.")
    name: str | None = Field(None, description="How the answer names this image [default: the path, or images[i]].")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("give exactly one of path and data")
        return self


ImageRef = Annotated[ImageItem, BeforeValidator(_image_item)]


class ClassifyRequest(_Strict):
    images: list[ImageRef] = Field(description="Images to score (at least one).")
    labels: list[str] = Field(description="Labels in any language, kept in order.")
    templates: list[str] = Field(default_factory=list, description='Text around each label, {} marks the label.')
    top_k: int | None = Field(None, ge=1, description="Only the K most likely labels per image.")
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
    texts: list[str] | None = Field(None, description="Texts to embed (give texts or images).")
    images: list[ImageRef] | None = Field(None, description="Images to embed.")
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
    text: str | None = Field(None, description="A text part, in any language.")
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

    index: str = Field("auto", description='Where the index lives: "auto" (the model\'s own) or an absolute folder.')
    include_hidden: bool = False
    exclude_dirs: list[str] | None = Field(
        None, description="Folder names not to index [default: .git, node_modules, ...].")
    wait: float = Field(0.0, ge=0, le=86_400, description="Seconds to wait for another process updating the index.")


class SearchRequest(_Indexing):
    """`altclip search` as a request: the server indexes the folder `dir` (unless update is
    false) and ranks the images below it. Paths are the server's: Unix socket only."""

    query: list[QueryPart] = Field(description="The query's parts: their weighted sum is the query.")
    dir: str = Field(description="An absolute folder: the images below it are indexed and searched.")
    top_k: int = Field(10, ge=1, description="The number of results.")
    min_score: float | None = Field(None, description="Only results whose cosine is at least this.")
    update: bool = Field(True, description="Index new and changed images below dir first.")

    @field_validator("query")
    @classmethod
    def _some_parts(cls, v):
        if not v:
            raise ValueError("query is empty: give at least one part")
        return v


class IndexPath(_Strict):
    path: str = Field(description="An absolute file or folder on the server's machine.")
    name: str | None = Field(None, description="How messages name it [default: the path].")


class IndexRequest(_Indexing):
    """`altclip index` as a request: the server brings the index up to date with the images at or
    below `paths`. Paths are the server's: Unix socket only."""

    paths: list[IndexPath] = Field(description="What to index: absolute files or folders.")
    retry_failed: bool = Field(False, description="Try again the images that failed before, changed or not.")
    rebuild: bool = Field(False, description="Start the index over and embed every image.")
    compact: bool = Field(False, description="Rewrite the vector file without the vectors no file uses.")

    @field_validator("paths")
    @classmethod
    def _some_paths(cls, v):
        if not v:
            raise ValueError("paths is empty: give at least one file or folder")
        return v


class EmbeddingsRequest(_Strict):
    """OpenAI's embeddings request; an input that is a data:image/...;base64, URI is an image
    (or every input, with "modality": "image", as Infinity has it)."""

    model: str
    input: object = Field(description="A string or a list of strings; token arrays are not accepted.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
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


def parse_json(model: type[BaseModel], body: bytes):
    """A validated request from a JSON body; ApiError(400) naming the first problem otherwise."""
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(body)
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
