"""The decode-ahead pipeline: order, per-input failures, bounded prefetch."""
import threading
import time

import numpy as np
import pytest

from altclip_cli.errors import InputError
from altclip_cli.inputs.pipeline import stream_embeddings


def fake_open(source):
    if source.startswith("bad"):
        raise InputError(f"{source}: not an image")
    if source.startswith("crash"):
        raise ValueError("decoder bug")
    return int(source.split("-")[1])


def preprocess(value):
    return np.full((3, 2, 2), value, dtype=np.float32)


def encode(batch):
    return batch.reshape(len(batch), -1)[:, :1] * np.ones((1, 4), np.float32)  # (B, 4), row = its value


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_results_in_input_order_with_failures_in_place(batch_size):
    sources = ["ok-1", "bad-a", "ok-2", "crash-b", "ok-3", "ok-4", "bad-c"]
    results = list(stream_embeddings(sources, fake_open, preprocess, encode, batch_size=batch_size, workers=3))
    assert [r.index for r in results] == list(range(len(sources)))
    assert [r.source for r in results] == sources
    for r in results:
        if r.source.startswith("ok"):
            assert r.error is None and r.embedding[0] == int(r.source.split("-")[1])
        else:
            assert r.embedding is None and isinstance(r.error, InputError) and r.source in str(r.error)


def test_prefetch_is_bounded():
    opened, lock = [], threading.Lock()
    consumed = []

    def counting_open(source):
        with lock:
            opened.append(source)
        return 1

    def sources():
        for i in range(100):
            # When the i-th source is produced, the consumer has seen `len(consumed)` results:
            # the pipeline may hold at most 2 * batch_size in flight plus one batch pending.
            assert i - len(consumed) <= 2 * 4 + 4
            yield f"ok-{i}"

    for r in stream_embeddings(sources(), counting_open, preprocess, encode, batch_size=4, workers=2):
        consumed.append(r)
    assert len(consumed) == 100 and len(opened) == 100


def test_empty_input():
    assert list(stream_embeddings([], fake_open, preprocess, encode, batch_size=4)) == []


CLOSE_BOUND_S = 2.0


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # an error closing a dropped generator
@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_blocked_input_does_not_hold_up_the_consumer_stopping(how):
    """The consumer stops (Ctrl-C, or it broke off and dropped the generator) while a worker is stuck
    on an input that never returns: stopping returns at once, with no join on the blocked worker."""
    entered, release = threading.Event(), threading.Event()

    def blocking_open(source):
        if source == "ok-3":
            entered.set()
            release.wait()  # a FIFO nobody writes to: blocks until the test ends
        return 1

    holder = {"stream": stream_embeddings([f"ok-{i}" for i in range(20)], blocking_open, preprocess, encode,
                                          batch_size=2, workers=2)}
    try:
        assert next(holder["stream"]).index == 0
        assert entered.wait(10), "the blocking input never reached a worker"

        errors = []

        def stop():
            try:
                if how == "close":
                    holder["stream"].close()
                else:
                    del holder["stream"]  # the last reference: CPython closes the generator here
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        # Stop from a helper thread, so that a close that waits on the input fails the test, not hangs it.
        stopper = threading.Thread(target=stop, daemon=True)
        start = time.monotonic()
        stopper.start()
        stopper.join(timeout=CLOSE_BOUND_S)
        assert not stopper.is_alive(), f"stopping the stream waited more than {CLOSE_BOUND_S} s on the blocked input"
        assert time.monotonic() - start < CLOSE_BOUND_S
        assert errors == []
        assert not release.is_set()  # the input was still blocked all along
        if how == "close":
            with pytest.raises(StopIteration):
                next(holder["stream"])
    finally:
        release.set()


def test_an_idle_worker_holds_nothing_of_the_tasks_it_ran():
    """A decode worker waiting for work keeps no reference to its last task's arguments. Else the
    last reference to a model that open_fn reaches can be a daemon thread's, freed while the
    interpreter shuts down, which aborts the process at exit (a C++ destructor in PyTorch)."""
    import gc
    import weakref

    from altclip_cli.inputs.pipeline import DaemonPool

    class Model:  # stands in for what open_fn's closure reaches
        pass

    pool = DaemonPool(1)
    try:
        model = Model()
        alive = weakref.ref(model)
        task = pool.submit(lambda m: "decoded", model)
        assert pool.result(task, timeout=10) == "decoded"
        del task, model
        deadline = time.monotonic() + 5
        while alive() is not None and time.monotonic() < deadline:  # the worker is between tasks
            gc.collect()
            time.sleep(0.01)
        assert alive() is None, "the idle worker still holds its last task's arguments"
    finally:
        pool.close()


def test_an_idle_worker_holds_nothing_of_a_task_cancelled_before_it_ran():
    """The same for a task cancelled while queued (a run stopped early): the worker that takes it
    off the queue skips it and keeps none of it."""
    import gc
    import weakref

    from altclip_cli.inputs.pipeline import DaemonPool

    class Model:
        pass

    pool = DaemonPool(1)
    try:
        release = threading.Event()
        first = pool.submit(release.wait)  # keeps the one worker busy while the second is queued
        model = Model()
        alive = weakref.ref(model)
        second = pool.submit(lambda m: "decoded", model)
        assert second.future.cancel()
        del second, model
        release.set()
        assert pool.result(first, timeout=10) is True
        deadline = time.monotonic() + 5
        while alive() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert alive() is None, "the idle worker still holds the cancelled task's arguments"
    finally:
        pool.close()
