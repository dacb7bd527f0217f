"""`altclip index` and its store: incremental updates that skip the model when nothing changed,
renames and duplicates without the model, failures recorded once, kill -9 at any point, one
writer at a time, consistent snapshots for readers, damaged and foreign indexes refused with a
way out, an index that moves with its folder, and classify/embed --index equal to runs without it."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from altclip_cli.paths import default_index_folder
from altclip_cli.search.database import SCHEMA_VERSION
from altclip_cli.search.store import HEADER_SIZE, INDEX_DB, VECTORS, IndexStore, IndexStoreError
from altclip_cli.search.update import UpdateSummary, index_identity, model_identity, update_index
from test_cli import SAFE_ENV, invoke, jsonl, write_image

FP32 = ["--precision", "fp32"]


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """cwd = tmp_path with photos/: a.png, b.jpg, sub/c.png, sub/deeper/d.png (random pixels)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    write_image(root / "a.png", 1)
    write_image(root / "b.jpg", 2)
    write_image(root / "sub" / "c.png", 3)
    write_image(root / "sub" / "deeper" / "d.png", 4)
    return root


@pytest.fixture
def tower(monkeypatch):
    """Counts the images that go through the image tower."""
    from altclip_cli.runtime.altclip import AltCLIP

    seen = []
    real = AltCLIP.encode_pixel_batch

    def spy(self, pixels):
        seen.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(AltCLIP, "encode_pixel_batch", spy)
    return seen


@pytest.fixture
def loads(monkeypatch):
    """Counts the model loads of the command line (load_model)."""
    import altclip_cli.cli.options as options

    calls = []
    real = options.load_model

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(options, "load_model", spy)
    return calls


def index(model, *args, env=None):
    return invoke("index", *args, "-m", model, *FP32, env=env)


def folder_of(model) -> Path:
    return default_index_folder(model_identity(str(model))["weights"])


def content(folder) -> dict[str, np.ndarray]:
    """{absolute path: vector} of every indexed file with a vector."""
    with IndexStore.open(folder) as store, store.snapshot() as snap:
        paths = snap.paths_of(snap.file_ids)
        return {p: np.array(snap.vectors[r]) for p, r in zip(paths, snap.rows)}


def rows(folder) -> dict[str, tuple]:
    """{stored path: (vec_row, error)} straight from the database."""
    db = sqlite3.connect(Path(folder) / INDEX_DB)
    try:
        return {p: (v, e) for p, v, e in db.execute("SELECT path, vec_row, error FROM files")}
    finally:
        db.close()


def check_invariants(folder) -> int:
    """No file row points past vectors_committed, and vectors.f32 holds at least that many rows."""
    folder = Path(folder)
    db = sqlite3.connect(folder / INDEX_DB)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        top = db.execute("SELECT MAX(vec_row) FROM files").fetchone()[0]
    finally:
        db.close()
    committed, dim = int(meta["vectors_committed"]), int(meta["dim"])
    assert top is None or top < committed
    assert (folder / VECTORS).stat().st_size >= HEADER_SIZE + committed * dim * 4
    return committed


def summary_line(result) -> str:
    return [line for line in result.stderr.splitlines() if line.startswith("indexed ")][0]


# --- incremental updates ------------------------------------------------------------------------------


def test_first_run_indexes_everything_and_a_second_run_loads_no_model(photos, model, tower, loads):
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert summary_line(result).startswith("indexed photos: 4 added (4 files, ")
    assert sum(tower) == 4 and len(loads) == 1
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith("indexed photos: no changes (4 files, ")
    assert sum(tower) == 4 and len(loads) == 1  # no model, no image tower
    assert sorted(content(folder_of(model))) == sorted(str(p) for p in photos.rglob("*.*g"))


def test_an_unchanged_tree_writes_nothing(photos, model, monkeypatch):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    files = [folder / name for name in (INDEX_DB, INDEX_DB + "-wal", VECTORS) if (folder / name).exists()]
    before = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    for method in ("append_vectors", "commit"):
        monkeypatch.setattr(IndexStore, method, lambda *a, **k: pytest.fail("the index was written"))
    with IndexStore.open(folder, write=True) as store:
        summary = update_index(lambda: pytest.fail("the model was loaded"), store, [photos])
    assert (summary.unchanged, summary.changed, summary.files) == (4, False, 4)
    assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in files] == before


