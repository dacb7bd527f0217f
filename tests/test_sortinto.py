"""The sorter behind `classify --sort-into` (outputs/sortinto.py): names that never replace a file,
re-runs that change nothing, moves that lose no photo under kill -9 (at random and at each step),
two runs at once, equal copies from elsewhere (`cp -p`), another filesystem, symbolic links."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from altclip_cli.outputs import noreplace, sortinto, sortjournal
from altclip_cli.outputs.sortinto import Sorter, folder_name
from altclip_cli.outputs.sortjournal import JOURNAL_FOLDER, TMP_PREFIX


def _other_filesystem(tmp_path) -> Path | None:
    """A fresh folder on another filesystem than tmp_path (/dev/shm is usually tmpfs), or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    folder = Path(shm / f"altclip-test-{os.getpid()}-{tmp_path.name}")
    folder.mkdir()
    return folder


@pytest.fixture
def far(tmp_path):
    """A folder on another filesystem (the test is skipped where there is none)."""
    folder = _other_filesystem(tmp_path)
    if folder is None:
        pytest.skip("no second filesystem (/dev/shm) to move across")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["renameat2", "link"])
def primitive(request, monkeypatch):
    """Run the test with renameat2(RENAME_NOREPLACE), and again with the hard link + unlink fallback."""
    if request.param == "renameat2" and noreplace._renameat2 is None:
        pytest.skip("no renameat2 here")
    if request.param == "link":
        monkeypatch.setattr(noreplace, "_renameat2", None)
    return request.param


def _files(*roots) -> list[bytes]:
    """The contents of every file under roots (journals and temporaries left out), sorted."""
    found = []
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and not p.name.startswith(TMP_PREFIX) and JOURNAL_FOLDER not in p.parts:
                found.append(p.read_bytes())
    return sorted(found)


def test_name_clash_and_idempotence(tmp_path):
    src = tmp_path / "x.jpg"
    src.write_bytes(b"one")
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    (out / "t" / "x.jpg").write_bytes(b"two")
    (out / "t" / "x-1.jpg").write_bytes(b"three")
    with Sorter(out, "copy") as s:
        p = s.place(src, "t")
        assert (p.action, p.target.name) == ("copy", "x-2.jpg")
        assert s.place(src, "t").action == "already there"
    with Sorter(out, "link") as s:
        assert s.place(src, "t").target.name == "x-3.jpg"
        assert s.place(src, "t").action == "already there"
    assert not (out / JOURNAL_FOLDER).exists()  # a finished run leaves only label folders
    assert [folder_name(x) for x in ("a/b", "..", None, "_unsure", " cat. ", "猫", ".altclip-sort")] == \
        ["a_b", "_", "_unsure", "_unsure_", "cat", "猫", "_altclip-sort"]


@pytest.mark.parametrize("across", [False, True])
def test_move_keeps_a_cp_p_copy_from_another_folder(tmp_path, request, across):
    """Same name, same bytes, same mtime (cp -p, rsync -a): two photos. The second gets a name of
    its own and neither is deleted as 'the rest of an interrupted move'."""
    out = request.getfixturevalue("far") / "out" if across else tmp_path / "out"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "IMG_1.jpg", tmp_path / "b" / "IMG_1.jpg"
    first.write_bytes(b"same bytes")
    shutil.copy2(first, second)
    assert os.stat(first).st_mtime_ns == os.stat(second).st_mtime_ns
    with Sorter(out, "move") as s:
        s.place(first, "cat")
        placed = s.place(second, "cat")
    assert placed.target == out / "cat" / "IMG_1-1.jpg"
    assert sorted(p.name for p in (out / "cat").iterdir()) == ["IMG_1-1.jpg", "IMG_1.jpg"]
    assert not first.exists() and not second.exists()
    with Sorter(out, "move") as s:  # a re-run with nothing left to move removes nothing
        pass
    assert _files(out) == [b"same bytes"] * 2


def test_a_hard_link_already_at_the_target_is_already_moved(tmp_path, primitive):
    out = tmp_path / "out"
    (out / "cat").mkdir(parents=True)
    src = tmp_path / "x.jpg"
    src.write_bytes(b"photo")
    os.link(src, out / "cat" / "x.jpg")
    with Sorter(out, "move") as s:
        assert s.place(src, "cat").action == "already there"
    assert not src.exists() and (out / "cat" / "x.jpg").read_bytes() == b"photo"


