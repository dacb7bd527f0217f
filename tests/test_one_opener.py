"""Every reader of a local image file goes through one opener (inputs/files.py), so a FIFO, a
device, a folder or a file too large to send fails the same way, named and at once, on every
path: in-process, through a TCP server (the client reads the bytes), through the Unix socket
(the server reads the path), and in the gallery of `search -f html`. The commands run in real
processes with a time limit, so a hang fails the test instead of blocking it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bounded import in_thread  # noqa: E402
from test_search_html import Page  # noqa: E402
from test_serve import png_bytes, start_server  # noqa: E402
from test_serve_client import CLIENT_MAIN, Run, client_env  # noqa: E402

from altclip_cli.errors import InputError  # noqa: E402
from altclip_cli.serve import client  # noqa: E402
from altclip_cli.serve.client import RequestFailed  # noqa: E402

LIMIT_S = 100  # below the default --input-timeout (120 s): an input waited on until then fails the test
HUGE = 64 << 30  # a sparse file: no disk used, far more than memory


def altclip(*args, cwd, xdg: Path) -> Run:
    proc = subprocess.run([sys.executable, "-c", CLIENT_MAIN, *map(str, args)], capture_output=True, cwd=cwd,
                          env=client_env(xdg, ALTCLIP_DEVICE="cpu", ALTCLIP_PRECISION="fp32"), timeout=LIMIT_S,
                          stdin=subprocess.DEVNULL)
    return Run(proc)


@pytest.fixture
def inputs(tmp_path):
    """A folder with a.png, stuck.png (a FIFO nobody writes to), b.png; released afterwards."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    os.mkfifo(folder / "stuck.png")
    (folder / "b.png").write_bytes(png_bytes(2))
    yield folder
    try:  # a reader blocked in open() gets EOF
        os.close(os.open(folder / "stuck.png", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture(scope="module")
def tcp_server(_tiny_model_master):
    s = start_server(_tiny_model_master, tcp=True)
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def unix_server(_tiny_model_master):
    s = start_server(_tiny_model_master)
    yield s
    assert s.stop() == 0, s.log()


def records(run: Run) -> dict:
    return {r["image"]: r for r in map(json.loads, run.stdout.splitlines())}


def check_failed(run: Run, failed: dict[str, str], ok: list[str]) -> None:
    """Exit 3 (some inputs failed); each failed input named with its reason, in its record and on
    stderr; the others done."""
    assert run.code == 3, run.stderr
    got = records(run)
    for name, why in failed.items():
        assert got[name].get("error") == why, got[name]
        assert f"error: {name}: {why}" in run.stderr
    assert all("error" not in got[name] for name in ok), got


# --- through a TCP server: the client reads the files and sends their bytes -----------------------


@pytest.mark.parametrize("command", ["classify", "embed"])
def test_a_fifo_through_a_tcp_server_fails_at_once(command, tcp_server, inputs, _tiny_model_master, tmp_path):
    what = ("-l", "cat", "-l", "dog", "-f", "jsonl") if command == "classify" else ("--image",)
    run = altclip(command, *what, "a.png", "stuck.png", "b.png", "-m", _tiny_model_master,
                  "--server", tcp_server.target, cwd=inputs, xdg=tmp_path)
    check_failed(run, {"stuck.png": "not a regular file (a FIFO)"}, ["a.png", "b.png"])
    assert run.modules is not None and "torch" not in run.modules  # the server did the work


def test_a_file_too_large_to_send_is_refused_unread(tcp_server, inputs, _tiny_model_master, tmp_path):
    """64 GiB (sparse): over what one request to the server carries, refused from its size
    before a byte is read into memory."""
    with open(inputs / "huge.png", "wb") as f:
        f.truncate(HUGE)
    run = altclip("classify", "-l", "cat", "a.png", "huge.png", "-f", "jsonl", "-m", _tiny_model_master,
                  "--server", tcp_server.target, cwd=inputs, xdg=tmp_path)
    cap = int(64_000_000 * 0.9) // 4 * 3  # the server's --max-request-mb, in base64, per request
    check_failed(run, {"huge.png": f"the file is {HUGE:,} bytes, over the limit of {cap:,} bytes (what one "
                                   "request to the server carries: its --max-request-mb)"}, ["a.png"])


def test_a_device_through_a_tcp_server_is_refused(tcp_server, inputs, _tiny_model_master, tmp_path):
    run = altclip("classify", "-l", "cat", "a.png", "/dev/zero", "-f", "jsonl", "-m", _tiny_model_master,
                  "--server", tcp_server.target, cwd=inputs, xdg=tmp_path)
    check_failed(run, {"/dev/zero": "not a regular file (a character device)"}, ["a.png"])


# --- in-process ---------------------------------------------------------------------------------------


def test_a_fifo_and_a_device_in_process_fail_at_once(inputs, _tiny_model_master, tmp_path):
    """The default --input-timeout (120 s) is never waited for: neither is opened."""
    run = altclip("embed", "--image", "a.png", "stuck.png", "/dev/zero", "b.png", "-m", _tiny_model_master, "--server", "off", cwd=inputs, xdg=tmp_path)
    check_failed(run, {"stuck.png": "not a regular file (a FIFO)",
                       "/dev/zero": "not a regular file (a character device)"}, ["a.png", "b.png"])


# --- through the Unix socket: the server reads the paths ----------------------------------------------


@pytest.mark.parametrize("path, why", [("/dev/zero", "not a regular file (a character device)"),
                                       ("folder", "is a directory, not an image file"),
                                       ("stuck.png", "not a regular file (a FIFO)")])
def test_the_server_refuses_a_path_that_is_no_image_file_in_the_same_words(unix_server, inputs, path, why):
    if path == "folder":
        (inputs / "folder").mkdir()
    full = path if os.path.isabs(path) else str(inputs / path)
    with pytest.raises(RequestFailed) as exc:
        client.post_json(unix_server.target, "/v1/embed", {"images": [{"path": full}]}, timeout=60)
    assert exc.value.status == 422 and exc.value.message == f"{full}: {why}"
    both = {"images": [{"path": full}, {"path": str(inputs / "a.png")}], "on_error": "record"}
    answer = client.post_json(unix_server.target, "/v1/embed", both, timeout=60)
    assert answer["results"][0]["error"] == why and answer["results"][1].get("error") is None


# --- the gallery --------------------------------------------------------------------------------------


def test_search_html_with_a_fifo_among_the_results_writes_the_page(_tiny_model_master, tmp_path):
    """An indexed image replaced by a FIFO: its card says why it has no thumbnail, the page is
    written, the others have theirs."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(png_bytes(10 + i))
    index = tmp_path / "index"
    common = ("-m", _tiny_model_master, "--server", "off", "--index", index)
    built = altclip("index", photos, *common, cwd=tmp_path, xdg=tmp_path)
    assert built.code == 0, built.stderr
    (photos / "p1.png").unlink()
    os.mkfifo(photos / "p1.png")
    try:
        run = altclip("search", "a cat", "--dir", photos, "--no-index", "-o", tmp_path / "page.html", *common,
                      cwd=tmp_path, xdg=tmp_path)
    finally:
        try:
            os.close(os.open(photos / "p1.png", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert run.code == 0, run.stderr
    page = Page((tmp_path / "page.html").read_text(encoding="utf-8"))
    cards = {Path(c["attrs"]["data-path"]).name: c for c in page.cards}
    assert sorted(cards) == ["p0.png", "p1.png", "p2.png"]
    assert cards["p1.png"]["imgs"] == [] and "not a regular file (a FIFO)" in cards["p1.png"]["text"]
    assert all(cards[n]["imgs"] for n in ("p0.png", "p2.png"))


# --- a read that never returns (a hung network mount), on every path that reads here -------------------


@pytest.fixture
def hung(tmp_path, monkeypatch):
    """A path whose stat() blocks (as on a hung NFS mount) until the test ends; others stat as usual."""
    path = tmp_path / "nfs" / "hung.png"
    release = threading.Event()
    real_stat = os.stat

    def stat(p, *args, **kw):
        if os.fspath(p) == str(path):
            release.wait()
        return real_stat(p, *args, **kw)

    monkeypatch.setattr(os, "stat", stat)
    yield path
    release.set()


def within_limit(fn, limit: float = 30):
    return in_thread(fn, limit)[0]


def test_the_client_of_a_tcp_server_reads_a_file_within_the_input_timeout(hung):
    from altclip_cli.inputs.sources import Source
    from altclip_cli.serve.client import parse_target
    from altclip_cli.serve.remote import RemoteModel

    model = RemoteModel(parse_target("http://127.0.0.1:9"), {"limits": {"max_request_bytes": 1_000_000}},
                        model_id="m")
    model.input_timeout = 0.5  # as cli.options.connect_server sets it from --input-timeout
    out = within_limit(lambda: model._image_item(Source("nfs/hung.png", path=str(hung))))
    assert isinstance(out.get("error"), InputError), out
    assert out["error"].message == "nfs/hung.png: no data after 0.5 s (a hung network mount?)"


def test_the_gallery_makes_its_thumbnails_within_the_input_timeout(hung, tmp_path):
    from altclip_cli.search.html import Hit, render

    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(3))
    out = within_limit(lambda: render([Hit(1, str(hung), 0.9), Hit(2, str(good), 0.8)], "q", input_timeout=0.5))
    page = Page(out["value"])
    assert page.cards[0]["imgs"] == [] and "no data after 0.5 s (a hung network mount?)" in page.cards[0]["text"]
    assert len(page.cards[1]["imgs"]) == 1


def test_a_query_image_is_read_within_the_input_timeout(hung):
    from altclip_cli.search.query import QueryError, open_images, parse_query

    out = within_limit(lambda: open_images(parse_query(str(hung)), {}, 0.5))
    assert isinstance(out.get("error"), QueryError), out
    assert out["error"].message == f"query image {hung}: no data after 0.5 s (a hung network mount?)"


def test_the_index_hashes_files_within_the_input_timeout(hung, tmp_path, monkeypatch):
    """Content keys of same-size files (renames and copies are found by them): the run of files
    with one that gives no data keeps no keys (they go to the decoders, under the same limit);
    the other runs have theirs. One file per run here."""
    from types import SimpleNamespace

    from altclip_cli.search import update

    monkeypatch.setattr(update, "HASH_CHUNK", 1)

    files = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(bytes([i]) * 100)
        files.append(SimpleNamespace(path=str(path), size=100, content_key=None))
    files.insert(1, SimpleNamespace(path=str(hung), size=100, content_key=None))
    within_limit(lambda: update._hash_all(files, 0.5))
    assert files[1].content_key is None
    assert [f.content_key for f in files[::2] + files[3:]] == [update.content_key(f.path, 100)
                                                               for f in files[::2] + files[3:]]
