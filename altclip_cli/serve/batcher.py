"""Dynamic batching on one model thread.

Every model call of the server runs on this thread, one forward pass at a time: torch's CPU
threads already use every core, and two passes at once would only fight over them. Requests
hand in jobs (token ids, pixel arrays, or a call such as the label embeddings) and get a
Future. When the thread takes a job it waits a short window (5 ms by default) for more jobs of
the same kind, then runs them as one batch, up to the batch size; jobs that arrive while a
pass runs are merged into the next one. The queue of waiting jobs is bounded: a full queue
refuses at once (QueueFull), which the server answers with 503 and Retry-After.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; `retry_after` estimates when it has room."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting")
        self.waiting = waiting
        self.retry_after = retry_after


class Stopped(Exception):
    """The server stopped before the job ran."""


@dataclass(eq=False)
class _Job:
    kind: str  # "text" (token id lists), "image" ((N, 3, H, W) float32), "call" (a function)
    payload: object
    size: int  # items: texts or images (1 for a call)
    normalize: bool = True
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    jobs: int = 0
    batches: int = 0
    items: int = 0
    largest_batch_jobs: int = 0  # the most jobs (requests' parts) one forward pass has held
    largest_batch_items: int = 0
    multi_job_batches: int = 0  # passes that held more than one job
    refused: int = 0  # jobs refused because the queue was full
    busy_s: float = 0.0
    recent_batch_s: float = 0.0  # moving average of a pass's time

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class Batcher:
    """The model thread. `model` is an altclip_cli.runtime.altclip.AltCLIP."""

    def __init__(self, model, *, text_batch: int, image_batch: int, window_s: float = 0.005,
                 max_waiting: int = 64):
        self.model = model
        self.text_batch, self.image_batch = text_batch, image_batch
        self.window_s = window_s
        self.max_waiting = max_waiting
        self.stats = BatchStats()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="altclip-model", daemon=True)

    # --- the requests' side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit_texts(self, token_ids: list[list[int]], normalize: bool = True) -> Future:
        """(N, D) float32 embeddings of the tokenised texts."""
        return self._submit(_Job("text", token_ids, len(token_ids), normalize))

    def submit_images(self, pixels: np.ndarray, normalize: bool = True) -> Future:
        """(N, D) float32 embeddings of (N, 3, H, W) pixel values."""
        return self._submit(_Job("image", pixels, len(pixels), normalize))

    def submit_call(self, fn: Callable[[], object]) -> Future:
        """fn() on the model thread, alone (e.g. the label embeddings, which use the model)."""
        return self._submit(_Job("call", fn, 1))

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def _submit(self, job: _Job) -> Future:
        with self._cond:
            if self._stopping:
                raise Stopped("the server is stopping")
            if len(self._queue) >= self.max_waiting:
                self.stats.refused += 1
                raise QueueFull(len(self._queue), self._retry_after())
            self._queue.append(job)
            self.stats.jobs += 1
            self._cond.notify()
        return job.future

    def _retry_after(self) -> int:
        """Seconds until the queue has room, about: the waiting jobs' passes at the recent pace."""
        per_pass = self.stats.recent_batch_s or 1.0  # pessimistic: one job per pass
        return max(1, min(60, math.ceil(per_pass * (len(self._queue) + 1))))

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the pass that runs, fail the jobs still waiting (Stopped), end the thread."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            _settle(job.future, exc=Stopped("the server stopped before this request ran"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the model thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._gather()
                self._busy = True
            try:
                if batch:
                    self._run(batch)
            finally:
                self._busy = False

    def _gather(self) -> list[_Job]:
        """The next job and, for texts and images, the same kind's jobs that arrive within the
        window, up to the batch size. Called with the lock held."""
        first = self._queue.popleft()
        if first.future.cancelled():  # its client went away
            return []
        batch = [first]
        if first.kind == "call":
            return batch
        limit = self.text_batch if first.kind == "text" else self.image_batch
        total = first.size
        deadline = time.monotonic() + self.window_s
        while total < limit and not self._stopping:
            for job in list(self._queue):
                if job.kind == first.kind and total + job.size <= limit:
                    self._queue.remove(job)
                    if not job.future.cancelled():
                        batch.append(job)
                        total += job.size
            left = deadline - time.monotonic()
            if total >= limit or left <= 0:
                break
            self._cond.wait(left)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        for job in batch:
            job.future.set_running_or_notify_cancel()
        started = time.monotonic()
        try:
            if batch[0].kind == "call":
                results = [batch[0].payload()]
            elif batch[0].kind == "text":
                results = self._encode_texts(batch)
            else:
                results = self._encode_images(batch)
        except BaseException as exc:  # noqa: BLE001 - the requests answer 500; the thread goes on
            for job in batch:
                _settle(job.future, exc=exc)
            return
        finally:
            self._account(batch, time.monotonic() - started)
        for job, result in zip(batch, results):
            _settle(job.future, result=result)

    def _account(self, batch: list[_Job], seconds: float) -> None:
        s = self.stats
        if batch[0].kind != "call":
            s.batches += 1
            items = sum(job.size for job in batch)
            s.items += items
            s.largest_batch_jobs = max(s.largest_batch_jobs, len(batch))
            s.largest_batch_items = max(s.largest_batch_items, items)
            s.multi_job_batches += len(batch) > 1
            s.recent_batch_s = seconds if not s.recent_batch_s else 0.8 * s.recent_batch_s + 0.2 * seconds
        s.busy_s += seconds

    def _encode_texts(self, batch: list[_Job]) -> list[np.ndarray]:
        """As AltCLIP.encode_texts, over every job's texts: sorted by length so that a pass pads
        little, rows put back in order."""
        model = self.model
        ids = [seq for job in batch for seq in job.payload]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), model.embed_dim)
        for start in range(0, len(order), self.text_batch):
            rows = order[start:start + self.text_batch]
            batch_ids, mask = model.tokenizer.pad([ids[i] for i in rows])
            out[rows] = model.encode_token_batch(batch_ids, mask).cpu()
        return self._split(batch, out)

    def _encode_images(self, batch: list[_Job]) -> list[np.ndarray]:
        pixels = np.concatenate([job.payload for job in batch]) if len(batch) > 1 else batch[0].payload
        parts = [self.model.encode_pixels(torch.from_numpy(pixels[start:start + self.image_batch]))
                 for start in range(0, len(pixels), self.image_batch)]
        return self._split(batch, torch.cat(parts))

    @staticmethod
    def _split(batch: list[_Job], out: torch.Tensor) -> list[np.ndarray]:
        """Each job's rows, float32, L2-normalised where the job asks (as the runtime's _finish)."""
        results, start = [], 0
        for job in batch:
            rows = out[start:start + job.size].float()
            start += job.size
            results.append((F.normalize(rows, dim=-1) if job.normalize else rows).numpy())
        return results


def _settle(future: Future, result=None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled (its request went away)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
