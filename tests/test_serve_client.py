"""classify, embed and search through a running `altclip serve` (--server / ALTCLIP_SERVER): which
server a command uses and why (auto, off, a socket path, a URL), results equal to in-process,
no torch in the client, and a server that goes away mid-run. The commands run in real
processes; the server is `altclip serve` on the tiny model, on the default socket of a private
XDG_RUNTIME_DIR."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import assert_records_close, png_bytes, short_dir, start_server  # noqa: E402

from altclip_cli.serve import client, discovery  # noqa: E402
from altclip_cli.serve.client import ServerDown, ServerMismatch  # noqa: E402
from altclip_cli.serve.discovery import Wanted, connect, mismatch  # noqa: E402

# The command in its own process; at exit it names the heavy modules it imported.
CLIENT_MAIN = """
import atexit, sys
def _modules():
    heavy = [m for m in ("torch", "numpy", "PIL", "safetensors", "tokenizers", "huggingface_hub.file_download",
                         "rich", "fastapi", "pydantic") if m in sys.modules]
    sys.stderr.write(f"modules: {heavy}\\n")
atexit.register(_modules)
from altclip_cli.cli import main
main(sys.argv[1:])
"""


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.stdout = proc.stdout
        lines = proc.stderr.decode("utf-8", "replace").splitlines()
        self.modules = next((eval(line[len("modules: "):]) for line in lines if line.startswith("modules: ")), None)
        self.stderr = [line for line in lines if not line.startswith("modules: ")]

    def debug(self) -> list[str]:
        return [line for line in self.stderr if line.startswith("debug: server:")]


def client_env(xdg: Path, **extra) -> dict:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "NO_COLOR": "1", **extra}
    for name in ("ALTCLIP_DEBUG", "ALTCLIP_SERVER", "ALTCLIP_TOKEN", "ALTCLIP_DEVICE", "ALTCLIP_PRECISION"):
        if name not in extra:
            env.pop(name, None)
    return env


def altclip(xdg: Path, *args, stdin: bytes | None = None, env: dict | None = None, cwd=None) -> Run:
    proc = subprocess.run([sys.executable, "-c", CLIENT_MAIN, *map(str, args)], input=stdin, capture_output=True,
                          env=client_env(xdg, **(env or {})), cwd=cwd, timeout=300)
    return Run(proc)


def assert_embed_lines_close(got_stdout: bytes, want_stdout: bytes) -> None:
    """`altclip embed`'s jsonl lines: the same errors, and embeddings within 1e-6."""
    got = [json.loads(x) for x in got_stdout.splitlines()]
    want = [json.loads(x) for x in want_stdout.splitlines()]
    assert [g.get("error") for g in got] == [w.get("error") for w in want]
    for g, w in zip(got, want):
        if "embedding" in w:
            np.testing.assert_allclose(g["embedding"], w["embedding"], rtol=0, atol=1e-6)


def counters(target) -> tuple[int, int]:
    """(requests, inputs through the model) of a server; the requests count this health request."""
    info = client.health(target)
    return info["requests"], info["batching"]["items"]


# --- the shared server: on the default socket of a private XDG_RUNTIME_DIR ----------------------------


@pytest.fixture(scope="module")
def xdg():
    folder = short_dir()
    folder.chmod(0o700)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(_tiny_model_master, xdg):
    s = start_server(_tiny_model_master, socket_path=xdg / "altclip" / "altclip.sock")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client-images")
    for i in range(5):
        (folder / f"img{i}.png").write_bytes(png_bytes(10 + i, size=(40 + 9 * i, 30 + 4 * i)))
    (folder / "bad.png").write_bytes(b"not an image")
    return folder


M = ("--precision", "fp32")  # the shared server's precision; its device is cpu


def model_args(model) -> tuple:
    return ("-m", model, *M)


# --- which server ---------------------------------------------------------------------------------------


def test_auto_without_a_server_runs_in_process(_tiny_model_master, tmp_path):
    empty = short_dir()
    try:
        run = altclip(empty, "--debug", "embed", "--text", "-", *model_args(_tiny_model_master), stdin=b"a cat\n")
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    assert run.code == 0, run.stderr
    assert run.debug() == [f"debug: server: none at unix:{empty}/altclip/altclip.sock: running in-process"]
    assert "torch" in run.modules
    assert json.loads(run.stdout)["text"] == "a cat"


