"""`altclip serve` under careless or hostile clients: every request's work is bounded (a cap on
its images and texts, images decoded a bounded number ahead of the model), and who may talk
to a TCP server (the Host check where it protects, the token where there is one)."""
from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from altclip_cli.serve import client  # noqa: E402
from altclip_cli.serve.client import RequestFailed, ServerDown  # noqa: E402
from test_serve import data_uri, short_dir, start_server  # noqa: E402

WARNING = "warning: a TCP server without --token-file answers every user of this machine"


def pixel_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1), value).save(buf, "PNG")
    return buf.getvalue()


# --- the work of one request ---------------------------------------------------------------------------


def test_a_request_with_more_items_than_the_cap_gets_413_naming_it(_tiny_model_master):
    s = start_server(_tiny_model_master, "--batch-size", "2")  # the cap: 4 batches, so 8 images
    try:
        limits = s.health()["limits"]
        assert limits["max_images"] == 8 and limits["max_texts"] == 1024
        pngs = [data_uri(pixel_png(i)) for i in range(9)]
        for path, payload in (("/v1/embed", {"images": pngs}),
                              ("/v1/classify", {"images": pngs, "labels": ["cat"]}),
                              ("/v1/embeddings", {"model": "altclip", "input": pngs})):
            with pytest.raises(RequestFailed) as exc:
                client.post_json(s.target, path, payload)
            assert exc.value.status == 413, (path, exc.value.message)
            assert "holds 9 images; this server takes at most 8 per request (--max-items)" in exc.value.message
            assert exc.value.error["code"] == "too_many_items"
        with pytest.raises(RequestFailed) as exc:
            client.post_json(s.target, "/v1/embed", {"texts": ["a"] * 1025})
        assert exc.value.status == 413 and "at most 1,024" in exc.value.message
        out = client.post_json(s.target, "/v1/embed", {"images": pngs[:8]})
        assert [r["row"] for r in out["results"]] == list(range(8))
    finally:
        assert s.stop() == 0, s.log()

    s = start_server(_tiny_model_master, "--max-items", "3")
    try:
        assert s.health()["limits"]["max_texts"] == 3
        with pytest.raises(RequestFailed) as exc:
            client.post_json(s.target, "/v1/embeddings", {"model": "altclip", "input": ["a", "b", "c", "d"]})
        assert exc.value.status == 413 and "holds 4 inputs; this server takes at most 3" in exc.value.message
    finally:
        assert s.stop() == 0, s.log()


class CountingModel:
    """Decodes 1x1 grey images to their value; counts images decoded and embedded, and the most
    decoded at any time that the model had not yet embedded."""

    draft_min_side = None
    embed_dim = 2

    def __init__(self):
        self.lock = threading.Lock()
        self.decoded = self.embedded = self.most_ahead = 0

    def preprocessor(self, image):
        with self.lock:
            self.decoded += 1
            self.most_ahead = max(self.most_ahead, self.decoded - self.embedded)
        return np.full((3, 1, 1), float(image.convert("L").getpixel((0, 0))), np.float32)

    def encode_pixels(self, pixels):
        time.sleep(0.01)
        with self.lock:
            self.embedded += len(pixels)
        return torch.stack([pixels.mean(dim=(1, 2, 3)), torch.ones(len(pixels))], dim=1)


