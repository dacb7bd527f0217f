"""A request's work, away from the event loop: its images as inputs (`image_inputs`), decoded
and preprocessed in worker threads (`Decoder`) a bounded number ahead of the model
(`embed_images`), and its model passes handed to the model thread (`submit`, `model_job`), the
batcher's refusals answered as 503."""
from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..inputs.files import stuck_error
from ..inputs.pipeline import DaemonPool, prepare
from .batcher import QueueFull, Stopped
from .requests import ApiError, bad_request, decode_base64


@dataclass(frozen=True)
class ImageInput:
    name: str
    data: bytes | None = None
    path: str | None = None

    def __str__(self) -> str:  # how pipeline.prepare names it in an error
        return self.name


MAX_ABANDONED = 32  # decoding threads left stuck on inputs that never returned, before images are refused


class Decoder:
    """Decoding and preprocessing in daemon worker threads (PIL releases the GIL), bounded by
    the same caps as files on the command line: the pixel cap and the input timeout.

    A worker stuck past the input timeout (a read of a hung network mount never returns) is
    abandoned and replaced; its thread ends only if the read ever does. Once `max_abandoned`
    of them (in every decoding pool of the process: index updates' too) are still stuck, the
    server decodes no more images and answers 503 (`check_stuck`) until some come back."""

    def __init__(self, model, workers: int, max_pixels: int | None, input_timeout: float | None,
                 max_abandoned: int = MAX_ABANDONED):
        self.model, self.max_pixels, self.input_timeout = model, max_pixels, input_timeout
        self.workers, self.max_abandoned = workers, max_abandoned
        self.pool = DaemonPool(workers)

    def check_stuck(self) -> None:
        """ApiError 503 while `max_abandoned` decoding threads are stuck."""
        stuck = DaemonPool.abandoned()
        if stuck >= self.max_abandoned:
            raise ApiError(503, f"{stuck} decoding threads are stuck on inputs that never returned (a hung network "
                                "mount?): this server decodes no more images until they do",
                           type="server_error", code="decoders_stuck", headers={"Retry-After": "60"},
                           hint="restart the server if the mount never comes back")

    def _open(self, item: ImageInput):
        from ..inputs.images import open_image

        source = item.data if item.path is None else item.path  # a path: regular files only (inputs/files.py)
        return open_image(source, name=item.name, max_pixels=self.max_pixels,
                          draft_min_side=self.model.draft_min_side)

    def start(self, item: ImageInput):
        """Hand one item to the decoders; collect() takes its outcome. ApiError 503 while too
        many decoding threads are stuck (see the class doc)."""
        self.check_stuck()
        return self.pool.submit(prepare, item, self._open, self.model.preprocessor)

    def collect(self, tasks) -> list:
        """(3, H, W) float32 pixels or an InputError per (item, task), in order. Blocks: run it
        in a worker thread."""
        out = []
        for i, (item, task) in enumerate(tasks):
            try:
                out.append(self.pool.result(task, self.input_timeout))
            except InputError as exc:
                out.append(exc)
            except FutureTimeout:  # the worker is stuck on this input: it is replaced
                if DaemonPool.abandoned() + 1 >= self.max_abandoned:  # the last one: the rest are not tried
                    for _item, rest in tasks[i + 1:]:  # (before the replacement worker takes one)
                        rest.future.cancel()
                self.pool.abandon(task)
                self.check_stuck()
                out.append(stuck_error(item.name, self.input_timeout))
        return out

    async def decode(self, items: list[ImageInput]) -> list:
        """(3, H, W) float32 pixels or an InputError, per item, in order: all at once, for the
        few images of a query."""
        tasks = [(item, self.start(item)) for item in items]
        return await run_in_threadpool(self.collect, tasks)

    def close(self) -> None:
        self.pool.close()


async def embed_images(state, items: list[ImageInput], normalize: bool, *, stop_at_failure: bool = False) -> list:
    """Per item, in order: its (D,) float32 embedding or its InputError (with stop_at_failure,
    the list ends after the first failure). As pipeline.stream_embeddings, at most two batches
    of images are decoded ahead of the model, however many the request holds: a batch is
    decoded while the one before it is embedded. state: the ServeState."""
    decoder, batcher = state.decoder, state.batcher
    size = batcher.image_batch
    out: list = []
    window: deque = deque()  # (item, task) handed to the decoders, oldest first
    upcoming = iter(items)
    try:
        while True:
            for item in itertools.islice(upcoming, 2 * size - len(window)):
                window.append((item, decoder.start(item)))
            if not window:
                return out
            taken = [window.popleft() for _ in range(min(size, len(window)))]
            decoded, pixels = await run_in_threadpool(_decoded_batch, decoder, taken)
            if stop_at_failure and any(isinstance(r, InputError) for r in decoded):
                out.extend(itertools.takewhile(lambda r: not isinstance(r, InputError), decoded))
                out.append(next(r for r in decoded if isinstance(r, InputError)))
                return out
            rows = iter(await model_job(submit(batcher.submit_images, pixels, normalize)) if pixels is not None else ())
            out.extend(r if isinstance(r, InputError) else next(rows) for r in decoded)
    finally:  # also when the client went away: what is still queued is dropped
        for _, task in window:
            task.future.cancel()


def _decoded_batch(decoder: Decoder, taken) -> tuple[list, np.ndarray | None]:
    """(pixels or InputError per item, the good ones stacked (N, 3, H, W) or None)."""
    decoded = decoder.collect(taken)
    good = [r for r in decoded if not isinstance(r, InputError)]
    return decoded, np.stack(good) if good else None


def image_inputs(items, state) -> list[ImageInput]:
    """The request's image items (requests.ImageItem) as inputs; ApiError for a path over TCP
    (403), a relative path or bad base64 (400). state: the ServeState."""
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


def image_failure(results, items) -> ApiError | None:
    """422 for the first input that failed to decode, or None."""
    for i, (item, r) in enumerate(zip(items, results)):
        if isinstance(r, InputError):
            return ApiError(422, r.message, param=f"images[{i}]", code="bad_image")
    return None


async def model_job(future):
    """The result of a batcher job; 503 when the server stopped first."""
    try:
        return await asyncio.wrap_future(future)
    except Stopped as exc:
        raise ApiError(503, str(exc), type="server_error", code="stopping") from None


def submit(fn, *args):
    """fn(*args), one of the batcher's submit methods: its Future; 503 (with Retry-After) when
    the queue is full or the server stops."""
    try:
        return fn(*args)
    except QueueFull as exc:
        raise ApiError(503, f"{exc}; try again in {exc.retry_after} s", type="server_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except Stopped as exc:
        raise ApiError(503, str(exc), type="server_error", code="stopping") from None