def test_auto_with_a_matching_server_uses_it_and_imports_no_torch(server, xdg, _tiny_model_master):
    before = counters(server.target)
    texts = "a cat\n\n猫\n".encode()
    run = altclip(xdg, "--debug", "embed", "--text", "-", *model_args(_tiny_model_master), stdin=texts)
    assert run.code == 0, run.stderr
    after = counters(server.target)
    assert after[0] == before[0] + 3 and after[1] == before[1] + 3  # ours, its health, its embed; three texts
    assert run.modules == ["numpy"], run.modules  # no torch: the vectors come from the server
    [line] = run.debug()
    assert line.startswith(f"debug: server: using unix:{xdg}/altclip/altclip.sock (altclip ")
    assert f"{_tiny_model_master}, cpu, fp32)" in line

    local = altclip(xdg, "embed", "--text", "-", *model_args(_tiny_model_master), "--server", "off",
                    stdin=texts)
    assert local.code == 0 and "torch" in local.modules
    assert run.stdout == local.stdout  # the same bytes: the same vectors, printed the same way
    assert [json.loads(x)["text"] for x in run.stdout.splitlines()] == ["a cat", "", "猫"]


def test_classify_through_the_server_equals_in_process_without_torch(server, xdg, pictures, _tiny_model_master):
    args = ("classify", "img0.png", "img1.png", "bad.png", "missing.png", "img2.png", "-l", "猫", "-l", "dog",
            "-l", "a beach", "-t", "a photo of {}.", "-t", "{}", "-f", "json", *model_args(_tiny_model_master))
    before = counters(server.target)
    run = altclip(xdg, *args, cwd=pictures)
    local = altclip(xdg, *args, "--server", "off", cwd=pictures)
    assert counters(server.target)[1] > before[1]
    assert run.modules == ["numpy"], run.modules  # no torch, no PIL: scored here from the server's vectors
    assert run.code == local.code == 3  # some inputs failed
    assert run.stderr == local.stderr  # the same error lines for bad.png and missing.png
    got, want = json.loads(run.stdout), json.loads(local.stdout)
    assert [r["image"] for r in got] == ["img0.png", "img1.png", "bad.png", "missing.png", "img2.png"]
    assert [r.get("error") for r in got] == [r.get("error") for r in want]
    assert_records_close([r for r in got if "scores" in r], [r for r in want if "scores" in r])

    top = altclip(xdg, "classify", "img3.png", "-l", "cat", "-l", "dog", "-k", "1", "-f", "jsonl",
                  *model_args(_tiny_model_master), cwd=pictures)
    assert top.code == 0 and len(json.loads(top.stdout)["scores"]) == 1


def test_embed_images_to_a_file_through_the_server_equals_in_process(server, xdg, pictures, _tiny_model_master,
                                                                       tmp_path):
    names = ["img0.png", "bad.png", "img1.png", "img2.png", "img3.png", "img4.png"]
    args = ("embed", "--image", *names, "-b", "2", *model_args(_tiny_model_master))
    before = counters(server.target)
    run = altclip(xdg, *args, "-o", tmp_path / "s.npy", cwd=pictures)
    assert counters(server.target)[1] == before[1] + 5
    local = altclip(xdg, *args, "-o", tmp_path / "l.npy", "--server", "off", cwd=pictures)
    assert run.code == local.code == 3, run.stderr
    assert run.modules == ["numpy"], run.modules
    got, want = np.load(tmp_path / "s.npy"), np.load(tmp_path / "l.npy")
    assert got.shape == want.shape == (5, got.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (tmp_path / "s.jsonl").read_text() == (tmp_path / "l.jsonl").read_text()
    settings = [json.loads((tmp_path / f"{n}.manifest.json").read_text())["settings"] for n in "sl"]
    assert settings[0] == settings[1]

    # --resume reads the same settings: a finished run through the server is finished in-process too
    again = altclip(xdg, *args, "-o", tmp_path / "s.npy", "--resume", "--server", "off", cwd=pictures)
    assert again.code == 3 and any("is already complete" in line for line in again.stderr), again.stderr


def test_an_interrupted_run_resumes_through_the_server(server, xdg, pictures, _tiny_model_master, tmp_path):
    """Half a run in-process (stopped by SIGINT-like KeyboardInterrupt at a checkpoint), the rest
    through the server: the rows are those of one uninterrupted run."""
    names = [f"img{i}.png" for i in range(5)] * 2
    args = ("embed", "--image", *names, "-b", "2", "--checkpoint-every", "2", *model_args(_tiny_model_master))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from embedhooks import interrupted_after\n"
            "from altclip_cli.cli import cli\n"
            "with interrupted_after(4):\n"
            "    sys.exit(cli.main(sys.argv[2:], prog_name='altclip', standalone_mode=False))")
    first = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), *args, "-o", tmp_path / "r.npy",
                            "--server", "off"], cwd=pictures, capture_output=True, env=client_env(xdg), timeout=300)
    assert first.returncode == 130, first.stderr.decode()
    assert not (tmp_path / "r.npy").exists()
    rest = altclip(xdg, *args, "-o", tmp_path / "r.npy", "--resume", cwd=pictures, env={"ALTCLIP_DEBUG": "1"})
    assert rest.code == 0, rest.stderr
    assert rest.modules == ["numpy"] and rest.debug()[0].startswith("debug: server: using")
    assert any(line.startswith("resuming after 4 of 10 inputs") for line in rest.stderr), rest.stderr
    whole = altclip(xdg, *args, "-o", tmp_path / "w.npy", "--server", "off", cwd=pictures)
    assert whole.code == 0
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), np.load(tmp_path / "w.npy"), rtol=0, atol=1e-6)
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "w.jsonl").read_text()


