"""`altclip embed -o`'s promises under kill -9, signals and changed settings: the array and its
sidecar always belong together (or altclip names the state), Ctrl-C and SIGTERM cannot split a
commit, and --resume refuses what it cannot continue."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from altclip_cli.errors import AltclipError
from altclip_cli.outputs.embedfile import EmbeddingOutput, settings_difference
from altclip_cli.outputs.manifest import check_pair, finish_commit
from embedhooks import interrupted_after
from test_cli import SAFE_ENV, invoke, write_image
from tiny import random_state_dict

SETTINGS = {"kind": "image", "model": "m", "weights": "w1", "precision": "fp32", "device_type": "cpu",
            "dtype": "float32", "normalize": True, "exact_decode": False}


# --- the commit, killed at every step ------------------------------------------------------------------

# A child process writes an "old" pair (rows of 1.0, names old-i), then commits a "new" pair (rows of
# 2.0, names new-i), and SIGKILLs itself just before the k-th file-system call of that commit.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from altclip_cli.outputs.embedfile import EmbeddingOutput
    path, kill_at, old_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = {"kind": "text", "model": "m", "weights": "w", "precision": "fp32", "device_type": "cpu",
                "dtype": "float32", "normalize": True, "exact_decode": None}

    def write(tag, value, rows):
        out = EmbeddingOutput(path, settings=settings)
        out.open(4)
        out.add([(f"{tag}-{i}", {"text": f"{tag}-{i}"}) for i in range(rows)], np.full((rows, 4), value, np.float32))
        return out

    if old_rows:
        write("old", 1.0, old_rows).commit()
    out = write("new", 2.0, 3)
    calls = [0]

    def fault(real):
        def wrapper(*args, **kwargs):
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in ("replace", "fsync", "unlink", "rename"):
        setattr(os, name, fault(getattr(os, name)))
    out.commit()
    print(calls[0])
""")


def _run_child(path: Path, kill_at: int, old_rows: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_at), str(old_rows)],
                          capture_output=True, text=True, timeout=120)


def _pair_content(npy: Path) -> tuple[str, str]:
    """('old'|'new', 'old'|'new') for the array and the sidecar on disk."""
    array = np.load(npy)
    sidecar = npy.with_suffix(".jsonl").read_text()
    return ("old" if array[0, 0] == 1.0 else "new"), ("old" if '"old-0"' in sidecar else "new")


@pytest.mark.parametrize("old_rows", [0, 3], ids=["first-write", "overwrite"])
def test_a_kill_at_any_step_of_the_commit_never_leaves_a_silently_mixed_pair(tmp_path, old_rows):
    steps = int(_run_child(tmp_path / "dry.npy", -1, old_rows).stdout)
    assert steps >= 5  # fsyncs, the journal, two renames, the manifest
    mixed_states_seen = 0
    for k in range(steps + 1):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        npy = folder / "out.npy"
        proc = _run_child(npy, k, old_rows)
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr
        problems, _ = check_pair(npy)
        if not problems:
            content = _pair_content(npy)
            assert content in (("old", "old"), ("new", "new")), f"step {k}: a mixed pair passed the check"
            continue
        # altclip names the state; a journal means the commit can be finished, to the new pair.
        if any("was interrupted" in p for p in problems):
            mixed_states_seen += 1
            assert finish_commit(npy)
            assert check_pair(npy)[0] == []
            assert _pair_content(npy) == ("new", "new")
        else:
            assert old_rows == 0, f"step {k}: the old pair was damaged: {problems}"
            assert any("does not exist" in p for p in problems)  # a first write not yet visible
    assert mixed_states_seen >= 2  # killed between the renames, among others


