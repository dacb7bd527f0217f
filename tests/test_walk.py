"""The one folder walk (inputs/walk.py) and the one path rule of the index (paths.index_path):
classify/embed -r find what index and search find, a --sort-into folder inside the tree is not
walked, names that are not UTF-8 are skipped with a warning (in-process and through a server),
a file under a symlinked folder is one row whoever stores or looks it up, a warm server sees a
change to a symlink's target, and a server stores paths as an in-process run does."""
from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pytest

from altclip_cli.inputs.sources import expand_images
from altclip_cli.inputs.walk import walk_images
from altclip_cli.paths import default_index_folder
from altclip_cli.search.store import INDEX_DB
from test_cli import invoke, write_image

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # a name the file system holds as bytes that are not UTF-8


def stored(folder) -> tuple[str, list[str]]:
    """(the index's path mode, its stored paths, sorted)."""
    db = sqlite3.connect(Path(folder) / INDEX_DB)
    try:
        mode = db.execute("SELECT value FROM meta WHERE key = 'paths'").fetchone()[0]
        return mode, sorted(p for (p,) in db.execute("SELECT path FROM files"))
    finally:
        db.close()


def auto_index(model_dir) -> Path:
    from altclip_cli.search.update import model_identity

    return default_index_folder(model_identity(str(model_dir), progress=False)["weights"])


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """cwd = tmp_path, photos/{a.png, sub/b.png, node_modules/x.png, .cache/y.png, fifo.png (a FIFO)}."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    for sub in ("sub", "node_modules", ".cache"):
        (root / sub).mkdir(parents=True)
    write_image(root / "a.png", 1)
    write_image(root / "sub" / "b.png", 2)
    write_image(root / "node_modules" / "x.png", 3)
    write_image(root / ".cache" / "y.png", 4)
    os.mkfifo(root / "fifo.png")
    return root


# --- one walk -------------------------------------------------------------------------------------------

def test_classify_r_walks_what_index_walks(tree):
    """No node_modules, no hidden folder, no FIFO: the same files for both, and the same options."""
    indexed = sorted(rel for rel, *_x in walk_images(str(tree)).files)
    walked = [s.name for s in expand_images(["photos"], recursive=True)]
    assert indexed == ["a.png", "sub/b.png"]
    assert walked == ["photos/a.png", "photos/sub/b.png"]
    wide = [s.name for s in expand_images(["photos"], recursive=True, include_hidden=True, exclude_dirs=())]
    assert wide == ["photos/a.png", "photos/.cache/y.png", "photos/node_modules/x.png", "photos/sub/b.png"]
    assert sorted(rel for rel, *_x in walk_images(str(tree), include_hidden=True, exclude_dirs=()).files) == \
        sorted(n.removeprefix("photos/") for n in wide)


def test_classify_takes_the_walk_options(tree, tiny_model_dir):
    result = invoke("embed", "photos", "-r", "--include-hidden", "--exclude-dir", "sub", "-m", tiny_model_dir,
                    "--server", "off")
    assert result.exit_code == 0, result.output
    images = [line.split('"image": "')[1].split('"')[0] for line in result.stdout.splitlines()]
    assert images == ["photos/a.png", "photos/.cache/y.png", "photos/node_modules/x.png"]


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path):
    depth = sys.getrecursionlimit() + 50
    deep = folder = str(tmp_path / "d")
    os.mkdir(deep)
    for _ in range(depth):
        folder += "/x"
        os.mkdir(folder)
    Path(folder, "deep.png").write_bytes(b"x")
    try:
        found = [s.name for s in expand_images([str(deep)], recursive=True)]
        assert len(found) == 1 and found[0].endswith("/x/deep.png") and found[0].count("/x") == depth
    finally:  # removed bottom up (a recursive removal would meet the recursion limit too)
        os.remove(os.path.join(folder, "deep.png"))
        while folder != deep:
            os.rmdir(folder)
            folder = os.path.dirname(folder)


# --- --sort-into inside the tree --------------------------------------------------------------------------

def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_sorting_into_a_folder_inside_the_walked_tree_twice_changes_nothing(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 1)
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "b.png", 2)
    args = ["classify", ".", "-r", "-l", "cat", "-l", "dog", "--sort-into", "sorted", "-m", tiny_model_dir,
            "--server", "off"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    after_first = listing(tmp_path / "sorted")
    assert len([p for p in after_first if p.endswith(".png")]) == 2
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert listing(tmp_path / "sorted") == after_first  # no a-1.png, no link to a link
    assert "sorted/" not in second.stdout  # the sorted links are no inputs


# --- names that are not UTF-8 -----------------------------------------------------------------------------

@pytest.fixture
def odd_names(tmp_path, monkeypatch):
    """cwd = tmp_path/<not UTF-8>/ holding photos/a.png; tmp_path/plain/{a.png, <not UTF-8>/b.png,
    <not UTF-8>.png}."""
    base = tmp_path / NOT_UTF8
    (base / "photos").mkdir(parents=True)
    write_image(base / "photos" / "a.png", 1)
    plain = tmp_path / "plain"
    (plain / NOT_UTF8).mkdir(parents=True)
    write_image(plain / "a.png", 1)
    write_image(plain / NOT_UTF8 / "b.png", 2)
    write_image(plain / (NOT_UTF8 + ".png"), 3)
    monkeypatch.chdir(base)
    return plain


def test_index_and_search_skip_names_that_are_not_utf8_with_a_warning(odd_names, tiny_model_dir):
    shown = "caf\ufffd"
    for args in (["index", "photos"], ["search", "cat", "--dir", "photos", "-f", "jsonl"]):
        result = invoke(*args, "-m", tiny_model_dir, "--server", "off")
        assert result.exit_code == 0, result.output
        assert "bug in altclip" not in result.stderr and "UnicodeEncodeError" not in result.stderr
        assert f"{shown}/photos: the folder name is not valid UTF-8" in result.stderr
    # Below a UTF-8 folder: the images there are indexed, the others named and skipped.
    result = invoke("index", odd_names, "-m", tiny_model_dir, "--server", "off")
    assert result.exit_code == 0, result.output
    assert f"plain/{shown}: the folder name is not valid UTF-8" in result.stderr
    assert f"plain/{shown}.png: the file name is not valid UTF-8" in result.stderr
    assert "1 added" in result.stderr
    result = invoke("search", "cat", "--dir", odd_names, "-f", "jsonl", "-m", tiny_model_dir, "--server", "off")
    assert result.exit_code == 0 and result.stdout.count('"rank"') == 1, result.output


# --- one path rule ----------------------------------------------------------------------------------------

@pytest.fixture
def linked(tmp_path, monkeypatch):
    """cwd = tmp_path: photos/{a.png, album -> ../elsewhere/album/ (c.png)}."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "elsewhere" / "album").mkdir(parents=True)
    write_image(tmp_path / "photos" / "a.png", 1)
    write_image(tmp_path / "elsewhere" / "album" / "c.png", 3)
    os.symlink("../elsewhere/album", tmp_path / "photos" / "album")
    return tmp_path / "photos"