def test_search_through_the_server_indexes_and_ranks_there(server, xdg, pictures, _tiny_model_master, tmp_path):
    """Over the Unix socket the server indexes the new images with its warm model and ranks: the
    client imports neither torch nor numpy, prints what an in-process run prints on stderr, and
    finds the same images with the same scores."""
    folder = tmp_path / "pics"
    shutil.copytree(pictures, folder)
    common = ("--dir", folder, "-f", "jsonl", *model_args(_tiny_model_master))
    before = counters(server.target)
    first = altclip(xdg, "search", "a cat", *common, "--index", tmp_path / "by-server")
    assert first.code == 0, first.stderr
    assert counters(server.target)[1] >= before[1] + 6  # 5 images and the query through its model
    assert first.modules == [], first.modules
    here = altclip(xdg, "search", "a cat", *common, "--index", tmp_path / "here", "--server", "off")
    assert here.code == 0 and "torch" in here.modules

    def without_seconds(lines):
        return [re.sub(r", [0-9.]+ s\)$", ")", line) for line in lines]

    assert without_seconds(first.stderr) == without_seconds(here.stderr)
    assert any(line.startswith(f"error: {folder / 'bad.png'}: ") for line in first.stderr), first.stderr
    assert f"indexed {folder}: 5 added, 1 failed (6 files)" in without_seconds(first.stderr)
    got, want = [json.loads(x) for x in first.stdout.splitlines()], [json.loads(x) for x in here.stdout.splitlines()]
    assert [g["path"] for g in got] == [w["path"] for w in want] and len(got) == 5
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=2e-4)

    # The index the server wrote is the one an in-process run reads: nothing to do, same ranking.
    again = altclip(xdg, "search", "a cat", "-s", "dog", *common, "--index", tmp_path / "by-server")
    local = altclip(xdg, "search", "a cat", "-s", "dog", *common, "--index", tmp_path / "by-server",
                    "--server", "off")
    assert again.code == local.code == 0 and again.stderr == local.stderr == [], (again.stderr, local.stderr)
    got, want = [json.loads(x) for x in again.stdout.splitlines()], [json.loads(x) for x in local.stdout.splitlines()]
    assert [g["path"] for g in got] == [w["path"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=2e-4)

    picture = altclip(xdg, "search", str(folder / "img1.png"), *common, "--index", tmp_path / "by-server")
    assert picture.code == 0 and picture.modules == [], picture.stderr  # the server reads the query image
    assert json.loads(picture.stdout.splitlines()[0])["path"] == str(folder / "img1.png")
    missing = altclip(xdg, "search", "./nope.jpg", *common, "--index", tmp_path / "by-server", cwd=folder)
    assert missing.code == 1 and missing.stderr[0].startswith("error: query image ") and "nope.jpg" in missing.stderr[0]
    cancel = altclip(xdg, "search", "cat", "-s", "cat", *common, "--index", tmp_path / "by-server", "--no-index")
    assert cancel.code == 2 and "cancel out" in cancel.stderr[0], cancel.stderr


def test_a_search_that_indexes_on_the_server_reports_its_progress(_tiny_model_master, tmp_path):
    """While the server embeds new images, /v1/health shows the update's progress, and the
    client's progress callback (the command's bar on a terminal) follows it to the end."""
    from altclip_cli.search.query import parse_query

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(200 + i, size=(30 + i, 24)))
    s = start_server(_tiny_model_master, "--batch-size", "2", delay=0.15)  # 6 slow passes
    try:
        remote = connect(s.target, Wanted(model=str(_tiny_model_master), precision="fp32"))
        assert remote.searches
        seen = []
        answer = remote.search(parse_query("a cat"), str(folder), index=str(tmp_path / "index"), top=3,
                               min_score=None, update=True, progress=lambda done, total: seen.append((done, total)))
        assert answer["update"]["added"] == 12 and len(answer["results"]) == 3
        assert seen and {total for _done, total in seen} == {12}
        assert [done for done, _total in seen] == sorted(done for done, _total in seen)
        assert s.health()["indexing"] == []  # gone once the request is answered
    finally:
        assert s.stop() == 0, s.log()


