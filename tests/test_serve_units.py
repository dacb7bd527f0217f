"""The server's parts without a server: the batcher on a stand-in model, the Host policy, the
client's addresses and errors, and the client's imports (nothing heavy)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from altclip_cli.serve import client
from altclip_cli.serve.batcher import Batcher, QueueFull, Stopped
from altclip_cli.serve.transport import HostPolicy, is_loopback, split_host


class FakeModel:
    """Embeds token ids as their sum and count, pixels as their mean; records each pass's size."""

    embed_dim = 2

    def __init__(self):
        self.passes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    class tokenizer:  # noqa: N801 - the attribute the batcher reads
        @staticmethod
        def pad(seqs):
            width = max(len(s) for s in seqs)
            ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.float32)
            return ids, (ids != 0)

    def encode_token_batch(self, ids, mask):
        self.gate.wait()
        self.passes.append(len(ids))
        return torch.stack([ids.sum(1), mask.sum(1).float()], dim=1)

    def encode_pixels(self, pixels):
        self.gate.wait()
        self.passes.append(len(pixels))
        flat = pixels.reshape(len(pixels), -1)
        return torch.stack([flat.mean(1), flat.max(1).values], dim=1)


def make(**kw):
    model = FakeModel()
    batcher = Batcher(model, text_batch=kw.pop("text_batch", 8), image_batch=kw.pop("image_batch", 4), **kw)
    batcher.start()
    return model, batcher


def test_jobs_that_arrive_together_share_a_pass_and_get_their_own_rows():
    model, batcher = make(window_s=0.2)
    try:
        futures = [batcher.submit_texts([[i + 1], [i + 1, 1]], normalize=False) for i in range(3)]
        results = [f.result(5) for f in futures]
        assert model.passes == [6]  # three jobs, one pass
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r, [[i + 1, 1], [i + 2, 2]])
        assert batcher.stats.multi_job_batches == 1 and batcher.stats.largest_batch_jobs == 3
        normalised = batcher.submit_texts([[3, 4]], normalize=True).result(5)
        np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-6)
    finally:
        batcher.stop()


def test_a_pass_holds_at_most_the_batch_size_and_kinds_do_not_mix():
    model, batcher = make(window_s=0.2, image_batch=4)
    try:
        model.gate.clear()  # the first pass blocks until everything is queued
        first = batcher.submit_images(np.ones((1, 3, 2, 2), np.float32))
        time.sleep(0.3)
        images = [batcher.submit_images(np.full((2, 3, 2, 2), i, np.float32)) for i in range(3)]
        text = batcher.submit_texts([[5]])
        model.gate.set()
        for f in [first, *images, text]:
            f.result(5)
        assert model.passes[0] == 1  # the first pass ran alone
        assert sorted(model.passes[1:]) == [1, 2, 4]  # 2+2 images, then 2, and the text alone
        np.testing.assert_allclose(images[2].result()[:, 0], 1.0 / np.sqrt(2), rtol=1e-6)
    finally:
        batcher.stop()


def test_a_full_queue_refuses_and_stop_fails_the_waiting_jobs():
    model, batcher = make(window_s=0, max_waiting=2)
    model.gate.clear()
    running = batcher.submit_texts([[1]])
    deadline = time.monotonic() + 5
    while batcher.waiting and time.monotonic() < deadline:  # taken by the model thread
        time.sleep(0.01)
    waiting = [batcher.submit_texts([[2]]), batcher.submit_texts([[3]])]
    with pytest.raises(QueueFull) as exc:
        batcher.submit_texts([[4]])
    assert exc.value.retry_after >= 1 and batcher.stats.refused == 1
    threading.Timer(0.2, model.gate.set).start()
    batcher.stop()
    assert running.result(5).shape == (1, 2)  # the pass that ran is finished
    for f in waiting:
        with pytest.raises(Stopped):
            f.result(5)
    with pytest.raises(Stopped):
        batcher.submit_texts([[5]])