def test_a_touched_file_is_embedded_again_and_a_deleted_one_removed(photos, model, tower):
    assert index(model, "photos").exit_code == 0
    st = (photos / "a.png").stat()
    os.utime(photos / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (photos / "sub" / "c.png").unlink()
    tower.clear()
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith("indexed photos: 1 updated, 1 removed (3 files, ")
    assert sum(tower) == 1
    indexed = content(folder_of(model))
    assert str(photos / "sub" / "c.png") not in indexed and len(indexed) == 3
    with IndexStore.open(folder_of(model)) as store, store.snapshot(photos / "sub") as snap:
        assert snap.paths_of(snap.file_ids) == [str(photos / "sub" / "deeper" / "d.png")]


def test_renamed_and_copied_files_reuse_their_vectors_without_the_model(photos, model, tower):
    assert index(model, "photos").exit_code == 0
    before = content(folder_of(model))
    (photos / "a.png").rename(photos / "sub" / "moved.png")
    shutil.copy(photos / "b.jpg", photos / "copy of b.jpg")
    shutil.copy(photos / "sub" / "c.png", photos / "c1.png")  # two new copies of one file
    shutil.copy(photos / "sub" / "c.png", photos / "c2.png")
    with IndexStore.open(folder_of(model), write=True) as store:
        summary = update_index(lambda: pytest.fail("the model was loaded"), store, [photos])
    assert (summary.renamed, summary.added, summary.removed, summary.reused, summary.embedded) == (1, 3, 0, 4, 0)
    after = content(folder_of(model))
    np.testing.assert_array_equal(after[str(photos / "sub" / "moved.png")], before[str(photos / "a.png")])
    np.testing.assert_array_equal(after[str(photos / "copy of b.jpg")], before[str(photos / "b.jpg")])
    np.testing.assert_array_equal(after[str(photos / "c2.png")], before[str(photos / "sub" / "c.png")])
    assert str(photos / "a.png") not in after and len(after) == 7


def test_new_duplicates_in_one_run_are_embedded_once(photos, model, tower):
    for i in range(3):
        shutil.copy(photos / "a.png", photos / f"a{i}.png")
    result = index(model, "photos", "-b", "1")
    assert result.exit_code == 0, result.stderr
    assert sum(tower) == 4  # a.png and its three copies: once; b, c, d
    stored = rows(folder_of(model))
    assert len({stored[str(photos / name)][0] for name in ("a.png", "a0.png", "a1.png", "a2.png")}) == 1


def test_hidden_files_and_folders_are_skipped_unless_asked(photos, model):
    (photos / ".hidden").mkdir()
    write_image(photos / ".hidden" / "h.png", 5)
    write_image(photos / ".dot.png", 6)
    assert index(model, "photos").exit_code == 0
    assert len(content(folder_of(model))) == 4
    result = index(model, "photos", "--include-hidden")
    assert summary_line(result).startswith("indexed photos: 2 added (6 files, ")
    result = index(model, "photos")  # the index follows the walk: they go again
    assert summary_line(result).startswith("indexed photos: 2 removed (4 files, ")


def test_excluded_folders(photos, model):
    for name in ("node_modules", "@eaDir", "keep"):
        (photos / name).mkdir()
        write_image(photos / name / "x.png", 7)
    assert index(model, "photos").exit_code == 0
    names = {Path(p).parent.name for p in content(folder_of(model))}
    assert "keep" in names and not names & {"node_modules", "@eaDir"}
    assert index(model, "photos", "--exclude-dir", "sub", "--exclude-dir", "keep").exit_code == 0
    names = {Path(p).parent.name for p in content(folder_of(model))}
    assert names == {"photos", "node_modules", "@eaDir"}  # the defaults are replaced


def test_a_bad_image_is_recorded_once_and_tried_again_only_when_it_changes(photos, model, tower):
    (photos / "bad.jpg").write_text("not an image")
    result = index(model, "photos")
    assert result.exit_code == 3
    assert "error: photos/bad.jpg: not an image, or in a format Pillow cannot read" in result.stderr.splitlines()
    assert summary_line(result).startswith("indexed photos: 4 added, 1 failed (5 files, ")
    assert rows(folder_of(model))[str(photos / "bad.jpg")] == (None, "not an image, or in a format Pillow cannot read")
    tower.clear()
    result = index(model, "photos")
    assert result.exit_code == 0 and "error:" not in result.stderr
    assert "1 image that failed before and did not change since were not tried again" in result.stderr
    assert summary_line(result).startswith("indexed photos: no changes (5 files, ")
    assert index(model, "photos", "--retry-failed").exit_code == 3
    write_image(photos / "bad.jpg", 8)  # fixed: a real image now
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith("indexed photos: 1 updated (5 files, ")
    assert rows(folder_of(model))[str(photos / "bad.jpg")][1] is None


def test_vectors_equal_the_runtime_encode_images(photos, model, loaded):
    from altclip_cli.inputs.images import open_image

    assert index(model, "photos").exit_code == 0
    indexed = content(folder_of(model))
    paths = sorted(indexed)
    expected = loaded.encode_images([open_image(p, draft_min_side=loaded.draft_min_side) for p in paths])
    np.testing.assert_allclose(np.stack([indexed[p] for p in paths]), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1, atol=1e-6)


def test_snapshot_under_a_folder_is_a_range_that_does_not_leak_to_siblings(photos, model):
    (photos / "sub2").mkdir()
    write_image(photos / "sub2" / "e.png", 9)
    write_image(photos / "sub.png", 10)  # sorts between "sub" and "sub/"
    assert index(model, "photos").exit_code == 0
    with IndexStore.open(folder_of(model)) as store:
        for under, expected in [(photos / "sub", {"sub/c.png", "sub/deeper/d.png"}),
                                (photos / "sub" / "c.png", {"sub/c.png"}), (photos / "sub2", {"sub2/e.png"}),
                                (photos, {"a.png", "b.jpg", "sub.png", "sub/c.png", "sub/deeper/d.png", "sub2/e.png"}),
                                (photos / "nothing", set())]:
            with store.snapshot(under) as snap:
                got = {os.path.relpath(p, photos) for p in snap.paths_of(snap.file_ids)}
                assert got == expected and snap.count == len(expected) == len(snap.rows)
                assert snap.rows.dtype == np.int64 and snap.vectors.shape[1] == store.dim


# --- crash safety ---------------------------------------------------------------------------------------


def _many_photos(root: Path, count: int, size=(64, 48)) -> None:
    root.mkdir()
    for i in range(count):
        folder = root / f"f{i % 3}"
        folder.mkdir(exist_ok=True)
        write_image(folder / f"img{i:03d}.png", 100 + i, size)


def _index_cmd(model, *args, quiet=True) -> list[str]:
    return [sys.executable, "-m", "altclip_cli", "index", "photos", "-m", str(model), *FP32, "-b", "1",
            "--commit-every", "4", *(["-q"] if quiet else []), *args]


def test_kill_9_at_random_points_of_a_real_index_run(tmp_path, model):
    """A clean run's index, against one whose runs were killed at random instants, each time
    checked and continued: the same paths with the same vectors (-b 1: bit for bit)."""
    os.chdir(tmp_path)
    _many_photos(tmp_path / "photos", 60, (640, 480))  # a few ms each to decode: room to land mid-run
    env = {**os.environ, **SAFE_ENV}
    clean = subprocess.run(_index_cmd(model, "--index", "clean"), env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    reference = content(tmp_path / "clean")
    assert len(reference) == 60
    rng = random.Random(7)
    partial_states = 0
    for trial in range(7):
        proc = subprocess.Popen(_index_cmd(model, "--index", "killed"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        done = _files_in(tmp_path / "killed")
        if trial == 0 or done >= 56:  # while it starts (loading the model, creating the index)
            time.sleep(rng.uniform(0.2, 1.0))
        else:  # once it has committed a random number of files, plus a random few milliseconds
            target = rng.randint(done + 1, min(done + 20, 56))
            deadline = time.monotonic() + 120
            while proc.poll() is None and _files_in(tmp_path / "killed") < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.01))
        proc.kill()
        proc.wait(timeout=60)
        if (tmp_path / "killed" / INDEX_DB).exists():
            check_invariants(tmp_path / "killed")
            partial_states += 0 < len(rows(tmp_path / "killed")) < 60
    assert partial_states >= 3  # the kills landed mid-run
    final = subprocess.run(_index_cmd(model, "--index", "killed"), env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    check_invariants(tmp_path / "killed")
    got = content(tmp_path / "killed")
    assert sorted(got) == sorted(reference)
    for path, vector in reference.items():
        np.testing.assert_array_equal(got[path], vector)


def _files_in(folder: Path) -> int:
    try:
        db = sqlite3.connect(folder / INDEX_DB)
        try:
            return db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


# The real command, SIGKILLed by itself just before or just after its k-th SQLite commit.
FAULT = textwrap.dedent("""
    import os, signal, sys
    from altclip_cli.search.store import IndexStore
    when, at = sys.argv[1], int(sys.argv[2])
    real, calls = IndexStore.commit, [0]

    def commit(self, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == at:  # the batch's vectors are appended and fsynced
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, **kwargs)
        if when == "after" and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    IndexStore.commit = commit
    from altclip_cli.cli import main
    main(sys.argv[3:])
""")


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_just_before_or_after_the_commit(tmp_path, model, when):
    os.chdir(tmp_path)
    _many_photos(tmp_path / "photos", 12)
    env = {**os.environ, **SAFE_ENV}
    args = _index_cmd(model, "--index", "idx")[3:]
    assert subprocess.run(_index_cmd(model, "--index", "clean"), env=env, timeout=300).returncode == 0
    proc = subprocess.run([sys.executable, "-c", FAULT, when, "2", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    committed = check_invariants(tmp_path / "idx")
    written = ((tmp_path / "idx" / VECTORS).stat().st_size - HEADER_SIZE) // (16 * 4)
    if when == "before":
        assert (committed, written) == (4, 8)  # the second batch is on disk, not committed
    else:
        assert (committed, written) == (8, 8)
    assert len(rows(tmp_path / "idx")) == committed
    IndexStore.open(tmp_path / "idx", write=True).close()  # a writer cuts what was never committed
    assert (tmp_path / "idx" / VECTORS).stat().st_size == HEADER_SIZE + committed * 16 * 4
    result = subprocess.run(_index_cmd(model, "--index", "idx"), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert check_invariants(tmp_path / "idx") == 12
    assert ((tmp_path / "idx" / VECTORS).stat().st_size - HEADER_SIZE) // 64 == 12  # the dropped rows were cut
    got, reference = content(tmp_path / "idx"), content(tmp_path / "clean")
    assert sorted(got) == sorted(reference)
    for path, vector in reference.items():
        np.testing.assert_array_equal(got[path], vector)


def test_sigterm_stops_a_real_run_with_143_and_keeps_its_work(tmp_path, model):
    os.chdir(tmp_path)
    _many_photos(tmp_path / "photos", 40, (640, 480))
    env = {**os.environ, **SAFE_ENV}
    proc = subprocess.Popen(_index_cmd(model, "--index", "idx"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _files_in(tmp_path / "idx") < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "hint: run the same command again to go on from there"
    done = check_invariants(tmp_path / "idx")
    assert 8 <= done < 40 and len(rows(tmp_path / "idx")) == done
    result = subprocess.run(_index_cmd(model, "--index", "idx", quiet=False), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert summary_line(result).startswith(f"indexed photos: {40 - done} added (40 files, ")


def test_ctrl_c_commits_what_is_done_and_exits_130(photos, model, monkeypatch):
    """Ctrl-C while the third image is in the model: the two before it are committed (with
    --commit-every 3 they were still pending), and the next run does the rest."""
    from altclip_cli.runtime.altclip import AltCLIP

    real, calls = AltCLIP.encode_pixel_batch, []

    def encode(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(AltCLIP, "encode_pixel_batch", encode)
    result = index(model, "photos", "-b", "1", "--commit-every", "3")
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-2:] == [
        "error: interrupted; the index keeps what was done (2 images indexed, 0 failed)",
        "hint: run the same command again to go on from there"]
    assert check_invariants(folder_of(model)) == 2
    monkeypatch.setattr(AltCLIP, "encode_pixel_batch", real)
    result = index(model, "photos")
    assert summary_line(result).startswith("indexed photos: 2 added (4 files, ")


# --- one writer, many readers ---------------------------------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    from altclip_cli.search.store import IndexStore
    store = IndexStore.open(sys.argv[1], write=True, writer="altclip index")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    store.close()
""")


def test_a_second_writer_fails_at_once_naming_the_first_or_waits_with_wait(photos, model):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        write_image(photos / "new.png", 11)
        result = index(model, "photos")
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [
            f"error: another altclip index (pid {holder.pid}) is updating {folder}",
            "hint: wait for it to finish, or pass --wait 600 to wait up to 10 minutes for it"]
    finally:
        holder.kill()
        holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    result = index(model, "photos", "--wait", "60")
    holder.wait()
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith("indexed photos: 1 added (5 files, ")


def test_a_snapshot_sees_only_committed_vectors(photos, model, loaded):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    reader = IndexStore.open(folder, identity=index_identity(loaded))
    with IndexStore.open(folder, write=True) as writer:
        before = reader.snapshot()
        writer.append_vectors(np.ones((3, writer.dim), np.float32))  # written and fsynced, not committed
        during = reader.snapshot()
        assert during.vectors.shape == before.vectors.shape == (4, writer.dim)
        assert during.count == 4 and int(during.rows.max()) < 4
        writer.commit(upserts=[(writer.key_of(photos / "x.png"), 1, 1, None, 5, None)])
        after = reader.snapshot()
        assert after.vectors.shape == (7, writer.dim) and after.count == 5
        assert during.count == 4 and during.paths_of(during.file_ids[:1])  # still its own view
        np.testing.assert_array_equal(after.vectors[5], np.ones(writer.dim, np.float32))
        for snap in (before, during, after):
            snap.close()
    reader.close()


def test_a_snapshot_cache_reuses_the_rows_until_anyone_commits(photos, model, loaded):
    """A long-lived reader (the server) reads the rows below a folder once, and again after any
    commit, by another connection or process, or after the index was rebuilt."""
    from altclip_cli.search.store import SnapshotCache

    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    cache = SnapshotCache()

    def snap(under=None):
        with IndexStore.open(folder) as store, store.snapshot(under, cache=cache) as s:
            return s.rows, s.count, s.paths_of(s.file_ids)

    rows, count, paths = snap()
    assert count == 4 and np.shares_memory(snap()[0], rows)  # no commit since: the same arrays
    below = snap(photos / "sub")
    assert below[1] == 2 and np.shares_memory(snap(photos / "sub")[0], below[0])
    assert np.shares_memory(snap()[0], rows)
    with IndexStore.open(folder, write=True) as writer:  # a commit that changes no row still counts
        writer.commit(upserts=[(writer.key_of(paths[0]), 1, 1, None, int(rows[0]), None)])
    again, count, _ = snap()
    assert not np.shares_memory(again, rows) and count == 4
    with IndexStore.open(folder, write=True) as writer:
        writer.commit(deletes=[int(i) for i in range(1, 3)])
    assert snap()[1] == 2
    assert index(model, "photos", "--rebuild").exit_code == 0  # new files: the cache opens them
    rows, count, paths = snap()
    assert count == 4 and sorted(paths) == sorted(str(p) for p in photos.rglob("*") if p.is_file())
    cache.close()


# --- compaction ------------------------------------------------------------------------------------------


def _churned(tmp_path, model) -> tuple[Path, dict]:
    """photos/ (12 images) indexed in idx/, then 3 deleted and 2 changed and indexed again: 5
    unused vectors. Returns (the index folder, {path: vector} the index must hold)."""
    os.chdir(tmp_path)
    _many_photos(tmp_path / "photos", 12)
    env = {**os.environ, **SAFE_ENV}
    assert subprocess.run(_index_cmd(model, "--index", "idx"), env=env, timeout=300).returncode == 0
    for i in (1, 5, 9):
        next((tmp_path / "photos").rglob(f"img{i:03d}.png")).unlink()
    for i in (2, 7):
        write_image(next((tmp_path / "photos").rglob(f"img{i:03d}.png")), 900 + i)
    assert subprocess.run(_index_cmd(model, "--index", "idx"), env=env, timeout=300).returncode == 0
    with IndexStore.open(tmp_path / "idx") as store:
        assert store.rows == 14 and len(rows(tmp_path / "idx")) == 9
    return tmp_path / "idx", content(tmp_path / "idx")


def test_compact_drops_the_unused_vectors_and_keeps_every_files_own(tmp_path, model):
    folder, before = _churned(tmp_path, model)
    with IndexStore.open(folder, write=True) as store:
        assert store.compact(only_if_worth=True) is None  # 5 unused: under COMPACT_MIN_UNUSED
    result = subprocess.run(_index_cmd(model, "--index", "idx", "--compact", quiet=False), capture_output=True,
                            text=True, env={**os.environ, **SAFE_ENV}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "compacted the index's vectors: 5 no longer used dropped (9 kept)" in result.stderr
    assert check_invariants(folder) == 9 and (folder / VECTORS).stat().st_size == HEADER_SIZE + 9 * 16 * 4
    after = content(folder)
    assert sorted(after) == sorted(before)
    for path, vector in before.items():
        np.testing.assert_array_equal(after[path], vector)
    assert not (folder / (VECTORS + ".new")).exists()
    with IndexStore.open(folder, write=True) as store:
        assert store.compact() == (9, 9)  # nothing unused: nothing rewritten


# The real command, SIGKILLed by itself at one step of its compaction.
COMPACT_FAULT = textwrap.dedent("""
    import os, signal, sys
    from altclip_cli.search import compaction
    step = sys.argv[1]

    def killing(name, after):
        real = getattr(compaction, name)
        def wrapped(*args, **kwargs):
            if not after:
                os.kill(os.getpid(), signal.SIGKILL)
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(compaction, name, wrapped)

    {"written": lambda: killing("commit_renumbering", False), "committed": lambda: killing("commit_renumbering", True),
     "renamed": lambda: killing("put_in_place", True)}[step]()
    from altclip_cli.cli import main
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("step", ["written", "committed", "renamed"])
def test_a_compaction_killed_at_any_step_loses_nothing(tmp_path, model, step):
    """Killed after the new file is written, after the renumbering is committed (the new file not
    yet in place), or after it is: readers see every file's own vector meanwhile, and the next
    writer finishes or undoes the compaction."""
    folder, before = _churned(tmp_path, model)
    args = _index_cmd(model, "--index", "idx", "--compact")[3:]
    proc = subprocess.run([sys.executable, "-c", COMPACT_FAULT, step, *args], env={**os.environ, **SAFE_ENV},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (folder / (VECTORS + ".new")).exists() is (step != "renamed")

    def same(got):
        assert sorted(got) == sorted(before)
        for path, vector in before.items():
            np.testing.assert_array_equal(got[path], vector)

    same(content(folder))  # a reader, before any writer came by
    with IndexStore.open(folder) as reader:  # classify --index's reader: lookup, then the vectors
        found = reader.lookup(before)
        same({p: reader.vector(found[p][2]) for p in before})
    IndexStore.open(folder, write=True).close()  # the next writer: finishes or undoes it
    assert not (folder / (VECTORS + ".new")).exists()
    committed = check_invariants(folder)
    assert committed == (14 if step == "written" else 9)
    assert (folder / VECTORS).stat().st_size == HEADER_SIZE + committed * 16 * 4
    same(content(folder))


def test_a_reader_keeps_its_view_while_another_process_compacts(tmp_path, model):
    folder, before = _churned(tmp_path, model)
    reader = IndexStore.open(folder)
    found = reader.lookup(before)
    snap = reader.snapshot()
    with IndexStore.open(folder, write=True) as writer:
        assert writer.compact() == (14, 9)
    kept = dict(zip(snap.paths_of(snap.file_ids), (np.array(snap.vectors[r]) for r in snap.rows)))
    snap.close()
    assert sorted(kept) == sorted(before) and all(np.array_equal(kept[p], v) for p, v in before.items())
    found_again = reader.lookup(before)  # the rows renumbered: the reader follows to the new file
    assert {p: r[2] for p, r in found_again.items()} != {p: r[2] for p, r in found.items()}
    assert all(np.array_equal(reader.vector(found_again[p][2]), v) for p, v in before.items())
    reader.close()


@pytest.mark.parametrize("step", ["snapshot", "open"])
def test_a_reader_that_began_before_a_rebuild_reads_the_rebuilt_index(photos, model, monkeypatch, step):
    """A reader that read the index's settings (its committed rows, and which vector file holds
    them) just before `index --rebuild` replaced the index, and opens the vector file just after:
    it reads the rebuilt index, never the new file under the old rows' numbers."""
    import altclip_cli.search.snapshot as snapshot_module
    import altclip_cli.search.store as store_module

    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    (photos / "a.png").unlink()
    (photos / "sub" / "c.png").unlink()
    module, name = (snapshot_module, "map_vectors") if step == "snapshot" else (store_module, "open_matching")
    real, rebuilt = getattr(module, name), []

    def rebuild_first(*args, **kwargs):
        if not rebuilt:  # between reading the settings and opening the vector file
            rebuilt.append(None)  # the rebuild's own opening goes straight through
            rebuilt[0] = index(model, "photos", "--rebuild")
        return real(*args, **kwargs)

    reader = IndexStore.open(folder) if step == "snapshot" else None
    monkeypatch.setattr(module, name, rebuild_first)
    reader = reader or IndexStore.open(folder)
    with reader.snapshot() as snap:
        seen = {p: np.array(snap.vectors[r]) for p, r in zip(snap.paths_of(snap.file_ids), snap.rows)}
    monkeypatch.undo()
    assert rebuilt and rebuilt[0].exit_code == 0, rebuilt and rebuilt[0].stderr
    expected = content(folder)
    assert sorted(expected) == sorted([str(photos / "b.jpg"), str(photos / "sub" / "deeper" / "d.png")])
    assert sorted(seen) == sorted(expected)
    for path, vector in expected.items():
        np.testing.assert_array_equal(seen[path], vector)
    reader.close()


# --- damaged, newer, foreign ----------------------------------------------------------------------------


def _damage(folder: Path, how: str) -> None:
    if how == "bad magic":
        with open(folder / VECTORS, "r+b") as f:
            f.write(b"NOTMAGIC")
    elif how == "bad crc":
        with open(folder / VECTORS, "r+b") as f:
            f.seek(12)
            f.write(b"\x07")
    elif how == "truncated vectors":
        with open(folder / VECTORS, "r+b") as f:
            f.truncate(HEADER_SIZE + 2 * 16 * 4)
    elif how == "missing vectors":
        (folder / VECTORS).unlink()
    elif how == "garbage database":
        for name in (INDEX_DB + "-wal", INDEX_DB + "-shm"):
            (folder / name).unlink(missing_ok=True)
        (folder / INDEX_DB).write_bytes(b"this is not a database" * 100)


@pytest.mark.parametrize("how", ["bad magic", "bad crc", "truncated vectors", "missing vectors", "garbage database"])
def test_a_damaged_index_is_an_error_with_the_way_to_rebuild(photos, model, how):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    _damage(folder, how)
    result = index(model, "photos")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: the index in {folder} is damaged: ")
    assert lines[1] == (f"hint: rebuild it with `altclip index --rebuild --index {folder} PATHS...` "
                        f"(same PATHS as before), or delete the folder {folder}")
    with pytest.raises(IndexStoreError, match="is damaged"):
        IndexStore.open(folder).snapshot().close()
    result = index(model, "photos", "--rebuild")
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith("indexed photos: 4 added (4 files, ")
    assert len(content(folder)) == 4


def test_an_index_from_a_newer_altclip_is_refused(photos, model):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    db = sqlite3.connect(folder / INDEX_DB)
    with db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    result = index(model, "photos")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: the index in {folder} was written by a newer altclip (index schema 99; this altclip reads up to {SCHEMA_VERSION})",
        f"hint: upgrade altclip (pip install -U altclip), or rebuild it with `altclip index --rebuild --index "
        f"{folder} PATHS...` (same PATHS as before), or delete the folder {folder}"]


def test_another_models_index_is_refused_naming_both(photos, model, tmp_path):
    from tiny import write_model

    other = write_model(tmp_path / "other-model", seed=1)
    assert index(model, "photos", "--index", "idx").exit_code == 0
    result = index(other, "photos", "--index", "idx")
    assert result.exit_code == 1
    ours, theirs = model_identity(str(model)), model_identity(str(other))
    assert result.stderr.splitlines()[0] == (
        f"error: the index in {tmp_path / 'idx'} was made with another model: {model} (weights {ours['weights']}, "
        f"16 dims); this run uses {other} (weights {theirs['weights']}, 16 dims)")
    assert result.stderr.splitlines()[1].startswith(f"hint: use that model (-m {model}), another --index folder")
    assert index(other, "photos").exit_code == 0  # --index auto: its own folder
    assert folder_of(other) != folder_of(model)


def test_another_precision_is_refused_when_it_would_add_vectors(photos, model, loaded):
    assert index(model, "photos").exit_code == 0
    write_image(photos / "new.png", 12)
    result = invoke("index", "photos", "-m", model, "--precision", "bf16")
    assert result.exit_code == 1
    assert "holds vectors computed at fp32 precision; this run computes at bf16" in result.stderr
    assert "hint: pass --precision fp32 to add to it" in result.stderr


# --- an index that moves with its folder ----------------------------------------------------------------


def test_an_index_inside_the_tree_stores_relative_paths_and_moves_with_it(photos, model, tmp_path):
    result = index(model, "photos", "--index", "photos/.altclip-index")
    assert result.exit_code == 0, result.stderr
    stored = rows(photos / ".altclip-index")
    assert sorted(stored) == ["../a.png", "../b.jpg", "../sub/c.png", "../sub/deeper/d.png"]
    before = content(photos / ".altclip-index")
    moved = tmp_path / "elsewhere" / "pictures"
    moved.parent.mkdir()
    photos.rename(moved)
    with IndexStore.open(moved / ".altclip-index", write=True) as store:
        summary = update_index(lambda: pytest.fail("the model was loaded"), store, [moved])
        assert (summary.unchanged, summary.changed) == (4, False)
        with store.snapshot(moved / "sub") as snap:
            assert sorted(snap.paths_of(snap.file_ids)) == [str(moved / "sub" / "c.png"),
                                                            str(moved / "sub" / "deeper" / "d.png")]
        with store.snapshot(moved) as snap:
            assert snap.count == 4
    after = content(moved / ".altclip-index")
    assert sorted(after) == sorted(p.replace(str(photos), str(moved)) for p in before)
    result = index(model, str(moved), "--index", str(moved / ".altclip-index"))
    assert summary_line(result).startswith(f"indexed {moved}: no changes (4 files, ")


def test_an_index_outside_the_tree_stores_absolute_paths(photos, model):
    assert index(model, "photos", "--index", "idx").exit_code == 0
    assert all(p.startswith(str(photos) + "/") for p in rows(Path("idx")))


# --- classify and embed --index ---------------------------------------------------------------------------


def test_classify_with_index_equals_without_and_skips_the_tower_for_indexed_images(photos, model, tower):
    assert index(model, "photos", "-b", "1").exit_code == 0
    write_image(photos / "late.png", 13)  # not in the index
    (photos / "bad.jpg").write_text("nope")
    args = ["classify", "photos", "-r", "-l", "cat", "-l", "dog", "-l", "一只猫", "-m", model, *FP32, "-b", "1"]
    tower.clear()
    plain = invoke(*args)
    assert plain.exit_code == 3 and sum(tower) == 5
    tower.clear()
    indexed = invoke(*args, "--index", "auto")
    assert indexed.exit_code == 3, indexed.stderr
    assert sum(tower) == 1  # only late.png
    assert indexed.stdout == plain.stdout
    assert indexed.stderr == plain.stderr
    assert [r["image"] for r in jsonl(indexed.stdout)][-1] == "photos/sub/deeper/d.png"
    # late.png was added, with the vector `altclip index` gives it: the next run needs no image tower.
    added = content(folder_of(model))[str(photos / "late.png")]
    tower.clear()
    assert invoke(*args, "--index", "auto").stdout == plain.stdout and sum(tower) == 0
    result = index(model, "photos", "-b", "1")  # late.png is indexed already; bad.jpg is new and fails
    assert summary_line(result).startswith(  # late.png's date, place and camera are read, without the tower
        "indexed photos: 1 failed; dates, places and cameras read from 1 photo (6 files, "), result.stderr
    shutil.rmtree(folder_of(model))
    assert index(model, "photos", "-b", "1").exit_code == 3
    np.testing.assert_array_equal(content(folder_of(model))[str(photos / "late.png")], added)


def test_embed_with_index_equals_without(photos, model, tower):
    assert index(model, "photos", "-b", "1").exit_code == 0
    st = (photos / "b.jpg").stat()
    os.utime(photos / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # changed since: not taken from the index
    tower.clear()
    plain = invoke("embed", "--image", "photos", "-r", "-m", model, *FP32, "-b", "1", "-o", "plain.npy")
    assert plain.exit_code == 0 and sum(tower) == 4
    tower.clear()
    indexed = invoke("embed", "--image", "photos", "-r", "-m", model, *FP32, "-b", "1", "-o", "indexed.npy",
                     "--index", "auto")
    assert indexed.exit_code == 0, indexed.stderr
    assert sum(tower) == 1
    np.testing.assert_array_equal(np.load("indexed.npy"), np.load("plain.npy"))
    assert Path("indexed.jsonl").read_text() == Path("plain.jsonl").read_text()
    assert rows(folder_of(model))[str(photos / "b.jpg")][0] == 4  # b.jpg's new vector, added
    tower.clear()
    again = invoke("embed", "--image", "photos", "-r", "-m", model, *FP32, "-b", "1", "-o", "again.npy",
                   "--index", "auto")
    assert again.exit_code == 0 and sum(tower) == 0
    np.testing.assert_array_equal(np.load("again.npy"), np.load("plain.npy"))


def test_additions_wait_for_no_one_and_say_so(photos, model, tower, monkeypatch):
    """Another run holding the index: the images new to it are not added, with a warning; the
    results are those of a run without --index."""
    from altclip_cli.search import reuse

    monkeypatch.setattr(reuse, "ADD_WAIT_S", 0.1)
    assert index(model, "photos", "-b", "1").exit_code == 0
    write_image(photos / "late.png", 13)
    args = ["classify", "photos", "-r", "-l", "cat", "-m", model, *FP32, "-b", "1"]
    plain = invoke(*args)
    with IndexStore.open(folder_of(model), write=True, writer="altclip index"):
        held = invoke(*args, "--index", "auto")
    assert held.exit_code == 0 and held.stdout == plain.stdout
    assert held.stderr.startswith("warning: --index: another altclip index (pid ")
    assert held.stderr.rstrip().endswith("the images new to it are not added this time (`altclip index` adds them)")
    assert str(photos / "late.png") not in rows(folder_of(model))


def test_index_of_another_precision_is_not_used(photos, model, tower):
    assert index(model, "photos").exit_code == 0
    tower.clear()
    result = invoke("classify", "photos", "-r", "-l", "cat", "-m", model, "--precision", "bf16", "--index", "auto")
    assert result.exit_code == 0
    assert sum(tower) == 4
    assert (f"warning: --index: the vectors in {folder_of(model)} were computed at fp32 precision, this run at bf16: "
            "not using them") in result.stderr.splitlines()


@pytest.mark.parametrize("command", ["classify", "embed"])
def test_an_index_of_another_model_is_not_used_with_a_warning(photos, model, tmp_path, command):
    """classify/embed --index DIR with DIR made by another model: a warning naming the index and
    both models, then the run without the index (and nothing added to it)."""
    from tiny import write_model

    other = write_model(tmp_path / "other-model", seed=1)
    assert index(model, "photos", "--index", "idx").exit_code == 0
    before = rows("idx")
    args = ["-l", "cat"] if command == "classify" else ["--image"]
    args = [command, "photos", "-r", *args, "-m", other, *FP32]
    result = invoke(*args, "--index", "idx")
    plain = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == plain.stdout
    ours, theirs = model_identity(str(model)), model_identity(str(other))
    assert result.stderr.splitlines() == [
        f"warning: --index: the index in {tmp_path / 'idx'} was made with another model: {model} "
        f"(weights {ours['weights']}, 16 dims); this run uses {other} (weights {theirs['weights']}, 16 dims): "
        "not using it"]
    assert rows("idx") == before


def test_index_option_usage(photos, model):
    result = invoke("embed", "--text", "-", "--index", "auto", "-m", model, input="x\n")
    assert result.exit_code == 2 and result.stderr.startswith("error: --index is for images")
def test_index_that_does_not_exist_yet_is_made_from_the_run(photos, model, tower):
    result = invoke("classify", "photos", "-r", "-l", "cat", "-m", model, *FP32, "--index", "new")
    assert result.exit_code == 0 and sum(tower) == 4
    assert result.stderr == ("warning: --index: there is no index in new yet; every image goes through the model, "
                             "and the images are added to a new one\n")
    tower.clear()
    again = invoke("classify", "photos", "-r", "-l", "cat", "-m", model, *FP32, "--index", "new")
    assert again.exit_code == 0 and again.stderr == "" and sum(tower) == 0 and again.stdout == result.stdout
    assert check_invariants("new") == 4


def test_the_summary_line():
    summary = UpdateSummary(added=12, updated=3, renamed=2, removed=1, failed=1, files=1234, seconds=0.84)
    assert summary.line("photos") == "indexed photos: 12 added, 3 updated, 2 renamed, 1 removed, 1 failed (1,234 files, 0.8 s)"
    assert UpdateSummary(files=1).line("a, b") == "indexed a, b: no changes (1 file, 0.0 s)"


def test_meta_records_the_model_and_settings(photos, model):
    assert index(model, "photos").exit_code == 0
    db = sqlite3.connect(folder_of(model) / INDEX_DB)
    meta = dict(db.execute("SELECT key, value FROM meta"))
    db.close()
    identity = model_identity(str(model))
    assert {k: meta[k] for k in ("schema_version", "model", "weights", "dim", "dtype", "paths", "vectors_committed",
                                  "precision", "exact_decode", "device_type")} == {
        "schema_version": "3", "model": str(model), "weights": identity["weights"], "dim": "16",
        "dtype": "float32", "paths": "absolute", "vectors_committed": "4", "precision": "fp32",
        "exact_decode": "0", "device_type": "cpu"}
    assert json.loads(json.dumps(meta))["altclip"]