def test_search_through_a_server_uses_this_commands_own_index(server, xdg, pictures, _tiny_model_master,
                                                              tmp_path):
    """--index auto names the index under the command's ALTCLIP_HOME, not the server's: a run
    in-process afterwards finds it up to date."""
    from altclip_cli.serve.client import health

    folder = tmp_path / "pics"
    shutil.copytree(pictures, folder)
    home = tmp_path / "home"
    env = {"ALTCLIP_HOME": str(home)}
    common = ("--dir", folder, "-f", "jsonl", *model_args(_tiny_model_master))
    run = altclip(xdg, "search", "a cat", *common, env=env)
    assert run.code == 0 and "torch" not in run.modules, run.stderr
    assert (home / "indexes" / health(server.target)["weights"] / "index.sqlite3").is_file()
    local = altclip(xdg, "search", "a cat", *common, "--server", "off", env=env)
    assert local.code == 0 and local.stderr == [], local.stderr  # nothing left to index
    assert [json.loads(x)["path"] for x in local.stdout.splitlines()] == \
        [json.loads(x)["path"] for x in run.stdout.splitlines()]


def test_index_through_the_server_equals_in_process(server, xdg, pictures, _tiny_model_master, tmp_path):
    """`altclip index` with a server running: the server indexes (the client imports no torch),
    with the messages, summary and exit code of an in-process run, into the same index."""
    folder = tmp_path / "pics"
    shutil.copytree(pictures, folder)
    before = counters(server.target)
    run = altclip(xdg, "index", "pics", "--index", "by-server", *model_args(_tiny_model_master), cwd=tmp_path)
    here = altclip(xdg, "index", "pics", "--index", "here", *model_args(_tiny_model_master), "--server", "off",
                   cwd=tmp_path)
    assert run.code == here.code == 3  # bad.png
    assert counters(server.target)[1] == before[1] + 5
    assert "torch" not in run.modules and "torch" in here.modules

    def without_seconds(lines):
        return [re.sub(r", [0-9.]+ s\)$", ")", line) for line in lines]

    assert without_seconds(run.stderr) == without_seconds(here.stderr)
    assert "error: pics/bad.png: not an image" in run.stderr[0] and run.stderr[-1].startswith("indexed pics: 5 added")
    again = altclip(xdg, "index", "pics", "--index", "by-server", *model_args(_tiny_model_master), "--server", "off",
                    cwd=tmp_path)
    assert again.code == 0 and again.stderr[0].startswith("indexed pics: no changes (6 files"), again.stderr
    rebuilt = altclip(xdg, "index", "pics", "--index", "by-server", "--rebuild", *model_args(_tiny_model_master),
                      cwd=tmp_path)
    assert rebuilt.code == 3 and rebuilt.stderr[-1].startswith("indexed pics: 5 added, 1 failed"), rebuilt.stderr


def test_info_names_the_server_on_the_default_socket(server, xdg, tmp_path):
    running = altclip(xdg, "info")
    line = next(x for x in running.stdout.decode().splitlines() if x.startswith("server: "))
    pid = client.health(server.target)["pid"]
    assert line.startswith(f"server: unix:{xdg / 'altclip' / 'altclip.sock'}: ") and f"pid {pid}, up " in line
    assert json.loads(altclip(xdg, "info", "--json").stdout)["server"]["pid"] == pid
    empty = tmp_path / "run"
    empty.mkdir(mode=0o700)
    none = altclip(empty, "info")
    assert f"server: none on unix:{empty / 'altclip' / 'altclip.sock'} (`altclip serve` starts one)" in \
        none.stdout.decode().splitlines()


def test_search_over_tcp_encodes_the_query_there_and_indexes_here(_tiny_model_master, pictures, tmp_path):
    """A TCP server may not see this machine's folders: it encodes the query, the rest runs here."""
    s = start_server(_tiny_model_master, tcp=True)
    try:
        folder = tmp_path / "pics"
        shutil.copytree(pictures, folder)
        run = altclip(tmp_path, "search", "a cat", "--dir", folder, "--index", tmp_path / "index", "-f", "jsonl",
                      *model_args(_tiny_model_master), "--server", s.target)
        assert run.code == 0, run.stderr
        assert any(line.startswith("new or changed images to index: loading the model in this process")
                   for line in run.stderr), run.stderr
        assert len(run.stdout.splitlines()) == 5
    finally:
        assert s.stop() == 0, s.log()