def test_kill_9_at_random_moments_of_a_real_embed(tmp_path, tiny_model_dir):
    """The real command, killed at random times while it embeds and commits: after each kill the
    output is the earlier pair, the new pair, or a state `altclip check` names and --repair fixes."""
    os.chdir(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"text number {i}\n" for i in range(400)))
    cmd = [sys.executable, "-m", "altclip_cli", "embed", "--text", str(texts), "-o", "out.npy", "-m",
           str(tiny_model_dir), "--precision", "fp32", "-b", "8", "--checkpoint-every", "16"]
    env = {**os.environ, **SAFE_ENV}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    reference = np.load("out.npy")
    rng = random.Random(1)
    for trial in range(6):
        proc = subprocess.Popen(cmd + (["--resume"] if trial % 2 else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.kill()
        proc.wait(timeout=60)
        problems, _ = check_pair(Path("out.npy"))
        if problems:
            assert any("was interrupted" in p for p in problems), problems
            assert finish_commit(Path("out.npy"))
        assert check_pair(Path("out.npy"))[0] == []
        np.testing.assert_array_equal(np.load("out.npy"), reference)
        lines = Path("out.jsonl").read_text().splitlines()
        assert [json.loads(line)["row"] for line in lines] == list(range(400))


# --- signals during the commit -----------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_taken_by_another_thread_during_the_commit_waits_for_it(tmp_path, monkeypatch, signum):
    """The kernel may hand SIGINT/SIGTERM to any thread (OpenMP, decoders); the commit still ends
    whole and the signal acts after it."""
    import altclip_cli.outputs.embedfile as embedfile

    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)  # stands for an OpenMP worker
    bystander.start()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)  # as `altclip embed` handles SIGTERM
    try:
        out = EmbeddingOutput(tmp_path / "x.npy", settings=SETTINGS)
        out.open(4)
        out.add([("a", {"image": "a"}), ("b", {"image": "b"})], np.ones((2, 4), np.float32))
        real_replace = embedfile.os.replace
        calls = []

        def replace_then_signal(src, dst):
            real_replace(src, dst)
            calls.append(dst)
            if len(calls) == 2:  # between the sidecar's and the array's rename
                signal.pthread_kill(bystander.ident, signum)
                time.sleep(0.2)  # the main thread runs Python handlers meanwhile

        monkeypatch.setattr(embedfile.os, "replace", replace_then_signal)
        with pytest.raises(KeyboardInterrupt):
            out.commit()
        monkeypatch.setattr(embedfile.os, "replace", real_replace)
    finally:
        signal.signal(signal.SIGTERM, previous)
        idle.set()
    assert out.committed
    assert check_pair(tmp_path / "x.npy")[0] == []
    assert np.load(tmp_path / "x.npy").shape == (2, 4)


def test_sigterm_during_the_commit_of_the_cli_finishes_the_files_then_exits_143(tmp_path, tiny_model_dir, monkeypatch):
    import altclip_cli.outputs.embedfile as embedfile

    monkeypatch.chdir(tmp_path)
    for i in range(3):
        write_image(tmp_path / f"p{i}.png", i)
    real_replace = embedfile.os.replace

    def replace_then_sigterm(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("x.jsonl"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)

    monkeypatch.setattr(embedfile.os, "replace", replace_then_sigterm)
    result = invoke("embed", "--image", "p0.png", "p1.png", "p2.png", "-o", "x.npy", "-m", tiny_model_dir)
    monkeypatch.setattr(embedfile.os, "replace", real_replace)
    assert result.exit_code == 143
    assert "interrupted after writing 3 rows to x.npy" in result.stderr
    assert check_pair(tmp_path / "x.npy")[0] == []


# --- --resume refuses what it cannot continue ---------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("weights", "w2"), ("precision", "bf16"), ("device_type", "cuda"),
                                        ("normalize", False), ("dtype", "float16"), ("exact_decode", True),
                                        ("kind", "text")])
def test_each_setting_that_changes_the_numbers_is_compared(key, value):
    error = settings_difference(SETTINGS, {**SETTINGS, key: value})
    assert isinstance(error, AltclipError)
    assert error.message == f"cannot resume: the earlier run used {key} {SETTINGS[key]!r}, this one {value!r}"
    assert error.hint.startswith("give the earlier run's ")
    assert settings_difference(SETTINGS, {**SETTINGS, "model": "another/name"}) is None  # weights decide


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(4):
        write_image(tmp_path / f"p{i}.png", 20 + i)
    return ["p0.png", "p1.png", "p2.png", "p3.png"]


def _interrupted(photos, model, *options):
    with interrupted_after(2):
        result = invoke("embed", "--image", *photos, "-o", "x.npy", "-b", "1", "-m", model, *options)
    assert result.exit_code == 130, result.stderr
    assert Path("x.npy.checkpoint.json").exists()


@pytest.mark.parametrize("first, second, message", [
    (["--precision", "fp32"], ["--precision", "bf16"], "precision 'fp32', this one 'bf16'"),
    ([], ["--no-normalize"], "normalize True, this one False"),
    ([], ["--dtype", "float16"], "dtype 'float32', this one 'float16'"),
    ([], ["--exact-decode"], "exact_decode False, this one True"),
])
def test_resume_under_another_option_is_refused_and_named(photos, tiny_model_dir, first, second, message):
    base = ["--precision", "fp32"] if not first else []
    _interrupted(photos, tiny_model_dir, *base, *first)
    result = invoke("embed", "--image", *photos, "-o", "x.npy", "-b", "1", "-m", tiny_model_dir, *base, *second,
                    "--resume")
    assert result.exit_code == 1
    assert f"error: cannot resume: the earlier run used {message}" in result.stderr
    assert "hint: give the earlier run's" in result.stderr
    assert Path("x.npy.checkpoint.json").exists() and not Path("x.npy").exists()  # nothing touched


