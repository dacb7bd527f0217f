"""`altclip serve` run for real: a server process on a Unix socket (or TCP loopback) with the tiny
model, asked through altclip's own stdlib client, raw http.client and OpenAI's client. Results
are compared with the library's in-process results on the same model and precision."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from altclip_cli.cli import cli  # noqa: E402
from altclip_cli.outputs.records import score_record  # noqa: E402
from altclip_cli.inputs.images import open_image  # noqa: E402
from altclip_cli.serve import client  # noqa: E402
from altclip_cli.serve.client import RequestFailed, ServerBusy, ServerDown, ServerLost, ServerMismatch  # noqa: E402

# The server's own process: optionally every forward pass made slow (for queue and kill tests).
SERVER_MAIN = """
import sys, time
delay = float(sys.argv[1])
if delay:
    from altclip_cli.serve import batcher
    real = batcher.Batcher._run
    def slow(self, batch):
        time.sleep(delay)
        return real(self, batch)
    batcher.Batcher._run = slow
from altclip_cli.cli import main
main(sys.argv[2:])
"""


class Server:
    """A running `altclip serve` process; its stderr goes to a file (a full pipe would block it)."""

    def __init__(self, proc: subprocess.Popen, target: str, log: Path, folder: Path):
        self.proc, self.target, self.log_path, self.folder = proc, target, log, folder

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> dict:
        return client.health(self.target)

    def stop(self, sig=signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not stop on {sig!r}:\n{self.log()}")


def server_env(home: Path) -> dict:
    env = {**os.environ, "ALTCLIP_HOME": str(home / "altclip"), "HF_HOME": str(home / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1"}
    env.pop("ALTCLIP_DEBUG", None)
    return env


def short_dir() -> Path:
    """A private folder with a short path (a Unix socket path holds about 100 bytes)."""
    return Path(tempfile.mkdtemp(dir="/tmp", prefix="acs"))


def start_server(model_dir, *args, socket_path: Path | None = None, delay: float = 0.0, tcp: bool = False,
                 wait: bool = True, home: Path | None = None, main: str = SERVER_MAIN) -> Server:
    folder = short_dir()
    home = home or folder
    log = folder / "server.log"
    cmd = ["serve", "-m", str(model_dir), "--device", "cpu", "--precision", "fp32", *map(str, args)]
    if tcp:
        cmd += ["--port", "0"]
    else:
        socket_path = socket_path or folder / "s.sock"
        cmd += ["--socket", str(socket_path)]
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", main, str(delay), *cmd], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=server_env(home))
    server = Server(proc, str(socket_path) if not tcp else "", log, folder)
    if wait:
        _wait_ready(server, tcp)
    return server


def _wait_ready(server: Server, tcp: bool, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"the server exited ({server.proc.returncode}):\n{server.log()}")
        if tcp and not server.target:
            m = re.search(r"listening on (http://\S+),", server.log())
            if m:
                server.target = m.group(1)
        if server.target:
            try:
                server.health()
                return
            except ServerDown:
                pass
        time.sleep(0.05)
    server.proc.kill()
    raise AssertionError(f"the server did not answer within {timeout} s:\n{server.log()}")


def png_bytes(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1x1 PNG whose header declares width x height: tiny on the wire, 10 gigapixels if decoded."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR's width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # and its CRC
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def raw_request(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    return client.request(server.target, method, path, body, headers=headers or {})


# --- the shared server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(_tiny_model_master):
    """One server for the read-only tests: a 1 MB request cap, a 50 ms batching window."""
    s = start_server(_tiny_model_master, "--max-request-mb", "1", "--batch-window-ms", "50")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for i in range(8):
        path = folder / f"img{i}.png"
        path.write_bytes(png_bytes(i, size=(40 + 7 * i, 30 + 5 * i)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def local(tiny_loaded):
    return tiny_loaded[1]


def in_process_records(model, paths, labels, templates=None, top_k=None, names=None):
    emb = model.encode_images([open_image(p) for p in paths])
    probs, logits = model.scores(emb, model.label_embeddings(labels, templates))
    names = names or [str(p) for p in paths]
    return [score_record(n, labels, probs[i], logits[i], top_k) for i, n in enumerate(names)]


def assert_records_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["image"] == w["image"]
        assert [s["label"] for s in g["scores"]] == [s["label"] for s in w["scores"]]
        for gs, ws in zip(g["scores"], w["scores"]):
            assert gs["prob"] == pytest.approx(ws["prob"], rel=1e-5, abs=1e-6)
            assert gs["logit"] == pytest.approx(ws["logit"], rel=1e-5, abs=1e-5)


def test_health_names_the_server_and_its_model(server, local, _tiny_model_master):
    info = server.health()
    from altclip_cli import __version__

    assert info["status"] == "ok" and info["altclip"] == __version__ and info["protocol"] == client.PROTOCOL
    assert info["model"] == str(_tiny_model_master) and info["weights"] == local.weights_id
    assert info["device"] == "cpu" and info["precision"] == "fp32" and info["embed_dim"] == local.embed_dim
    assert info["pid"] == server.proc.pid and info["uptime_s"] > 0
    assert info["transport"] == "unix" and info["paths"] is True
    assert info["limits"]["max_request_bytes"] == 1_000_000
    client.check_compatible(info, model=str(_tiny_model_master))
    with pytest.raises(ServerMismatch, match="runs .* not BAAI/AltCLIP"):
        client.check_compatible(info, model="BAAI/AltCLIP")
    with pytest.raises(ServerMismatch, match="protocol"):
        client.check_compatible(info, protocol=client.PROTOCOL + 1)
    assert "GET /v1/health 200" in server.log()


def test_classify_gives_the_in_process_records(server, local, images):
    labels, templates = ["猫", "dog", "a beach", "dog"], ["a photo of {}.", "{}"]
    out = client.post_json(server.target, "/v1/classify", {
        "images": [str(images[0]), {"path": str(images[1]), "name": "second.png"},
                   {"data": b64(images[2].read_bytes()), "name": "third.png"}, data_uri(images[3].read_bytes())],
        "labels": labels, "templates": templates})
    want = in_process_records(local, images[:4], labels, templates,
                              names=[str(images[0]), "second.png", "third.png", "images[3]"])
    assert_records_close(out["results"], want)
    assert out["model"] == local.model_id

    top = client.post_json(server.target, "/v1/classify", {"images": [str(images[4])], "labels": labels, "top_k": 2})
    assert_records_close(top["results"], in_process_records(local, images[4:5], labels, top_k=2))


def test_classify_multipart_upload(server, local, images):
    boundary = "altclip-test-boundary"
    parts = []
    for path in images[:2]:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    for label in ("猫", "dog"):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n{label}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, data = raw_request(server, "POST", "/v1/classify", body,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, data
    want = in_process_records(local, images[:2], ["猫", "dog"], names=[p.name for p in images[:2]])
    assert_records_close(json.loads(data)["results"], want)

    bad = body.replace(b'name="label"', b'name="colour"', 1)
    status, _, data = raw_request(server, "POST", "/v1/classify", bad,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "unknown form field 'colour'" in json.loads(data)["error"]["message"]


def test_embed_texts_and_images_equal_in_process(server, local, images):
    texts = ["a cat", "一只猫", "", "صورة قطة " * 30]
    out = client.post_json(server.target, "/v1/embed", {"texts": texts})
    assert [r["row"] for r in out["results"]] == [0, 1, 2, 3] and [r["text"] for r in out["results"]] == texts
    got = np.array([r["embedding"] for r in out["results"]], dtype=np.float32)
    np.testing.assert_allclose(got, local.encode_texts(texts), rtol=0, atol=1e-6)
    assert out["dim"] == local.embed_dim and out["normalized"] is True

    raw = client.post_json(server.target, "/v1/embed", {"texts": texts[:2], "normalize": False, "encoding": "base64"})
    got = np.stack([np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in raw["results"]])
    np.testing.assert_allclose(got, local.encode_texts(texts[:2], normalize=False), rtol=1e-6, atol=1e-6)

    out = client.post_json(server.target, "/v1/embed", {"images": [str(p) for p in images[:3]]})
    got = np.array([r["embedding"] for r in out["results"]], dtype=np.float32)
    np.testing.assert_allclose(got, local.encode_images([open_image(p) for p in images[:3]]), rtol=0, atol=1e-6)
    assert [r["image"] for r in out["results"]] == [str(p) for p in images[:3]]


def test_embed_on_error_record_keeps_going(server, local, images, tmp_path):
    out = client.post_json(server.target, "/v1/embed", {
        "images": [str(images[0]), str(tmp_path / "missing.png"), {"data": b64(b"not an image"), "name": "junk"}],
        "on_error": "record"})
    first, missing, junk = out["results"]
    assert first["row"] == 0 and len(first["embedding"]) == local.embed_dim
    assert missing == {"row": None, "image": str(tmp_path / "missing.png"), "error": "no such file"}
    assert junk["row"] is None and "not an image" in junk["error"]


def test_openai_embeddings_shape_and_values(server, local, images):
    out = client.post_json(server.target, "/v1/embeddings", {"model": "altclip", "input": "a cat"})
    assert set(out) == {"object", "data", "model", "usage"} and out["object"] == "list"
    assert out["model"] == local.model_id
    [item] = out["data"]
    assert set(item) == {"object", "index", "embedding"} and item["object"] == "embedding" and item["index"] == 0
    np.testing.assert_allclose(np.array(item["embedding"], np.float32), local.encode_texts(["a cat"])[0], atol=1e-6)
    tokens = len(local.tokenizer.encode(["a cat"])[0])
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    png = images[0].read_bytes()
    mixed = client.post_json(server.target, "/v1/embeddings", {
        "model": local.model_id, "input": ["a cat", data_uri(png), "一只猫"], "encoding_format": "base64"})
    got = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in mixed["data"]]
    assert [d["index"] for d in mixed["data"]] == [0, 1, 2]
    np.testing.assert_allclose(np.stack([got[0], got[2]]), local.encode_texts(["a cat", "一只猫"]), atol=1e-6)
    np.testing.assert_allclose(got[1], local.encode_images([open_image(images[0])])[0], atol=1e-6)

    as_image = client.post_json(server.target, "/v1/embeddings",
                                {"model": "altclip", "input": [data_uri(png)], "modality": "image"})
    np.testing.assert_allclose(as_image["data"][0]["embedding"], got[1], atol=1e-6)

    for payload, status, words in [
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "is not served here"),
        ({"model": "altclip", "input": [1, 2, 3]}, 400, "token arrays"),
        ({"model": "altclip", "input": []}, 400, "input is empty"),
        ({"model": "altclip", "input": "x", "dimensions": 3}, 400, "dimensions 3"),
        ({"model": "altclip", "input": ["a cat"], "modality": "image"}, 400, "not a data:image"),
        ({"model": "altclip", "input": "x", "temperature": 1}, 400, "unknown field 'temperature'"),
    ]:
        with pytest.raises(RequestFailed) as exc:
            client.post_json(server.target, "/v1/embeddings", payload)
        assert exc.value.status == status and words in exc.value.message, payload


def test_bad_requests_are_4xx_naming_the_problem_and_the_server_stays_up(server, images):
    cases = [
        ("/v1/classify", {"images": [str(images[0])], "labels": ["cat"], "colour": "red"}, 400, "unknown field 'colour'"),
        ("/v1/classify", {"images": [str(images[0])], "labels": []}, 400, "labels is empty"),
        ("/v1/classify", {"images": [str(images[0])], "labels": ["cat", " "]}, 400, "label 1"),
        ("/v1/classify", {"images": [], "labels": ["cat"]}, 400, "images is empty"),
        ("/v1/classify", {"images": [str(images[0])], "labels": ["cat"], "templates": ["no slot"]}, 400, "has no {}"),
        ("/v1/classify", {"images": ["relative.png"], "labels": ["cat"]}, 400, "must be absolute"),
        ("/v1/classify", {"images": [{"data": "!!!"}], "labels": ["cat"]}, 400, "not valid base64"),
        ("/v1/classify", {"images": [{"data": b64(b"hello"), "name": "hello.txt"}], "labels": ["cat"]}, 422,
         "hello.txt: not an image"),
        ("/v1/classify", {"images": [{"data": b64(bomb_png()), "name": "bomb.png"}], "labels": ["cat"]}, 422,
         "over the limit of 178,956,970 pixels"),
        ("/v1/embed", {"texts": ["a"], "images": [str(images[0])]}, 400, "either texts or images"),
        ("/v1/embed", {"texts": ["a"], "encoding": "hex"}, 400, "encoding"),
    ]
    for path, payload, status, words in cases:
        with pytest.raises(RequestFailed) as exc:
            client.post_json(server.target, path, payload)
        assert exc.value.status == status, (payload, exc.value.message)
        assert words in exc.value.message, (payload, exc.value.message)
        assert exc.value.error["type"] and "message" in exc.value.error

    fifo = short_dir() / "fifo.png"
    os.mkfifo(fifo)  # nobody writes to it: opening it would block a decoder for ever
    with pytest.raises(RequestFailed) as exc:
        client.post_json(server.target, "/v1/classify", {"images": [str(fifo)], "labels": ["cat"]}, timeout=30)
    assert exc.value.status == 422 and exc.value.message == f"{fifo}: not a regular file (a FIFO)"

    status, _, data = raw_request(server, "POST", "/v1/embed", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]["message"]
    status, _, data = raw_request(server, "POST", "/v1/embed", b'{"texts": ["a"]}', {"Content-Type": "text/plain"})
    assert status == 415
    status, _, _ = raw_request(server, "GET", "/v1/nothing")
    assert status == 404
    assert client.post_json(server.target, "/v1/embed", {"texts": ["still here"]})["results"][0]["row"] == 0


def test_bomb_upload_is_refused_naming_the_pixel_cap(server):
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bomb.png"\r\n\r\n'.encode()
            + bomb_png() + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\ncat\r\n'
                           f"--{boundary}--\r\n".encode())
    status, _, data = raw_request(server, "POST", "/v1/classify", body,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    error = json.loads(data)["error"]
    assert status == 422 and "bomb.png" in error["message"]
    assert "10,000,000,000 pixels, over the limit of 178,956,970 pixels" in error["message"]


def test_over_size_requests_get_413(server):
    big = {"texts": ["x" * 1_100_000]}
    with pytest.raises(RequestFailed) as exc:
        client.post_json(server.target, "/v1/embed", big)
    assert exc.value.status == 413 and "at most 1,000,000 bytes" in exc.value.message

    # Without Content-Length (chunked): counted as it arrives.
    def chunks():
        yield b'{"texts": ["'
        for _ in range(40):
            yield b"y" * 50_000
        yield b'"]}'

    conn = client._UnixConnection(server.target, timeout=30)
    try:
        conn.request("POST", "/v1/embed", body=chunks(), headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "at most 1,000,000 bytes" in json.loads(resp.read())["error"]["message"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the last chunk; the status above is what matters when it answers
    finally:
        conn.close()
    assert client.post_json(server.target, "/v1/embed", {"texts": ["ok"]})["results"]


def test_eight_parallel_clients_are_batched_and_correct(server, local, images):
    before = server.health()["batching"]
    barrier = threading.Barrier(8)
    results: dict[int, object] = {}

    def one(i):
        barrier.wait()
        try:
            results[i] = client.post_json(server.target, "/v1/embed", {"images": [str(images[i])]})
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = local.encode_images([open_image(p) for p in images])
    for i in range(8):
        assert isinstance(results[i], dict), results[i]
        np.testing.assert_allclose(results[i]["results"][0]["embedding"], want[i], atol=1e-6)
    after = server.health()["batching"]
    assert after["multi_job_batches"] > before["multi_job_batches"], after
    assert after["largest_batch_jobs"] > 1
    assert after["batches"] - before["batches"] < 8  # fewer passes than requests


# --- search ------------------------------------------------------------------------------------------


@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(8):
        (folder / ("sub" if i % 3 == 0 else "") / f"p{i}.png").write_bytes(png_bytes(30 + i, size=(36 + 5 * i, 28 + 3 * i)))
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_search_indexes_the_folder_and_ranks_as_the_reference(server, tiny_loaded, photo_folder, tmp_path):
    """POST /v1/search: the folder indexed by the server, two requests at once (its updates of one
    index take turns), then a weighted text + image query ranked as transformers' embeddings rank."""
    from oracle import Reference
    from test_search import _same_ranking

    query = [{"text": "a red car", "weight": 2}, {"image": str(photo_folder / "p1.png")},
             {"text": "a cat", "weight": -0.5}]
    payload = {"query": query, "dir": str(photo_folder), "index": str(tmp_path / "index"), "top_k": 50}
    answers = [None, None]

    def ask(i):
        answers[i] = client.post_json(server.target, "/v1/search", payload)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    first, second = sorted(answers, key=lambda a: -a["update"]["added"])
    assert first["update"]["added"] == 8 and first["update"]["failed"] == 1
    assert second["update"]["added"] == 0 and second["update"]["failed"] == 0  # the failure is not tried again
    assert first["walked"] == [str(photo_folder)]
    assert bool(second["walked"]) is (not sys.platform.startswith("linux"))  # watched: no walk
    assert [m["level"] for m in first["messages"]] == ["error"]
    assert first["messages"][0]["message"].startswith(f"{photo_folder / 'broken.png'}: not an image")
    assert first["results"] == second["results"] and first["searched"] == 8

    paths = sorted(str(p) for p in photo_folder.rglob("p*.png"))
    reference = Reference(tiny_loaded[0])
    texts = reference.text_embeddings(["a red car", "a cat"])
    image = reference.image_embeddings([str(photo_folder / "p1.png")])[0]
    q = 2 * texts[0] + image - 0.5 * texts[1]
    _same_ranking(first["results"], paths, reference.image_embeddings(paths) @ (q / np.linalg.norm(q)))

    below = client.post_json(server.target, "/v1/search", {**payload, "dir": str(photo_folder / "sub"),
                                                           "update": False, "top_k": 2, "min_score": -1})
    assert below["update"] is None and below["searched"] == 3 and len(below["results"]) == 2
    assert all(r["path"].startswith(str(photo_folder / "sub") + "/") for r in below["results"])