def test_classify_and_embed_with_an_index_through_the_server(server, xdg, pictures, _tiny_model_master, tmp_path):
    """--index: the index's vectors for unchanged images, the server's for the others (added to the
    index: embed then finds img2 there too), scored here."""
    folder = tmp_path / "pics"
    shutil.copytree(pictures, folder)
    index = tmp_path / "index"
    built = altclip(xdg, "index", folder / "img0.png", folder / "img1.png", "--index", index,
                    *model_args(_tiny_model_master))
    assert built.code == 0, built.stderr
    names = [str(folder / n) for n in ("img0.png", "img2.png", "img1.png", "bad.png")]
    for args in (("classify", *names, "-l", "cat", "-l", "dog", "-t", "a {}", "-f", "json"),
                 ("embed", "--image", *names)):
        before = counters(server.target)
        run = altclip(xdg, *args, "--index", index, *model_args(_tiny_model_master))
        assert counters(server.target)[1] == before[1] + (3 if args[0] == "classify" else 0)  # labels, img2
        local = altclip(xdg, *args, "--index", index, *model_args(_tiny_model_master), "--server", "off")
        assert run.code == local.code == 3 and run.stderr == local.stderr
        assert "torch" not in run.modules and "torch" in local.modules
        if args[0] == "classify":
            got, want = json.loads(run.stdout), json.loads(local.stdout)
            assert [g.get("error") for g in got] == [w.get("error") for w in want]
            assert_records_close([g for g in got if "scores" in g], [w for w in want if "scores" in w])
        else:
            assert_embed_lines_close(run.stdout, local.stdout)


@pytest.mark.parametrize("how", ["precision", "model", "exact-decode"])
def test_auto_with_a_server_that_differs_runs_in_process_and_says_why(server, xdg, tiny_model_dir, how,
                                                                      _tiny_model_master):
    args, why = {
        "precision": (("-m", _tiny_model_master, "--precision", "bf16"), "it computes at fp32, this command at bf16"),
        "model": (("-m", tiny_model_dir, *M), f"it runs {_tiny_model_master}, not {tiny_model_dir}"),
        "exact-decode": (("-m", _tiny_model_master, *M, "--exact-decode"),
                         "it decodes images without --exact-decode, this command with"),
    }[how]
    kind = ("--image", str(Path(__file__))) if how == "exact-decode" else ("--text", "-")
    before = counters(server.target)
    run = altclip(xdg, "--debug", "embed", *kind, *args, stdin=b"a cat\n")
    assert run.code == (3 if how == "exact-decode" else 0), run.stderr  # (this file is no image)
    assert run.debug() == [f"debug: server: unix:{xdg}/altclip/altclip.sock does not match ({why}): "
                           "running in-process"]
    assert "torch" in run.modules
    assert counters(server.target)[1] == before[1]  # nothing went through the server's model


def test_auto_precision_matches_only_a_server_that_chose_its_own(server, xdg, _tiny_model_master):
    run = altclip(xdg, "--debug", "embed", "--text", "-", "-m", _tiny_model_master, stdin=b"a\n")
    assert run.code == 0
    assert run.debug() == [f"debug: server: unix:{xdg}/altclip/altclip.sock does not match (it was started with "
                           "--precision fp32, this command asks for auto): running in-process"]


def test_altclip_server_off_forces_in_process(server, xdg, _tiny_model_master):
    before = counters(server.target)
    run = altclip(xdg, "embed", "--text", "-", *model_args(_tiny_model_master), stdin=b"a cat\n",
                  env={"ALTCLIP_SERVER": "off", "ALTCLIP_DEBUG": "1"})
    assert run.code == 0
    assert run.debug() == ["debug: server: off (--server off or ALTCLIP_SERVER=off): running in-process"]
    assert "torch" in run.modules
    assert counters(server.target) == (before[0] + 1, before[1])  # only our own health request: not even asked


