"""Commands through a running `altclip serve`: which server a command may use (`connect`), and a
model that asks it (`RemoteModel`) with the part of AltCLIP's interface that classify, embed and
search call, so that the commands keep one code path for both.

    remote = connect("auto", Wanted(model="BAAI/AltCLIP", precision="auto", ...))
    model = remote or altclip_cli.load(...)          # the same calls from here on
    model.encode_texts(["a cat"]); model.label_embeddings(labels); model.stream_images(sources)

One shortcut: classify's scoring (`classify_records`) is the server's too (/v1/classify, with its
label cache and torch's softmax), so the client needs no numpy and the records are the ones an
in-process run writes; `label_embeddings` and `scores` (numpy) serve classify --index.

What "the same model" means without loading it (`mismatch`): the protocol; the model folder (a
local folder by its real path, a hub id by the snapshot its revision names in this machine's
Hugging Face cache) against the server's `model_folder`; an explicit --device against the
server's, while auto takes any; --precision auto against a server that chose its precision
too, an explicit one against the server's; and, when images go to the server, the decoding
(--exact-decode) and the pixel cap. When unsure, it is not the same.

The server reads local images by path over its Unix socket; over TCP, and for URLs (fetched
here, with the command's --url-timeout and --url-max-mb), their bytes are sent. Vectors come
back as float32 bytes (base64), bit for bit what the server computed.

No torch and no PIL here, and numpy only where vectors are computed with or written as arrays:
`echo "a cat" | altclip embed --text -` through a server prints its rows without importing it
(Float32Row).
"""
from __future__ import annotations

import base64
import math
import os
import stat
import struct
import sys
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..errors import InputError
from ..inputs.files import DEFAULT_INPUT_TIMEOUT, read_regular
from ..inputs.names import display
from .client import (PROTOCOL, RequestFailed, ServerBusy, ServerDown, ServerError, ServerLost,
                     ServerMismatch, ServerTimeout, Target, health, parse_target, post_json)
from .transport import default_socket_path

if TYPE_CHECKING:
    import numpy as np

AUTO_HEALTH_TIMEOUT = 2.0  # auto asks the default socket this long before it runs in-process
TEXTS_PER_REQUEST = 1024
ROWS_WITHOUT_NUMPY = 8  # texts that text_batches prints without numpy (4 ms a row; its import takes 40)
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)  # as inputs.images.DEFAULT_MAX_PIXELS (which imports PIL)
BUSY_PATIENCE_S = 60.0  # how long a full queue (503) is waited out, in its Retry-After steps
REQUESTS_AHEAD = 2  # image requests in flight: the server decodes one while it encodes the other
REQUEST_SHARE = 0.9  # of the server's --max-request-mb that one request of image bytes may fill
PROGRESS_POLL_S = 0.25  # how often a search asks the server how its indexing goes
HEALTH_TIMEOUT_WHILE_BUSY = 2.0


@dataclass(frozen=True)
class Wanted:
    """What a command would load in-process, to compare with a server's /v1/health."""

    model: str
    revision: str | None = None
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto, fp32, fp16, bf16
    exact_decode: bool = False
    max_pixels: int | None = None  # --max-pixels: None the default cap, 0 none
    images: bool = True  # images go to the server: its decoding must be ours
    scores: bool = False  # the command scores images against labels (needs the logit scale)