@pytest.mark.parametrize("given", [["photos/album/c.png"], ["photos", "-r"], ["photos/album"]])
def test_a_file_under_a_symlinked_folder_is_one_row_for_index_and_classify(linked, tiny_model_dir, given):
    result = invoke("index", "photos", "-m", tiny_model_dir, "--server", "off")
    assert result.exit_code == 0, result.output
    folder = auto_index(tiny_model_dir)
    before = stored(folder)
    assert before == ("absolute", sorted([str(linked / "a.png"), str(linked / "album" / "c.png")]))
    result = invoke("classify", *given, "-l", "cat", "-l", "dog", "--index", "auto", "-m", tiny_model_dir,
                    "--server", "off")
    assert result.exit_code == 0, result.output
    assert stored(folder) == before  # found where index put it: no second row


def test_classify_index_adds_a_new_file_where_index_would_store_it(linked, tiny_model_dir):
    result = invoke("classify", "photos", "-r", "-l", "cat", "-l", "dog", "--index", "auto", "-m", tiny_model_dir,
                    "--server", "off")
    assert result.exit_code == 0, result.output
    folder = auto_index(tiny_model_dir)
    added = stored(folder)
    result = invoke("index", "photos", "-m", tiny_model_dir, "--server", "off")
    assert result.exit_code == 0 and "no changes" in result.stderr, result.output
    assert stored(folder) == added


# --- through a warm server --------------------------------------------------------------------------------

serve = pytest.importorskip("test_serve")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("walk-serve")


@pytest.fixture(scope="module")
def server(_tiny_model_master, home):
    """A server whose ALTCLIP_HOME is home/tree/altclip (its `--index auto` lies inside home/tree)."""
    (home / "tree").mkdir()
    s = serve.start_server(_tiny_model_master, home=home / "tree")
    yield s
    assert s.stop() == 0, s.log()


def through(server, *args, home=None):
    env = {"ALTCLIP_HOME": str(home / "tree" / "altclip")} if home is not None else {}
    return invoke(*args, "--server", server.target, "--device", "cpu", env=env)