def test_search_requests_that_cannot_be_done_are_named(server, photo_folder, tmp_path):
    from altclip_cli.search.store import IndexStore

    index = str(tmp_path / "index")
    good = {"query": [{"text": "a cat"}], "dir": str(photo_folder), "index": index}
    cases = [
        ({**good, "colour": "red"}, 400, "unknown field 'colour'", None),
        ({**good, "query": []}, 400, "query is empty", None),
        ({**good, "query": [{"text": " "}]}, 400, "the text is empty", None),
        ({**good, "query": [{"text": "a", "image": "/x.png"}]}, 400, "exactly one of text and image", None),
        ({**good, "dir": "photos"}, 400, "dir must be an absolute folder", None),
        ({**good, "dir": str(tmp_path / "nowhere")}, 422, "no such folder", None),
        ({**good, "index": "idx"}, 400, 'index must be "auto" or an absolute folder', None),
        ({**good, "update": False}, 422, f"there is no index in {index}", None),
        ({**good, "query": [{"image": str(photo_folder / "gone.png")}]}, 422, "query image ", None),
    ]
    for payload, status, words, code in cases:
        with pytest.raises(RequestFailed) as exc:
            client.post_json(server.target, "/v1/search", payload)
        assert exc.value.status == status and words in exc.value.message, (payload, exc.value.message)
        if code:
            assert exc.value.error["code"] == code
    assert not (tmp_path / "index").exists()  # nothing was indexed for a request refused up front
    # Parts that cancel out are found once encoded (the folder is indexed meanwhile): a usage error.
    with pytest.raises(RequestFailed) as exc:
        client.post_json(server.target, "/v1/search", {**good, "query": [{"text": "cat"}, {"text": "cat", "weight": -1}]})
    assert exc.value.status == 400 and "cancel out" in exc.value.message and exc.value.error["code"] == "usage"

    client.post_json(server.target, "/v1/search", good)  # builds the index
    (photo_folder / "p0.png").touch()  # a change: the next search walks, and needs the write lock
    with IndexStore.open(index, write=True, writer="altclip index"):  # another process's update
        with pytest.raises(RequestFailed) as exc:
            client.post_json(server.target, "/v1/search", good)
        assert exc.value.status == 409 and f"another altclip index (pid {os.getpid()}) is updating" in exc.value.message
        assert "--wait" in exc.value.error["hint"]
        assert client.post_json(server.target, "/v1/search", {**good, "update": False})["searched"] == 8


