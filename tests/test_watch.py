"""search/watch.py: a TreeWatch sees every change below the folders it watches (and not the
reads of them), and refuses file systems whose changes may come from elsewhere."""
from __future__ import annotations

import os

import pytest

from altclip_cli.search import watch as watch_module
from altclip_cli.inputs.walk import walk_images
from altclip_cli.search.watch import TreeWatch

pytestmark = pytest.mark.skipif(not TreeWatch.available(), reason="inotify is Linux's")


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x.png", "a/y.png", "a/b/z.png"):
        (tmp_path / rel).write_bytes(b"pixels " + rel.encode())
    return tmp_path


def armed(root) -> TreeWatch:
    w = TreeWatch()
    walk_images(str(root), before_listing=w.add)
    assert w.usable, w.why_not
    assert w.folders == 3 and not w.changed()
    return w


@pytest.mark.parametrize("change", ["new file", "new folder", "write", "touch", "rename", "delete", "chmod",
                                    "delete folder"])
def test_every_change_below_the_tree_is_seen(tree, change):
    w = armed(tree)
    deep = tree / "a" / "b" / "z.png"
    if change == "new file":
        (tree / "a" / "b" / "new.png").write_bytes(b"new")
    elif change == "new folder":
        (tree / "a" / "c").mkdir()
    elif change == "write":
        with open(deep, "r+b") as f:  # in place: same size, and the mtime is set back as it was
            st = os.stat(deep)
            f.write(b"PIXELS")
        os.utime(deep, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "touch":
        os.utime(deep, ns=(0, 1_000_000_000))
    elif change == "rename":
        deep.rename(tree / "a" / "b" / "w.png")
    elif change == "delete":
        deep.unlink()
    elif change == "chmod":
        deep.chmod(0o600)
    elif change == "delete folder":
        deep.unlink()
        (tree / "a" / "b").rmdir()
    assert w.changed()
    w.close()


def test_reading_the_files_is_no_change(tree):
    w = armed(tree)
    for path in tree.rglob("*.png"):
        path.read_bytes()
    walk_images(str(tree))
    assert not w.changed()
    (tree / "x.png").write_bytes(b"changed")
    assert w.changed()
    w.close()


def test_a_file_system_that_is_not_local_is_refused(tree, monkeypatch):
    monkeypatch.setattr(watch_module, "_mount_types", lambda: {})  # every folder on an unknown file system
    w = TreeWatch()
    walk_images(str(tree), before_listing=w.add)
    assert not w.usable and "unknown file system" in w.why_not
    assert w.changed()  # not usable: the caller must walk


def test_too_many_folders_gives_up(tree):
    w = TreeWatch(max_folders=2)
    walk_images(str(tree), before_listing=w.add)
    assert not w.usable and "more than 2 folders" in w.why_not and w.changed()


def test_changes_name_where_they_happened(tree):
    w = armed(tree)
    (tree / "a" / "b" / "z.png").write_bytes(b"new pixels")
    (tree / "a" / "new").mkdir()
    (tree / "x.png").unlink()
    assert w.changes() == {str(tree / "a" / "b" / "z.png"), str(tree / "a" / "new"), str(tree / "x.png")}
    assert w.changes() == set()  # consumed
    os.utime(tree / "a", ns=(0, 0))  # a watched folder's own change names the folder
    assert w.changes() == {str(tree / "a")}
    w.close()
