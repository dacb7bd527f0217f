"""The command line end to end on the tiny random model: exit codes and exact output shapes for
every command and format, errors as `error:`/`hint:` lines, and the cheap-import promise."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from altclip_cli import __version__
from altclip_cli.cli import cli
from embedhooks import interrupted_after

# Subprocesses never reach the network: the hub is a dead local port and offline mode is on.
# fp32 on the CPU, so the numbers compare with the reference model's.
SAFE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_COLOR": "1", "ALTCLIP_DEVICE": "cpu", "ALTCLIP_PRECISION": "fp32"}


def invoke(*args, input=None, env=None):
    env = {**SAFE_ENV, **(env or {})}
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def write_image(path: Path, seed: int, size=(64, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path, monkeypatch):
    """cwd with a.png, b.jpg, c.png (random pixels) and bad.jpg (text)."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.jpg", 2)
    write_image(tmp_path / "c.png", 3)
    (tmp_path / "bad.jpg").write_text("not an image")
    return tmp_path


@pytest.fixture
def ref(tiny_loaded):
    return tiny_loaded[1]


def opened(*paths):
    from altclip_cli.inputs.images import open_image

    return [open_image(p) for p in paths]


# --- the command group ---------------------------------------------------------------------------------

def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("classify", "embed", "download", "info", "models"):
        assert f"  {command} " in result.stdout
    assert "Exit codes:" in result.stdout


@pytest.mark.parametrize("command", ["classify", "embed", "download", "info", "models"])
def test_every_command_has_help_with_short_flag(command):
    result = invoke(command, "-h")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: altclip {command} ")
    assert result.stderr == ""


def test_version():
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"altclip {__version__}\n")


def test_unknown_command_and_option_are_usage_errors():
    result = invoke("clasify")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: No such command 'clasify'.")
    result = invoke("classify", "a.jpg", "-l", "x", "--bogus")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: No such option") and "--bogus" in lines[0]
    assert lines[1:] == ["hint: see 'altclip classify --help'"]


def _python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **SAFE_ENV, **(env or {})})


HEAVY = ("torch", "numpy", "safetensors", "huggingface_hub", "PIL", "tokenizers", "rich")