def test_index_requests(server, photo_folder, tmp_path):
    """POST /v1/index: `altclip index` by the server; what it cannot do is named."""
    index = str(tmp_path / "index")
    answer = client.post_json(server.target, "/v1/index", {"paths": [{"path": str(photo_folder), "name": "photos"}],
                                                           "index": index})
    assert answer["update"]["added"] == 8 and answer["update"]["failed"] == 1 and answer["compacted"] is None
    assert answer["messages"][0]["message"].startswith("photos/broken.png: not an image")
    (photo_folder / "p1.png").unlink()
    answer = client.post_json(server.target, "/v1/index", {"paths": [{"path": str(photo_folder)}], "index": index,
                                                           "compact": True})
    assert answer["update"]["removed"] == 1 and answer["compacted"] == [8, 7]
    cases = [
        ({"paths": []}, 400, "paths is empty"),
        ({"paths": [{"path": "photos"}]}, 400, "paths[0] must be absolute"),
        ({"paths": [{"path": str(tmp_path / "gone")}]}, 422, "no such file or folder"),
        ({"paths": [{"path": str(photo_folder)}], "index": "idx"}, 400, 'index must be "auto" or an absolute folder'),
        ({"paths": [{"path": str(photo_folder)}], "rebuilt": True}, 400, "unknown field 'rebuilt'"),
    ]
    for payload, status, words in cases:
        with pytest.raises(RequestFailed) as exc:
            client.post_json(server.target, "/v1/index", payload)
        assert exc.value.status == status and words in exc.value.message, (payload, exc.value.message)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the server watches folders with inotify")