def test_a_clash_on_a_name_of_255_bytes_takes_a_shorter_one(tmp_path):
    name = "é" * 125 + ".jpg"  # 254 bytes
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / name).write_bytes(b"1")
    (tmp_path / "b" / name).write_bytes(b"2")
    with Sorter(tmp_path / "out", "copy") as s:
        s.place(tmp_path / "a" / name, "cat")
        second = s.place(tmp_path / "b" / name, "cat").target
    assert second.name == "é" * 124 + "-1.jpg" and second.read_bytes() == b"2"


def test_files_inside_the_sort_folder_are_already_sorted(tmp_path):
    """A walk that reaches DIR itself (or a list naming its files) never sorts them again."""
    out = tmp_path / "out"
    photo = tmp_path / "x.jpg"
    photo.write_bytes(b"photo")
    with Sorter(out, "link") as s:
        s.place(photo, "cat")
    with Sorter(out, "copy") as s:
        s.place(photo, "cat")
    inside = sorted((out / "cat").iterdir())
    assert [p.name for p in inside] == ["x-1.jpg", "x.jpg"]
    for mode in ("link", "copy", "move"):
        with Sorter(out, mode) as s:
            for p in inside:
                assert s.place(p, "dog") == sortinto.Placement(p, p, "already sorted")
    assert not (out / "dog").exists() and sorted((out / "cat").iterdir()) == inside


@pytest.mark.parametrize("mode", ["link", "copy", "move"])
def test_a_folder_sorted_into_itself(tmp_path, mode):
    """Files directly in DIR are inputs; moving one onto its own name never removes it."""
    photo = tmp_path / "x.jpg"
    photo.write_bytes(b"photo")
    with Sorter(tmp_path, mode) as s:
        assert s.place(photo, "cat").target == tmp_path / "cat" / "x.jpg"
        again = tmp_path / "cat" / "x.jpg"
        assert s.place(again, "cat").action == "already sorted"
    assert again.read_bytes() == b"photo" and photo.exists() == (mode != "move")


def test_link_through_a_symlinked_folder_is_already_there(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.jpg").write_bytes(b"photo")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    out = tmp_path / "out"
    with Sorter(out, "link") as s:
        s.place(tmp_path / "real" / "x.jpg", "cat")
        assert s.place(tmp_path / "alias" / "x.jpg", "cat").action == "already there"
    assert [p.name for p in (out / "cat").iterdir()] == ["x.jpg"]


@pytest.mark.parametrize("across", [False, True])
def test_moving_a_relative_symlink_keeps_it_pointing_at_the_photo(tmp_path, request, across):
    out = request.getfixturevalue("far") / "out" if across else tmp_path / "out"
    (tmp_path / "photos").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes(b"photo")
    link = tmp_path / "photos" / "x.jpg"
    link.symlink_to(Path("..") / "elsewhere" / "x.jpg")
    with Sorter(out, "move") as s:
        s.place(link, "cat")
    moved = out / "cat" / "x.jpg"
    assert moved.is_symlink() and moved.read_bytes() == b"photo"
    assert not os.path.lexists(link) and (tmp_path / "elsewhere" / "x.jpg").read_bytes() == b"photo"


def test_a_name_taken_between_choosing_and_taking_it_is_never_replaced(tmp_path, monkeypatch, primitive):
    """Another writer creates the chosen name just before the rename: its file stays, and the
    photo takes the next name."""
    src = tmp_path / "x.jpg"
    src.write_bytes(b"photo")
    out = tmp_path / "out"
    real = sortjournal.rename_noreplace  # the one the journalled move takes its names with
    raced = []

    def racing(a, b, **kw):
        if not raced:
            raced.append(b)
            Path(b).write_bytes(b"another writer")
        return real(a, b, **kw)

    monkeypatch.setattr(sortjournal, "rename_noreplace", racing)
    with Sorter(out, "move") as s:
        placed = s.place(src, "cat")
    assert raced == [out / "cat" / "x.jpg"]
    assert (out / "cat" / "x.jpg").read_bytes() == b"another writer"
    assert placed.target == out / "cat" / "x-1.jpg" and placed.target.read_bytes() == b"photo"
    assert not src.exists()


def test_rename_noreplace_refuses_an_existing_name(tmp_path, primitive):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    with pytest.raises(FileExistsError):
        sortinto.rename_noreplace(a, b)
    assert a.read_bytes() == b"a" and b.read_bytes() == b"b"
    sortinto.rename_noreplace(a, tmp_path / "c")
    assert not a.exists() and (tmp_path / "c").read_bytes() == b"a"


def test_a_source_that_cannot_be_removed_leaves_no_second_copy(tmp_path, far, monkeypatch):
    """Across filesystems the copy is placed before the source is unlinked; if the unlink fails
    (a read-only source folder), the copy is taken back and the source stays."""
    src = tmp_path / "x.jpg"
    src.write_bytes(b"photo")
    real_unlink = os.unlink

    def unlink(path, *a, **k):
        if Path(path) == src:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(sortinto.os, "unlink", unlink)
    with Sorter(far / "out", "move") as s:
        with pytest.raises(PermissionError):
            s.place(src, "cat")
    assert src.read_bytes() == b"photo" and list((far / "out" / "cat").iterdir()) == []


def test_a_source_removed_by_another_run_between_link_and_unlink_stays_at_its_target(tmp_path, monkeypatch):
    """Another run may finish the same move (it sees the same file at the target and unlinks the
    source): the link's own unlink then finds no source, and the target must stay."""
    monkeypatch.setattr(noreplace, "_renameat2", None)
    src = tmp_path / "x.jpg"
    src.write_bytes(b"photo")
    real_link = os.link

    def link_then_another_run(a, b, **kw):
        real_link(a, b, **kw)
        os.unlink(a)

    monkeypatch.setattr(os, "link", link_then_another_run)
    with Sorter(tmp_path / "out", "move") as s:
        s.place(src, "cat")
    assert (tmp_path / "out" / "cat" / "x.jpg").read_bytes() == b"photo"


def test_a_source_changed_during_its_copy_is_not_removed(tmp_path, far, monkeypatch):
    src = tmp_path / "x.jpg"
    src.write_bytes(b"photo")
    real = shutil.copyfileobj

    def copy_then_write(a, b, *args):
        real(a, b, *args)
        with open(src, "ab") as f:
            f.write(b" and more")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_write)
    with Sorter(far / "out", "move") as s:
        with pytest.raises(OSError, match="changed while it was being copied"):
            s.place(src, "cat")
    assert src.read_bytes() == b"photo and more" and list((far / "out" / "cat").iterdir()) == []


