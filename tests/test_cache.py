"""altclip's own caches: what invalidates them (tokenizer, config, version, replaced weights),
concurrent writers, damaged entries, and `altclip cache` / `altclip cache clear`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import altclip_cli
import altclip_cli.version
from altclip_cli.cache import inventory
from altclip_cli.cache import weights as weight_cache
from altclip_cli.cache.identity import FORMAT
from altclip_cli.cli import cli
from altclip_cli.cli.commands.cache import human_size
from altclip_cli.paths import altclip_home, converted_dir

SAFE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1", "COLUMNS": "200"}
LABELS = ["cat", "a photo of the dog", "猫"]
DAY = 86400


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={**SAFE_ENV, **(env or {})}, catch_exceptions=False)


def load(folder: Path, **kwargs):
    return altclip_cli.load(str(folder), device="cpu", precision="bf16", **kwargs)


def spy_text_tower(monkeypatch, model) -> list:
    """The batches of texts the model's text tower is asked to encode."""
    calls = []
    real = model.encode_texts
    monkeypatch.setattr(model, "encode_texts", lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw))
    return calls


@pytest.fixture
def altclip_log(monkeypatch, caplog):
    """The library's warnings, whether or not an earlier CLI test stopped their propagation."""
    monkeypatch.setattr(logging.getLogger("altclip"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="altclip")
    return caplog


def aged(path: Path, days: float) -> Path:
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return path


def weight_entries(source: Path) -> list[Path]:
    """The weight-cache entries made from `source`."""
    want = [str(source.resolve())]
    return [d for d in weight_cache.weights_root().iterdir()
            if (weight_cache.read_meta(d) or {}).get("sources") == want]


def replace_weights_keeping_size_and_mtime(weights: Path, seed: int = 1) -> None:
    """What `cp -p other.safetensors model.safetensors` does with a fine-tune of the same shapes:
    other bytes, the same size and mtime."""
    before = weights.stat()
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v
               for k, v in load_file(weights).items()}
    other = weights.with_name("other.safetensors")
    save_file(tensors, str(other))
    shutil.copyfile(other, weights)  # into the same file, as cp does
    other.unlink()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# --- the label cache's key -----------------------------------------------------------------------------


def test_a_changed_tokenizer_json_does_not_serve_old_label_embeddings(tiny_model_dir, monkeypatch):
    first = load(tiny_model_dir).label_embeddings(LABELS)
    again = load(tiny_model_dir)
    calls = spy_text_tower(monkeypatch, again)
    np.testing.assert_array_equal(again.label_embeddings(LABELS), first)
    assert calls == []  # unchanged files: served from the cache

    # "▁cat" all but forbidden: "cat" becomes other token ids, so other embeddings.
    path = tiny_model_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    for piece in tokenizer["model"]["vocab"]:
        if piece[0] == "▁cat":
            piece[1] = -1000.0
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    changed = load(tiny_model_dir)
    calls = spy_text_tower(monkeypatch, changed)
    got = changed.label_embeddings(LABELS)
    assert calls == [LABELS]  # every label computed anew
    np.testing.assert_array_equal(got, load(tiny_model_dir, use_cache=False).label_embeddings(LABELS))
    assert not np.allclose(got[0], first[0], atol=1e-3)


@pytest.mark.parametrize("change", ["tokenizer.json rewritten", "config.json rewritten", "altclip version"])
def test_label_cache_key_covers_tokenizer_config_and_version(tiny_model_dir, monkeypatch, change):
    load(tiny_model_dir).label_embeddings(LABELS)
    if change == "altclip version":
        monkeypatch.setattr(altclip_cli.version, "__version__", altclip_cli.__version__ + ".post1")
    else:  # the same content, spelt differently: the file's identity changes
        path = tiny_model_dir / change.split()[0]
        path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=1), encoding="utf-8")
    model = load(tiny_model_dir)
    calls = spy_text_tower(monkeypatch, model)
    model.label_embeddings(LABELS)
    assert calls == [LABELS]


# --- the weight cache ---------------------------------------------------------------------------------------