def test_search_skips_the_walk_of_a_watched_tree_until_something_changes(server, photo_folder, tmp_path,
                                                                          _tiny_model_master):
    index = str(tmp_path / "index")

    def ask(folder=photo_folder, **extra):
        payload = {"query": [{"text": "a cat"}], "dir": str(folder), "index": index, "top_k": 50, **extra}
        return client.post_json(server.target, "/v1/search", payload)

    first = ask()
    assert first["walked"] and first["update"]["added"] == 8
    again = ask()
    assert not again["walked"] and again["results"] == first["results"]
    inside = str(photo_folder / "index-here")  # an index inside the tree: its own writes are no change
    assert ask(index=inside)["update"]["added"] == 8
    assert not ask(index=inside)["walked"]
    assert not ask(photo_folder / "sub")["walked"]  # below a watched tree
    assert ask(exclude_dirs=["sub"])["walked"]  # other walk options: walked (and sub's images dropped)
    assert ask()["walked"]  # the index changed since the watched walk: walked again, sub's images back
    assert not ask()["walked"]

    # A change is walked where it happened: the folder that holds it.
    (photo_folder / "sub" / "new.png").write_bytes(png_bytes(99))
    found = ask()
    assert found["walked"] == [str(photo_folder / "sub")] and found["update"]["added"] == 1
    assert str(photo_folder / "sub" / "new.png") in [r["path"] for r in found["results"]]
    assert found["update"]["files"] == found["searched"] == 9
    (photo_folder / "p1.png").write_bytes(png_bytes(98))  # replaced in place
    replaced = ask()
    assert replaced["walked"] == [str(photo_folder)] and replaced["update"]["updated"] == 1
    # A new folder is walked (and watched from then on); a new hidden one is not, its folder is.
    (photo_folder / "new" / "deeper").mkdir(parents=True)
    (photo_folder / "new" / "deeper" / "a.png").write_bytes(png_bytes(96))
    (photo_folder / ".cache").mkdir()
    (photo_folder / ".cache" / "thumb.png").write_bytes(png_bytes(95))
    grown = ask(photo_folder / "sub")  # below the change: nothing to walk for this folder ...
    assert not grown["walked"]
    grown = ask()  # ... while the whole tree's search walks it
    assert sorted(grown["walked"]) == [str(photo_folder)] and grown["update"]["added"] == 1
    paths = [r["path"] for r in grown["results"]]
    assert str(photo_folder / "new" / "deeper" / "a.png") in paths and not any("/.cache/" in p for p in paths)
    (photo_folder / "new" / "deeper" / "a.png").unlink()
    gone = ask()
    assert gone["walked"] == [str(photo_folder / "new" / "deeper")] and gone["update"]["removed"] == 1

    # Another process adds to the index (here a hidden file, which the server's walks leave out):
    # the server notices the index changed and walks, so the result is what a walk finds.
    (photo_folder / ".hidden.png").write_bytes(png_bytes(97))
    ask()  # (the new file is an event: walked, and the watch armed again)
    result = invoke("index", str(photo_folder), "--include-hidden", "--index", index, "-m", str(_tiny_model_master),
                    "--precision", "fp32")
    assert result.exit_code == 0 and "2 added" in result.stderr, result.stderr  # (and .cache/thumb.png)
    after = ask()
    assert after["walked"] == [str(photo_folder)] and after["update"]["removed"] == 2
    assert not any("/." in r["path"] for r in after["results"])


