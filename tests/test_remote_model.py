"""The model through a server (serve/remote.py) beside the one in this process: the same
model-facing layer (runtime/embedder.py) over both, and requests that stay under the server's
size cap however long the inputs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import short_dir, start_server  # noqa: E402
from test_serve_client import altclip, assert_embed_lines_close, model_args  # noqa: E402

from altclip_cli.serve import client  # noqa: E402


@pytest.fixture(scope="module")
def small_server(_tiny_model_master):
    """A server that takes requests of at most 20 kB."""
    s = start_server(_tiny_model_master, "--max-request-mb", "0.02")
    yield s
    assert s.stop() == 0, s.log()


def test_long_texts_are_split_into_requests_the_server_takes(small_server, _tiny_model_master):
    """60 texts of about 600 bytes (36 kB in all) through a server that takes 20 kB per request:
    several requests, the vectors of an in-process run."""
    texts = "".join(f"line {i}: " + "ein Wort, 一个词, a word " * 22 + "\n" for i in range(60)).encode()
    before = client.health(small_server.target)["requests"]
    xdg = short_dir()
    try:
        run = altclip(xdg, "embed", "--text", "-", *model_args(_tiny_model_master), "--server", small_server.target,
                      stdin=texts)
        local = altclip(xdg, "embed", "--text", "-", *model_args(_tiny_model_master), "--server", "off", stdin=texts)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)
    assert run.code == 0, run.stderr
    assert client.health(small_server.target)["requests"] >= before + 3  # its health, two or more embeds
    assert "torch" not in run.modules
    assert [json.loads(x)["text"] for x in run.stdout.splitlines()] == texts.decode().splitlines()
    assert_embed_lines_close(run.stdout, local.stdout)


def test_a_text_too_long_for_any_request_is_an_input_error_naming_it(small_server, _tiny_model_master):
    texts = ("a cat\na dog\n" + "x" * 30_000 + "\n").encode()
    xdg = short_dir()
    try:
        run = altclip(xdg, "embed", "--text", "-", *model_args(_tiny_model_master), "--server", small_server.target,
                      stdin=texts)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)
    assert run.code == 1
    assert run.stderr[0].startswith(f"error: text 3 ('{'x' * 40}...'): 30,003 bytes as JSON, over what the server "
                                    f"at unix:{small_server.target} takes in one request"), run.stderr
    assert run.stderr[1] == "hint: start the server with a larger --max-request-mb, or run in-process (--server off)"
    assert "bug" not in " ".join(run.stderr)


def test_labels_and_scores_through_a_server_are_the_in_process_models(small_server, _tiny_model_master, tmp_path,
                                                                       monkeypatch):
    """Both models are Embedders: prompt ensembles, synonym groups and scores are one code, so a
    server's results equal the in-process model's (to float32 rounding of the vectors)."""
    from altclip_cli.runtime.altclip import AltCLIP, load
    from altclip_cli.runtime.embedder import Embedder
    from altclip_cli.serve.discovery import Wanted, connect

    monkeypatch.setenv("ALTCLIP_HOME", str(tmp_path / "home"))  # an empty label cache

    remote = connect(small_server.target, Wanted(model=str(_tiny_model_master), precision="fp32", images=False,
                                                 scores=True))
    local = load(_tiny_model_master, device="cpu", precision="fp32", use_cache=False)
    assert isinstance(remote, Embedder) and isinstance(local, AltCLIP) and isinstance(local, Embedder)
    for name in ("label_embeddings", "group_embeddings", "scores", "encode_images", "classify"):
        assert getattr(type(remote), name) is getattr(Embedder, name) is getattr(type(local), name)
    groups = [["cat", "猫", "gato"], ["dog"], ["a beach at night"]]
    templates = ["a photo of {}.", "{}"]
    got, want = remote.group_embeddings(groups, templates), local.group_embeddings(groups, templates)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    before = client.health(small_server.target)["requests"]
    np.testing.assert_array_equal(remote.group_embeddings(groups, templates), got)  # this machine's label cache
    assert client.health(small_server.target)["requests"] == before + 1  # the health requests only
    rng = np.random.default_rng(3)
    images = rng.standard_normal((4, local.embed_dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    assert remote.logit_scale == pytest.approx(local.logit_scale, rel=1e-6)
    for a, b in zip(remote.scores(images, got), local.scores(images, want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
