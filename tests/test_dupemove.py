"""Moving duplicates aside and putting them back (outputs/dupemove.py, behind `altclip dupes
--move-to DIR` and `--restore DIR`): kill -9 at random instants and at each step of a move and of
a restore loses no photo and a re-run finishes; never replacing a file (`cp -p` copies, a new file
at the original's name); DIR inside the tree or the tree itself; two runs at once; names that
are not UTF-8; sources that changed or vanished; another filesystem; folders gone before restore."""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from altclip_cli.outputs import dupemove, noreplace, sortjournal
from altclip_cli.outputs.dupemove import MOVED_FOLDER, TMP_PREFIX, MoveAsideError, move_aside, restore
from test_sortinto import far, primitive  # noqa: F401,F811 (fixtures: another filesystem; both no-replace primitives)


class Said:
    """A stand-in for the command's Messages: the lines, by kind."""

    def __init__(self):
        self.notes, self.warnings = [], []

    def note(self, line):
        self.notes.append(line)

    def warn(self, line):
        self.warnings.append(line)


def _tree(root: Path, n: int) -> dict[str, bytes]:
    """n photos in root, spread over nested folders, the first with a name that is not UTF-8.
    Returns {path (os.fsdecode'd): bytes}."""
    photos = {}
    for i in range(n):
        folder = root / f"f{i % 7}" / (f"g{i % 3}" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        name = b"IMG-\xff.jpg" if i == 0 else f"IMG_{i:04d}.jpg".encode()
        path = os.fsdecode(os.path.join(os.fsencode(folder), name))
        data = os.urandom(16 * 1024) + i.to_bytes(4, "little")
        with open(path, "wb") as f:
            f.write(data)
        photos[path] = data
    return photos


def _items(root: Path, photos) -> list[tuple[str, str]]:
    return [(p, os.path.relpath(p, root)) for p in sorted(photos)]


def _contents(*roots) -> Counter:
    """How many times each content is under roots as a photo (journals and temporaries left out)."""
    found = Counter()
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and not p.name.startswith(TMP_PREFIX) and MOVED_FOLDER not in p.parts:
                found[p.read_bytes()] += 1
    return found


def _at_home(photos: dict[str, bytes]) -> bool:
    return all(os.path.exists(p) and Path(p).read_bytes() == data for p, data in photos.items())


def _no_leftovers(*roots) -> bool:
    return not any(p.name.startswith(TMP_PREFIX) for root in roots for p in Path(root).rglob("*"))


def _out(tmp_path, request, how) -> Path:
    return request.getfixturevalue("far") / "out" if how == "across" else tmp_path / "out"


# --- a move and a restore ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same", "link", "across"])
def test_move_aside_then_restore_puts_every_photo_back(tmp_path, request, monkeypatch, how):
    if how == "link":
        monkeypatch.setattr(noreplace, "_renameat2", None)
    root, out = tmp_path / "tree", _out(tmp_path, request, how)
    photos = _tree(root, 30)
    summary = move_aside(_items(root, photos), out)
    assert sorted(s for s, _ in summary.moved) == sorted(photos) and not summary.skipped
    for source, where in summary.moved:  # under its path relative to the tree
        assert where == os.path.join(out, os.path.relpath(source, root))
        assert Path(where).read_bytes() == photos[source] and not os.path.lexists(source)
    assert list((out / MOVED_FOLDER).glob("*.moved")) and _no_leftovers(root, out)

    again = move_aside(_items(root, photos), out)  # a re-run: nothing to do, nothing said wrong
    assert (again.moved, again.skipped, sorted(again.already)) == ([], [], sorted(summary.moved))

    back = restore(out)
    assert sorted(back.restored) == sorted((w, s) for s, w in summary.moved) and not back.kept
    assert _at_home(photos) and _contents(out) == Counter()
    assert list(out.iterdir()) == []  # the folders the move made and its record are gone
    said = Said()
    assert restore(out, said) == dupemove.RestoreSummary()  # a second restore does nothing
    assert said.warnings == [] and _at_home(photos)


def test_a_cp_p_copy_already_in_dest_gets_its_own_name_and_stays(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 3)
    source = sorted(photos)[1]
    rel = os.path.relpath(source, root)
    (out / rel).parent.mkdir(parents=True)
    shutil.copy2(source, out / rel)  # same name, bytes and mtime: another photo all the same
    summary = move_aside([(source, rel)], out)
    assert summary.moved == [(source, os.fsdecode(out / rel)[:-4] + "-1.jpg")]
    assert (out / rel).read_bytes() == photos[source]
    back = restore(out)
    assert back.restored == [(summary.moved[0][1], source)]
    assert _at_home(photos) and (out / rel).read_bytes() == photos[source]  # the copy untouched
    assert sorted(p.name for p in (out / rel).parent.iterdir()) == [Path(rel).name]


def test_a_hard_link_of_the_photo_in_dest_is_where_it_went(tmp_path, primitive):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 2)
    source = sorted(photos)[0]
    rel = os.path.relpath(source, root)
    (out / rel).parent.mkdir(parents=True)
    os.link(source, out / rel)  # a move killed between its link and its unlink looks like this
    summary = move_aside([(source, rel)], out)
    assert summary.moved == [(source, os.fsdecode(out / rel))] and not os.path.lexists(source)
    assert restore(out).restored == [(os.fsdecode(out / rel), source)]
    assert _at_home(photos) and not (out / rel).exists()