def test_paths_are_refused_over_tcp_and_the_host_header_is_checked(_tiny_model_master, images):
    s = start_server(_tiny_model_master, tcp=True)
    try:
        assert s.target.startswith("http://127.0.0.1:")
        port = int(s.target.rsplit(":", 1)[1])
        info = s.health()
        assert info["transport"] == "tcp" and info["paths"] is False
        with pytest.raises(RequestFailed) as exc:
            client.post_json(s.target, "/v1/classify", {"images": [str(images[0])], "labels": ["cat"]})
        assert exc.value.status == 403 and "Unix socket only" in exc.value.message
        assert info["search"] is False
        for path, body in (("/v1/search", {"query": [{"text": "a cat"}], "dir": "/"}),
                           ("/v1/index", {"paths": [{"path": "/"}]})):
            with pytest.raises(RequestFailed) as exc:
                client.post_json(s.target, path, body)
            assert exc.value.status == 403 and "Unix socket only" in exc.value.message
        out = client.post_json(s.target, "/v1/classify", {"images": [data_uri(images[0].read_bytes())], "labels": ["cat"]})
        assert out["results"][0]["scores"][0]["label"] == "cat"

        def get(headers):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.putrequest("GET", "/v1/health", skip_host=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        assert get({"Host": f"127.0.0.1:{port}"})[0] == 200
        assert get({"Host": f"localhost:{port}"})[0] == 200
        status, body = get({"Host": f"evil.example:{port}"})
        assert status == 403 and "DNS rebinding" in json.loads(body)["error"]["message"]
        assert get({"Host": f"127.0.0.1:{port + 1}"})[0] == 403
        assert get({})[0] in (400, 403)  # no Host at all
        status, body = get({"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example"})
        assert status == 403 and "cross-origin" in json.loads(body)["error"]["message"]
        assert get({"Host": f"127.0.0.1:{port}", "Origin": f"http://localhost:{port}"})[0] == 200
    finally:
        assert s.stop() == 0


def test_token_is_required_when_configured(_tiny_model_master, monkeypatch):
    folder = short_dir()
    token_file = folder / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    s = start_server(_tiny_model_master, "--host", "127.0.0.1", "--token-file", token_file, tcp=True, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"listening on (http://\S+),", s.log()):
            assert s.proc.poll() is None and time.monotonic() < deadline, s.log()
            time.sleep(0.05)
        url = re.search(r"listening on (http://\S+),", s.log()).group(1)
        for _ in range(200):  # bound before the line is printed; answers right away
            try:
                client.health(client.parse_target(url, token="s3cret-token"))
                break
            except ServerDown:
                time.sleep(0.05)
        with pytest.raises(RequestFailed) as exc:
            client.health(url)
        assert exc.value.status == 401 and "token" in exc.value.message
        with pytest.raises(RequestFailed) as exc:
            client.post_json(client.parse_target(url, token="wrong"), "/v1/embed", {"texts": ["a"]})
        assert exc.value.status == 401
        out = client.post_json(client.parse_target(url, token="s3cret-token"), "/v1/embed", {"texts": ["a"]})
        assert out["results"][0]["row"] == 0

        openai = pytest.importorskip("openai")
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        api = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-token", max_retries=0, timeout=60)
        got = api.embeddings.create(model="altclip", input=["a cat", "一只猫"])
        local = json.loads(json.dumps(client.post_json(client.parse_target(url, token="s3cret-token"), "/v1/embeddings",
                                                       {"model": "altclip", "input": ["a cat", "一只猫"]})))
        assert [d.index for d in got.data] == [0, 1]
        np.testing.assert_allclose([d.embedding for d in got.data], [d["embedding"] for d in local["data"]], atol=1e-6)
        single = api.embeddings.create(model="altclip", input="a cat", encoding_format="float")
        np.testing.assert_allclose(single.data[0].embedding, local["data"][0]["embedding"], atol=1e-6)
        assert got.usage.prompt_tokens == local["usage"]["prompt_tokens"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="altclip", input="x")
    finally:
        assert s.stop() == 0


# --- the socket ----------------------------------------------------------------------------------------


def invoke(*args):
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1"}
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def test_a_second_server_on_the_same_socket_fails_saying_one_runs(server, tiny_model_dir):
    result = invoke("serve", "-m", tiny_model_dir, "--socket", server.target)
    assert result.exit_code == 1
    assert f"error: a server is already running on {server.target} (pid {server.proc.pid})" in result.stderr
    assert "hint:" in result.stderr
    assert server.health()["status"] == "ok"  # untouched


def test_a_stale_socket_is_replaced_and_a_live_stranger_is_not(_tiny_model_master, tiny_model_dir):
    folder = short_dir()
    path = folder / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays; nothing answers on it
    assert path.exists()
    with pytest.raises(ServerDown):
        client.health(str(path))
    s = start_server(_tiny_model_master, socket_path=path)
    try:
        assert s.health()["status"] == "ok"
        assert f"replaced a stale socket at {path}" in s.log()
    finally:
        assert s.stop() == 0
    assert not path.exists()  # removed on a clean stop

    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.bind(str(path))
    stranger.listen(1)
    try:
        result = invoke("serve", "-m", tiny_model_dir, "--socket", path)
        assert result.exit_code == 1 and "it answers, but holds no altclip lock" in result.stderr
    finally:
        stranger.close()
        path.unlink()
    path.write_text("not a socket")
    result = invoke("serve", "-m", tiny_model_dir, "--socket", path)
    assert result.exit_code == 1 and "exists and is not a socket" in result.stderr
    assert path.read_text() == "not a socket"


def test_a_socket_folder_others_can_reach_is_refused(tiny_model_dir):
    folder = short_dir()
    shared = folder / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    result = invoke("serve", "-m", tiny_model_dir, "--socket", shared / "s.sock")
    assert result.exit_code == 1
    assert f"error: {shared} has mode 0755: other users could reach the socket" in result.stderr
    assert f"hint: chmod 700 {shared}" in result.stderr
    assert not (shared / "s.sock").exists()

    link = folder / "link"
    private = folder / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    result = invoke("serve", "-m", tiny_model_dir, "--socket", link / "s.sock")
    assert result.exit_code == 1 and "is a symbolic link" in result.stderr

    created = folder / "new"
    from altclip_cli.serve.transport import prepare_socket_dir

    prepare_socket_dir(created)
    assert (created.stat().st_mode & 0o777) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_socket_folder_owned_by_another_user_is_refused(tiny_model_dir):
    folder = short_dir() / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    result = invoke("serve", "-m", tiny_model_dir, "--socket", folder / "s.sock")
    assert result.exit_code == 1 and f"{folder} belongs to uid 65534, not to you" in result.stderr


def test_default_socket_place(monkeypatch, tmp_path):
    from altclip_cli.serve.transport import default_socket_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "altclip" / "altclip.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == Path(tempfile.gettempdir()) / f"altclip-{os.getuid()}" / "altclip.sock"


def test_listening_beyond_loopback_needs_a_token(tiny_model_dir):
    result = invoke("serve", "-m", tiny_model_dir, "--host", "0.0.0.0", "--port", "0")
    assert result.exit_code == 2
    assert "error: --host 0.0.0.0 is not a loopback address" in result.stderr
    assert "--token-file" in result.stderr
    result = invoke("serve", "-m", tiny_model_dir, "--socket", "/tmp/x.sock", "--port", "1")
    assert result.exit_code == 2 and "either --socket or --host/--port" in result.stderr
    result = invoke("serve", "-m", tiny_model_dir, "--token-file", "/dev/null")
    assert result.exit_code == 2 and "--token-file is for TCP" in result.stderr


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, tiny_model_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = invoke("serve", "-m", tiny_model_dir, "--socket", short_dir() / "s.sock")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: altclip serve needs the serve extra (fastapi not installed)",
                                          "hint: pip install 'altclip[serve]'"]