def test_weights_replaced_with_same_size_and_mtime_are_read_anew(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    texts = ["a photo of the cat", "猫"]
    old = load(tiny_model_dir).encode_texts(texts)
    replace_weights_keeping_size_and_mtime(weights)
    new = load(tiny_model_dir).encode_texts(texts)
    np.testing.assert_array_equal(new, load(tiny_model_dir, use_cache=False).encode_texts(texts))
    assert not np.allclose(new, old, atol=1e-3)
    # The entry of the old content is superseded: one entry for the file.
    assert len(weight_entries(weights)) == 1
    assert len(list(weight_cache.weights_root().iterdir())) == 1
    np.testing.assert_array_equal(load(tiny_model_dir).encode_texts(texts), new)  # and it is the new one


def test_a_superseded_entry_locked_by_another_writer_is_left_alone(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    load(tiny_model_dir)
    [old] = weight_entries(weights)
    replace_weights_keeping_size_and_mtime(weights)
    with FileLock(str(old / ".lock")):  # another process writing it
        load(tiny_model_dir)
        assert old.is_dir() and len(weight_entries(weights)) == 2
    replace_weights_keeping_size_and_mtime(weights, seed=2)
    load(tiny_model_dir)  # its lock is free now: both earlier versions go
    assert not old.exists() and len(weight_entries(weights)) == 1


def test_a_live_writers_temporary_file_is_left_until_the_lock_is_free(tiny_model_dir, monkeypatch):
    weights = tiny_model_dir / "model.safetensors"
    target = weight_cache.compute_weights_path(weight_cache.weights_identity([weights]), "bf16")
    target.parent.mkdir(parents=True)
    theirs = target.with_name(f".{target.name}.424242.tmp")  # another process's, half written
    theirs.write_bytes(b"half written")
    reached = threading.Event()
    real = weight_cache.save_compute_weights
    monkeypatch.setattr(weight_cache, "save_compute_weights", lambda *a: (reached.set(), real(*a)))
    loaded = {}
    with FileLock(str(target.parent / ".lock")):  # ... which holds the entry's lock
        thread = threading.Thread(target=lambda: loaded.update(model=load(tiny_model_dir)), daemon=True)
        thread.start()
        assert reached.wait(120)
        time.sleep(0.5)  # ample for a writer that does not wait for the lock
        assert theirs.read_bytes() == b"half written"
        assert not target.exists()
    thread.join(120)
    assert "model" in loaded and target.is_file()
    assert not theirs.exists()  # with the lock its own, the writer clears a killed writer's leftovers


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong keys", "empty"])
def test_a_damaged_weight_cache_entry_is_rebuilt_with_a_warning(tiny_model_dir, damage, altclip_log):
    texts = ["a photo of the cat"]
    want = load(tiny_model_dir).encode_texts(texts)
    [entry] = weight_entries(tiny_model_dir / "model.safetensors")
    path = entry / "model-bf16.safetensors"
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(len(good)))
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "wrong keys":
        save_file({"text_model.something.else": torch.zeros(3, dtype=torch.bfloat16)}, str(path))
    else:
        path.write_bytes(b"")
    altclip_log.clear()
    np.testing.assert_array_equal(load(tiny_model_dir).encode_texts(texts), want)
    assert [r.levelname for r in altclip_log.records] == ["WARNING"]
    assert "rebuilding the damaged weight cache" in altclip_log.records[0].getMessage()
    with safe_open(str(path), framework="pt") as f:  # written again, whole
        assert len(list(f.keys())) > 1
    assert weight_entries(tiny_model_dir / "model.safetensors") == [entry]


def test_an_older_format_entry_does_not_stop_a_load_and_is_listed_as_unknown(tiny_model_dir):
    older = weight_cache.weights_root() / ("0" * 32)  # another FORMAT's identity, no meta.json
    older.mkdir(parents=True)
    (older / "model-bf16.safetensors").write_bytes(b"\0" * 100)
    load(tiny_model_dir)
    listed = {e.path: e for e in inventory.entries()}
    assert listed[older].name == "unknown (older format)" and listed[older].sources is None
    assert listed[weight_entries(tiny_model_dir / "model.safetensors")[0]].precisions == ["bf16"]


def test_meta_json_is_written_before_the_weights(tiny_model_dir, monkeypatch):
    """A weights file without meta.json can then only be an older altclip's."""
    from altclip_cli.nn import checkpoint

    seen = []
    real = checkpoint.save_safetensors
    monkeypatch.setattr(checkpoint, "save_safetensors",
                        lambda tensors, path: seen.append(weight_cache.read_meta(path.parent)) or real(tensors, path))
    load(tiny_model_dir)
    assert seen and seen[0] is not None, "the weights went in before meta.json"
    assert seen[0]["sources"] == [str((tiny_model_dir / "model.safetensors").resolve())]
    assert seen[0]["format"] == FORMAT


# --- altclip cache ------------------------------------------------------------------------------------------


def fake_weights(name: str, sources: list[str] | None, days: float, size: int = 1000) -> Path:
    entry = weight_cache.weights_root() / name
    entry.mkdir(parents=True)
    (entry / "model-bf16.safetensors").write_bytes(b"\0" * size)
    if sources is not None:
        (entry / "meta.json").write_text(json.dumps({"format": FORMAT, "sources": sources, "created": 0}))
        (entry / ".last-used").touch()
        aged(entry / ".last-used", days)
    else:
        aged(entry / "model-bf16.safetensors", days)
    return entry


def fake_converted(model_id: str, commit: str, days: float, size: int = 2000) -> Path:
    folder = converted_dir() / model_id.replace("/", "--") / commit
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\1" * size)
    aged(folder / "model.safetensors", days)
    return folder


def fake_labels(rows: int, days: float) -> Path:
    from altclip_cli.cache.labels import LabelCache, labels_path

    LabelCache("k", "bf16").put({f"label {i}": np.ones(16, np.float32) for i in range(rows)}, [])
    return aged(labels_path(), days)


def tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def kept(tmp_path):
    """One entry of each kind, old and new: {name: path}."""
    return {
        "new weights": fake_weights("a" * 32, ["/models/ft/model.safetensors"], days=0.1),
        "old weights": fake_weights("b" * 32, ["/models/base/model.safetensors"], days=40),
        "older format": fake_weights("c" * 32, None, days=400),
        "new converted": fake_converted("BAAI/AltCLIP", "1" * 40, days=0.5),
        "old converted": fake_converted("BAAI/AltCLIP-m18", "2" * 40, days=3),
        "labels": fake_labels(5, days=0.2),
    }


def test_cache_lists_every_entry_with_its_size_as_json_lines(kept, tiny_model_dir):
    load(tiny_model_dir).label_embeddings(LABELS)
    hf_file = Path(os.environ["HF_HOME"]) / "hub" / "models--x--y" / "blob"
    hf_file.parent.mkdir(parents=True)
    hf_file.write_bytes(b"\0" * 12345)
    result = invoke("cache")  # not a terminal: JSON lines, as with --json
    assert result.exit_code == 0 and result.stderr == ""
    assert invoke("cache", "--json").stdout == invoke("cache", "list", "--json").stdout == result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines()]
    *rows, total = records
    by_path = {r["path"]: r for r in rows}
    [real] = weight_entries(tiny_model_dir / "model.safetensors")
    assert set(by_path) == {str(p) for p in kept.values()} | {str(real)}
    for row in rows:
        path = Path(row["path"])
        assert row["bytes"] == (path.stat().st_size if row["kind"] == "labels" else tree_size(path))
        assert row["bytes"] > 0 and row["last_used"].endswith("Z")
    assert by_path[str(real)]["sources"] == [str((tiny_model_dir / "model.safetensors").resolve())]
    assert by_path[str(real)]["precisions"] == ["bf16"]
    assert by_path[str(kept["older format"])]["name"] == "unknown (older format)"
    assert by_path[str(kept["older format"])]["sources"] is None
    assert by_path[str(kept["old converted"])] == {
        "kind": "converted", "name": f"BAAI/AltCLIP-m18@{'2' * 40}", "path": str(kept["old converted"]),
        "bytes": 2000, "last_used": by_path[str(kept["old converted"])]["last_used"],
        "model": "BAAI/AltCLIP-m18", "commit": "2" * 40}
    assert by_path[str(kept["labels"])]["rows"] == 5 + len(LABELS)
    assert [r["kind"] for r in rows] == ["weights"] * 4 + ["converted"] * 2 + ["labels"]
    assert total == {"kind": "total", "entries": 7, "bytes": sum(r["bytes"] for r in rows),
                     "altclip_home": str(altclip_home()), "hf_cache": total["hf_cache"]}
    # huggingface_hub reads HF_HOME once per process: a fresh one shows where the hub cache is.
    proc = subprocess.run([sys.executable, "-m", "altclip_cli", "cache", "--json"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **SAFE_ENV})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["hf_cache"] == str(Path(os.environ["HF_HOME"]) / "hub")
    assert hf_file.read_bytes() == b"\0" * 12345  # shown, not counted or touched