def mismatch(info: dict, wanted: Wanted) -> str | None:
    """Why the server of `info` (its /v1/health) does not compute what the command would
    in-process, or None when it does."""
    if info.get("status") != "ok":
        return f"it is not ready (status {info.get('status')!r})"
    if info.get("protocol") != PROTOCOL:
        return f"it speaks protocol {info.get('protocol')} (altclip {info.get('altclip')}), this altclip {PROTOCOL}"
    folder, why = model_folder(wanted.model, wanted.revision)
    if folder is None:
        return why
    theirs = info.get("model_folder")
    if not theirs or os.path.realpath(folder) != os.path.realpath(theirs):
        return f"it runs {_named(str(info.get('model')), theirs)}, not {_named(wanted.model, folder)}"
    if wanted.device != "auto" and not _same_device(wanted.device, str(info.get("device"))):
        return f"it runs on {info.get('device')}, not {wanted.device}"
    if wanted.precision == "auto":
        if info.get("precision_requested") != "auto":
            asked = info.get("precision_requested") or "a precision it does not report"
            return f"it was started with --precision {asked}, this command asks for auto"
    elif info.get("precision") != wanted.precision:
        return f"it computes at {info.get('precision')}, this command at {wanted.precision}"
    if wanted.images:
        if info.get("exact_decode") is not (wanted.exact_decode is True):
            has = {True: "with", False: "without"}.get(info.get("exact_decode"), "not saying whether with")
            ours = "with" if wanted.exact_decode else "without"
            return f"it decodes images {has} --exact-decode, this command {ours}"
        ours = DEFAULT_MAX_PIXELS if wanted.max_pixels is None else (wanted.max_pixels or None)
        limits = info.get("limits") or {}
        if "max_pixels" not in limits or limits["max_pixels"] != ours:
            return f"its pixel cap is {limits.get('max_pixels', 'unknown')}, this command's {ours}"
    if wanted.scores and not isinstance(info.get("logit_scale"), (int, float)):
        return "it does not report its logit scale (an older altclip)"
    if not isinstance(info.get("embed_dim"), int) or not info.get("weights"):
        return "it does not report its embedding width and weights"
    return None


def model_folder(model: str, revision: str | None) -> tuple[str | None, str]:
    """(the folder `model` resolves to here without downloading anything, or None and why not).
    A local folder as runtime.load takes it; a hub id as the cached snapshot of `revision`."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return os.path.realpath(local), ""
    from ..hub.hfcache import cached_snapshot

    snapshot = cached_snapshot(model, revision)
    if snapshot is None:
        rev = f" (revision {revision})" if revision else ""
        return None, (f"{model}{rev} is neither a local folder nor in this machine's Hugging Face cache, so it "
                      "cannot be compared")
    return os.path.realpath(snapshot), ""


def _named(model: str, folder: str | None) -> str:
    same = folder and os.path.realpath(os.path.expanduser(model)) == os.path.realpath(folder)
    return model if same else f"{model} ({folder or 'no folder given'})"


def _same_device(asked: str, served: str) -> bool:
    def norm(d: str) -> str:
        return "cuda:0" if d == "cuda" else d

    return norm(asked.lower()) == norm(served.lower())


# --- choosing the server ------------------------------------------------------------------------------


def connect(spec: str, wanted: Wanted, *, token: str | None = None,
            debug: Callable[[str], None] = lambda line: None, warn: Callable[[str], None] = lambda line: None,
            fetch_kw: dict | None = None) -> "RemoteModel | None":
    """The RemoteModel of the server `spec` names, or None to run in-process.
    spec: "off" (None), "auto" (the default socket's server when one answers and matches,
    else None; `debug` says which and why), or a socket path / http(s) URL, which must answer
    and match: ServerDown, ServerTimeout, ServerMismatch or RequestFailed (401) otherwise."""
    spec = (spec or "auto").strip()
    if spec.lower() == "off":
        debug("server: off (--server off or ALTCLIP_SERVER=off): running in-process")
        return None
    if spec.lower() == "auto":
        return _auto(wanted, debug, warn, fetch_kw)
    target = parse_target(spec, token)
    try:
        info = health(target)
    except ServerDown as exc:
        raise ServerDown(f"--server {spec}: {exc.message}",
                         hint="start it with `altclip serve` (--socket PATH, or --port for TCP), or use --server "
                              "auto, which runs in-process when no server answers") from None
    except ServerTimeout as exc:
        raise ServerTimeout(f"--server {spec}: {exc.message}", hint=exc.hint) from None
    except RequestFailed as exc:
        hint = "set ALTCLIP_TOKEN or --token-file to the server's token" if exc.status == 401 else exc.hint
        raise RequestFailed(exc.status, f"--server {spec}: {exc.message}", exc.error, hint=hint) from None
    except ServerMismatch as exc:
        raise ServerMismatch(f"--server {spec}: {exc.message}", hint=exc.hint) from None
    why = mismatch(info, wanted)
    if why is not None:
        raise ServerMismatch(f"the server at {target} does not compute what this command asks for: {why}",
                             hint="start `altclip serve` with the same -m, --revision, --device, --precision, "
                                  "--exact-decode and --max-pixels, or use --server off to run in-process")
    debug(f"server: using {target} ({_describe(info)})")
    return RemoteModel(target, info, model_id=wanted.model, fetch_kw=fetch_kw)


def _auto(wanted: Wanted, debug, warn, fetch_kw) -> "RemoteModel | None":
    path = default_socket_path()
    where = f"unix:{path}"
    try:
        st = os.stat(path)
    except OSError:
        debug(f"server: none at {where}: running in-process")
        return None
    problem = _foreign_socket(path, st)
    if problem is not None:
        warn(f"not using the server socket {path}: {problem}")
        debug(f"server: {where} is not private: running in-process")
        return None
    try:
        info = health(str(path), timeout=AUTO_HEALTH_TIMEOUT)
    except ServerError as exc:
        debug(f"server: {where} does not answer ({exc.message}): running in-process")
        return None
    why = mismatch(info, wanted)
    if why is not None:
        debug(f"server: {where} does not match ({why}): running in-process")
        return None
    debug(f"server: using {where} ({_describe(info)})")
    return RemoteModel(parse_target(str(path)), info, model_id=wanted.model, fetch_kw=fetch_kw)


def _foreign_socket(path: Path, st: os.stat_result) -> str | None:
    """Why a socket at the default place is not one of this user's servers (as `altclip serve`
    makes them: a socket of ours in a private folder of ours), or None."""
    uid = os.getuid()
    if not stat.S_ISSOCK(st.st_mode):
        return "it is not a socket"
    if st.st_uid != uid:
        return f"it belongs to uid {st.st_uid}, not to you"
    folder = os.lstat(path.parent)
    if stat.S_ISLNK(folder.st_mode) or folder.st_uid != uid or folder.st_mode & 0o077:
        return f"its folder {path.parent} is not a private folder of yours (0700)"
    return None


def _describe(info: dict) -> str:
    return (f"altclip {info.get('altclip')}, pid {info.get('pid')}: {info.get('model')}, {info.get('device')}, "
            f"{info.get('precision')}")


# --- the model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteDevice:
    """The server's device, as far as the commands look at it (`.type`, and its name)."""

    name: str

    @property
    def type(self) -> str:
        return self.name.split(":")[0]

    def __str__(self) -> str:
        return self.name


