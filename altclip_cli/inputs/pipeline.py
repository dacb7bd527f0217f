"""Images from their sources to embeddings: decoding and preprocessing run in worker threads
(PIL releases the GIL) a bounded number of images ahead of the model, and results come back in
input order, one per source, failures included, so one bad file never stops a run.

An input whose read never returns (a hung network mount; a FIFO or a device is refused unread,
see files.py) fails once it has been in a worker for `input_timeout` seconds: its thread cannot
be stopped, so it is abandoned (a daemon, it exits if the read ever returns) and a fresh worker
takes its place."""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import InputError
from .files import DEFAULT_INPUT_TIMEOUT, stuck_error
from .threads import plan_threads


@dataclass
class ImageResult:
    index: int  # position in the input
    source: object  # as given
    embedding: np.ndarray | None  # (D,) float32, None when the input failed
    error: InputError | None = None


@dataclass(eq=False)
class _Worker:
    retired: bool = False  # abandoned on a stuck input: exits once that input returns, if ever
    counted: bool = False  # in DaemonPool.abandoned()


@dataclass(eq=False)
class _Task:
    fn: Callable
    args: tuple
    future: Future = field(default_factory=Future)
    started: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0  # time.monotonic() when a worker took it
    worker: _Worker | None = None


class DaemonPool:
    """A minimal thread pool whose workers are daemon threads: an input that blocks forever
    cannot keep Ctrl-C or the interpreter's exit waiting, as ThreadPoolExecutor's joined
    workers would, and the worker stuck on it can be replaced (`abandon`)."""

    _abandoned = 0  # abandoned workers of every pool still alive (stuck in their call)
    _abandoned_lock = threading.Lock()

    @classmethod
    def abandoned(cls) -> int:
        """How many abandoned workers, in all the pools of this process, are still stuck: a
        long-lived caller (`altclip serve`) bounds them by refusing new work past a limit."""
        return cls._abandoned

    def __init__(self, workers: int):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._names = itertools.count()
        self._workers = workers
        for _ in range(workers):
            self._start_worker()

    def _start_worker(self) -> None:
        worker = _Worker()
        threading.Thread(target=self._work, args=(worker,), name=f"altclip-decode-{next(self._names)}",
                         daemon=True).start()

    def _work(self, worker: _Worker) -> None:
        try:
            while not worker.retired and (task := self._tasks.get()) is not None:
                self._run(task, worker)
                # Hold nothing of the caller's while waiting for the next task (one run or one
                # cancelled before it ran). Otherwise the last reference to what a task's
                # arguments reach (the model, through open_fn) can be this daemon thread's, which
                # then frees it while the interpreter shuts down, and a C++ destructor in it
                # aborts the process ("terminate called without an active exception") after its
                # output is written.
                task = None
        finally:
            with DaemonPool._abandoned_lock:
                if worker.counted:
                    DaemonPool._abandoned -= 1

    @staticmethod
    def _run(task: _Task, worker: _Worker) -> None:
        if not task.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        task.worker, task.started_at = worker, time.monotonic()
        task.started.set()
        try:
            task.future.set_result(task.fn(*task.args))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            task.future.set_exception(e)

    def submit(self, fn, *args) -> _Task:
        task = _Task(fn, args)
        self._tasks.put(task)
        return task

    def result(self, task: _Task, timeout: float | None):
        """The task's result (or its exception), waiting at most `timeout` seconds from when a
        worker started it (not from when it was queued); FutureTimeout past that."""
        if timeout is None:
            return task.future.result()
        task.started.wait()  # waited on in submission order: a live worker takes this one next
        left = task.started_at + timeout - time.monotonic()
        return task.future.result(timeout=max(0.0, left))

    def abandon(self, task: _Task) -> None:
        """Give up on a started task whose call does not return: its worker retires and a new one
        keeps the pool's capacity."""
        with DaemonPool._abandoned_lock:
            task.worker.retired = task.worker.counted = True
            DaemonPool._abandoned += 1
        self._start_worker()

    def close(self) -> None:
        for _ in range(self._workers):
            self._tasks.put(None)


def prepare(source, open_fn: Callable, preprocess: Callable) -> np.ndarray:
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
                      workers: int | None = None, input_timeout: float | None = DEFAULT_INPUT_TIMEOUT,
                      boundary: int | None = None) -> Iterator[ImageResult]:
    """Yield one ImageResult per source, in order.

    open_fn(source) -> PIL image; preprocess(image) -> (3, H, W); encode_batch((B, 3, H, W)) -> (B, D).
    At most 2 * batch_size images are decoded ahead of the model, whatever the input's length.
    input_timeout: seconds one source may take from when a worker starts on it (time spent
    queued does not count); past that it fails with an InputError and the run goes on
    (None: no limit).
    boundary: a model batch also ends before every source whose index is a multiple of it, so
    with boundary == batch_size the batches are sources [k*B, (k+1)*B) whatever fails among them,
    and a run started at any multiple of B batches its rows as a run from 0 does (rows.py).
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
        index, source, task = in_flight.popleft()
        if boundary and index % boundary == 0 and pending:
            yield from flush()
        try:
            pending.append((index, source, pool.result(task, input_timeout), None))
        except InputError as e:
            pending.append((index, source, None, e))
        except FutureTimeout:
            pool.abandon(task)
            pending.append((index, source, None, stuck_error(str(source), input_timeout)))
        if sum(p is not None for _, _, p, _ in pending) >= batch_size:
            yield from flush()

    pool = DaemonPool(workers or plan_threads("cpu").decode_workers)
    try:
        for index, source in enumerate(sources):
            in_flight.append((index, source, pool.submit(prepare, source, open_fn, preprocess)))
            if len(in_flight) >= ahead:
                yield from settle_oldest()
        while in_flight:
            yield from settle_oldest()
        yield from flush()
    finally:  # also when stopped early (Ctrl-C, the consumer broke off): drop what is queued
        for _, _, task in in_flight:
            task.future.cancel()
        pool.close()