def test_cache_on_a_terminal_is_a_table(kept, monkeypatch):
    monkeypatch.setattr("altclip_cli.cli.terminal.isatty", lambda stream: True)
    result = invoke("cache")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "what", "size", "last", "used"]
    assert lines[1].split() == ["weights", "/models/ft/model.safetensors", "bf16",
                                *human_size(tree_size(kept["new weights"])).split(), "2", "hours", "ago"]
    assert "unknown (older format)" in lines[3] and "400 days ago" in lines[3]
    assert lines[6].split()[:4] == ["labels", "label", "embeddings", "5"]
    total = sum(tree_size(p) for p in kept.values() if p.is_dir()) + kept["labels"].stat().st_size
    assert f"total: 6 entries, {human_size(total)} in {altclip_home()}" in result.stdout
    assert "`hf cache` manages it" in result.stdout


def test_an_empty_cache_lists_only_the_total():
    result = invoke("cache", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["entries"] == 0


# --- altclip cache clear ------------------------------------------------------------------------------------


def test_clear_older_than_removes_old_entries_and_keeps_fresh_ones(kept):
    hf_file = Path(os.environ["HF_HOME"]) / "hub" / "models--x--y" / "blob"
    hf_file.parent.mkdir(parents=True)
    hf_file.write_bytes(b"hub")
    gone = ("old weights", "older format", "old converted")
    freed = sum(tree_size(kept[name]) for name in gone)
    result = invoke("cache", "clear", "--older-than", "1d")
    assert (result.exit_code, result.stdout) == (0, "")
    assert result.stderr == f"removed 3 entries (2 weights, 1 converted), freed {human_size(freed)}\n"
    assert {name for name, path in kept.items() if not path.exists()} == set(gone)
    assert not (converted_dir() / "BAAI--AltCLIP-m18").exists()  # the model's folder went with its last commit
    assert hf_file.read_bytes() == b"hub"  # the Hugging Face cache is never touched
    assert invoke("cache", "clear", "--older-than", "1d").stderr == "nothing to remove (nothing unused for 1d)\n"


def test_clear_without_older_than_removes_every_entry_of_the_kinds_asked(kept):
    result = invoke("cache", "clear", "--converted", "--labels")
    assert result.exit_code == 0
    assert result.stderr.startswith("removed 3 entries (2 converted, 1 labels), freed ")
    assert not kept["new converted"].exists() and not kept["old converted"].exists()
    assert all(kept[name].exists() for name in ("new weights", "old weights", "older format"))
    from altclip_cli.cache.labels import count_rows

    assert count_rows(kept["labels"]) == 0  # emptied in place
    result = invoke("cache", "clear")
    assert result.stderr.startswith("removed 3 entries (3 weights), freed ")
    assert [json.loads(line)["kind"] for line in invoke("cache").stdout.splitlines()] == ["labels", "total"]


def test_clear_dry_run_removes_nothing(kept):
    before = sorted(p for p in altclip_home().rglob("*"))
    result = invoke("cache", "clear", "--older-than", "2d", "--dry-run")
    assert (result.exit_code, result.stdout) == (0, "")
    lines = result.stderr.splitlines()
    sizes = {name: tree_size(kept[name]) for name in ("old weights", "older format", "old converted")}
    assert lines == [f"would remove weights: /models/base/model.safetensors ({human_size(sizes['old weights'])})",
                     "would remove weights: unknown (older format) (1000 B)",
                     f"would remove converted: BAAI/AltCLIP-m18@{'2' * 40} (2.0 KB)",
                     f"would remove 3 entries (2 weights, 1 converted), freeing {human_size(sum(sizes.values()))}"]
    assert sorted(p for p in altclip_home().rglob("*")) == before
    assert invoke("cache", "clear", "-n", "-q").stderr == ""


@pytest.mark.parametrize("duration", ["3x", "12", "-1d", "d", "1d 2", ""])
def test_clear_with_a_bad_duration_is_a_usage_error(kept, duration):
    result = invoke("cache", "clear", "--older-than", duration)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (f"error: --older-than: {duration!r} is not a duration\n"
                             "hint: give a number and a unit (s, m, h, d, w): 90m, 12h, 30d, 2w\n")
    assert all(path.exists() for path in kept.values())


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("12h", 43200), ("30d", 30 * DAY), ("2w", 14 * DAY),
                                           ("1d12h", 1.5 * DAY), ("45s", 45), ("0.5h", 1800), (" 1D ", DAY)])