def test_dry_run_plans_the_names_a_real_run_uses(tmp_path):
    for folder, data in (("a", b"1"), ("b", b"2"), ("c", b"1")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(data)
    sources = [tmp_path / f / "x.jpg" for f in "abc"]
    for mode in ("link", "copy", "move"):
        out = tmp_path / f"out-{mode}"
        with Sorter(out, mode, dry_run=True) as s:
            plan = [(p.action, p.target) for p in map(lambda x: s.place(x, "cat"), sources)]
        assert not out.exists()
        saved = {x: x.read_bytes() for x in sources}
        with Sorter(out, mode) as s:
            real = [(p.action, p.target) for p in map(lambda x: s.place(x, "cat"), sources)]
        assert plan == real
        for x, data in saved.items():
            x.write_bytes(data)
    assert [t.name for _, t in plan] == ["x.jpg", "x-1.jpg", "x-2.jpg"]


# --- two runs at once -----------------------------------------------------------------------------

def test_a_live_runs_journal_and_temporaries_are_left_alone(tmp_path):
    out = tmp_path / "out"
    with Sorter(out, "copy") as first:
        (out / "cat").mkdir()
        tmp = first._journal.temporary(out / "cat")
        tmp.write_bytes(b"half a copy")
        dead = out / "cat" / f"{TMP_PREFIX}12345-x.jpg"  # an old or dead run's leftover
        dead.write_bytes(b"stale")
        with Sorter(out, "copy"):
            pass
        assert tmp.exists() and not dead.exists()
        assert len(list((out / JOURNAL_FOLDER).glob("*.journal"))) == 1
    assert not tmp.exists() and not (out / JOURNAL_FOLDER).exists()


TWO_RUNS = r"""
import sys
from pathlib import Path
from altclip_cli.outputs.sortinto import Sorter
src, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with Sorter(out, mode) as s:
    for p in sorted(src.iterdir()):
        s.place(p, "even" if int(p.name[:4]) % 2 == 0 else "odd")
print("done", flush=True)
"""


@pytest.mark.parametrize("mode, across", [("move", False), ("move", True), ("copy", True)])
def test_two_runs_at_once_into_one_folder(tmp_path, request, mode, across):
    out = request.getfixturevalue("far") / "out" if across else tmp_path / "out"
    want = []
    for run in ("one", "two"):  # the same names, other bytes: every name clashes
        (tmp_path / run).mkdir()
        for i in range(150):
            data = os.urandom(32 * 1024) + run.encode()
            (tmp_path / run / f"{i:04d}.bin").write_bytes(data)
            want.append(data)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_RUNS, str(tmp_path / run), str(out), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run in ("one", "two")]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert stdout == "done\n", stderr
    assert _files(out) == sorted(want)
    assert not list(out.rglob(f"{TMP_PREFIX}*")) and not (out / JOURNAL_FOLDER).exists()
    if mode == "move":
        assert list((tmp_path / "one").iterdir()) == list((tmp_path / "two").iterdir()) == []


