"""A server's model: `RemoteModel` gives the two primitives of runtime/embedder.py
(`encode_texts`, `stream_images`) by asking a running `altclip serve`, so that labels, scores,
classification and embed's rows are the same code through a server as in-process; and it asks the
server to search and index this machine's folders. Which server to ask is serve/discovery.py's.

The server reads local images by path over its Unix socket; over TCP, and for URLs (fetched
here, with the command's --url-timeout and --url-max-mb), their bytes are sent. Requests stay
under the server's size cap (its /v1/health `limits`): texts and images are split by count and
by bytes, and one input too large for any request fails as an input. Vectors come back as
float32 bytes (base64), bit for bit what the server computed. Label embeddings are kept in this
machine's label cache, as in-process (`label_cache`).

No torch and no PIL here; numpy is imported where vectors are made.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..errors import InputError
from ..inputs.files import DEFAULT_INPUT_TIMEOUT, read_regular
from ..inputs.names import display
from ..runtime.embedder import Embedder
from .client import (RequestFailed, ServerBusy, ServerDown, ServerError, ServerLost, ServerMismatch, Target,
                     health, post_json, printable)

if TYPE_CHECKING:
    import numpy as np

TEXTS_PER_REQUEST = 1024
BUSY_PATIENCE_S = 60.0  # how long a full queue (503) is waited out, in its Retry-After steps
REQUESTS_AHEAD = 2  # image requests in flight: the server decodes one while it encodes the other
REQUEST_SHARE = 0.9  # of the server's --max-request-mb that one request's texts or image bytes may fill
DEFAULT_MAX_REQUEST_BYTES = 64_000_000  # a server that does not report its cap: altclip serve's default
PROGRESS_POLL_S = 0.25  # how often a search asks the server how its indexing goes
HEALTH_TIMEOUT_WHILE_BUSY = 2.0


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
class RemoteModel(Embedder):
    """An Embedder whose primitives a server answers (see the module doc), with the attributes
    the commands read. Failures of the server are ServerErrors (AltclipErrors: the command ends
    with exit status 1); an image that cannot be used is an InputError in its ImageResult, as
    in-process; a text too large for any request raises its InputError."""

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

    @functools.cached_property
    def label_cache(self):
        """This machine's label cache (cache/labels.py) for the server's model: keyed by its
        weights' identity, the tokenizer and config files of its folder (the same folder here:
        discovery.mismatch checks it) and its precision. None under ALTCLIP_NO_CACHE."""
        from ..cache.identity import enabled
        from ..cache.labels import LabelCache, text_identity
        from ..errors import AltclipError

        if not enabled():
            return None
        try:
            return LabelCache(text_identity(f"server:{self.weights_id}", self.folder), self.precision)
        except AltclipError:  # no tokenizer file to key by: labels go to the server every time
            return None

    # --- texts ----------------------------------------------------------------------------------

    def encode_texts(self, texts, *, batch_size: int | None = None, normalize: bool = True) -> np.ndarray:
        """(N, D) float32, row i for texts[i]. batch_size is the server's business (it batches
        every request's texts with its own); requests hold at most TEXTS_PER_REQUEST texts (or
        the server's `max_texts`) and stay under its size cap."""
        import numpy as np

        rows = []
        for chunk in self._text_requests(list(texts)):
            answer = self._post("/v1/embed", {"texts": chunk, "normalize": normalize, "encoding": "base64"})
            records = answer.get("results")
            if not isinstance(records, list) or len(records) != len(chunk):
                raise ServerError(f"the server at {self.target} answered {len(records or [])} vectors for "
                                  f"{len(chunk)} texts")
            rows += [self._row(r.get("embedding")) for r in records]
        return np.stack(rows) if rows else np.zeros((0, self.embed_dim), np.float32)

    def _text_requests(self, texts: list[str]) -> Iterator[list[str]]:
        """texts in runs of consecutive texts, each a request the server takes: at most
        TEXTS_PER_REQUEST (or the server's max_texts) texts, and at most REQUEST_SHARE of its
        byte cap as JSON. A text over that alone raises InputError naming it."""
        limits = self.info.get("limits") or {}
        most = min(TEXTS_PER_REQUEST, int(limits.get("max_texts") or TEXTS_PER_REQUEST))
        budget = self._request_budget()
        chunk, used = [], 0
        for i, text in enumerate(texts):
            size = len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")) + 1  # and a comma
            if size > budget:
                preview = display(text[:40]) + ("..." if len(text) > 40 else "")
                raise InputError(f"text {i + 1} ({preview!r}): {size:,} bytes as JSON, over what the server at "
                                 f"{self.target} takes in one request ({budget:,} bytes, from its --max-request-mb)",
                                 hint="start the server with a larger --max-request-mb, or run in-process "
                                      "(--server off)")
            if chunk and (len(chunk) >= most or used + size > budget):
                yield chunk
                chunk, used = [], 0
            chunk.append(text)
            used += size
        if chunk:
            yield chunk

    def _request_budget(self) -> int:
        """Bytes of texts or image items one request may carry: REQUEST_SHARE of the server's cap
        (the rest is room for the request's other fields)."""
        cap = (self.info.get("limits") or {}).get("max_request_bytes") or DEFAULT_MAX_REQUEST_BYTES
        return int(int(cap) * REQUEST_SHARE)

    # --- search ------------------------------------------------------------------------------------

    @property
    def searches(self) -> bool:
        """Whether the server indexes and searches this machine's folders (POST /v1/search, over
        its Unix socket only: over TCP it may not even see them)."""
        return bool(self.info.get("search")) and self.target.is_unix

    def search(self, parts, root: str, *, index: str, top: int, min_score: float | None, update: bool,
               wait: float = 0.0, include_hidden: bool = False, exclude_dirs=None,
               progress: Callable[[int, int], None] | None = None, where=None) -> dict:
        """POST /v1/search: the server brings the index (`index`: "auto" or an absolute folder)
        up to date below `root` (an absolute folder) unless not `update`, encodes the query
        (search.query.QueryParts; image parts as any image item) and ranks. Returns its answer:
        {"results": [{"rank", "path", "score", ...}], "searched", "update", "messages"}; where: a
        search.filters.SearchFilter, sent as the request's filter fields (the answer then also
        holds "total", "missing" and "unread"). The server's
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
                   "exclude_dirs": list(exclude_dirs) if exclude_dirs is not None else None,
                   **(where.as_request() if where is not None else {})}
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
                    why = printable(str(record.get("error") or "failed"))
                    failed[k] = InputError(f"{display(sources[k].name)}: {why}")
                else:
                    vectors[k] = self._row(record.get("embedding"))
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
        """items split so that no request passes the server's size cap (or its max_images); an
        image too large for it alone fails (it would be refused whole)."""
        limit = self._request_budget()
        most = int((self.info.get("limits") or {}).get("max_images") or len(items) or 1)
        group, used = [], 0
        for k, item, n in items:
            if n > limit:
                failed[k] = InputError(f"{display(sources[k].name)}: {n:,} bytes in base64, over what the server "
                                       f"at {self.target} takes in one request (--max-request-mb)")
                continue
            if group and (used + n > limit or len(group) >= most):
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
        """post_json, waiting out a full queue (503 queue_full + Retry-After) for up to
        BUSY_PATIENCE_S (any other 503, a server stopping or with stuck decoders, fails at once),
        and saying which server failed."""
        waited = 0.0
        while True:
            try:
                answer = post_json(self.target, path, payload)
                break
            except ServerBusy as exc:
                if exc.error.get("code") != "queue_full":  # stopping, or decoders stuck: waiting does not help
                    raise ServerBusy(exc.status, f"the server at {self.target}: {exc.message}", exc.error,
                                     exc.retry_after, hint=exc.hint) from None
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
        if printable(str(answer.get("model"))) != self.info.get("model"):
            raise ServerMismatch(f"the server at {self.target} now runs {answer.get('model')}, not "
                                 f"{self.info.get('model')} (it was restarted with another model)", hint=_AGAIN)
        return answer

    def _row(self, text) -> np.ndarray:
        """(D,) float32 from the server's base64 of its float32 little-endian bytes."""
        import numpy as np

        data = base64.b64decode(text) if isinstance(text, str) else b""
        if len(data) != 4 * self.embed_dim:
            raise ServerError(f"the server at {self.target} answered a vector of {len(data) // 4} values, "
                              f"not {self.embed_dim}")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)  # a writable copy, native order


_AGAIN = "see the server's log; run the command again (--server off runs it in-process)"


def _indexing(info: dict, mine: tuple[str, str], progress: Callable[[int, int], None]) -> None:
    key, value = mine
    for update in info.get("indexing") or []:
        if update.get(key) == value and update.get("total"):
            progress(int(update.get("done") or 0), int(update["total"]))
            return


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