def test_parse_duration(text, seconds):
    assert inventory.parse_duration(text) == seconds


def test_clear_skips_an_entry_another_process_holds_the_lock_of(kept):
    with FileLock(str(kept["old weights"] / ".lock")), FileLock(str(kept["old converted"] / "model.safetensors.lock")):
        result = invoke("cache", "clear", "--older-than", "1d")
        assert result.exit_code == 0
        assert result.stderr.splitlines() == [
            "warning: skipped weights: /models/base/model.safetensors: another altclip process is using it",
            f"warning: skipped converted: BAAI/AltCLIP-m18@{'2' * 40}: another altclip process is using it",
            "removed 1 entry (1 weights), freed 1000 B"]
        assert kept["old weights"].is_dir() and kept["old converted"].is_dir()
        assert not kept["older format"].exists()
        dry = invoke("cache", "clear", "--older-than", "1d", "-n")
        assert "warning: skipped weights: /models/base/model.safetensors" in dry.stderr
    assert invoke("cache", "clear", "--older-than", "1d").stderr.startswith("removed 2 entries")


def test_clear_leaves_the_label_cache_while_another_process_writes_it(kept):
    writer = sqlite3.connect(kept["labels"], isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        result = invoke("cache", "clear", "--labels")
        assert result.stderr.splitlines() == [
            "warning: skipped labels: label embeddings: another altclip process is using it", "removed nothing"]
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert invoke("cache", "clear", "--labels").stderr.startswith("removed 1 entry (1 labels)")


def test_clear_that_fails_to_remove_an_entry_says_so_and_exits_1(kept, monkeypatch):
    def refuse(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(weight_cache.shutil, "rmtree", refuse)
    result = invoke("cache", "clear", "--weights", "--older-than", "30d")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: could not remove weights: /models/base/model.safetensors ([Errno 13] Permission denied: "
        f"'{kept['old weights']}')",
        f"error: could not remove weights: unknown (older format) ([Errno 13] Permission denied: "
        f"'{kept['older format']}')",
        "removed nothing"]


def test_cache_json_does_not_go_with_clear():
    result = invoke("cache", "--json", "clear")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --json lists entries")


def test_search_indexes_are_listed_and_removed_only_when_named(tiny_model_dir, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + i, 16), (40 * i, 90, 200)).save(photos / f"{i}.png")
    assert invoke("index", photos, "-m", tiny_model_dir).exit_code == 0
    [row] = [json.loads(line) for line in invoke("cache").stdout.splitlines() if '"indexes"' in line]
    folder = Path(row["path"])
    assert folder.parent == altclip_home() / "indexes" and (folder / "index.sqlite3").is_file()
    assert row["model"] == row["name"] == str(tiny_model_dir) and row["images"] == 3
    assert row["bytes"] == tree_size(folder) > 0

    assert invoke("cache", "clear").stderr.startswith("removed 1 entry (1 weights)")  # caches only
    assert folder.exists()
    with FileLock(str(folder / ".write.lock")):  # an `altclip index` run updating it
        result = invoke("cache", "clear", "--indexes")
        assert result.stderr.startswith(f"warning: skipped indexes: {tiny_model_dir}: another altclip process")
    assert invoke("cache", "clear", "--indexes", "--older-than", "1d").stderr == \
        "nothing to remove (nothing unused for 1d)\n"
    result = invoke("cache", "clear", "--indexes")
    assert result.exit_code == 0 and result.stderr.startswith("removed 1 entry (1 indexes), freed ")
    assert not folder.exists()