# --- where DIR is -------------------------------------------------------------------------------------

def test_dest_that_is_the_tree_itself_is_refused_before_anything_moves(tmp_path):
    root = tmp_path / "tree"
    photos = _tree(root, 4)
    (tmp_path / "link").symlink_to(root)
    for dest in (root, tmp_path / "link"):
        with pytest.raises(MoveAsideError, match="it is the folder the photos are in"):
            move_aside(_items(root, photos), dest)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(MoveAsideError, match="not a folder"):
        move_aside(_items(root, photos), tmp_path / "file")
    with pytest.raises(MoveAsideError, match="no such folder"):
        restore(tmp_path / "nowhere")
    assert _at_home(photos) and not (root / MOVED_FOLDER).exists()


def test_dest_inside_the_tree_never_takes_its_own_photos_again(tmp_path):
    """The folder walk skips DIR; a list that names its files anyway moves none of them twice."""
    root = tmp_path / "tree"
    photos = _tree(root, 6)
    out = root / "dupes"
    first = move_aside(_items(root, photos)[:3], out)
    assert len(first.moved) == 3
    listed = [(os.fsdecode(p), os.path.relpath(p, root)) for p in out.rglob("*.jpg")]  # a careless walk
    said = Said()
    second = move_aside(listed + _items(root, photos)[3:], out, said)
    assert sorted(s for s, _ in second.skipped) == sorted(s for s, _ in listed)
    assert all("already inside" in why for _, why in second.skipped) and len(second.moved) == 3
    assert len(said.warnings) == 3 and all(any(s in w for w in said.warnings) for s, _ in listed)
    assert not list(out.glob("dupes"))  # nothing went to dupes/dupes/
    restore(out)
    assert _at_home(photos)


# --- sources that are not what was listed -------------------------------------------------------------

def test_sources_changed_vanished_or_odd_are_skipped_with_a_message(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 4)
    a, b, c, d = sorted(photos)
    listed = {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in photos}
    with open(b, "ab") as f:
        f.write(b"edited since")  # changed since it was listed
    os.unlink(c)  # gone since it was listed
    os.mkfifo(root / "pipe.jpg")
    (root / "link.jpg").symlink_to(a)
    items = [(p, os.path.relpath(p, root), listed[p]) for p in (a, b, c, d)]
    items += [(str(root / "pipe.jpg"), "pipe.jpg"), (str(root / "link.jpg"), "link.jpg"),
              (d, "../outside.jpg"), (d, "/etc/x.jpg"), (d, f"{MOVED_FOLDER}/x.jpg"), (d, "x\x00.jpg")]
    said = Said()
    summary = move_aside(items, out, said)
    why = dict((s, w) for s, w in summary.skipped if s != d)
    assert why[b] == "changed since it was listed: not moved"
    assert why[c] == "no longer there (moved or removed since it was listed): not moved"
    assert why[str(root / "pipe.jpg")] == why[str(root / "link.jpg")] == "not a regular file: not moved"
    assert [w for s, w in summary.skipped if s == d] == [
        "its relative path '../outside.jpg' is empty, absolute or climbs out: not moved",
        "its relative path '/etc/x.jpg' is empty, absolute or climbs out: not moved",
        f"its relative path '{MOVED_FOLDER}/x.jpg' would go into {MOVED_FOLDER}/: not moved",
        "a path with a NUL character: not moved"]
    assert summary.moved == [(a, os.path.join(out, os.path.relpath(a, root))), (d, os.path.join(out, os.path.relpath(d, root)))]
    assert said.warnings == [f"{s}: {w}" for s, w in summary.skipped]
    assert Path(b).read_bytes().endswith(b"edited since") and (root / "link.jpg").is_symlink()
    assert not (tmp_path / "outside.jpg").exists() and not (out.parent / "outside.jpg").exists()