def test_images_are_decoded_a_bounded_number_ahead_of_the_model():
    from altclip_cli.errors import InputError
    from altclip_cli.serve.batcher import Batcher
    from altclip_cli.serve.jobs import Decoder, ImageInput, embed_images

    model = CountingModel()
    batcher = Batcher(model, text_batch=4, image_batch=4, window_s=0)
    decoder = Decoder(model, workers=4, max_pixels=None, input_timeout=30)
    batcher.start()
    try:
        items = [ImageInput(f"im{i}", data=pixel_png(i)) for i in range(200)]
        items[57] = ImageInput("junk", data=b"not an image")
        state = SimpleNamespace(decoder=decoder, batcher=batcher)
        out = asyncio.run(embed_images(state, items, False))
        assert model.embedded == 199 and len(out) == 200
        assert isinstance(out[57], InputError) and out[57].message.startswith("junk:")
        assert [round(float(out[i][0])) for i in range(200) if i != 57] == [i for i in range(200) if i != 57]
        assert model.most_ahead <= 2 * 4, model.most_ahead  # two batches ahead, not the whole request

        model.decoded = model.embedded = 0
        first_failure = asyncio.run(embed_images(state, items, False, stop_at_failure=True))
        assert len(first_failure) == 58 and isinstance(first_failure[-1], InputError)
        assert model.decoded < 100  # the rest was never decoded
    finally:
        batcher.stop()
        decoder.close()


# --- who may talk to a TCP server ----------------------------------------------------------------------


def _listening(s) -> str:
    deadline = time.monotonic() + 120
    while not (m := re.search(r"listening on (http://\S+),", s.log())):
        assert s.proc.poll() is None and time.monotonic() < deadline, s.log()
        time.sleep(0.05)
    url = m.group(1)
    s.target = url
    return url


def _get(port: int, headers: dict, path: str = "/v1/health"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_with_a_token_any_host_name_is_accepted_and_the_scheme_is_case_insensitive(_tiny_model_master):
    token_file = short_dir() / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    s = start_server(_tiny_model_master, "--host", "127.0.0.1", "--token-file", token_file, tcp=True, wait=False)
    try:
        port = int(_listening(s).rsplit(":", 1)[1])
        for _ in range(200):
            try:
                client.health(client.parse_target(s.target, token="s3cret-token"))
                break
            except ServerDown:
                time.sleep(0.05)
        for host in (f"myhost:{port}", "gpu-box.example.org:8790", f"127.0.0.1:{port}"):
            status, body = _get(port, {"Host": host, "Authorization": "Bearer s3cret-token"})
            assert status == 200 and body["status"] == "ok", (host, body)
        for scheme in ("bearer", "BEARER", "Bearer "):
            assert _get(port, {"Host": f"myhost:{port}", "Authorization": f"{scheme} s3cret-token"})[0] == 200
        status, body = _get(port, {"Host": f"myhost:{port}"})
        assert status == 401 and "token" in body["error"]["message"]
        assert _get(port, {"Host": f"myhost:{port}", "Authorization": "Basic s3cret-token"})[0] == 401
        assert _get(port, {"Host": f"myhost:{port}", "Authorization": "Bearer wrong"})[0] == 401
        assert WARNING not in s.log()
    finally:
        assert s.stop() == 0, s.log()


def test_without_a_token_the_host_check_stays_and_allow_host_adds_names(_tiny_model_master):
    s = start_server(_tiny_model_master, "--allow-host", "myhost", "--allow-host", "localhost:9000", tcp=True)
    try:
        port = int(s.target.rsplit(":", 1)[1])
        assert _get(port, {"Host": f"127.0.0.1:{port}"})[0] == 200
        assert _get(port, {"Host": f"myhost:{port}"})[0] == 200
        assert _get(port, {"Host": "localhost:9000"})[0] == 200  # the near end of a tunnel
        status, body = _get(port, {"Host": f"evil.example:{port}"})
        assert status == 403 and "DNS rebinding" in body["error"]["message"]
        assert _get(port, {"Host": "myhost:9000"})[0] == 403
        assert s.log().count(WARNING) == 1  # said once, at start
    finally:
        assert s.stop() == 0, s.log()


def test_a_tcp_server_without_a_token_says_once_that_every_local_user_can_reach_it(_tiny_model_master):
    s = start_server(_tiny_model_master, tcp=True)
    try:
        client.post_json(s.target, "/v1/embed", {"texts": ["a"]})
        log = s.log()
        assert log.count(WARNING) == 1 and log.index(WARNING) < log.index("listening on"), log
    finally:
        assert s.stop() == 0, s.log()