def test_an_explicit_socket_or_url_that_is_down_is_an_error(xdg, _tiny_model_master, tmp_path):
    sock = tmp_path / "none.sock"
    run = altclip(xdg, "embed", "--text", "-", *model_args(_tiny_model_master), "--server", sock, stdin=b"a\n")
    assert run.code == 1 and run.stdout == b""
    assert run.stderr == [
        f"error: --server {sock}: no server answers at unix:{sock} (No such file or directory)",
        "hint: start it with `altclip serve` (--socket PATH, or --port for TCP), or use --server auto, which runs "
        "in-process when no server answers"]
    assert "torch" not in run.modules  # it never loaded the model

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = altclip(xdg, "classify", Path(__file__), "-l", "a", *model_args(_tiny_model_master),
                  env={"ALTCLIP_SERVER": f"http://127.0.0.1:{port}"})
    assert run.code == 1
    assert run.stderr[0] == f"error: --server http://127.0.0.1:{port}: no server answers at http://127.0.0.1:{port} " \
                            "(Connection refused)"
    assert run.stderr[1].startswith("hint: start it with `altclip serve`")

    bad = altclip(xdg, "embed", "--text", "-", "--server", "ftp://host/x", stdin=b"a\n")
    assert bad.code == 2 and "is not a server address" in bad.stderr[0]


def test_an_explicit_server_for_another_model_or_precision_is_an_error(server, xdg, tiny_model_dir,
                                                                       _tiny_model_master):
    before = counters(server.target)
    run = altclip(xdg, "embed", "--text", "-", "-m", tiny_model_dir, *M, "--server", server.target, stdin=b"a\n")
    assert run.code == 1 and run.stdout == b""
    assert run.stderr == [
        f"error: the server at unix:{server.target} does not compute what this command asks for: it runs "
        f"{_tiny_model_master}, not {tiny_model_dir}",
        "hint: start `altclip serve` with the same -m, --revision, --device, --precision, --exact-decode and "
        "--max-pixels, or use --server off to run in-process"]
    run = altclip(xdg, "embed", "--text", "-", "-m", _tiny_model_master, "--precision", "fp16",
                  "--server", server.target, stdin=b"a\n")
    assert run.code == 1 and "it computes at fp32, this command at fp16" in run.stderr[0]
    assert counters(server.target)[1] == before[1]