def test_a_file_where_a_folder_must_be_made_skips_only_its_photos(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 14)
    out.mkdir()
    (out / "f1").write_bytes(b"a file named like a folder of the tree")
    said = Said()
    summary = move_aside(_items(root, photos), out, said)
    blocked = sorted(p for p in photos if os.path.relpath(p, root).startswith("f1" + os.sep))
    assert blocked and sorted(s for s, _ in summary.skipped) == blocked
    assert all(w.startswith(f"cannot create {out / 'f1'}") for _, w in summary.skipped)
    assert len(summary.moved) == 14 - len(blocked) and len(said.warnings) == len(blocked)
    restore(out)
    assert _at_home(photos) and (out / "f1").read_bytes().startswith(b"a file")


# --- restore against what happened since --------------------------------------------------------------

def test_restore_recreates_a_folder_that_is_gone(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 10)
    move_aside(_items(root, photos), out)
    shutil.rmtree(root)  # the user tidied the emptied folders away
    assert len(restore(out).restored) == 10 and _at_home(photos)


def test_restore_keeps_both_when_a_new_file_took_the_name(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 5)
    summary = move_aside(_items(root, photos), out)
    taken, where = summary.moved[2]
    Path(taken).write_bytes(b"a new photo with the old name")
    said = Said()
    back = restore(out, said)
    assert back.kept == [(where, taken, f"{taken} is taken by another file now (both are kept)")]
    assert len(back.restored) == 4
    assert any(taken in w and where in w for w in said.warnings)
    assert Path(taken).read_bytes() == b"a new photo with the old name" and Path(where).read_bytes() == photos[taken]
    again = restore(out)  # the record still names it: the same answer, nothing else touched
    assert again.kept == back.kept and again.restored == []
    os.rename(taken, root / "renamed.jpg")  # the user moves the new file out of the way
    assert restore(out).restored == [(where, taken)]
    assert _at_home(photos) and list(out.iterdir()) == []


def test_restore_of_a_photo_removed_from_dest_says_so_once(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 3)
    summary = move_aside(_items(root, photos), out)
    source, where = summary.moved[0]
    os.rename(where, tmp_path / "reviewed.jpg")
    said = Said()
    back = restore(out, said)
    assert back.missing == [(where, source)] and len(back.restored) == 2
    assert len(said.warnings) == 1 and where in said.warnings[0] and source in said.warnings[0]
    assert restore(out) == dupemove.RestoreSummary()


def test_restore_keeps_a_photo_whose_folder_is_now_a_file(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 3)
    summary = move_aside(_items(root, photos), out)
    source, where = summary.moved[0]
    shutil.rmtree(root / "f0")
    (root / "f0").write_bytes(b"now a file")
    said = Said()
    back = restore(out, said)
    assert [(w, s) for w, s, _ in back.kept] == [(where, source)] and back.kept[0][2].startswith("cannot create")
    assert len(back.restored) == 2 and Path(where).read_bytes() == photos[source]
    os.unlink(root / "f0")
    assert restore(out).restored == [(where, source)] and _at_home(photos)


def test_an_interrupted_run_is_settled_and_said_by_the_next(tmp_path, monkeypatch):
    """A move cut between its hard link and its unlink (Ctrl-C in the same process here) leaves
    its journal; the next run finishes the move and says so."""
    monkeypatch.setattr(noreplace, "_renameat2", None)
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 3)
    real_unlink = os.unlink

    def interrupted(path, *a, **k):
        if os.fsdecode(path) in photos:
            raise KeyboardInterrupt
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        move_aside(_items(root, photos), out)
    monkeypatch.setattr(os, "unlink", real_unlink)
    first = sorted(photos)[0]
    said = Said()
    summary = move_aside(_items(root, photos), out, said)
    where = os.path.join(out, os.path.relpath(first, root))
    assert said.notes == summary.recovered == [f"finished an interrupted move: {first} -> {where}"]
    assert summary.already == [(first, where)] and len(summary.moved) == 2
    assert len(restore(out).restored) == 3 and _at_home(photos)