SAME_SOURCES = r"""
import sys
from pathlib import Path
from altclip_cli.outputs import noreplace, sortinto
src, out, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if how == "link":
    noreplace._renameat2 = None
with sortinto.Sorter(out, "move") as s:
    for p in sorted(src.iterdir()):
        try:
            s.place(p, "x")
        except OSError:
            pass  # moved by another run a moment before: its error, never a lost photo
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["same", "link", "across"])
def test_three_runs_moving_the_same_photos_at_once_lose_none(tmp_path, request, how):
    out = request.getfixturevalue("far") / "out" if how == "across" else tmp_path / "out"
    (tmp_path / "src").mkdir()
    want = []
    for i in range(200):
        want.append(os.urandom(8 * 1024) + i.to_bytes(4, "little"))
        (tmp_path / "src" / f"{i:04d}.bin").write_bytes(want[-1])
    cmd = [sys.executable, "-c", SAME_SOURCES, str(tmp_path / "src"), str(out), how]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert stdout == "done\n", stderr
    assert list((tmp_path / "src").iterdir()) == []
    assert sorted(set(_files(out))) == sorted(want)  # each photo at least once (a copy may be twice)


# --- kill -9 ----------------------------------------------------------------------------------------

KILL_SCRIPT = r"""
import os, signal, sys, time
from pathlib import Path
from altclip_cli.outputs import noreplace, sortinto, sortjournal
src, out, how, step, nth = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
if how == "link":  # no renameat2: a hard link, then an unlink
    noreplace._renameat2 = None
pace = 0.0002 if step == "random" else 0  # killed from outside at a random instant: not too fast
if step not in ("none", "random"):  # kill -9 right after the nth call of one step
    owner, name = {"journal": (sortinto.Journal, "begin"), "place": (sortjournal, "rename_noreplace"),
                   "copy": (sortjournal.shutil, "copyfileobj"), "link": (sortinto.os, "link"),
                   "unlink": (sortinto.os, "unlink"), "fsync": (sortinto.os, "fsync")}[step]
    real, calls = getattr(owner, name), []
    def wrapped(*a, **k):
        result = real(*a, **k)
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapped)
with sortinto.Sorter(out, "move") as s:
    for line in s.recovered:
        print(line, file=sys.stderr)
    for folder in sorted(src.iterdir()):
        for p in sorted(folder.iterdir()):
            s.place(p, "even" if p.name[:4].isdigit() and int(p.name[:4]) % 2 == 0 else "odd")
            time.sleep(pace)
print("done", flush=True)
"""


def _photos(src: Path, n: int) -> list[bytes]:
    """src/a/ with n files (the first with a name that is not UTF-8) and src/b/, a `cp -p` copy
    of a/: the same names, bytes and mtimes. Returns every file's content."""
    (src / "a").mkdir(parents=True)
    folder = os.fsencode(src / "a")
    for i in range(n):
        name = b"0000-\xff.bin" if i == 0 else f"{i:04d}.bin".encode()
        with open(os.path.join(folder, name), "wb") as f:
            f.write(os.urandom(64 * 1024) + i.to_bytes(4, "little"))
    shutil.copytree(src / "a", src / "b")  # copy2: the same mtimes
    return _files(src)


def _check_after_kill(src, out, want):
    placed = Counter(_files(src, out))
    assert not Counter(want) - placed  # nothing lost: each photo, each copy, in its old place or its new
    assert placed.total() <= len(want) + 1  # in both places at most the one the kill cut short


