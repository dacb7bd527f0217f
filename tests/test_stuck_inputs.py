"""One stuck input cannot stall a run: a URL that trickles, a redirect off http(s), a FIFO nobody
writes to. Each fails on its own, named, within its time limit, and the other inputs go on."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from altclip_cli.cli import cli
from altclip_cli.errors import InputError
from altclip_cli.inputs.images import open_image
from altclip_cli.inputs.pipeline import stream_embeddings
from altclip_cli.inputs.urls import fetch_url
from bounded import in_thread
from urlserver import serve

SAFE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1",
            "ALTCLIP_DEVICE": "cpu", "ALTCLIP_PRECISION": "fp32"}


# --- URLs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with serve() as url:
        yield url


def test_a_trickling_url_ends_at_the_deadline(server):
    """One byte every 0.3 s resets a per-read socket timeout for ever; the deadline is for the whole download."""
    out, took = in_thread(lambda: fetch_url(server + "/trickle", timeout=1.5), limit=10)
    assert isinstance(out.get("error"), InputError)
    assert out["error"].message == f"{server}/trickle: timed out after 1.5 s (the limit for the whole download)"
    assert 1.4 <= took < 3


@pytest.mark.parametrize("path, target", [("/to-ftp", "ftp://127.0.0.1/cat.png"), ("/to-file", "file:///etc/passwd")])
def test_a_redirect_off_http_is_refused_as_such(server, path, target):
    with pytest.raises(InputError) as info:
        fetch_url(server + path, timeout=5)
    assert info.value.message == (f"{server}{path}: redirected to {target}, which is not an http(s) URL; "
                                  "only http(s) redirects are followed")


def test_a_redirect_loop_is_too_many_redirects(server):
    with pytest.raises(InputError, match=r"/loop: too many redirects \(more than 10; a redirect loop\?\)"):
        fetch_url(server + "/loop", timeout=5)


def test_an_http_redirect_is_followed(server):
    assert fetch_url(server + "/hop", timeout=5)[:8] == b"\x89PNG\r\n\x1a\n"


# --- reads that never return -----------------------------------------------------------------------


@pytest.fixture
def fifo_among_images(tmp_path):
    """[a.png, stuck.png (a FIFO nobody writes to), b.png, c.png]; the FIFO is released afterwards,
    so the worker abandoned on it ends."""
    paths = []
    for name, seed in (("a.png", 1), ("stuck.png", None), ("b.png", 2), ("c.png", 3)):
        path = tmp_path / name
        if seed is None:
            os.mkfifo(path)
        else:
            pixels = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        paths.append(path)
    yield paths
    try:  # a writer that closes at once: the reader blocked in open() gets EOF
        os.close(os.open(paths[1], os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left
        pass


def mean_pixel(image):
    return np.asarray(image.convert("RGB"), dtype=np.float32).mean()[None, None, None] * np.ones((3, 1, 1), np.float32)


def first_value(batch):
    return batch.reshape(len(batch), -1)[:, :4]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_fifo_is_refused_at_once_and_the_others_go_on(fifo_among_images, workers):
    """With the default input timeout: the FIFO is refused unread, not waited on."""
    def run():
        return list(stream_embeddings([str(p) for p in fifo_among_images], open_image, mean_pixel, first_value,
                                      batch_size=2, workers=workers))

    out, took = in_thread(run, limit=20)
    results = out["value"]
    assert [r.index for r in results] == [0, 1, 2, 3]
    stuck = results[1]
    assert stuck.embedding is None
    assert stuck.error.message == f"{fifo_among_images[1]}: not a regular file (a FIFO)"
    assert all(r.error is None and r.embedding is not None for r in results[::2] + results[3:])


def test_the_deadline_counts_from_when_a_worker_starts(tmp_path):
    """One worker, inputs that take 0.6 s each, a 1 s limit: the third waits 1.2 s in the queue
    and still succeeds."""
    def slow_open(source):
        time.sleep(0.6)
        return source

    results = list(stream_embeddings([1, 2, 3], slow_open, lambda v: np.full((3, 1, 1), v, np.float32),
                                     first_value, batch_size=4, workers=1, input_timeout=1))
    assert [r.error for r in results] == [None, None, None]
    assert [r.embedding[0] for r in results] == [1, 2, 3]


def test_two_stuck_inputs_keep_the_pool_at_capacity():
    """With one worker and two inputs that never return, every later input still gets decoded:
    each abandoned worker is replaced."""
    never = threading.Event()

    def open_fn(source):
        if source.startswith("stuck"):
            never.wait()
        return 1

    sources = ["stuck-1", "ok-1", "stuck-2", "ok-2", "ok-3"]
    try:
        out, took = in_thread(lambda: list(stream_embeddings(sources, open_fn, lambda v: np.ones((3, 1, 1), np.float32),
                                                             first_value, batch_size=1, workers=1,
                                                             input_timeout=0.5)), limit=10)
    finally:
        never.set()
    assert [r.error is None for r in out["value"]] == [False, True, False, True, True]
    assert out["value"][0].error.message == "stuck-1: no data after 0.5 s (a hung network mount?)"
    assert out["value"][0].error.hint == "raise the input timeout (--input-timeout) if this input is only slow"
    assert took < 3


def test_classify_goes_on_past_a_fifo(tiny_model_dir, fifo_among_images, monkeypatch):
    """With the default --input-timeout (120 s): the FIFO fails at once, as not a regular file."""
    monkeypatch.chdir(fifo_among_images[0].parent)
    args = ["classify", "a.png", "stuck.png", "b.png", "c.png", "-l", "cat", "-l", "dog", "-f", "jsonl",
            "-m", str(tiny_model_dir)]
    out, took = in_thread(lambda: CliRunner().invoke(cli, args, env=SAFE_ENV, catch_exceptions=False), limit=60)
    result = out["value"]
    assert result.exit_code == 3
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == ["a.png", "stuck.png", "b.png", "c.png"]
    assert records[1] == {"image": "stuck.png", "error": "not a regular file (a FIFO)"}
    assert all(len(r["scores"]) == 2 for r in records[::2] + records[3:])
    assert "error: stuck.png: not a regular file (a FIFO)" in result.stderr