def test_ctrl_c_in_a_restore_across_filesystems_then_a_rerun_says_nothing_wrong(tmp_path, far, monkeypatch):
    """The photos put back before Ctrl-C are copies (another filesystem): the next restore knows
    them from the interrupted restore's record, not as photos gone from DIR."""
    root, out = tmp_path / "tree", far / "out"
    photos = _tree(root, 8)
    move_aside(_items(root, photos), out)
    real_move, calls = sortjournal.Journal.move, []

    def move_then_ctrl_c(self, *a):
        real_move(self, *a)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(sortjournal.Journal, "move", move_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        restore(out)
    monkeypatch.setattr(sortjournal.Journal, "move", real_move)
    said = Said()
    back = restore(out, said)
    assert len(back.restored) == 5 and not back.missing and not back.kept and said.warnings == []
    assert _at_home(photos) and list(out.iterdir()) == []


def test_a_restore_while_another_runs_is_refused(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 2)
    move_aside(_items(root, photos), out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(MoveAsideError, match="another run is moving photos into it or restoring them"):
            restore(out)
    finally:
        os.close(fd)
    assert len(restore(out).restored) == 2


# --- two runs at once ------------------------------------------------------------------------------------

RUN = r"""
import os, sys
from altclip_cli.outputs import dupemove, noreplace, sortjournal
src, out, how = sys.argv[1:4]
if how == "link":
    noreplace._renameat2 = None
paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
s = dupemove.move_aside([(p, os.path.relpath(p, src)) for p in paths], out)
print(len(s.moved), len(s.already), len(s.skipped), flush=True)
"""


@pytest.mark.parametrize("how, which", [("same", "two trees"), ("across", "two trees"),
                                        ("same", "one tree"), ("link", "one tree"), ("across", "one tree")])
def test_two_runs_at_once_lose_nothing_and_restore_puts_all_back(tmp_path, request, how, which):
    """Two trees with the same relative names (every name in DIR clashes), or one tree moved by
    two runs at once."""
    out = _out(tmp_path, request, how)
    roots = [tmp_path / "one", tmp_path / "two"] if which == "two trees" else [tmp_path / "one"] * 2
    photos = {}
    for root in dict.fromkeys(roots):
        photos.update(_tree(root, 80))
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(root), str(out), how],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for root in roots]
    counts = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        counts.append([int(x) for x in stdout.split()])
    if which == "two trees":  # one after the other (a run waits for the one moving into DIR)
        assert counts == [[80, 0, 0], [80, 0, 0]]
    else:  # the second finds every photo it listed moved by the first
        assert sorted(counts)[1] == [80, 0, 0] and sorted(counts)[0][::2] == [0, 0]
    assert _contents(*roots) == Counter() and _contents(out) == Counter(photos.values())
    restore(out)
    assert _at_home(photos) and _contents(out) == Counter() and _no_leftovers(*roots, out)


# --- kill -9 ---------------------------------------------------------------------------------------------