# --- load, stop, failures ---------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(_tiny_model_master):
    s = start_server(_tiny_model_master, "--queue-size", "1", "--batch-window-ms", "0", delay=1.5)
    try:
        outcomes = {}

        def post(key):
            try:
                outcomes[key] = client.post_json(s.target, "/v1/embed", {"texts": [key]})
            except Exception as exc:  # noqa: BLE001 - checked below
                outcomes[key] = exc

        first = threading.Thread(target=post, args=("first",))
        first.start()
        _until(lambda: s.health()["batching"]["jobs"] == 1 and s.health()["waiting"] == 0)  # running
        second = threading.Thread(target=post, args=("second",))
        second.start()
        _until(lambda: s.health()["waiting"] == 1)  # queued
        with pytest.raises(ServerBusy) as exc:
            client.post_json(s.target, "/v1/embed", {"texts": ["third"]})
        assert exc.value.status == 503 and exc.value.retry_after >= 1 and "busy" in exc.value.message
        first.join(30)
        second.join(30)
        assert outcomes["first"]["results"][0]["text"] == "first"
        assert outcomes["second"]["results"][0]["text"] == "second"
        assert s.health()["batching"]["refused"] == 1
    finally:
        assert s.stop() == 0


def _until(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_idle_timeout_exits(_tiny_model_master):
    s = start_server(_tiny_model_master, "--idle-timeout", "1")
    try:
        rc = s.proc.wait(30)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        raise AssertionError(f"still running after the idle timeout:\n{s.log()}")
    assert rc == 0
    assert "stopped (no request for 1 s (--idle-timeout))" in s.log()
    assert not Path(s.target).exists()


def test_ctrl_c_and_sigterm_stop_cleanly(_tiny_model_master):
    for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
        s = start_server(_tiny_model_master)
        client.post_json(s.target, "/v1/embed", {"texts": ["a"]})
        assert s.stop(sig) == 0, s.log()
        assert f"stopped ({name} received) after 2 requests" in s.log()
        assert "Traceback" not in s.log()
        assert not Path(s.target).exists()
        with pytest.raises(ServerDown):
            client.health(s.target)


def test_a_server_killed_mid_request_gives_the_client_an_error_not_a_hang(_tiny_model_master):
    s = start_server(_tiny_model_master, delay=60)
    outcome = {}

    def post():
        started = time.monotonic()
        try:
            outcome["result"] = client.post_json(s.target, "/v1/embed", {"texts": ["a"]}, timeout=120)
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome["result"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=post)
    thread.start()
    _until(lambda: s.health()["batching"]["jobs"] == 1)
    s.proc.kill()
    s.proc.wait()
    thread.join(20)
    assert not thread.is_alive(), "the client hangs"
    assert isinstance(outcome["result"], ServerLost), outcome
    assert "closed the connection before it answered" in outcome["result"].message
    assert outcome["seconds"] < 20
    with pytest.raises(ServerDown, match="no server answers"):
        client.health(s.target)  # the socket file is left behind: stale, and says so
    assert Path(s.target).exists()
    shutil.rmtree(s.folder, ignore_errors=True)