def _rerun_finishes(cmd, src, out, want):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.stdout == "done\n", done.stderr
    assert all(list(folder.iterdir()) == [] for folder in src.iterdir())
    assert _files(out) == want  # every photo once, the cp -p copies included
    assert not list(out.rglob(f"{TMP_PREFIX}*")) and not (out / JOURNAL_FOLDER).exists()


def _kill_target(tmp_path, request, how):
    if how == "across":
        return request.getfixturevalue("far") / "out"
    return tmp_path / "out"


@pytest.mark.parametrize("how", ["same", "link", "across"])
def test_move_killed_at_random_loses_nothing_and_a_rerun_finishes(tmp_path, request, how):
    src, out = tmp_path / "src", _kill_target(tmp_path, request, how)
    want = _photos(src, 200)
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(src), str(out), how, "random", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.rglob("*.bin"))) < 40:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < sum(len(list(f.iterdir())) for f in src.iterdir()) < 400, "killed too late to test anything"
    _check_after_kill(src, out, want)
    _rerun_finishes(cmd, src, out, want)


KILL_POINTS = [  # (how, step, nth): kill -9 right after that call
    ("same", "place", 3),  # renameat2: one step, nothing journalled
    ("link", "journal", 3), ("link", "link", 3), ("link", "fsync", 3), ("link", "unlink", 3),
    ("across", "copy", 3), ("across", "journal", 3), ("across", "place", 3), ("across", "unlink", 3),
    ("across", "fsync", 4), ("across", "place", 202),  # 202: a b/ file, the cp -p copy of a/'s first
]


@pytest.mark.parametrize("how, step, nth", KILL_POINTS)
def test_move_killed_at_each_step_loses_nothing_and_a_rerun_finishes(tmp_path, request, how, step, nth):
    src, out = tmp_path / "src", _kill_target(tmp_path, request, how)
    want = _photos(src, 120 if nth < 100 else 201)
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(src), str(out), how, step, str(nth)]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _check_after_kill(src, out, want)
    rerun = [*cmd[:-2], "none", "0"]
    _rerun_finishes(rerun, src, out, want)


# --- through `classify --sort-into` ------------------------------------------------------------------

UNSURE = ["-l", "cat", "-l", "dog", "--min-prob", "1"]  # every image unsure: one folder, _unsure


@pytest.fixture
def two_folders(tmp_path, monkeypatch):
    """cwd with a/x.png and b/x.png: two photos under one name."""
    from test_cli import write_image

    monkeypatch.chdir(tmp_path)
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "x.png", seed)
    return tmp_path


def test_classify_move_keeps_a_cp_p_copy(two_folders, model):
    from test_cli import invoke

    shutil.copy2(two_folders / "a" / "x.png", two_folders / "b" / "x.png")  # as cp -p / rsync -a make it
    data = (two_folders / "a" / "x.png").read_bytes()
    result = invoke("classify", "a", "b", *UNSURE, "--sort-into", "out", "--move", "-m", model)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (two_folders / "out" / "_unsure").iterdir()) == ["x-1.png", "x.png"]
    assert _files(two_folders / "out") == [data, data]
    assert not (two_folders / "a" / "x.png").exists() and not (two_folders / "b" / "x.png").exists()


def test_classify_move_never_replaces_a_file_made_just_before_its_rename(two_folders, model, monkeypatch):
    from test_cli import invoke

    out = two_folders / "out"
    raced = []

    def racing(real):
        def call(a, b, *args, **kw):
            if not raced and Path(os.path.abspath(b)).parent == out / "_unsure":
                raced.append(Path(b).name)
                Path(b).write_bytes(b"another writer")  # between the check for the name and the rename
            return real(a, b, *args, **kw)
        return call

    monkeypatch.setattr(os, "rename", racing(os.rename))
    monkeypatch.setattr(sortjournal, "rename_noreplace", racing(sortjournal.rename_noreplace))
    data = (two_folders / "a" / "x.png").read_bytes()
    result = invoke("classify", "a", *UNSURE, "--sort-into", "out", "--move", "-m", model)
    assert result.exit_code == 0, result.stderr
    assert raced == ["x.png"]
    assert (out / "_unsure" / "x.png").read_bytes() == b"another writer"
    assert (out / "_unsure" / "x-1.png").read_bytes() == data and not (two_folders / "a" / "x.png").exists()