KILL = r"""
import os, signal, sys, time
from altclip_cli.outputs import dupemove, noreplace, sortjournal
what, src, out, how, step, nth = sys.argv[1:7]
nth = int(nth)
if how == "link":  # no renameat2: a hard link, then an unlink
    noreplace._renameat2 = None
if step not in ("none", "random"):  # kill -9 right after the nth call of one step
    owner, name = {"journal": (sortjournal.Journal, "begin"), "place": (sortjournal, "rename_noreplace"),
                   "copy": (sortjournal.shutil, "copyfileobj"), "link": (os, "link"), "unlink": (os, "unlink"),
                   "fsync": (os, "fsync"), "record": (dupemove, "write_record"), "rename": (os, "rename")}[step]
    real, calls = getattr(owner, name), []
    def wrapped(*a, **k):
        result = real(*a, **k)
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapped)
if step == "random":  # killed from outside at a random instant: not too fast
    real_move = sortjournal.Journal.move
    def paced(self, *a):
        real_move(self, *a)
        time.sleep(0.0005)
    sortjournal.Journal.move = paced
if what == "move":
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
    s = dupemove.move_aside([(p, os.path.relpath(p, src)) for p in paths], out)
    print("moved", len(s.moved), "already", len(s.already), "skipped", s.skipped, flush=True)
else:
    s = dupemove.restore(out)
    print("restored", len(s.restored), "kept", s.kept, "missing", s.missing, flush=True)
"""


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-c", KILL, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _kill_when(args, count, at_least: int):
    """Start the run and kill -9 it once count() reaches at_least (or it ends)."""
    proc = subprocess.Popen([sys.executable, "-c", KILL, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and count() < at_least:
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _check_none_lost(root, out, photos):
    """Each photo at its old place or its new one (at least once); in both only the one cut short."""
    found = _contents(root, out)
    assert not Counter(photos.values()) - found
    assert found.total() <= len(photos) + 1


def _in(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.jpg")) if folder.exists() else 0


@pytest.mark.parametrize("how", ["same", "link", "across"])
def test_killed_at_random_moments_of_a_move_and_a_restore_loses_nothing(tmp_path, request, how):
    """300 photos: the move killed twice at random, finished by a re-run; the restore killed
    twice at random, finished by a re-run: every photo's bytes exactly once, at its old path."""
    root, out = tmp_path / "tree", _out(tmp_path, request, how)
    photos = _tree(root, 300)
    rng = random.Random()
    for _ in range(2):
        _kill_when(["move", root, out, how, "random", 0], lambda: _in(out), rng.randrange(10, 240))
        _check_none_lost(root, out, photos)
    assert 0 < _in(out) < 300, "killed too late to test anything"
    done = _run("move", root, out, how, "none", 0)
    assert done.stdout.startswith("moved ") and "skipped []" in done.stdout, done.stderr
    assert _contents(root) == Counter() and _contents(out) == Counter(photos.values())
    for _ in range(2):
        _kill_when(["restore", root, out, how, "random", 0], lambda: _in(root), rng.randrange(10, 240))
        _check_none_lost(root, out, photos)
    assert 0 < _in(root) < 300, "killed too late to test anything"
    done = _run("restore", root, out, how, "none", 0)
    assert done.returncode == 0 and "kept [] missing []" in done.stdout, done.stderr
    assert _at_home(photos) and _contents(root) == Counter(photos.values()) and _contents(out) == Counter()
    assert _no_leftovers(root, out) and list(out.iterdir()) == []
    assert _run("restore", root, out, how, "none", 0).stdout == "restored 0 kept [] missing []\n"


KILL_POINTS = [  # (how, step, nth): kill -9 right after that call, in the move and in the restore
    ("same", "journal", 3), ("same", "place", 3), ("same", "rename", 1),  # rename: the journal kept as a record
    ("link", "journal", 3), ("link", "link", 3), ("link", "fsync", 3), ("link", "unlink", 3),
    ("across", "copy", 3), ("across", "journal", 3), ("across", "place", 3), ("across", "unlink", 3),
    ("across", "fsync", 4),
]


@pytest.mark.parametrize("how, step, nth", KILL_POINTS)
def test_killed_at_each_step_of_a_move_and_a_restore_loses_nothing(tmp_path, request, how, step, nth):
    root, out = tmp_path / "tree", _out(tmp_path, request, how)
    photos = _tree(root, 20)
    killed = _run("move", root, out, how, step, nth)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _check_none_lost(root, out, photos)
    done = _run("move", root, out, how, "none", 0)
    assert "skipped []" in done.stdout, done.stderr
    assert _contents(root) == Counter() and _contents(out) == Counter(photos.values())
    killed = _run("restore", root, out, how, step, nth)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _check_none_lost(root, out, photos)
    done = _run("restore", root, out, how, "none", 0)
    assert done.returncode == 0 and "kept [] missing []" in done.stdout, done.stderr
    assert _at_home(photos) and _contents(out) == Counter() and _no_leftovers(root, out)


def test_killed_while_a_restore_rewrites_its_record(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    photos = _tree(root, 10)
    assert _run("move", root, out, "same", "none", 0).returncode == 0
    record = next((out / MOVED_FOLDER).glob("*.moved"))
    (record.parent / f".{record.name}.tmp-99999").write_bytes(b"{}")  # a rewrite killed before its rename
    killed = _run("restore", root, out, "same", "record", 1)
    assert killed.returncode == -signal.SIGKILL and _at_home(photos)
    assert _run("restore", root, out, "same", "none", 0).stdout == "restored 0 kept [] missing []\n"
    assert _contents(out) == Counter() and not (out / MOVED_FOLDER).exists()