def test_resume_with_changed_weights_is_refused(photos, tiny_model_dir):
    from safetensors.torch import save_file

    _interrupted(photos, tiny_model_dir, "--precision", "fp32")
    from altclip_cli.nn.config import read_config

    save_file(random_state_dict(read_config(tiny_model_dir), seed=7), str(tiny_model_dir / "model.safetensors"))
    result = invoke("embed", "--image", *photos, "-o", "x.npy", "-b", "1", "-m", tiny_model_dir,
                    "--precision", "fp32", "--resume")
    assert result.exit_code == 1
    assert "error: cannot resume: the earlier run used weights" in result.stderr


def test_resume_on_another_device_type_is_refused(photos, tiny_model_dir):
    _interrupted(photos, tiny_model_dir, "--precision", "fp32")
    checkpoint = json.loads(Path("x.npy.checkpoint.json").read_text())
    checkpoint["settings"]["device_type"] = "cuda"  # as if the run had been on a GPU
    Path("x.npy.checkpoint.json").write_text(json.dumps(checkpoint))
    result = invoke("embed", "--image", *photos, "-o", "x.npy", "-b", "1", "-m", tiny_model_dir,
                    "--precision", "fp32", "--resume")
    assert result.exit_code == 1
    assert "the earlier run used device_type 'cuda', this one 'cpu'" in result.stderr


def test_resume_on_a_complete_output_says_so_and_changes_nothing(photos, tiny_model_dir):
    args = ["embed", "--image", *photos, "-o", "x.npy", "-m", tiny_model_dir, "--precision", "fp32"]
    assert invoke(*args).exit_code == 0
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in ("x.npy", "x.jsonl", "x.manifest.json")}
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "x.npy is already complete (4 rows from 4 inputs): nothing to do" in result.stderr
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before} == before
    other = invoke(*args, "--no-normalize", "--resume")
    assert other.exit_code == 1 and "the earlier run used normalize True, this one False" in other.stderr
    fewer = invoke("embed", "--image", *photos[:3], "-o", "x.npy", "-m", tiny_model_dir, "--precision", "fp32",
                   "--resume")
    assert fewer.exit_code == 1 and "x.npy is complete, but for other inputs" in fewer.stderr
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before} == before


# --- altclip check ----------------------------------------------------------------------------------------------

def test_check_passes_a_committed_pair_and_names_every_broken_state(photos, tiny_model_dir):
    assert invoke("embed", "--image", *photos, "-o", "x.npy", "-m", tiny_model_dir).exit_code == 0
    ok = invoke("check", "x.npy", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout) == {"output": "x.npy", "ok": True, "problems": [], "rows": 4, "dim": 16}

    sidecar = Path("x.jsonl").read_text()
    Path("x.jsonl").write_text(sidecar.replace("p0.png", "pX.png"))
    changed = invoke("check", "x.npy")
    assert changed.exit_code == 1
    assert "error: x.jsonl is not the file its manifest describes" in changed.stderr
    Path("x.jsonl").write_text(sidecar)

    manifest = Path("x.manifest.json").read_text()
    Path("x.manifest.json").unlink()
    assert "x.manifest.json is missing" in invoke("check", "x.npy").stderr
    Path("x.manifest.json").write_text(manifest)

    # As if killed between the renames: a journal, the new sidecar in place, the new array in .part.
    Path("x.npy").rename("x.npy.part")
    Path("x.npy").write_bytes(b"old array")
    Path("x.npy.commit.json").write_text(manifest)
    stuck = invoke("check", "x.npy")
    assert stuck.exit_code == 1
    assert "was interrupted while its files were being replaced" in stuck.stderr
    assert "hint: altclip check x.npy --repair" in stuck.stderr
    repaired = invoke("check", "x.npy", "--repair")
    assert repaired.exit_code == 0, repaired.stderr
    assert sorted(p for p in os.listdir() if p.startswith("x.")) == ["x.jsonl", "x.manifest.json", "x.npy"]
    assert invoke("check", "x.npy").exit_code == 0


def test_resume_with_a_copy_of_the_same_weights_continues(photos, tiny_model_dir, tmp_path):
    """The weights are identified by their content: a copied (or re-downloaded) model continues."""
    import shutil

    _interrupted(photos, tiny_model_dir, "--precision", "fp32")
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "model"))
    result = invoke("embed", "--image", *photos, "-o", "x.npy", "-b", "1", "-m", copy, "--precision", "fp32",
                    "--resume")
    assert result.exit_code == 0, result.stderr
    assert "resuming after 2 of 4 inputs" in result.stderr