def test_through_a_server_names_that_are_not_utf8_are_skipped_with_a_warning(server, odd_names, _tiny_model_master):
    for args in (["index", "photos"], ["search", "cat", "--dir", "photos", "-f", "jsonl"]):
        result = through(server, *args, "-m", _tiny_model_master)
        assert result.exit_code == 0, result.output + server.log()[-3000:]
        assert "bug in altclip" not in result.stderr and "UnicodeEncodeError" not in result.stderr
        assert "caf\ufffd/photos: the folder name is not valid UTF-8" in result.stderr, result.stderr


def test_a_server_stores_the_paths_an_in_process_run_stores(server, home, _tiny_model_master, monkeypatch):
    """`--index auto` inside the walked folder (its ALTCLIP_HOME there): absolute paths both ways;
    an index DIR inside it: relative both ways."""
    tree = home / "tree"
    (tree / "photos").mkdir()
    write_image(tree / "photos" / "a.png", 1)
    monkeypatch.chdir(tree)
    monkeypatch.setenv("ALTCLIP_HOME", str(tree / "altclip"))
    auto = auto_index(_tiny_model_master)
    for index in ("auto", str(tree / "idx")):
        folder = auto if index == "auto" else Path(index)
        rows = {}
        for how in ("in-process", "server"):
            if how == "in-process":
                result = invoke("index", ".", "--index", index, "-m", _tiny_model_master, "--server", "off",
                                env={"ALTCLIP_HOME": str(tree / "altclip")})
            else:
                result = through(server, "index", ".", "--index", index, "-m", _tiny_model_master, home=home)
            assert result.exit_code == 0 and "1 added" in result.stderr, result.output
            rows[how] = stored(folder)
            for name in os.listdir(folder):
                os.remove(folder / name)
        assert rows["in-process"] == rows["server"], index
        assert rows["server"][0] == ("absolute" if index == "auto" else "relative")


def test_a_warm_server_sees_a_change_to_a_symlinks_target(server, tmp_path):
    from altclip_cli.serve import client

    root, outside = tmp_path / "photos", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write_image(root / "a.png", 1)
    write_image(outside / "target.png", 2)
    os.symlink(outside / "target.png", root / "link.png")
    index = str(tmp_path / "index")

    def ask():
        payload = {"query": [{"text": "a cat"}], "dir": str(root), "index": index, "top_k": 10}
        return client.post_json(server.target, "/v1/search", payload)

    first = ask()
    assert first["walked"] and first["update"]["added"] == 2
    assert not ask()["walked"]  # watched, unchanged
    write_image(outside / "target.png", 3, size=(50, 40))  # the target changes, the link does not
    changed = ask()
    assert changed["walked"] == [str(root)] and changed["update"]["updated"] == 1, changed
    assert not ask()["walked"]
    os.remove(outside / "target.png")  # the target goes: the link is broken, its row dropped
    gone = ask()
    assert gone["walked"] == [str(root)] and gone["update"]["removed"] == 1, gone
    # A symlinked folder outside the tree: its entries are watched through the link.
    (outside / "album").mkdir()
    os.symlink(outside / "album", root / "album")
    assert ask()["walked"] == [str(root / "album")]  # a new folder: walked where it is
    write_image(outside / "album" / "new.png", 4)
    grown = ask()
    assert grown["walked"] == [str(root / "album")] and grown["update"]["added"] == 1, grown


def test_the_watch_names_a_symlink_whose_target_changed(tmp_path):
    from altclip_cli.search.watch import TreeWatch

    if not TreeWatch.available():
        pytest.skip("inotify is Linux's")
    root, outside = tmp_path / "photos", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "t.png").write_bytes(b"one")
    (outside / "u.png").write_bytes(b"two")
    os.symlink(outside / "t.png", root / "link.png")
    watch = TreeWatch()
    found = walk_images(str(root), before_listing=watch.add, followed_link=watch.add_link)
    assert [rel for rel, *_x in found.files] == ["link.png"] and watch.changes() == set()
    st = os.stat(outside / "t.png")
    with open(outside / "t.png", "ab") as f:  # written to, its mtime set back
        f.write(b"+")
    os.utime(outside / "t.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert watch.changes() == {str(root / "link.png")}
    assert watch.changes() == set()  # reported once: the walk that follows watches it again
    walk_images(str(root), before_listing=watch.add, followed_link=watch.add_link)
    os.remove(root / "link.png")
    os.symlink(outside / "u.png", root / "link.png")  # retargeted: an event in the watched folder too
    assert str(root / "link.png") in watch.changes()
    watch.close()
