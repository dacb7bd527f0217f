"""Model resolution, download, conversion and caching, against a fake hub on 127.0.0.1.

The served repos hold a stand-in model (not loadable by the model code; only its files
matter here): config.json, tokenizer.json, preprocessor_config.json and a pytorch_model.bin
of a few tensors, one of them shared, plus an int64 position_ids buffer.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from altclip_cli.nn.checkpoint import read_pickle
from altclip_cli.errors import AltclipError, CheckpointError, DownloadError, ModelError
from altclip_cli.hub import cached_models, download_model, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import FakeHub  # noqa: E402

BIN_REPO = "tiny/altclip-bin"      # pytorch_model.bin only, like the hub's BAAI/AltCLIP
ST_REPO = "tiny/altclip-st"        # model.safetensors and pytorch_model.bin
EVIL_REPO = "tiny/evil"            # a pytorch_model.bin whose pickle runs code


def stand_in_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(64, 32, generator=g)
    return {
        "text_model.roberta.embeddings.word_embeddings.weight": shared,
        "text_model.tied.weight": shared,  # same storage: must come out as two equal tensors
        "text_model.roberta.embeddings.position_ids": torch.arange(514, dtype=torch.int64)[None],
        "visual_projection.weight": torch.randn(16, 24, generator=g).t(),  # not contiguous
        "vision_model.half.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "vision_model.empty": torch.zeros(0, 3),
        "logit_scale": torch.tensor(2.6592),
    }


class _RunsCode:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _write_repo(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakehub")
    state = stand_in_state_dict()
    torch.save(state, root / "state.bin")
    common = {
        "config.json": json.dumps({"model_type": "altclip"}).encode(),
        "preprocessor_config.json": json.dumps({"crop_size": 224, "size": 224}).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "Unigram", "vocab": [["<s>", 0.0]]}}',
    }
    binary = (root / "state.bin").read_bytes()
    _write_repo(root / BIN_REPO, {**common, "pytorch_model.bin": binary,
                                  "README.md": b"# not fetched\n", "flax_model.msgpack": b"\0" * 100})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, root / "st.safetensors")
    _write_repo(root / ST_REPO, {**common, "pytorch_model.bin": binary,
                                 "model.safetensors": (root / "st.safetensors").read_bytes()})
    marker = root / "code-ran"
    torch.save({"w": torch.ones(2), "hook": _RunsCode(marker)}, root / "evil.bin")
    _write_repo(root / EVIL_REPO, {**common, "pytorch_model.bin": (root / "evil.bin").read_bytes()})
    with FakeHub(root) as hub:
        yield SimpleNamespace(hub=hub, state=state, binary=binary, marker=marker)


@pytest.fixture
def env(served, tmp_path, monkeypatch):
    """HF_ENDPOINT at the fake hub, empty HF and altclip caches. huggingface_hub reads its
    environment once, at import, into `constants`: those are patched too."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    url = served.hub.url
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("ALTCLIP_HOME", str(tmp_path / "altclip"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    patches = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": False,
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        # Small chunks, so that a cut-off transfer leaves whole chunks on disk to resume from.
        "DOWNLOAD_CHUNK_SIZE": 1024,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    served.hub.clear_log()
    return SimpleNamespace(hub=served.hub, served=served, cache=hf_home / "hub",
                           altclip=tmp_path / "altclip", monkeypatch=monkeypatch)


def go_offline(env) -> None:
    from huggingface_hub import constants

    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def assert_same_tensors(path: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_file(str(path))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def converted_path(env, repo_id: str, commit: str) -> Path:
    return env.altclip / "converted" / repo_id.replace("/", "--") / commit / "model.safetensors"


# ---------------------------------------------------------------------------------------------


def test_download_into_empty_cache(env):
    resolved = resolve_model(BIN_REPO, progress=False)

    commit = env.hub.commit(BIN_REPO)
    storage = env.cache / "models--tiny--altclip-bin"
    assert resolved.repo_id == BIN_REPO and resolved.commit == commit
    assert resolved.folder == storage / "snapshots" / commit
    assert (storage / "refs" / "main").read_text() == commit
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "pytorch_model.bin"):
        file = resolved.folder / name
        assert file.is_symlink() and file.resolve().parent == storage / "blobs"
    assert sorted(env.hub.fetched()) == ["config.json", "preprocessor_config.json",
                                         "pytorch_model.bin", "tokenizer.json"]  # no README, no flax
    # Converted into altclip's cache, not into the shared snapshot folder.
    assert resolved.weights == [converted_path(env, BIN_REPO, commit)]
    assert not (resolved.folder / "model.safetensors").exists()
    assert_same_tensors(resolved.weights[0], env.served.state)
    assert [p.name for p in resolved.weights[0].parent.iterdir() if p.name.endswith(".tmp")] == []


def test_second_resolve_makes_no_request(env):
    first = resolve_model(BIN_REPO, progress=False)
    stamp = first.weights[0].stat().st_mtime_ns
    env.hub.clear_log()

    second = resolve_model(BIN_REPO, progress=False)

    assert env.hub.requests == []
    assert second == first
    assert second.weights[0].stat().st_mtime_ns == stamp  # converted once


def test_offline_uses_cache_and_explains_a_miss(env):
    resolve_model(BIN_REPO, progress=False)
    go_offline(env)
    env.hub.clear_log()

    assert resolve_model(BIN_REPO, progress=False).repo_id == BIN_REPO
    with pytest.raises(DownloadError) as err:
        resolve_model(ST_REPO, progress=False)

    assert env.hub.requests == []
    assert "tiny/altclip-st is not in the cache" in err.value.message
    assert "HF_HUB_OFFLINE" in err.value.message
    assert err.value.hint == "run: altclip download tiny/altclip-st"
    with pytest.raises(DownloadError, match="offline"):
        download_model(ST_REPO, progress=False)


def test_no_download_allowed(env):
    with pytest.raises(DownloadError, match="not in the cache"):
        resolve_model(BIN_REPO, download=False)
    assert env.hub.requests == []


def test_unknown_repo(env):
    with pytest.raises(DownloadError) as err:
        resolve_model("tiny/no-such-model", progress=False)
    assert type(err.value) is DownloadError
    assert "tiny/no-such-model was not found" in err.value.message
    assert "BAAI/AltCLIP" in err.value.hint


def test_unknown_revision(env):
    with pytest.raises(DownloadError, match="has no revision 'v9'"):
        resolve_model(BIN_REPO, revision="v9", progress=False)


def test_unreachable_hub(env):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env.monkeypatch.setattr(constants, "ENDPOINT", dead)
    env.monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(DownloadError) as err:
        resolve_model(BIN_REPO, progress=False)
    assert "could not reach the Hugging Face Hub" in err.value.message
    assert "HF_HUB_OFFLINE=1" in err.value.hint


def test_interrupted_download_resumes_with_range(env):
    env.hub.cut_next(BIN_REPO, "pytorch_model.bin", after=5000)

    resolved = resolve_model(BIN_REPO, progress=False)

    gets = [h for m, p, h in env.hub.requests if m == "GET" and p.endswith("/pytorch_model.bin")]
    assert len(gets) == 2
    assert "Range" not in gets[0]
    start = int(gets[1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 5000  # whole chunks already on disk were kept
    blob = (resolved.folder / "pytorch_model.bin").resolve()
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(env.served.binary).digest()
    assert_same_tensors(resolved.weights[0], env.served.state)


def test_pickle_holding_code_is_refused(env):
    with pytest.raises(CheckpointError) as err:
        resolve_model(EVIL_REPO, progress=False)
    assert "refused to unpickle" in err.value.message
    assert "makedirs" in err.value.message  # names what it would have called
    assert not env.served.marker.exists()
    leftovers = [p for p in env.altclip.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


def test_pickle_holding_a_class_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "cls": SimpleNamespace}, path)
    with pytest.raises(CheckpointError, match="SimpleNamespace"):
        read_pickle(path)


def test_safetensors_repo_does_not_fetch_the_bin(env):
    resolved = resolve_model(ST_REPO, progress=False)

    assert resolved.weights == [resolved.folder / "model.safetensors"]
    assert "pytorch_model.bin" not in env.hub.fetched()
    assert not (resolved.folder / "pytorch_model.bin").exists()
    assert not (env.altclip / "converted").exists()


def test_download_model_checks_the_remote_but_refetches_nothing(env):
    first = resolve_model(BIN_REPO, progress=False)
    env.hub.clear_log()

    again = download_model(BIN_REPO, progress=False)

    assert again == first
    assert any(p.startswith("/api/models/tiny/altclip-bin") for _, p, _ in env.hub.requests)
    assert env.hub.fetched() == []


def test_local_folder_resolves_to_itself(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    assert resolve_model(str(folder)).weights == [folder / "pytorch_model.bin"]

    save_file({"a": torch.ones(1)}, folder / "model.safetensors")
    resolved = resolve_model(str(folder))
    assert (resolved.folder, resolved.weights, resolved.repo_id, resolved.commit) == (
        folder, [folder / "model.safetensors"], None, None)

    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        resolve_model(str(shards))
    for name in set(index["weight_map"].values()):
        save_file({"x": torch.ones(1)}, shards / name)
    assert [p.name for p in resolve_model(str(shards)).weights] == sorted(set(index["weight_map"].values()))


def test_folder_without_config_or_bad_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path / "empty"))
    assert "config.json" in err.value.message and err.value.hint
    with pytest.raises(ModelError, match="neither a model folder"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "folder"))


def test_cached_models_lists_altclip_repos(env):
    assert cached_models() == []
    resolve_model(BIN_REPO, progress=False)
    resolve_model(ST_REPO, progress=False)

    found = {m.repo_id: m for m in cached_models()}

    assert set(found) == {BIN_REPO, ST_REPO}
    assert found[BIN_REPO].known is None and found[BIN_REPO].complete
    assert found[BIN_REPO].commit == env.hub.commit(BIN_REPO)
    assert found[BIN_REPO].size_bytes >= len(env.served.binary)
    assert found[BIN_REPO].converted_bytes > 0 and found[ST_REPO].converted_bytes == 0


def _convert_in_child(repo_id: str, barrier, results, log: str) -> None:
    from altclip_cli import hub
    from altclip_cli.nn import checkpoint

    real = checkpoint.write_safetensors

    def logged(tensors, path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # hold the lock a while: a second converter would collide here
        real(tensors, path)

    checkpoint.write_safetensors = logged
    barrier.wait(timeout=120)
    try:
        results.put(str(hub.resolve_model(repo_id, download=False, progress=False).weights[0]))
    except AltclipError as exc:
        results.put(f"error: {exc.message}")


def test_two_processes_convert_once(env, tmp_path):
    first = resolve_model(BIN_REPO, progress=False)
    shutil.rmtree(env.altclip / "converted")
    go_offline(env)  # children inherit the environment; they need no network either
    ctx = multiprocessing.get_context("spawn")
    barrier, results, log = ctx.Barrier(2), ctx.Queue(), tmp_path / "writes.log"

    procs = [ctx.Process(target=_convert_in_child, args=(BIN_REPO, barrier, results, str(log)))
             for _ in range(2)]
    for p in procs:
        p.start()
    outputs = []
    deadline = time.monotonic() + 180
    while len(outputs) < len(procs) and time.monotonic() < deadline:
        try:
            outputs.append(results.get(timeout=1))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]

    assert sorted(outputs) == [str(first.weights[0])] * 2
    assert len(log.read_text().split()) == 1  # one process converted, the other waited
    assert_same_tensors(first.weights[0], env.served.state)
    assert [p.name for p in first.weights[0].parent.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------
# Resuming across runs: weight files collect in blobs/<etag>.incomplete (altclip_cli/fetch.py)

# The CLI in a child process, with huggingface_hub's read size cut from 10 MB to 1 KiB (as the
# env fixture does in-process), so that some KB of the stand-in weights reach the disk.
CHILD = ("import sys; from huggingface_hub import constants; constants.DOWNLOAD_CHUNK_SIZE = 1024; "
         "from altclip_cli.cli import main; main(sys.argv[1:])")


def child_cli(*args: str) -> subprocess.Popen:
    """`altclip ARGS` against the fake hub and the test's caches (the env fixture's variables)."""
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def bin_paths(env) -> SimpleNamespace:
    storage = env.cache / "models--tiny--altclip-bin"
    blob = storage / "blobs" / hashlib.sha256(env.served.binary).hexdigest()
    return SimpleNamespace(storage=storage, blob=blob, partial=blob.with_name(blob.name + ".incomplete"),
                           lock=env.cache / ".locks" / storage.name / f"{blob.name}.lock")


def weight_ranges(env) -> list[str | None]:
    """The Range header of each GET of pytorch_model.bin, in order (None: the whole file)."""
    return [h.get("Range") for m, p, h in env.hub.requests if m == "GET" and p.endswith("/pytorch_model.bin")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_download_stopped_midway_resumes_in_the_next_process(env, sig):
    paths = bin_paths(env)
    env.hub.stall_next(BIN_REPO, "pytorch_model.bin", after=5000)
    first = child_cli("download", BIN_REPO)
    try:
        deadline = time.monotonic() + 120
        while not (paths.partial.is_file() and paths.partial.stat().st_size >= 4096):
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the partial file never grew"
            time.sleep(0.05)
        first.send_signal(sig)
        _, stderr = first.communicate(timeout=60)
    finally:
        env.hub.release()
        first.kill()
    if sig == signal.SIGINT:
        assert (first.returncode, stderr.splitlines()[-1]) == (130, "error: interrupted")
    else:
        assert first.returncode == -signal.SIGKILL
    have = paths.partial.stat().st_size
    assert 0 < have <= 5000 and not paths.blob.exists()
    env.hub.clear_log()

    second = child_cli("download", BIN_REPO)
    stdout, stderr = second.communicate(timeout=300)

    assert second.returncode == 0, stderr
    commit = env.hub.commit(BIN_REPO)
    snapshot = paths.storage / "snapshots" / commit
    assert stdout == f"{snapshot}\n"
    assert weight_ranges(env) == [f"bytes={have}-"]  # only the missing bytes
    link = snapshot / "pytorch_model.bin"
    assert link.is_symlink() and link.resolve() == paths.blob
    assert paths.blob.read_bytes() == env.served.binary
    assert (paths.storage / "refs" / "main").read_text() == commit
    assert list(paths.storage.glob("blobs/*.incomplete")) == []
    assert_same_tensors(converted_path(env, BIN_REPO, commit), env.served.state)


def test_a_blob_in_the_cache_is_not_fetched_again(env):
    first = download_model(BIN_REPO, progress=False)
    shutil.rmtree(first.folder.parent)  # snapshots/: only the blobs are left, as another tool may leave them
    env.hub.clear_log()

    again = download_model(BIN_REPO, progress=False)

    assert env.hub.fetched() == []
    assert again.folder == first.folder
    link = again.folder / "pytorch_model.bin"
    assert link.is_symlink() and link.resolve() == bin_paths(env).blob


@pytest.mark.parametrize("partial, ranges", [
    ("longer", [None]),                     # cannot be a prefix: discarded before any request
    ("same-size", [None]),                  # complete but wrong: fails the sha256, fetched whole
    ("prefix", ["bytes=4096-", None]),      # resumed, fails the sha256, fetched again whole
])
def test_a_corrupt_partial_is_not_trusted(env, partial, ranges, caplog):
    paths = bin_paths(env)
    data = env.served.binary
    paths.partial.parent.mkdir(parents=True)
    paths.partial.write_bytes({"longer": data + b"tail", "same-size": b"\0" * len(data),
                               "prefix": b"\0" * 4096}[partial])

    resolved = download_model(BIN_REPO, progress=False)

    assert weight_ranges(env) == ranges
    assert (resolved.folder / "pytorch_model.bin").read_bytes() == data
    assert not paths.partial.exists()
    assert "pytorch_model.bin: " in caplog.text  # said why it started again


def test_a_corrupt_fresh_download_is_an_error_and_kept_nowhere(env):
    paths = bin_paths(env)
    env.hub.corrupt_next(BIN_REPO, "pytorch_model.bin")

    with pytest.raises(DownloadError) as err:
        download_model(BIN_REPO, progress=False)

    assert type(err.value) is DownloadError
    assert err.value.message == "the downloaded pytorch_model.bin is corrupt (sha256 mismatch)"
    assert not paths.partial.exists() and not paths.blob.exists()
    assert download_model(BIN_REPO, progress=False).folder.is_dir()  # the next run starts afresh
    assert weight_ranges(env) == [None, None]


def test_waits_for_another_process_on_the_same_blob(env):
    from filelock import FileLock

    from altclip_cli.hub import blobs

    paths = bin_paths(env)
    paths.lock.parent.mkdir(parents=True)
    other = FileLock(str(paths.lock))  # held as huggingface_hub holds it while downloading
    other.acquire()
    asking, holding = threading.Event(), threading.Event()
    real_locked = blobs._locked

    @contextmanager
    def watched(path, *args, **kwargs):
        if Path(path) == paths.lock:
            asking.set()  # the waiter is about to take the blob's lock
        with real_locked(path, *args, **kwargs):
            if Path(path) == paths.lock:
                holding.set()
            yield

    env.monkeypatch.setattr(blobs, "_locked", watched)
    done: list = []
    errors: list = []

    def waiter():
        try:
            done.append(download_model(BIN_REPO, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    thread = threading.Thread(target=waiter, daemon=True)
    try:
        thread.start()
        assert asking.wait(30), f"the waiter never reached the blob's lock: {errors}"
        # It asked for the lock we hold: it must stay blocked, not download, not finish.
        assert not holding.wait(1.5), "the waiter took a lock another process holds"
        assert thread.is_alive() and not done and not errors
        assert weight_ranges(env) == [] and not paths.partial.exists()  # waiting, not downloading
        paths.blob.parent.mkdir(parents=True, exist_ok=True)
        paths.blob.write_bytes(env.served.binary)  # the other process finishes the blob
    finally:
        other.release()
    assert holding.wait(60), "released, the lock was never taken by the waiter"
    thread.join(timeout=120)

    assert not thread.is_alive() and errors == [] and done
    assert weight_ranges(env) == []  # it found the other process's blob: nothing fetched
    assert (done[0].folder / "pytorch_model.bin").resolve() == paths.blob