def test_classify_copy_leaves_a_concurrent_runs_temporaries_alone(two_folders, model, monkeypatch):
    """Run two starts (and settles leftovers in DIR) while run one is half-way through a copy."""
    from test_cli import SAFE_ENV, invoke

    real, second = shutil.copyfileobj, []

    def copy_then_start_another_run(src, dst, *args):
        real(src, dst, *args)
        if not second and os.path.basename(dst.name).startswith(TMP_PREFIX):
            second.append(subprocess.run(
                [sys.executable, "-m", "altclip_cli", "classify", "b", *UNSURE, "--sort-into", "out", "--copy",
                 "-m", str(model)], capture_output=True, text=True, timeout=300, env={**os.environ, **SAFE_ENV}))

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_start_another_run)
    result = invoke("classify", "a", *UNSURE, "--sort-into", "out", "--copy", "-m", model)
    assert second and second[0].returncode == 0, second[0].stderr
    assert result.exit_code == 0, result.stderr
    assert _files(two_folders / "out") == _files(two_folders / "a", two_folders / "b")
    assert not list((two_folders / "out").rglob(f"{TMP_PREFIX}*"))


def test_classify_dry_run_plans_the_names_a_real_run_uses(two_folders, model):
    from test_cli import invoke

    args = ["a", "b", *UNSURE, "--sort-into", "out", "--move", "-m", model]
    plan = invoke("classify", *args, "--dry-run")
    assert plan.exit_code == 0 and not (two_folders / "out").exists()
    done = invoke("classify", *args)
    assert done.exit_code == 0
    assert plan.stderr.splitlines() == done.stderr.splitlines() == [
        "move a/x.png -> out/_unsure/x.png", "move b/x.png -> out/_unsure/x-1.png"]


@pytest.mark.parametrize("mode", ["link", "copy", "move"])
def test_classify_a_failed_placement_is_exit_code_3(two_folders, model, mode):
    from test_cli import invoke

    (two_folders / "out").mkdir()
    (two_folders / "out" / "_unsure").write_text("a file where the label folder would go")
    flag = [] if mode == "link" else [f"--{mode}"]
    result = invoke("classify", "a", *UNSURE, "--sort-into", "out", *flag, "-m", model)
    assert result.exit_code == 3
    assert result.stderr.splitlines()[0].startswith(f"error: a/x.png: cannot {mode} it into out (")
    assert result.stderr.splitlines()[-1] == "warning: 1 of 1 images failed"
    assert (two_folders / "a" / "x.png").exists()


@pytest.mark.parametrize("mode", [[], ["--copy"]])
def test_classify_a_sort_folder_inside_the_tree_changes_nothing_on_a_second_run(two_folders, model, mode):
    from test_cli import invoke

    args = [".", "-r", *UNSURE, "--sort-into", "sorted", *mode, "-m", model]
    assert invoke("classify", *args).exit_code == 0
    before = sorted(str(p.relative_to(two_folders)) for p in (two_folders / "sorted").rglob("*"))
    assert before == ["sorted/_unsure", "sorted/_unsure/x-1.png", "sorted/_unsure/x.png"]
    assert invoke("classify", *args).exit_code == 0
    assert sorted(str(p.relative_to(two_folders)) for p in (two_folders / "sorted").rglob("*")) == before


def test_ctrl_c_between_link_and_unlink_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """An exception that is not an OSError (Ctrl-C) in the middle of a move leaves its journal
    entry open: the journal is kept for the next run, which finishes the move."""
    monkeypatch.setattr(noreplace, "_renameat2", None)
    src = tmp_path / "x.jpg"
    src.write_bytes(b"photo")
    out = tmp_path / "out"
    real_unlink = os.unlink

    def interrupted(path, *a, **k):
        if Path(path) == src:
            raise KeyboardInterrupt
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with Sorter(out, "move") as s:
            s.place(src, "cat")
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert _same_inode(src, out / "cat" / "x.jpg") and len(list((out / JOURNAL_FOLDER).iterdir())) == 1
    with Sorter(out, "move") as s:
        assert s.recovered == [f"finished an interrupted move: {src} -> {out / 'cat' / 'x.jpg'}"]
    assert not src.exists() and (out / "cat" / "x.jpg").read_bytes() == b"photo"
    assert not (out / JOURNAL_FOLDER).exists()


def _same_inode(a, b):
    return os.stat(a).st_ino == os.stat(b).st_ino
