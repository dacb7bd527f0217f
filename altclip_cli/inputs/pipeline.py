"""Images from their sources to embeddings: decoding and preprocessing run in worker threads
(PIL releases the GIL) a bounded number of images ahead of the model, and results come back in
input order, one per source, failures included, so one bad file never stops a run."""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import InputError
from ..runtime.threads import plan_threads


@dataclass
class ImageResult:
    index: int  # position in the input
    source: object  # as given
    embedding: np.ndarray | None  # (D,) float32, None when the input failed
    error: InputError | None = None


class DaemonPool:
    """A minimal thread pool whose workers are daemon threads: an input that blocks forever
    (a FIFO, a hung network mount) cannot keep Ctrl-C or the interpreter's exit waiting, as
    ThreadPoolExecutor's joined workers would."""

    def __init__(self, workers: int):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._work, name=f"altclip-decode-{i}", daemon=True).start()
        self._workers = workers

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer
                    future.set_exception(e)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def close(self) -> None:
        for _ in range(self._workers):
            self._tasks.put(None)


def _prepare(source, open_fn: Callable, preprocess: Callable) -> np.ndarray:
    """(3, H, W) float32 pixels, or InputError naming the source."""
    try:
        return preprocess(open_fn(source))
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{source}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the run
        raise InputError(f"{source}: cannot read the image ({type(e).__name__}: {e})") from None


def stream_embeddings(sources: Iterable, open_fn: Callable, preprocess: Callable,
                      encode_batch: Callable[[np.ndarray], np.ndarray], *, batch_size: int,
                      workers: int | None = None) -> Iterator[ImageResult]:
    """Yield one ImageResult per source, in order.

    open_fn(source) -> PIL image; preprocess(image) -> (3, H, W); encode_batch((B, 3, H, W)) -> (B, D).
    At most 2 * batch_size images are decoded ahead of the model, whatever the input's length.
    """
    ahead = 2 * batch_size
    pending: list[tuple[int, object, np.ndarray | None, InputError | None]] = []  # waiting for a batch
    in_flight: deque = deque()

    def flush() -> Iterator[ImageResult]:
        good = [p for _, _, p, _ in pending if p is not None]
        embeddings = iter(encode_batch(np.stack(good)) if good else [])
        for index, source, pixels, error in pending:
            yield ImageResult(index, source, next(embeddings) if pixels is not None else None, error)
        pending.clear()

    def settle_oldest() -> Iterator[ImageResult]:
        index, source, future = in_flight.popleft()
        try:
            pending.append((index, source, future.result(), None))
        except InputError as e:
            pending.append((index, source, None, e))
        if sum(p is not None for _, _, p, _ in pending) >= batch_size:
            yield from flush()

    pool = DaemonPool(workers or plan_threads("cpu").decode_workers)
    try:
        for index, source in enumerate(sources):
            in_flight.append((index, source, pool.submit(_prepare, source, open_fn, preprocess)))
            if len(in_flight) >= ahead:
                yield from settle_oldest()
        while in_flight:
            yield from settle_oldest()
        yield from flush()
    finally:  # also when stopped early (Ctrl-C, the consumer broke off): drop what is queued
        for _, _, future in in_flight:
            future.cancel()
        pool.close()