def test_a_failing_pass_fails_its_jobs_and_the_thread_goes_on():
    model, batcher = make(window_s=0)
    try:
        boom = batcher.submit_call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            boom.result(5)
        assert batcher.submit_call(lambda: "fine").result(5) == "fine"
    finally:
        batcher.stop()


@pytest.mark.parametrize("header, local, allowed", [
    ("127.0.0.1:8790", "127.0.0.1", True),
    ("localhost:8790", "127.0.0.1", True),
    ("LOCALHOST.:8790", "127.0.0.1", True),
    ("[::1]:8790", "::1", True),
    ("localhost:8790", "::1", True),
    ("evil.example:8790", "127.0.0.1", False),  # a DNS-rebinding page's own name
    ("127.0.0.1:8791", "127.0.0.1", False),
    ("127.0.0.1", "127.0.0.1", False),  # port 80 implied
    ("192.168.1.5:8790", "192.168.1.5", True),  # a wildcard bind reached at this address
    ("localhost:8790", "192.168.1.5", False),
    ("", "127.0.0.1", False),
    (None, "127.0.0.1", False),
    ("[::1:8790", "::1", False),
])
def test_host_policy(header, local, allowed):
    bound = "0.0.0.0" if local == "192.168.1.5" else "127.0.0.1"
    assert HostPolicy(bound, 8790).allows(header, local) is allowed


def test_host_policy_accepts_the_name_it_was_bound_to():
    policy = HostPolicy("photos.lan", 8790)
    assert policy.allows("photos.lan:8790", "192.168.1.5")
    assert not policy.allows("other.lan:8790", "192.168.1.5")


def test_split_host_and_loopback():
    assert split_host("Example.COM:80") == ("example.com", 80)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("a:b") is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")


def test_targets():
    assert client.parse_target("/run/a.sock").socket_path == "/run/a.sock"
    assert client.parse_target("unix:/run/a.sock").socket_path == "/run/a.sock"
    t = client.parse_target("http://127.0.0.1:8790/prefix/", token="t")
    assert (t.host, t.port, t.prefix, t.token, str(t)) == ("127.0.0.1", 8790, "/prefix", "t", "http://127.0.0.1:8790/prefix")
    with pytest.raises(ValueError):
        client.parse_target("ftp://x")


def test_client_errors_say_down_or_not_altclip(tmp_path):
    with pytest.raises(client.ServerDown, match="no server answers at unix:"):
        client.health(tmp_path / "none.sock")
    # Something that answers HTTP, but is not altclip.
    path = str(tmp_path / "other.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def answer(body: bytes, status: str = "200 OK"):
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        conn.close()

    try:
        threading.Thread(target=answer, args=(b'{"hello": 1}',)).start()
        with pytest.raises(client.ServerMismatch, match="not as an altclip server"):
            client.health(path)
        threading.Thread(target=answer, args=(b"<html>", "404 Not Found")).start()
        with pytest.raises(client.ServerMismatch):
            client.health(path)

        def hang_up():
            conn, _ = srv.accept()
            conn.recv(65536)
            conn.close()

        threading.Thread(target=hang_up).start()
        with pytest.raises(client.ServerLost, match="closed the connection before it answered"):
            client.post_json(path, "/v1/embed", {"texts": ["a"]})

        def silent():
            conn, _ = srv.accept()
            time.sleep(1.5)
            conn.close()

        threading.Thread(target=silent).start()
        with pytest.raises(client.ServerTimeout, match="no answer within 0.5 s"):
            client.post_json(path, "/v1/embed", {"texts": ["a"]}, timeout=0.5)
    finally:
        srv.close()


def test_the_client_imports_nothing_heavy():
    code = ("import sys, altclip_cli.serve.client, altclip_cli.serve.transport; "
            "heavy = [m for m in ('torch', 'numpy', 'PIL', 'fastapi', 'starlette', 'uvicorn', 'pydantic') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