@dataclass
class RemoteModel:
    """AltCLIP's encode_texts, encode_images, stream_images, label_embeddings and scores, and
    the attributes the commands read, answered by a server (see the module doc). Failures of the
    server are ServerErrors (AltclipErrors: the command ends with exit status 1); an input that
    cannot be used is an InputError in its ImageResult, as in-process."""

    target: Target
    info: dict
    model_id: str  # as the command names the model (as AltCLIP.model_id)
    fetch_kw: dict | None = None  # inputs.urls.fetch_url's timeout and max_bytes, for URLs
    input_timeout: float | None = DEFAULT_INPUT_TIMEOUT  # for reading a local file to send its bytes
    draft_min_side = None  # the server decodes; nothing is decoded here

    @property
    def folder(self) -> Path:
        return Path(self.info["model_folder"])

    @property
    def weights_id(self) -> str:
        return self.info["weights"]

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def precision(self) -> str:
        return self.info["precision"]

    @property
    def device(self) -> RemoteDevice:
        return RemoteDevice(str(self.info["device"]))

    @property
    def exact_decode(self) -> bool:
        return bool(self.info.get("exact_decode"))

    @property
    def logit_scale(self) -> float:
        return float(self.info["logit_scale"])

    def default_batch_size(self, kind: str) -> int:
        """The server's own batch size for "image" or "text" (runtime.device's for its device)."""
        return int(self.info["limits"]["image_batch" if kind == "image" else "text_batch"])

    # --- texts and labels --------------------------------------------------------------------------

    def encode_texts(self, texts, *, batch_size: int | None = None, normalize: bool = True) -> np.ndarray:
        """(N, D) float32, row i for texts[i]. The server batches as it does for any request."""
        import numpy as np

        rows = self.text_rows(texts, normalize=normalize)
        return np.stack(rows) if rows else np.zeros((0, self.embed_dim), np.float32)

    def text_rows(self, texts, *, normalize: bool = True) -> list[Float32Row]:
        """encode_texts' rows as the server sent them (no numpy needed)."""
        texts = list(texts)
        rows = []
        for i in range(0, len(texts), TEXTS_PER_REQUEST):
            chunk = texts[i:i + TEXTS_PER_REQUEST]
            answer = self._post("/v1/embed", {"texts": chunk, "normalize": normalize, "encoding": "base64"})
            records = answer.get("results")
            if not isinstance(records, list) or len(records) != len(chunk):
                raise ServerError(f"the server at {self.target} answered {len(records or [])} vectors for "
                                  f"{len(chunk)} texts")
            rows += [self._row(r.get("embedding")) for r in records]
        return rows

    def label_embeddings(self, labels, templates=None, *, batch_size: int | None = None) -> np.ndarray:
        """(L, D) float32, L2-normalised; with templates, the normalised mean of each label's
        filled templates (AltCLIP.label_embeddings' prompt ensemble)."""
        import numpy as np

        labels, templates = list(labels), list(templates or [])
        unique = list(dict.fromkeys(labels))
        if not unique:
            return np.zeros((0, self.embed_dim), np.float32)
        if templates:
            filled = [t.replace("{}", label) for label in unique for t in templates]
            emb = self.encode_texts(filled).reshape(len(unique), len(templates), -1).mean(axis=1)  # (L, D)
            emb = _normalize(emb)
        else:
            emb = self.encode_texts(unique)
        found = dict(zip(unique, emb))
        return np.stack([found[label] for label in labels])

    def scores(self, image_emb: np.ndarray, label_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probs, logits) from normalised embeddings, in float32 (AltCLIP.scores, in numpy:
        equal to its results within a few units in the last place)."""
        import numpy as np

        image_emb, label_emb = np.asarray(image_emb, np.float32), np.asarray(label_emb, np.float32)
        logits = (image_emb @ label_emb.T) * np.float32(self.logit_scale)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True), logits

    # --- classify ----------------------------------------------------------------------------------

    def classify_records(self, sources, labels, templates=None, top_k: int | None = None, *,
                         batch_size: int | None = None) -> Iterator[dict]:
        """`altclip classify`'s record per Source, in input order, scored by the server
        (/v1/classify: its label cache, its torch scores, formatted as cli.formats does):
        {"image", "scores": [...]} or {"image", "error"}. One request per `batch_size` sources
        [default: the server's image batch], two in flight."""
        size = batch_size or self.default_batch_size("image")
        sources = list(sources)
        request = {"labels": list(labels), "templates": list(templates or []), "top_k": top_k, "on_error": "record"}
        jobs = (lambda start=start: self._classify(sources[start:start + size], request)
                for start in range(0, len(sources), size))
        for records in _in_order(jobs, REQUESTS_AHEAD):
            yield from records

    def _classify(self, sources: list, request: dict) -> list[dict]:
        from ..inputs.sources import reason

        items, failed = self._image_items(sources)
        records: dict[int, dict] = {}
        for group in self._request_groups(items, failed, sources):
            answer = self._post("/v1/classify", {**request, "images": [item for _k, item, _n in group]})
            self._check_count(answer, len(group))
            records.update((k, record) for (k, _item, _n), record in zip(group, answer["results"]))
        for k, exc in failed.items():  # failed here, as cli.formats.error_record has it
            records[k] = {"image": display(sources[k].name), "error": reason(exc, sources[k].name)}
        return [records[k] for k in range(len(sources))]

    # --- search ------------------------------------------------------------------------------------

    @property
    def searches(self) -> bool:
        """Whether the server indexes and searches this machine's folders (POST /v1/search, over
        its Unix socket only: over TCP it may not even see them)."""
        return bool(self.info.get("search")) and self.target.is_unix

    def search(self, parts, root: str, *, index: str, top: int, min_score: float | None, update: bool,
               wait: float = 0.0, include_hidden: bool = False, exclude_dirs=None,
               progress: Callable[[int, int], None] | None = None) -> dict:
        """POST /v1/search: the server brings the index (`index`: "auto" or an absolute folder)
        up to date below `root` (an absolute folder) unless not `update`, encodes the query
        (search.query.QueryParts; image parts as any image item) and ranks. Returns its answer:
        {"results": [{"rank", "path", "score"}], "searched", "update", "messages"}. The server's
        refusal keeps its message and hint (a QueryError for a usage error, so exit status 2).
        progress(done, total): called while the server embeds new images below root (its
        /v1/health, asked every PROGRESS_POLL_S while the request runs)."""
        from ..inputs.sources import Source
        from ..search.query import QueryError

        query = []
        for p in parts:
            if p.is_image:
                src = Source(p.value, url=p.value) if p.is_url else Source(p.value, path=os.path.expanduser(p.value))
                try:
                    item = self._image_item(src)
                except InputError as exc:
                    raise QueryError(f"query image {exc.message}") from None
                query.append({"image": item, "weight": p.weight})
            else:
                query.append({"text": p.value, "weight": p.weight})
        payload = {"query": query, "dir": root, "index": index, "top_k": top, "min_score": min_score,
                   "update": update, "wait": wait, "include_hidden": include_hidden,
                   "exclude_dirs": list(exclude_dirs) if exclude_dirs is not None else None}
        try:
            return self._indexing_request("/v1/search", payload, ("dir", root), progress if update else None)
        except RequestFailed as exc:
            if exc.error.get("code") == "usage" and not isinstance(exc, ServerBusy):
                raise QueryError(exc.message, exc.hint, usage=True) from None
            raise

    def index(self, paths: list[tuple[str, str]], *, index: str, include_hidden: bool = False, exclude_dirs=None,
              retry_failed: bool = False, rebuild: bool = False, compact: bool = False, wait: float = 0.0,
              progress: Callable[[int, int], None] | None = None) -> dict:
        """POST /v1/index: `altclip index` by the server, for `paths` ((name for messages, absolute
        path) pairs) into `index` (an absolute folder, or "auto"). Returns its answer: {"update"
        (search.summary.UpdateSummary's fields), "compacted", "messages"}. progress as for search."""
        payload = {"paths": [{"path": p, "name": n} for n, p in paths], "index": index,
                   "include_hidden": include_hidden, "retry_failed": retry_failed, "rebuild": rebuild,
                   "compact": compact, "wait": wait,
                   "exclude_dirs": list(exclude_dirs) if exclude_dirs is not None else None}
        return self._indexing_request("/v1/index", payload, ("index", index), progress)

    def _indexing_request(self, path: str, payload: dict, mine: tuple[str, str],
                          progress: Callable[[int, int], None] | None) -> dict:
        """A request that may index for long: no deadline but the server's own per image; while
        it runs, progress(done, total) from the server's health entry whose `mine[0]` is `mine[1]`.
        A refusal is an AltclipError with the server's message and hint (RequestFailed, so its
        code stays readable); the server going away is ServerLost."""
        call = lambda: post_json(self.target, path, payload, timeout=None)  # noqa: E731
        try:
            if progress is None:
                return call()
            return self._polling(call, lambda info: _indexing(info, mine, progress))
        except ServerDown as exc:
            raise ServerLost(f"the server at {self.target} went away during the run ({exc.message})",
                             hint="the index keeps what the server committed; run the command again") from None

    def _polling(self, call: Callable[[], dict], seen: Callable[[dict], None]) -> dict:
        """call() in a thread; until it returns, seen(the server's health) every PROGRESS_POLL_S."""
        job = _start(call)
        while True:
            try:
                return job.result(timeout=PROGRESS_POLL_S)
            except FutureTimeout:
                pass
            try:
                seen(health(self.target, timeout=HEALTH_TIMEOUT_WHILE_BUSY))
            except ServerError:
                pass  # the request's own answer says what went wrong, if anything did

    # --- images ------------------------------------------------------------------------------------

    def encode_images(self, sources, *, batch_size: int | None = None, normalize: bool = True) -> np.ndarray:
        """(N, D) float32 for image Sources (inputs.sources.Source); the first that fails raises
        its InputError. (AltCLIP.encode_images takes PIL images: the server decodes here.)"""
        import numpy as np

        results = list(self.stream_images(sources, batch_size=batch_size, normalize=normalize))
        for r in results:
            if r.error is not None:
                raise r.error
        return np.stack([r.embedding for r in results]) if results else np.zeros((0, self.embed_dim), np.float32)

    def stream_images(self, sources: Iterable, *, open_fn: Callable | None = None, batch_size: int | None = None,
                      normalize: bool = True, workers: int | None = None, input_timeout: float | None = None,
                      boundary: int | None = None) -> Iterator:
        """One inputs.pipeline.ImageResult per Source, in input order, as AltCLIP.stream_images.
        open_fn, workers and input_timeout are the server's business here (its own decoders and
        --input-timeout); open_fn is not called. One request per `batch_size` sources [default:
        the server's image batch], also cut at every multiple of `boundary`; two in flight. The
        server runs each request's images as one batch (unless other clients' requests join it)."""
        size = batch_size or self.default_batch_size("image")
        sources = list(sources)
        cuts = sorted(set(range(0, len(sources), size)) | set(range(0, len(sources), boundary or size)))
        jobs = (lambda start=start, end=end: self._embed_images(start, sources[start:end], normalize)
                for start, end in zip(cuts, cuts[1:] + [len(sources)]))
        for results in _in_order(jobs, REQUESTS_AHEAD):
            yield from results

    def _embed_images(self, start: int, sources: list, normalize: bool) -> list:
        from ..inputs.pipeline import ImageResult

        items, failed = self._image_items(sources)
        vectors: dict = {}
        for group in self._request_groups(items, failed, sources):
            answer = self._post("/v1/embed", {"images": [item for _k, item, _n in group], "normalize": normalize,
                                              "encoding": "base64", "on_error": "record"})
            self._check_count(answer, len(group))
            for (k, _item, _n), record in zip(group, answer["results"]):
                if record.get("error") is not None or record.get("row") is None:
                    failed[k] = InputError(f"{display(sources[k].name)}: {record.get('error') or 'failed'}")
                else:
                    vectors[k] = self._row(record.get("embedding")).__array__()
        return [ImageResult(start + k, src, vectors.get(k), failed.get(k)) for k, src in enumerate(sources)]

    def _image_items(self, sources: list) -> tuple[list[tuple[int, dict, int]], dict[int, InputError]]:
        """([(position, the request's item, its size)], {position: the InputError of a source
        that fails here: a missing file over TCP, a URL that does not download})."""
        items, failed = [], {}
        for k, src in enumerate(sources):
            try:
                item = self._image_item(src)
            except InputError as exc:
                failed[k] = exc
                continue
            items.append((k, item, len(item.get("data", "")) + len(item.get("path", ""))))
        return items, failed

    def _check_count(self, answer: dict, n: int) -> None:
        records = answer.get("results")
        if not isinstance(records, list) or len(records) != n:
            raise ServerError(f"the server at {self.target} answered {len(records or [])} results for {n} images")

    def _request_groups(self, items, failed, sources):
        """items split so that no request passes the server's size cap; an image too large for
        it alone fails (it would be refused whole)."""
        limit = int((self.info.get("limits") or {}).get("max_request_bytes") or 64_000_000) * REQUEST_SHARE
        group, used = [], 0
        for k, item, n in items:
            if n > limit:
                failed[k] = InputError(f"{display(sources[k].name)}: {n:,} bytes in base64, over what the server "
                                       f"at {self.target} takes in one request (--max-request-mb)")
                continue
            if group and used + n > limit:
                yield group
                group, used = [], 0
            group.append((k, item, n))
            used += n
        if group:
            yield group

    def _image_item(self, src) -> dict:
        """The request's item for one Source: a path over the Unix socket, else the bytes."""
        from ..inputs.urls import fetch_url

        name = display(src.name)
        if getattr(src, "error", None) is not None:
            raise InputError(f"{name}: {src.error}")
        if getattr(src, "url", None) is not None:
            return {"data": _b64(fetch_url(src.url, **(self.fetch_kw or {}))), "name": name}
        path = os.path.abspath(src.path)
        if self.info.get("paths") and self.target.is_unix and _utf8(path):
            return {"path": path, "name": name}
        return {"data": _b64(_read_image_file(path, name, self.info, self.input_timeout)), "name": name}

    # --- requests ----------------------------------------------------------------------------------

    def _post(self, path: str, payload: dict) -> dict:
        """post_json, waiting out a full queue (503 + Retry-After) for up to BUSY_PATIENCE_S, and
        saying which server failed."""
        waited = 0.0
        while True:
            try:
                answer = post_json(self.target, path, payload)
                break
            except ServerBusy as exc:
                pause = min(max(exc.retry_after or 1.0, 0.2), 10.0)
                if waited + pause > BUSY_PATIENCE_S:
                    raise ServerBusy(exc.status, f"the server at {self.target} stayed busy for {waited:.0f} s: "
                                                 f"{exc.message}", exc.error, exc.retry_after) from None
                time.sleep(pause)
                waited += pause
            except RequestFailed as exc:
                raise RequestFailed(exc.status, f"the server at {self.target} refused {path}: {exc.message}",
                                    exc.error, hint=exc.hint or "this is a bug in altclip if the server runs the "
                                                                "same version: please report it") from None
            except ServerLost as exc:
                raise ServerLost(exc.message, hint=_AGAIN) from None
            except ServerDown as exc:
                raise ServerLost(f"the server at {self.target} went away during the run ({exc.message})",
                                 hint=_AGAIN) from None
        if answer.get("model") != self.info.get("model"):
            raise ServerMismatch(f"the server at {self.target} now runs {answer.get('model')}, not "
                                 f"{self.info.get('model')} (it was restarted with another model)", hint=_AGAIN)
        return answer

    def _row(self, text) -> Float32Row:
        data = base64.b64decode(text) if isinstance(text, str) else b""
        if len(data) != 4 * self.embed_dim:
            raise ServerError(f"the server at {self.target} answered a vector of {len(data) // 4} values, "
                              f"not {self.embed_dim}")
        return Float32Row(data)


_AGAIN = "see the server's log; run the command again (--server off runs it in-process)"


class Float32Row:
    """One vector as the server sends it: float32 little-endian bytes. numpy takes it as an
    array (__array__: np.stack(rows) works); iterated, it gives its values as floats that print
    as numpy prints float32 values (embed's jsonl), without importing numpy."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // 4

    def __iter__(self):
        numpy = sys.modules.get("numpy")
        if numpy is not None:  # already paid for: its scalars print the same, 25 times faster
            return iter(numpy.frombuffer(self.data, dtype="<f4").astype(numpy.float32))
        values = array("f", self.data)
        if sys.byteorder == "big":
            values.byteswap()
        return map(Float32, values)

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        row = np.frombuffer(self.data, dtype="<f4").astype(np.float32)  # a writable copy, native order
        return row if dtype is None else row.astype(dtype)


class Float32(float):
    """A float32 value that prints as numpy prints np.float32 (str and repr)."""

    def __str__(self) -> str:
        return format_float32(self)

    __repr__ = __str__


def format_float32(value: float) -> str:
    """str(np.float32(value)) for a float32 value, without numpy: the shortest digits that read
    back as the same float32, positional from 1e-4 to 1e6, else scientific (1e-05, 1.2345679e+08)."""
    if value != value:
        return "nan"
    if value in (math.inf, -math.inf):
        return "inf" if value > 0 else "-inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0.0"
    digits, exp = _shortest_float32(abs(value))  # value = 0.d1d2... * 10**(exp + 1)
    if 1e-4 <= abs(value) < 1e6:
        if exp >= 0:
            whole = digits[:exp + 1].ljust(exp + 1, "0")
            return f"{sign}{whole}.{digits[exp + 1:] or '0'}"
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def _as_float32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # past float32's largest: it reads as infinity
        return math.inf


def _shortest_float32(value: float) -> tuple[str, int]:
    """(digits without trailing zeros, decimal exponent of the first) of the shortest decimal
    that reads back as the float32 `value` (> 0); of two such, the nearer (numpy's Dragon4)."""
    def found(p: int) -> tuple[int, int] | None:
        """A p-digit decimal inside value's rounding interval, the nearer of the two around it."""
        text = f"{value:.{p - 1}e}"  # the nearest p-digit decimal, exactly rounded (ties to even)
        cut = text.index("e")
        mantissa, exp10 = int(text[:cut].replace(".", "")), int(text[cut + 1:]) - p + 1
        if _as_float32(float(text)) == value:
            return mantissa, exp10
        other = mantissa + (1 if float(text) < value else -1)  # the interval may reach the far side only
        return (other, exp10) if other > 0 and _as_float32(float(f"{other}e{exp10}")) == value else None

    # Nine digits always read back (float32's max_digits10); most values need eight or nine, and
    # a length that has one has every longer length too: try 8, then downwards while it holds.
    best = found(8)
    if best is None:
        best = found(9)
    else:
        for p in range(7, 0, -1):
            shorter = found(p)
            if shorter is None:
                break
            best = shorter
    m, exp10 = best
    return str(m).rstrip("0"), exp10 + len(str(m)) - 1


def _indexing(info: dict, mine: tuple[str, str], progress: Callable[[int, int], None]) -> None:
    key, value = mine
    for update in info.get("indexing") or []:
        if update.get(key) == value and update.get("total"):
            progress(int(update.get("done") or 0), int(update["total"]))
            return


def _normalize(emb: np.ndarray) -> np.ndarray:
    """As torch.nn.functional.normalize: x / max(|x|, 1e-12), in float32."""
    import numpy as np

    norm = np.linalg.norm(emb, axis=-1, keepdims=True)
    return (emb / np.maximum(norm, np.float32(1e-12))).astype(np.float32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a name that is not UTF-8 (surrogate escapes): its bytes are sent
        return False


def _read_image_file(path: str, name: str, info: dict, timeout: float | None) -> bytes:
    """A local image's bytes for a server that cannot read our files: inputs.files.read_regular
    (regular files only, failing as inputs.images.open_image does), refused unread when larger
    than one request to the server at `info` carries in base64, and read within `timeout` s."""
    carried = int((info.get("limits") or {}).get("max_request_bytes") or 64_000_000) * REQUEST_SHARE
    return read_regular(path, name=name, max_bytes=int(carried) // 4 * 3, timeout=timeout,
                        limit="what one request to the server carries: its --max-request-mb")


def _in_order(jobs: Iterable[Callable[[], object]], ahead: int) -> Iterator:
    """Each job's result in order, up to `ahead` jobs running at once in daemon threads (a job
    waiting on the server never holds up Ctrl-C or the interpreter's exit)."""
    running: deque[Future] = deque()
    for job in jobs:
        running.append(_start(job))
        if len(running) >= ahead:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


def _start(job: Callable[[], object]) -> Future:
    future: Future = Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(job())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    threading.Thread(target=run, name="altclip-request", daemon=True).start()
    return future


# --- embed's rows, as runtime.rows makes them, from the server --------------------------------


def text_batches(model, texts: list[str], *, batch_size: int | None = None, normalize: bool = True):
    """runtime.rows.text_batches through the server; the rows are Float32Rows (no numpy)."""
    if len(texts) > ROWS_WITHOUT_NUMPY:
        import numpy  # noqa: F401 - its import pays for itself: it prints Float32Rows 25 times faster
    from ..runtime.rows import TEXT_CHUNK

    size = batch_size or TEXT_CHUNK
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        rows = model.text_rows(chunk, normalize=normalize)
        yield [(t, {"text": t}, rows[i]) for i, t in enumerate(chunk)]


def image_batches(model, sources: list, *, batch_size: int | None = None, normalize: bool = True,
                  open_kw: dict | None = None, input_timeout: float | None = None,
                  on_error: Callable[[str, str], None] = lambda name, why: None):
    """runtime.rows.image_batches through the server: batch k is sources [k*size, (k+1)*size),
    one request each, whatever fails among them, so a resumed run batches as a run from the
    start does, and its checkpoints fall where an in-process run puts them."""
    from ..runtime.rows import rows_in_spans

    if not sources:
        return
    size = batch_size or model.default_batch_size("image")
    yield from rows_in_spans(model.stream_images(sources, batch_size=size, normalize=normalize,
                                                 input_timeout=input_timeout, boundary=size), size, on_error)