@pytest.mark.parametrize("how", ["explicit", "auto"])
def test_a_server_killed_mid_run_fails_the_command_naming_it(_tiny_model_master, pictures, tmp_path, how):
    """No fallback mid-run, with auto either: the command stops with exit 1 and an error naming
    the server; embed -o keeps its checkpoint for --resume."""
    home = short_dir()
    home.chmod(0o700)
    s = start_server(_tiny_model_master, socket_path=home / "altclip" / "altclip.sock", delay=1.0)
    try:
        names = [f"img{i % 5}.png" for i in range(12)]
        server_args = ("--server", s.target) if how == "explicit" else ()
        proc = subprocess.Popen([sys.executable, "-c", CLIENT_MAIN, "embed", "--image", *names, "-b", "2",
                                 "--checkpoint-every", "2", "-o", str(tmp_path / "k.npy"),
                                 *map(str, model_args(_tiny_model_master)), *server_args],
                                cwd=pictures, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(home))
        deadline = time.monotonic() + 60
        while s.health()["batching"]["batches"] < 2:  # two requests answered, more under way
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        out, err = proc.communicate(timeout=60)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        shutil.rmtree(home, ignore_errors=True)
    run = Run(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert run.code == 1, run.stderr
    errors = [line for line in run.stderr if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: the server at unix:{s.target} "), run.stderr
    assert "hint: see the server's log; run the command again (--server off runs it in-process)" in run.stderr
    assert any(line.startswith("the first ") and "--resume continues from there" in line for line in run.stderr)
    assert not (tmp_path / "k.npy").exists() and run.modules == ["numpy"]


def test_tcp_with_a_token(_tiny_model_master, pictures, tmp_path):
    """Over TCP the images travel as bytes; the token comes from ALTCLIP_TOKEN or --token-file."""
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    s = start_server(_tiny_model_master, "--token-file", token, tcp=True, wait=False)
    xdg = short_dir()
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"listening on (http://\S+),", s.log()):
            assert s.proc.poll() is None and time.monotonic() < deadline, s.log()
            time.sleep(0.05)
        s.target = re.search(r"listening on (http://\S+),", s.log()).group(1)
        args = ("embed", "--image", "img0.png", "img1.png", "bad.png", *model_args(_tiny_model_master),
                "--server", s.target)
        refused = altclip(xdg, *args, cwd=pictures)
        assert refused.code == 1 and refused.stderr[0].startswith(f"error: --server {s.target}: missing or wrong token")
        assert refused.stderr[1] == "hint: set ALTCLIP_TOKEN or --token-file to the server's token"
        run = altclip(xdg, *args, cwd=pictures, env={"ALTCLIP_TOKEN": "s3cret-token"})
        with_file = altclip(xdg, *args, "--token-file", token, cwd=pictures)
        local = altclip(xdg, *args[:-2], "--server", "off", cwd=pictures)
        assert run.code == with_file.code == local.code == 3, run.stderr
        assert run.modules == ["numpy"] and run.stdout == with_file.stdout
        assert_embed_lines_close(run.stdout, local.stdout)
        assert "POST /v1/embed 200" in s.log()
    finally:
        assert s.stop() == 0
        shutil.rmtree(xdg, ignore_errors=True)


# --- the rules, without processes -------------------------------------------------------------------


@pytest.fixture
def info(_tiny_model_master):
    return {"status": "ok", "protocol": client.PROTOCOL, "altclip": "0", "model": str(_tiny_model_master),
            "model_folder": str(_tiny_model_master), "device": "cpu", "device_requested": "cpu",
            "precision": "fp32", "precision_requested": "fp32", "exact_decode": False, "logit_scale": 100.0,
            "embed_dim": 32, "weights": "w", "limits": {"max_pixels": discovery.DEFAULT_MAX_PIXELS}}


def test_what_the_same_model_means(info, _tiny_model_master, tiny_model_dir, monkeypatch, tmp_path):
    ours = Wanted(model=str(_tiny_model_master), precision="fp32")
    assert mismatch(info, ours) is None
    monkeypatch.chdir(_tiny_model_master.parent)  # a relative name is the same folder
    assert mismatch(info, Wanted(model=_tiny_model_master.name, precision="fp32")) is None
    link = tmp_path / "link"
    link.symlink_to(_tiny_model_master)
    assert mismatch(info, Wanted(model=str(link), precision="fp32")) is None
    assert "not " + str(tiny_model_dir) in mismatch(info, Wanted(model=str(tiny_model_dir), precision="fp32"))
    unknown = mismatch(info, Wanted(model="nobody/none", precision="fp32"))
    assert "neither a local folder nor in this machine's Hugging Face cache" in unknown

    # devices: auto takes any; a named one must be the server's (cuda is cuda:0)
    assert mismatch(info, Wanted(model=str(_tiny_model_master), device="cpu", precision="fp32")) is None
    assert mismatch(info, Wanted(model=str(_tiny_model_master), device="cuda", precision="fp32")) == \
        "it runs on cpu, not cuda"
    assert mismatch({**info, "device": "cuda:0"}, Wanted(model=str(_tiny_model_master), device="cuda",
                                                          precision="fp32")) is None
    # precision: auto only with a server that chose too; a named one against what the server computes
    assert "--precision fp32, this command asks for auto" in mismatch(info, Wanted(model=str(_tiny_model_master)))
    chose = {**info, "precision_requested": "auto"}
    assert mismatch(chose, Wanted(model=str(_tiny_model_master))) is None
    assert mismatch(chose, Wanted(model=str(_tiny_model_master), precision="fp32")) is None
    assert mismatch({**info, "precision_requested": None}, Wanted(model=str(_tiny_model_master))) is not None
    # decoding matters for images only; an older server that does not say is not the same
    decode = Wanted(model=str(_tiny_model_master), precision="fp32", exact_decode=True)
    assert "without --exact-decode" in mismatch(info, decode)
    assert mismatch(info, Wanted(model=str(_tiny_model_master), precision="fp32", exact_decode=True,
                                 images=False)) is None
    assert mismatch({k: v for k, v in info.items() if k != "exact_decode"},
                    Wanted(model=str(_tiny_model_master), precision="fp32")) is not None
    for given, cap, same in ((None, discovery.DEFAULT_MAX_PIXELS, True), (0, None, True), (500, 500, True),
                             (500, discovery.DEFAULT_MAX_PIXELS, False), (None, None, False)):
        got = mismatch({**info, "limits": {"max_pixels": cap}},
                       Wanted(model=str(_tiny_model_master), precision="fp32", max_pixels=given))
        assert (got is None) == same, (given, cap, got)
    assert "protocol" in mismatch({**info, "protocol": client.PROTOCOL + 1}, ours)
    assert "logit scale" in mismatch({**info, "logit_scale": None}, Wanted(model=str(_tiny_model_master),
                                                                           precision="fp32", scores=True))


def test_a_hub_id_is_the_snapshot_its_revision_names_in_the_cache(info, _tiny_model_master, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    storage = tmp_path / "hub" / "models--someone--tiny"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        shutil.copytree(_tiny_model_master, storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commits[1])
    (storage / "refs" / "old").write_text(commits[0])
    served = {**info, "model": "someone/tiny", "model_folder": str(storage / "snapshots" / commits[1])}
    assert mismatch(served, Wanted(model="someone/tiny", precision="fp32")) is None
    assert mismatch(served, Wanted(model="someone/tiny", revision=commits[1], precision="fp32")) is None
    assert "not someone/tiny" in mismatch(served, Wanted(model="someone/tiny", revision="old", precision="fp32"))
    monkeypatch.chdir(tmp_path)  # a local folder of the same name is another model
    (tmp_path / "someone" / "tiny").mkdir(parents=True)
    assert mismatch(served, Wanted(model="someone/tiny", precision="fp32")) is not None


def test_auto_ignores_a_socket_that_is_not_private(monkeypatch, tmp_path):
    xdg = short_dir()
    try:
        folder = xdg / "altclip"
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(folder / "altclip.sock"))
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        lines, warnings = [], []
        assert connect("auto", Wanted(model="x"), debug=lines.append, warn=warnings.append) is None
        assert warnings == [f"not using the server socket {folder}/altclip.sock: {folder} has mode 0755: other "
                            "users could reach the socket; its folder must be private (0700)"]
        assert lines == [f"server: unix:{folder}/altclip.sock is not private: running in-process"]
        listener.close()
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


def test_auto_runs_in_process_when_the_default_socket_is_stale(monkeypatch):
    xdg = short_dir()
    try:
        folder = xdg / "altclip"
        folder.mkdir(mode=0o700)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(folder / "altclip.sock"))
        listener.close()  # the file stays, nothing listens: a server that died
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        lines = []
        assert connect("auto", Wanted(model="x"), debug=lines.append) is None
        assert lines[0].startswith(f"server: unix:{folder}/altclip.sock does not answer (no server answers at")
        with pytest.raises(ServerDown):
            connect(str(folder / "altclip.sock"), Wanted(model="x"))
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