def test_importing_the_cli_and_help_and_completion_import_nothing_heavy():
    code = f"""
import sys, io, contextlib
import altclip_cli.cli as c
heavy = {HEAVY!r}
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
for args in (["--help"], ["classify", "--help"], ["embed", "-h"], ["--version"]):
    with contextlib.redirect_stdout(io.StringIO()):
        assert c.cli.main(args, prog_name="altclip", standalone_mode=False) == 0
import os
os.environ.update(_ALTCLIP_COMPLETE="bash_complete", COMP_WORDS="altclip classify --model ", COMP_CWORD="3")
try:
    c.cli.main([], prog_name="altclip")
except SystemExit:
    pass
print("heavy:", sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "heavy: []"
    assert "plain,BAAI/AltCLIP\n" in proc.stdout


def _altclip_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("altclip")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "altclip_cli"]


# --- classify --------------------------------------------------------------------------------------------

LABELS = ["猫", "a dog", "une voiture", "Straße", "кошка", "قطة"]


def _label_args(labels=LABELS):
    return [x for label in labels for x in ("-l", label)]


def test_classify_jsonl_is_the_default_off_a_terminal(images, model, ref):
    result = invoke("classify", "a.png", "b.jpg", *_label_args(), "-m", model)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["image"] for r in records] == ["a.png", "b.jpg"]
    probs, logits = ref.classify(opened("a.png", "b.jpg"), LABELS)
    for record, p, lg in zip(records, probs, logits):
        assert list(record) == ["image", "top", "scores"]
        assert record["top"] == record["scores"][0]["label"]
        scores = record["scores"]
        assert sorted(s["label"] for s in scores) == sorted(LABELS)
        assert [list(s) for s in scores] == [["label", "prob", "logit"]] * len(LABELS)
        assert [s["prob"] for s in scores] == sorted((s["prob"] for s in scores), reverse=True)
        for s in scores:
            j = LABELS.index(s["label"])
            assert s["prob"] == pytest.approx(p[j], rel=1e-5, abs=1e-6)
            assert s["logit"] == pytest.approx(lg[j], rel=1e-5, abs=1e-5)
        assert sum(s["prob"] for s in scores) == pytest.approx(1.0, abs=1e-4)


def test_classify_json_array_with_error_in_place_exit_3(images, model):
    result = invoke("classify", "a.png", "bad.jpg", "missing.jpg", "c.png", "-l", "x", "-l", "y",
                    "-f", "json", "-m", model)
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert [r["image"] for r in data] == ["a.png", "bad.jpg", "missing.jpg", "c.png"]
    assert data[1] == {"image": "bad.jpg", "error": "not an image, or in a format Pillow cannot read"}
    assert data[2] == {"image": "missing.jpg", "error": "no such file"}
    assert len(data[0]["scores"]) == 2 and len(data[3]["scores"]) == 2
    assert result.stderr.splitlines() == [
        "error: bad.jpg: not an image, or in a format Pillow cannot read",
        "error: missing.jpg: no such file",
        "warning: 2 of 4 images failed",
    ]


def test_classify_json_with_no_images_is_an_empty_array(images, model):
    result = invoke("classify", "-", "-l", "x", "-f", "json", "-m", model, input="")
    assert (result.exit_code, result.stdout) == (0, "[]\n")


def test_classify_csv(images, model):
    result = invoke("classify", "a.png", "bad.jpg", "-l", "cat", "-l", "dog", "-l", "car", "-f", "csv",
                    "--top-k", "2", "-m", model)
    assert result.exit_code == 3
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["image", "rank", "label", "prob", "logit", "error", "top"]
    assert [r[:2] for r in rows[1:3]] == [["a.png", "1"], ["a.png", "2"]]
    assert float(rows[1][3]) >= float(rows[2][3])
    assert rows[1][6] == rows[2][6] == rows[1][2]
    assert rows[3] == ["bad.jpg", "", "", "", "", "not an image, or in a format Pillow cannot read", ""]
    assert len(rows) == 4


def test_classify_table(images, model):
    result = invoke("classify", "a.png", "bad.jpg", "b.jpg", *_label_args(), "-f", "table", "-k", "3", "-m", model)
    assert result.exit_code == 3
    lines = result.stdout.splitlines()
    assert lines[0].strip() == "a.png"
    assert lines[1].split() == ["label", "prob"]
    body = [line for line in lines[3:6]]
    assert all(line.split()[-2].endswith("%") or line.split()[-1].endswith("%") for line in body)
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes
    assert "b.jpg" in [line.strip() for line in lines]
    assert "bad.jpg" not in result.stdout and "error: bad.jpg" in result.stderr


def test_classify_top_k_and_duplicate_labels_kept_separate(images, model):
    result = invoke("classify", "a.png", "-l", "cat", "-l", "dog", "-l", "cat", "-m", model)
    assert result.exit_code == 0
    scores = jsonl(result.stdout)[0]["scores"]
    assert sorted(s["label"] for s in scores) == ["cat", "cat", "dog"]
    cats = [s for s in scores if s["label"] == "cat"]
    assert cats[0]["prob"] == cats[1]["prob"]
    assert "warning: label 'cat' is given 2 times" in result.stderr
    result = invoke("classify", "a.png", "-l", "cat", "-l", "dog", "-l", "car", "-k", "1", "-m", model)
    assert len(jsonl(result.stdout)[0]["scores"]) == 1


def test_classify_labels_file_and_templates(images, model, ref, tmp_path):
    (tmp_path / "labels.txt").write_bytes("猫\r\n\nune voiture\n".encode())
    templates = ["a photo of {}.", "{}, in a picture"]
    result = invoke("classify", "a.png", "--labels-file", "labels.txt", "-l", "dog",
                    "-t", templates[0], "--template", templates[1], "-m", model)
    assert result.exit_code == 0, result.stderr
    scores = jsonl(result.stdout)[0]["scores"]
    labels = ["dog", "猫", "une voiture"]
    assert sorted(s["label"] for s in scores) == sorted(labels)
    probs, _ = ref.classify(opened("a.png"), labels, templates=templates)
    for s in scores:
        assert s["prob"] == pytest.approx(probs[0][labels.index(s["label"])], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("args, message", [
    ([], "error: no labels given"),
    (["-l", "cat", "-l", ""], "error: label 2 (-l '') is empty"),
    (["-l", "  "], "error: label 1 (-l '  ') is empty"),
    (["-l", "cat", "-t", "a photo"], "error: template 'a photo' has no {} where the label goes"),
    (["--labels-file", "nope.txt"], "error: nope.txt: no such file"),
    (["-l", "x", "--device", "gpu"], "error: Invalid value for '--device'"),
    (["-l", "x", "--format", "xml"], "error: Invalid value for '-f' / '--format'"),
])
def test_classify_usage_errors_exit_2(images, model, args, message):
    result = invoke("classify", "a.png", *args, "-m", model)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(message), lines
    assert lines[1].startswith("hint: ") and len(lines) == 2


def test_classify_without_images_is_a_usage_error():
    result = invoke("classify", "-l", "cat")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Missing argument 'IMAGES...'")


def test_labels_and_images_cannot_both_come_from_stdin(images, model):
    result = invoke("classify", "-", "--labels-file", "-", "-m", model, input="a.png\n")
    assert result.exit_code == 2 and "stdin cannot hold both" in result.stderr


def test_classify_folder_recursive_and_stdin_list(images, model):
    (images / "sub").mkdir()
    write_image(images / "sub" / "d.png", 4)
    result = invoke("classify", ".", "-r", "-l", "x", "-m", model)
    assert result.exit_code == 3  # bad.jpg
    assert [r["image"] for r in jsonl(result.stdout)] == ["./a.png", "./b.jpg", "./bad.jpg", "./c.png", "./sub/d.png"]
    result = invoke("classify", "-", "-l", "x", "-m", model, input="c.png\r\n\nsub/d.png\n")
    assert result.exit_code == 0
    assert [r["image"] for r in jsonl(result.stdout)] == ["c.png", "sub/d.png"]


# --- errors that stop the run ------------------------------------------------------------------------------

def test_model_folder_without_config_is_one_line_error_exit_1(images, tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = invoke("classify", "a.png", "-l", "x", "-m", tmp_path / "empty-model")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and "config.json" in lines[0]
    assert lines[1].startswith("hint: ") and len(lines) == 2
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(images, tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = invoke("classify", "a.png", "-l", "x", "-m", tmp_path / "empty-model", "--debug")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-2].startswith("error: ")


def test_cuda_on_a_machine_without_it_is_an_error_not_a_cpu_run(images, model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("classify", "a.png", "-l", "x", "--device", "cuda", "-m", model)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --device cuda was asked for, but CUDA is not available")


def test_unexpected_exception_is_one_line_with_a_hint(images, model, monkeypatch):
    from altclip_cli.runtime import altclip as runtime

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(runtime, "load", boom)
    result = invoke("classify", "a.png", "-l", "x", "-m", model)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: unexpected ZeroDivisionError: boom",
        "hint: this is a bug in altclip: run again with --debug and report the traceback"]


# --- embed -----------------------------------------------------------------------------------------------

TEXTS = "a cat\n\n一只猫\r\nune voiture rouge\n"


def test_embed_text_file_rows_are_lines(tmp_path, model, ref, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("texts.txt").write_bytes(TEXTS.encode())
    result = invoke("embed", "--text", "texts.txt", "-o", "t.npy", "-m", model)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    array = np.load("t.npy")
    texts = ["a cat", "", "一只猫", "une voiture rouge"]
    assert array.shape == (4, ref.embed_dim) and array.dtype == np.float32
    np.testing.assert_allclose(array, ref.encode_texts(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)
    assert jsonl(Path("t.jsonl").read_text(encoding="utf-8")) == [{"row": i, "text": t} for i, t in enumerate(texts)]
    assert "wrote 4 rows to t.npy" in result.stderr


def test_embed_text_from_stdin_to_stdout_jsonl(model, ref):
    result = invoke("embed", "--text", "-", "-m", model, input="un chat\n猫\n")
    assert result.exit_code == 0
    records = jsonl(result.stdout)
    assert [list(r) for r in records] == [["row", "text", "embedding"]] * 2
    assert [(r["row"], r["text"]) for r in records] == [(0, "un chat"), (1, "猫")]
    np.testing.assert_allclose(np.array([r["embedding"] for r in records], dtype=np.float32),
                               ref.encode_texts(["un chat", "猫"]), atol=1e-6)


def test_embed_non_utf8_text_names_the_line(tmp_path, model):
    (tmp_path / "t.txt").write_bytes(b"fine\ncaf\xe9\n")
    result = invoke("embed", "--text", tmp_path / "t.txt", "-m", model)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"error: {tmp_path / 't.txt'} line 2: not valid UTF-8 (byte 0xe9 at column 4)"


def test_embed_images_with_failures_sidecar_lines_up(images, model, ref):
    result = invoke("embed", "--image", "a.png", "bad.jpg", "c.png", "missing.png", "-o", "out/x.npy", "-m", model)
    assert result.exit_code == 1 and "does not exist" in result.stderr  # the folder must exist
    os.mkdir("out")
    result = invoke("embed", "--image", "a.png", "bad.jpg", "c.png", "missing.png", "-o", "out/x.npy", "-m", model)
    assert result.exit_code == 3
    array = np.load("out/x.npy")
    np.testing.assert_allclose(array, ref.encode_images(opened("a.png", "c.png")), atol=1e-5)
    assert jsonl(Path("out/x.jsonl").read_text()) == [
        {"row": 0, "image": "a.png"},
        {"row": None, "image": "bad.jpg", "error": "not an image, or in a format Pillow cannot read"},
        {"row": 1, "image": "c.png"},
        {"row": None, "image": "missing.png", "error": "no such file"},
    ]
    assert sorted(os.listdir("out")) == ["x.jsonl", "x.manifest.json", "x.npy"]


def test_embed_float16_no_normalize(images, model, ref):
    result = invoke("embed", "a.png", "b.jpg", "-o", "h.npy", "--dtype", "float16", "--no-normalize", "-m", model)
    assert result.exit_code == 0
    array = np.load("h.npy")
    assert array.dtype == np.float16
    expected = ref.encode_images(opened("a.png", "b.jpg"), normalize=False)
    np.testing.assert_allclose(array.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1.0)


def test_embed_images_to_stdout(images, model):
    result = invoke("embed", "--image", "a.png", "bad.jpg", "-m", model)
    assert result.exit_code == 3
    records = jsonl(result.stdout)
    assert list(records[0]) == ["row", "image", "embedding"] and records[0]["row"] == 0
    assert len(records[0]["embedding"]) == 16
    assert records[1] == {"row": None, "image": "bad.jpg", "error": "not an image, or in a format Pillow cannot read"}


def test_embed_zero_inputs_writes_an_empty_array(images, model):
    result = invoke("embed", "--image", "-", "-o", "e.npy", "-m", model, input="\n")
    assert result.exit_code == 0
    assert np.load("e.npy").shape == (0, 16)
    assert Path("e.jsonl").read_text() == ""


@pytest.mark.parametrize("args, message", [
    ([], "error: nothing to embed"),
    (["--image"], "error: --image needs IMAGES"),
    (["--text", "t.txt", "a.png"], "error: give either --text FILE or --image IMAGES, not both"),
    (["--text", "t.txt", "--resume"], "error: --resume needs -o OUT.npy"),
    (["--text", "t.txt", "-o", "-"], "error: -o - is not supported"),
    (["--text", "t.txt", "--dtype", "int8"], "error: Invalid value for '--dtype'"),
])
def test_embed_usage_errors(args, message):
    result = invoke("embed", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message), result.stderr


def test_embed_resume_after_an_interruption_equals_a_clean_run(images, model):
    for i in range(7):
        write_image(images / f"p{i}.png", 10 + i)
    args = ["embed", "--image", "p0.png", "bad.jpg", "p1.png", "p2.png", "p3.png", "p4.png", "p5.png", "p6.png",
            "-b", "2", "--checkpoint-every", "3", "-m", model]
    clean = invoke(*args, "-o", "clean.npy")
    assert clean.exit_code == 3

    # batches are spans of 2 inputs, failed ones included: [p0 bad] [p1 p2] [p3 p4] ...
    with interrupted_after(4):
        stopped = invoke(*args, "-o", "x.npy")
    assert stopped.exit_code == 130
    assert "interrupted after 4 of 8 inputs; x.npy was not written" in stopped.stderr
    assert "hint: run the same command with --resume to continue from input 5" in stopped.stderr
    assert sorted(p for p in os.listdir() if p.startswith("x.")) == [
        "x.jsonl.part", "x.npy.checkpoint.json", "x.npy.part"]

    changed = invoke(*args[:-2], "-m", model, "--no-normalize", "-o", "x.npy", "--resume")
    assert changed.exit_code == 1 and "cannot resume" in changed.stderr

    resumed = invoke(*args, "-o", "x.npy", "--resume")
    assert resumed.exit_code == 3  # bad.jpg, from the first part, still counts
    assert "resuming after 4 of 8 inputs" in resumed.stderr
    assert np.array_equal(np.load("x.npy"), np.load("clean.npy"))
    assert Path("x.jsonl").read_text() == Path("clean.jsonl").read_text()
    assert sorted(p for p in os.listdir() if p.startswith("x.")) == ["x.jsonl", "x.manifest.json", "x.npy"]


def test_embed_without_resume_discards_a_partial_run(images, model):
    args = ["embed", "a.png", "b.jpg", "c.png", "-b", "1", "-m", model, "-o", "x.npy"]
    with interrupted_after(1):
        assert invoke(*args).exit_code == 130
    result = invoke(*args)
    assert result.exit_code == 0
    assert "warning: discarding the partial output of an interrupted run" in result.stderr
    assert np.load("x.npy").shape == (3, 16)


# --- info, models, download --------------------------------------------------------------------------------

def test_info_json(tmp_path):
    result = invoke("info", "--json", "--device", "cpu", "--precision", "fp32",
                    env={"HF_HOME": str(tmp_path / "hf"), "ALTCLIP_HOME": str(tmp_path / "ac")})
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["version"] == __version__
    assert (data["device"], data["device_reason"], data["precision"]) == ("cpu", "asked for", "fp32")
    assert data["altclip_home"] == str(tmp_path / "ac")
    assert set(data["libraries"]) >= {"torch", "numpy", "pillow", "tokenizers", "safetensors", "huggingface_hub"}
    text = invoke("info", "--device", "cpu")
    assert text.exit_code == 0 and text.stdout.startswith(f"altclip {__version__} ")
    assert "\ndevice: cpu (asked for)\n" in text.stdout


def test_models_lists_the_known_models():
    result = invoke("models", "--json")
    assert result.exit_code == 0
    rows = jsonl(result.stdout)
    assert [r["id"] for r in rows[:3]] == ["BAAI/AltCLIP", "BAAI/AltCLIP-m9", "BAAI/AltCLIP-m18"]
    assert set(rows[0]) == {"id", "languages", "download_gb", "cached", "cached_bytes", "folder", "description"}


def test_offline_and_not_cached_is_a_clear_error(images, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "ALTCLIP_HOME": str(tmp_path / "ac")}
    proc = subprocess.run(_altclip_cmd() + ["classify", "a.png", "-l", "x", "-m", "BAAI/AltCLIP"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **SAFE_ENV, **env})
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: ") and "BAAI/AltCLIP" in lines[0]
    assert lines[1].startswith("hint: ") and "altclip download" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_download_from_a_local_fake_hub_then_use_it_offline(images, tmp_path, model):
    from hubserver import FakeHub

    root = tmp_path / "hubroot"
    (root / "tiny").mkdir(parents=True)
    import shutil

    shutil.copytree(model, root / "tiny" / "altclip")
    env = {**os.environ, **SAFE_ENV, "HF_HOME": str(tmp_path / "hf"), "ALTCLIP_HOME": str(tmp_path / "ac")}
    env.pop("HF_HUB_OFFLINE")
    with FakeHub(root) as hub:
        env["HF_ENDPOINT"] = hub.url
        proc = subprocess.run(_altclip_cmd() + ["download", "tiny/altclip", "-q"], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        folder = Path(proc.stdout.strip())
        assert (folder / "config.json").is_file() and "snapshots" in folder.parts
        assert "model.safetensors" in hub.fetched()
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(_altclip_cmd() + ["classify", "a.png", "-l", "x", "-m", "tiny/altclip"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image"] == "a.png"
    proc = subprocess.run(_altclip_cmd() + ["models", "--json"], capture_output=True, text=True, timeout=120, env=env)
    rows = {r["id"]: r for r in jsonl(proc.stdout)}
    assert rows["tiny/altclip"]["cached"] is True


# --- real processes: pipelines and signals -------------------------------------------------------------------

def test_pipeline_paths_on_stdin_to_npy(images, model):
    proc = subprocess.run(f"printf 'a.png\\nb.jpg\\n' | {' '.join(_altclip_cmd())} embed --image - -o x.npy -m {model}",
                          shell=True, capture_output=True, text=True, timeout=300, env={**os.environ, **SAFE_ENV})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    array = np.load("x.npy")
    sidecar = jsonl(Path("x.jsonl").read_text())
    assert array.shape == (2, 16)
    assert sidecar == [{"row": 0, "image": "a.png"}, {"row": 1, "image": "b.jpg"}]


def test_pipeline_classify_jsonl_through_a_pipe(images, model):
    proc = subprocess.run(_altclip_cmd() + ["classify", "a.png", "b.jpg", "-l", "猫", "-l", "dog", "-m", str(model)],
                          capture_output=True, timeout=300, env={**os.environ, **SAFE_ENV})
    assert proc.returncode == 0
    records = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert [r["image"] for r in records] == ["a.png", "b.jpg"]
    assert "猫" in proc.stdout.decode("utf-8")  # not \\u-escaped


@contextmanager
def held_image(data: bytes):
    """(the URL of an image on 127.0.0.1 that is answered only once `release` is set, release):
    a decoder that fetches it waits, as on a read that does not return."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            release.wait()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/held.png", release
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_run_leaves_no_torn_output_and_resume_finishes(images, model, sig, code):
    """An input whose read does not return blocks the run part-way; the signal arrives while it waits."""
    import signal

    names = []
    for i in range(6):
        names.append(f"p{i}.png")
        write_image(images / names[-1], 20 + i)
    with held_image(write_image(images / "held.png", 99).read_bytes()) as (url, release):
        names.insert(4, url)
        cmd = _altclip_cmd() + ["embed", "--image", *names, "-b", "2", "-o", "x.npy", "-m", str(model)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **SAFE_ENV})
        deadline = time.time() + 120
        while not Path("x.npy.part").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(getattr(signal, sig))  # the decoding thread waits on the URL; the run must still end cleanly
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert not Path("x.npy").exists() and not Path("x.jsonl").exists()
        assert "--resume" in err
        done = json.loads(Path("x.npy.checkpoint.json").read_text())["inputs"]
        assert 0 < done <= 4

        release.set()
        resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, **SAFE_ENV})
        assert resumed.returncode == 0, resumed.stderr
        clean = subprocess.run(cmd[:-4] + ["-o", "clean.npy", "-m", str(model)], capture_output=True, text=True,
                               timeout=300, env={**os.environ, **SAFE_ENV})
    assert clean.returncode == 0, clean.stderr
    assert np.array_equal(np.load("x.npy"), np.load("clean.npy"))
    assert Path("x.jsonl").read_text() == Path("clean.jsonl").read_text()