@contextlib.contextmanager
def fake_server(answer):
    """A loopback HTTP server that answers every request with answer(method, body) -> (status,
    JSON payload, extra headers); yields its URL."""
    import http.server

    class Fake(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            status, payload, headers = answer(self.command, self.rfile.read(length) if length else b"")
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()


def test_an_explicit_server_that_is_not_altclip_is_a_mismatch(tmp_path):
    with fake_server(lambda method, body: (200, {"hello": "world"}, {})) as url:
        with pytest.raises(ServerMismatch, match="answers, but not as an altclip server"):
            connect(url, Wanted(model="x"))


def test_the_pixel_cap_copy_equals_the_library_default():
    from altclip_cli.inputs.images import DEFAULT_MAX_PIXELS

    assert discovery.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS


def test_a_stopping_server_is_not_waited_for(info):
    """Only a full queue is worth waiting out: a 503 from a server that is stopping fails the
    request at once, naming the server and its reason."""
    from altclip_cli.serve.client import ServerBusy
    from altclip_cli.serve.remote import RemoteModel

    seen = []

    def answer(method, body):
        seen.append(body)
        return 503, {"error": {"message": "the server is stopping", "code": "stopping"}}, {"Retry-After": "5"}

    with fake_server(answer) as url:
        model = RemoteModel(client.parse_target(url), info, model_id="m")
        started = time.monotonic()
        with pytest.raises(ServerBusy, match="the server at .*: the server is stopping"):
            model.encode_texts(["a"])
        assert len(seen) == 1 and time.monotonic() - started < 5


def test_a_full_queue_is_waited_out_and_a_restarted_server_is_noticed(info, monkeypatch):
    """503 + Retry-After: the request is sent again after the pause; an answer from another model
    (the server was restarted with it) fails the command instead of mixing vectors."""
    import base64

    from altclip_cli.serve.remote import RemoteModel

    answers = [(503, {"error": {"message": "the server is busy: 64 requests are waiting", "code": "queue_full"}}),
               (200, {"model": info["model"], "results": [
                   {"row": 0, "text": "a", "embedding": base64.b64encode(b"\0" * 128).decode()}]}),
               (200, {"model": "another", "results": []})]
    seen = []

    def answer(method, body):
        seen.append(json.loads(body))
        status, payload = answers.pop(0)
        return status, payload, {"Retry-After": "0.2"} if status == 503 else {}

    with fake_server(answer) as url:
        model = RemoteModel(client.parse_target(url), info, model_id="m")
        started = time.monotonic()
        assert model.encode_texts(["a"]).tolist() == [[0.0] * 32]
        assert time.monotonic() - started >= 0.2 and len(seen) == 2 and seen[0] == seen[1]
        with pytest.raises(ServerMismatch, match="now runs another, not .* restarted with another model"):
            model.encode_texts(["a"])