# --- completions and colour ------------------------------------------------------------------------------------

def test_completion_scripts_are_current():
    from altclip_cli.cli.completions import FILES, script

    folder = Path(__file__).parent.parent / "completions"
    for name, shell in FILES.items():
        assert (folder / name).read_text(encoding="utf-8") == script(shell), (
            f"completions/{name} is stale: run python -m altclip_cli.cli.completions completions/")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_no_color_is_respected_on_a_terminal(monkeypatch):
    from altclip_cli.cli.messages import Messages

    monkeypatch.delenv("NO_COLOR", raising=False)
    stream = _Tty()
    Messages(stream=stream).error("boom", hint="do this")
    assert "\x1b[" in stream.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    stream = _Tty()
    Messages(stream=stream).error("boom", hint="do this")
    assert stream.getvalue() == "error: boom\nhint: do this\n"


def test_table_is_the_default_on_a_terminal(images, model, monkeypatch):
    from altclip_cli.cli import terminal

    monkeypatch.setattr(terminal, "isatty", lambda stream: True)
    result = invoke("classify", "a.png", "-l", "猫", "-l", "dog", "-m", model)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].strip() == "a.png" and lines[1].split() == ["label", "prob"]
    assert "█" in result.stdout


def test_models_table_on_a_terminal(monkeypatch):
    from altclip_cli.cli import terminal

    monkeypatch.setattr(terminal, "isatty", lambda stream: True)
    result = invoke("models")
    assert result.exit_code == 0
    assert result.stdout.split()[:5] == ["model", "languages", "download", "cached", "description"]
    assert "BAAI/AltCLIP-m18" in result.stdout


def test_debug_before_the_command(images, tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = invoke("--debug", "classify", "a.png", "-l", "x", "-m", tmp_path / "empty-model")
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "altclip_cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"altclip {__version__}\n")


def test_interrupt_before_the_model_is_loaded_keeps_the_earlier_partial_run(images, model, monkeypatch):
    args = ["embed", "a.png", "b.jpg", "c.png", "-b", "1", "-m", model, "-o", "x.npy"]
    with interrupted_after(1):
        assert invoke(*args).exit_code == 130
    before = sorted(os.listdir())
    from altclip_cli.runtime import altclip as runtime

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runtime, "load", interrupted)
        result = invoke(*args, "--resume")
    assert result.exit_code == 130
    assert "error: interrupted; x.npy was not written" in result.stderr
    assert sorted(os.listdir()) == before
    result = invoke(*args, "--resume")
    assert result.exit_code == 0 and "resuming after 1 of 3 inputs" in result.stderr
    assert np.load("x.npy").shape == (3, 16)
